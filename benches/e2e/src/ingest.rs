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

pub struct PushOutcome {
    pub latencies: Vec<Duration>,
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

async fn push_one(
    client: &Client,
    url: &str,
    tenant: &str,
    r: &Request,
) -> Result<Duration, String> {
    let t = Instant::now();
    match client
        .post(url, tenant, "application/proto", r.body.clone())
        .await
    {
        Ok((200, _)) => Ok(t.elapsed()),
        Ok((status, body)) => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
        Err(e) => Err(e.to_string()),
    }
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
            let mut latencies = Vec::new();
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(r) = requests.get(i) else { break };
                match push_one(&client, &url, &tenant, r).await {
                    Ok(d) => latencies.push(d),
                    Err(e) => failures.push(e),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (latencies, failures)
        }));
    }
    let mut outcome = PushOutcome {
        latencies: Vec::new(),
        failures: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        if let Ok((l, f)) = t.await {
            outcome.latencies.extend(l);
            outcome.failures.extend(f);
        }
    }
    outcome.elapsed = start.elapsed();
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
    let mut outcome = PushOutcome {
        latencies: Vec::new(),
        failures: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for r in requests {
        tokio::time::sleep(gap).await;
        match push_one(&client, &url, tenant, r).await {
            Ok(d) => outcome.latencies.push(d),
            Err(e) => outcome.failures.push(e),
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// `clients` agents each pushing a request every `period` for `duration`:
/// a steady load whose latency is compared with and without queries.
pub async fn push_steady(
    base: &str,
    tenant: &str,
    requests: Arc<Vec<Request>>,
    clients: usize,
    period: Duration,
    duration: Duration,
) -> PushOutcome {
    let url = format!("{base}{PUSH_PATH}");
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients.max(1) {
        let (client, url, tenant, requests, stop) = (
            Client::new(),
            url.clone(),
            tenant.to_string(),
            requests.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Agents are spread over the period, not in lockstep.
            tokio::time::sleep(period * c as u32 / clients.max(1) as u32).await;
            let mut ticker = tokio::time::interval(period);
            let (mut latencies, mut failures) = (Vec::new(), Vec::new());
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let Some(r) = requests.get(i % requests.len().max(1)) else {
                    break;
                };
                match push_one(&client, &url, &tenant, r).await {
                    Ok(d) => latencies.push(d),
                    Err(e) => failures.push(e),
                }
                i += clients;
            }
            (latencies, failures)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcome = PushOutcome {
        latencies: Vec::new(),
        failures: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        if let Ok((l, f)) = t.await {
            outcome.latencies.extend(l);
            outcome.failures.extend(f);
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}
