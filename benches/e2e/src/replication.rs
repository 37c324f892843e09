//! What Raft costs the metastore's writes: a flush's block registration
//! (`AddBlocks`) committed by one replica alone, by three (all in this
//! process, on loopback, each with its own redb files on the same disk),
//! and, for reference, by the unreplicated metastore. Then how long the
//! cluster goes without a leader when its leader dies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_fixtures::level0_block;
use ember_metastore::raft::{self, ClusterConfig, Replicated};
use ember_metastore::{InProcess, Metastore, MetastoreClient};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use super::ingest::Latency;

const TOKEN: &str = "bench-cluster-token";
/// Registrations in a row, one at a time (a lone segment writer's flushes).
const SEQUENTIAL: usize = 1000;
/// Writers registering at once (segment writers' shards flushing together).
const CONCURRENT: usize = 32;
const PER_WRITER: usize = 100;
const FAILOVERS: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub struct CommitRun {
    pub setup: String,
    pub sequential: Latency,
    pub sequential_per_second: f64,
    pub concurrent: Latency,
    pub concurrent_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicationReport {
    pub commits: Vec<CommitRun>,
    /// Seconds from a leader's death to the first command committed by its
    /// successor, one per failover.
    pub failover_seconds: Vec<f64>,
}

struct Replica {
    replicated: Replicated,
    server: JoinHandle<()>,
}

pub async fn run() -> anyhow::Result<ReplicationReport> {
    let dir = tempfile::tempdir()?;
    let mut commits = Vec::new();

    let alone = Arc::new(Metastore::open(&dir.path().join("unreplicated.redb"))?);
    commits.push(measure("unreplicated (no Raft)", Arc::new(InProcess(alone)), 0).await?);

    for n in [1u64, 3] {
        let (replicas, _) = start_cluster(&dir.path().join(format!("r{n}")), n).await?;
        let leader = leader_of(&replicas).await?;
        let client: Arc<dyn MetastoreClient> = Arc::new(replicas[leader].replicated.clone());
        let offset = n as usize * 1_000_000;
        commits.push(
            measure(
                &format!("Raft, {n} replica(s), on the leader"),
                client,
                offset,
            )
            .await?,
        );
        if n == 3 {
            // A follower forwards each command to the leader once.
            let follower = (leader + 1) % replicas.len();
            let client: Arc<dyn MetastoreClient> = Arc::new(replicas[follower].replicated.clone());
            commits.push(
                measure(
                    "Raft, 3 replicas, through a follower",
                    client,
                    offset + 500_000,
                )
                .await?,
            );
        }
        for r in replicas {
            stop(r).await;
        }
    }

    let failover_seconds = failovers(&dir.path().join("failover")).await?;
    Ok(ReplicationReport {
        commits,
        failover_seconds,
    })
}

/// Registers one block per command: first one at a time, then from
/// `CONCURRENT` writers at once.
async fn measure(
    setup: &str,
    client: Arc<dyn MetastoreClient>,
    offset: usize,
) -> anyhow::Result<CommitRun> {
    info!(setup, "metastore commits");
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    let started = Instant::now();
    for i in 0..SEQUENTIAL {
        let t = Instant::now();
        client
            .add_blocks(vec![level0_block(offset + i, 50)])
            .await?;
        latencies.push(t.elapsed());
    }
    let sequential_per_second = SEQUENTIAL as f64 / started.elapsed().as_secs_f64();
    let sequential = Latency::of(latencies);

    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..CONCURRENT {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(PER_WRITER);
            for i in 0..PER_WRITER {
                let id = offset + SEQUENTIAL + w * PER_WRITER + i;
                let t = Instant::now();
                client.add_blocks(vec![level0_block(id, 50)]).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for w in writers {
        latencies.extend(w.await??);
    }
    let concurrent_per_second = latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok(CommitRun {
        setup: setup.to_string(),
        sequential,
        sequential_per_second,
        concurrent: Latency::of(latencies),
        concurrent_per_second,
    })
}

/// Kills the leader of three replicas `FAILOVERS` times (restarting it from
/// its files after each), timing until a survivor commits a command.
async fn failovers(dir: &std::path::Path) -> anyhow::Result<Vec<f64>> {
    let (mut replicas, peers) = start_cluster(dir, 3).await?;
    let mut out = Vec::new();
    for round in 0..FAILOVERS {
        let leader = leader_of(&replicas).await?;
        let dead = replicas.remove(leader);
        let id = dead.replicated.raft().metrics().borrow().id;
        let killed = Instant::now();
        stop(dead).await;
        let survivor: Arc<dyn MetastoreClient> = Arc::new(replicas[0].replicated.clone());
        let block = level0_block(9_000_000 + round, 50);
        loop {
            match survivor.add_blocks(vec![block.clone()]).await {
                Ok(()) => break,
                Err(_) if killed.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => anyhow::bail!("no leader a minute after the old one died: {e}"),
            }
        }
        let seconds = killed.elapsed().as_secs_f64();
        info!(round, seconds, "failover");
        out.push(seconds);
        let listener = TcpListener::bind(peer_addr(&peers[&id])).await?;
        replicas.push(start_replica(id, &dir.join(format!("r{id}")), listener, &peers).await?);
    }
    for r in replicas {
        stop(r).await;
    }
    Ok(out)
}

async fn start_cluster(
    dir: &std::path::Path,
    n: u64,
) -> anyhow::Result<(Vec<Replica>, BTreeMap<u64, String>)> {
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=n {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        peers.insert(id, format!("http://{}", listener.local_addr()?));
        listeners.push((id, listener));
    }
    let mut replicas = Vec::new();
    for (id, listener) in listeners {
        replicas.push(start_replica(id, &dir.join(format!("r{id}")), listener, &peers).await?);
    }
    Ok((replicas, peers))
}

async fn start_replica(
    id: u64,
    dir: &std::path::Path,
    listener: TcpListener,
    peers: &BTreeMap<u64, String>,
) -> anyhow::Result<Replica> {
    std::fs::create_dir_all(dir)?;
    let metastore = Arc::new(Metastore::open(&dir.join("metastore.redb"))?);
    let cluster = ClusterConfig {
        node_id: id,
        peers: peers.clone(),
        client: ember_engine::cluster_call::ClusterClient::new(TOKEN),
    };
    let replicated = raft::start(dir, metastore, &cluster).await?;
    let app = replicated.router();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Replica { replicated, server })
}

async fn stop(replica: Replica) {
    let _ = replica.replicated.raft().shutdown().await;
    replica.server.abort();
    let _ = replica.server.await;
}

/// The index in `replicas` of the one that leads, once one does.
async fn leader_of(replicas: &[Replica]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(i) = replicas.iter().position(|r| r.replicated.is_leader()) {
            return Ok(i);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("no leader within 30 s")
}

fn peer_addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

pub fn markdown(r: &ReplicationReport) -> String {
    let mut out = String::from(
        "| setup | one at a time: p50 / p99 ms | commands/s | 32 writers at once: p50 / p99 ms | commands/s |\n| --- | --- | --- | --- | --- |\n",
    );
    for c in &r.commits {
        out += &format!(
            "| {} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:.0} |\n",
            c.setup,
            c.sequential.p50_ms,
            c.sequential.p99_ms,
            c.sequential_per_second,
            c.concurrent.p50_ms,
            c.concurrent.p99_ms,
            c.concurrent_per_second
        );
    }
    let failovers: Vec<String> = r
        .failover_seconds
        .iter()
        .map(|s| format!("{s:.2} s"))
        .collect();
    out += &format!(
        "\nLeader killed, until a survivor commits a command: {}.\n",
        failovers.join(", ")
    );
    out
}
