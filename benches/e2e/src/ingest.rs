//! Pushes the workload over push.v1 (Connect, protobuf) and times every
//! request to its acknowledgement.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::workload::Request;
use ember::http_client::Client;

pub const PUSH_PATH: &str = "/push.v1.PusherService/Push";

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        Self {
            count: samples.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// What a set of pushes saw.
#[derive(Default)]
pub struct PushOutcome {
    /// Each acknowledged push's accepted attempt, sent to acknowledged.
    pub latencies: Vec<Duration>,
    /// Each acknowledged push from its first attempt, refusals included.
    pub with_retries: Vec<Duration>,
    /// Attempts refused with 429 (and retried).
    pub refusals: usize,
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

impl PushOutcome {
    fn record(&mut self, pushed: Result<Pushed, String>) {
        match pushed {
            Ok(p) => {
                self.latencies.push(p.ack);
                self.with_retries.push(p.whole);
                self.refusals += p.refusals;
            }
            Err(e) => self.failures.push(e),
        }
    }

    fn merge(&mut self, other: PushOutcome) {
        self.latencies.extend(other.latencies);
        self.with_retries.extend(other.with_retries);
        self.refusals += other.refusals;
        self.failures.extend(other.failures);
    }

    /// The outcomes of pushing tasks, merged.
    async fn of_tasks(tasks: Vec<tokio::task::JoinHandle<PushOutcome>>, start: Instant) -> Self {
        let mut outcome = PushOutcome::default();
        for t in tasks {
            match t.await {
                Ok(o) => outcome.merge(o),
                Err(e) => outcome.failures.push(format!("pushing task: {e}")),
            }
        }
        outcome.elapsed = start.elapsed();
        outcome
    }
}

/// One acknowledged push.
struct Pushed {
    ack: Duration,
    whole: Duration,
    refusals: usize,
}

/// Attempts at one push before it counts as failed: the server refuses
/// (429) only while it is at capacity, so a retry soon finds room.
const MAX_ATTEMPTS: usize = 30;
/// The server's Retry-After.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Pushes `r` until it is acknowledged, waiting out each 429 as Alloy's
/// pyroscope.write does.
async fn push_one(client: &Client, url: &str, tenant: &str, r: &Request) -> Result<Pushed, String> {
    let first = Instant::now();
    for refusals in 0..MAX_ATTEMPTS {
        let t = Instant::now();
        match client
            .post(url, tenant, "application/proto", r.body.clone())
            .await
        {
            Ok((200, _)) => {
                return Ok(Pushed {
                    ack: t.elapsed(),
                    whole: first.elapsed(),
                    refusals,
                })
            }
            Ok((429, _)) => tokio::time::sleep(RETRY_AFTER).await,
            Ok((status, body)) => {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("refused {MAX_ATTEMPTS} times in a row"))
}

/// Every request once, by `clients` concurrent clients taking them in order.
pub async fn push_all(
    base: &str,
    tenant: &str,
    requests: Arc<Vec<Request>>,
    clients: usize,
) -> PushOutcome {
    let url = format!("{base}{PUSH_PATH}");
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let progress = {
        let (done, total) = (done.clone(), requests.len());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let d = done.load(Ordering::Relaxed);
                tracing::info!("ingest: {d}/{total} requests acknowledged");
                if d >= total {
                    break;
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (client, url, tenant, requests, next, done) = (
            Client::new(),
            url.clone(),
            tenant.to_string(),
            requests.clone(),
            next.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut outcome = PushOutcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(r) = requests.get(i) else { break };
                outcome.record(push_one(&client, &url, &tenant, r).await);
                done.fetch_add(1, Ordering::Relaxed);
            }
            outcome
        }));
    }
    let outcome = PushOutcome::of_tasks(tasks, start).await;
    progress.abort();
    outcome
}

/// One client alone, a push at a time, each after the server's flush window
/// has passed: the latency a lone agent sees.
pub async fn push_lone(
    base: &str,
    tenant: &str,
    requests: &[Request],
    gap: Duration,
) -> PushOutcome {
    let url = format!("{base}{PUSH_PATH}");
    let client = Client::new();
    let start = Instant::now();
    let mut outcome = PushOutcome::default();
    for r in requests {
        tokio::time::sleep(gap).await;
        outcome.record(push_one(&client, &url, tenant, r).await);
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// `clients` agents each pushing a request every `period` for `duration`,
/// agent `c` to `bases[c mod n]`: a steady load whose latency is compared
/// with and without queries.
pub async fn push_steady(
    bases: &[String],
    tenant: &str,
    requests: Arc<Vec<Request>>,
    clients: usize,
    period: Duration,
    duration: Duration,
) -> PushOutcome {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients.max(1) {
        let (client, url, tenant, requests, stop) = (
            Client::new(),
            format!("{}{PUSH_PATH}", bases[c % bases.len()]),
            tenant.to_string(),
            requests.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Agents are spread over the period, not in lockstep.
            tokio::time::sleep(period * c as u32 / clients.max(1) as u32).await;
            let mut ticker = tokio::time::interval(period);
            let mut outcome = PushOutcome::default();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let Some(r) = requests.get(i % requests.len().max(1)) else {
                    break;
                };
                outcome.record(push_one(&client, &url, &tenant, r).await);
                i += clients;
            }
            outcome
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    PushOutcome::of_tasks(tasks, start).await
}
