//! What a replicated metastore keeps on disk over a long run: three
//! `ember serve` processes with every role and a metastore replica each,
//! over one shared object store, take the production shape's pushes at the
//! agents' own pace (one profile per series every `--interval-s`, agents
//! spread over the three) while compaction runs; every few minutes each
//! replica's index file (`metastore.redb`), Raft log (`raft.redb`) and
//! latest snapshot are measured. Snapshots and log purging should keep them
//! flat once compaction's retirements balance the new blocks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::info;

use super::production;
use super::queries::TENANT;
use super::server::Server;
use super::{ingest, BenchArgs};

const TOKEN: &str = "bench-cluster-token";
const REPLICAS: u64 = 3;

/// Bytes on disk (allocated blocks): redb sets a file's length ahead of
/// what it writes, and the holes take no disk, so lengths are kept too.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaSize {
    pub metastore_bytes: u64,
    pub raft_log_bytes: u64,
    pub raft_log_length: u64,
    pub snapshot_bytes: u64,
    pub applied_index: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub minute: f64,
    pub replicas: Vec<ReplicaSize>,
    pub blocks_by_level: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GrowthReport {
    pub minutes: u64,
    pub series: usize,
    pub compaction_levels: String,
    pub samples: Vec<Sample>,
    pub pushes: usize,
    pub failures: usize,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<GrowthReport> {
    let out = args.out.join("cluster-growth");
    std::fs::create_dir_all(&out)?;
    let minutes = args.cluster_growth_minutes;
    info!(
        "cluster growth: {} replicas, {} series pushing for {minutes} min",
        REPLICAS, args.production_series
    );
    let g = production::generate(args, &out)?;
    let servers = start(args, &out).await?;
    let bases: Vec<String> = servers.iter().map(|s| s.http.clone()).collect();

    let period = Duration::from_secs(args.interval_s.max(1) as u64);
    let (requests, series) = (g.requests.clone(), args.production_series);
    let pushes = tokio::spawn(async move {
        let duration = Duration::from_secs(minutes * 60);
        ingest::push_steady(&bases, TENANT, requests, series, period, duration).await
    });
    let mut report = GrowthReport {
        minutes,
        series: args.production_series,
        compaction_levels: args.production_compaction_levels.clone(),
        ..GrowthReport::default()
    };
    let started = Instant::now();
    let every = Duration::from_secs(args.cluster_growth_sample_seconds.max(1));
    while !pushes.is_finished() {
        tokio::time::sleep(every.min(Duration::from_secs(minutes * 60 + 5))).await;
        let sample = measure(&servers, started).await?;
        info!(
            minute = format!("{:.0}", sample.minute),
            metastore_mb = format!("{:.1}", sample.replicas[0].metastore_bytes as f64 / 1e6),
            raft_log_mb = format!("{:.1}", sample.replicas[0].raft_log_bytes as f64 / 1e6),
            applied = sample.replicas[0].applied_index,
            "cluster growth"
        );
        report.samples.push(sample);
    }
    let load = pushes.await?;
    report.pushes = load.latencies.len();
    report.failures = load.failures.len();
    report.samples.push(measure(&servers, started).await?);
    for s in servers {
        s.stop()?;
    }
    std::fs::write(
        args.out.join("cluster_growth.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("cluster_growth.md"), markdown(&report))?;
    Ok(report)
}

/// Three processes, each every role and a replica, over one bucket.
async fn start(args: &BenchArgs, out: &Path) -> anyhow::Result<Vec<Server>> {
    let bucket = out.join("bucket");
    std::fs::create_dir_all(&bucket)?;
    let ports = (1..=REPLICAS)
        .map(|_| free_port())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=http://127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let workers = production::compaction_workers(args).to_string();
    let mut servers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let dir = out.join(format!("replica{}", i + 1));
        std::fs::create_dir_all(&dir)?;
        let extra = production::server_args(&[
            "--object-store-url",
            &format!("file://{}", bucket.display()),
            "--metastore-listen-addr",
            &format!("127.0.0.1:{port}"),
            "--metastore-peers",
            &peers,
            "--node-id",
            &(i + 1).to_string(),
            "--cluster-token",
            TOKEN,
            "--compaction-workers",
            &workers,
            "--compaction-levels",
            &args.production_compaction_levels,
        ]);
        servers.push(Server::start(&dir, &extra).await?);
    }
    Ok(servers)
}

async fn measure(servers: &[Server], started: Instant) -> anyhow::Result<Sample> {
    let mut sample = Sample {
        minute: started.elapsed().as_secs_f64() / 60.0,
        ..Sample::default()
    };
    for s in servers {
        let m = s.metrics().await?;
        let meta = |name: &str| std::fs::metadata(s.data_dir.join(name)).ok();
        let on_disk = |name: &str| meta(name).map_or(0, |m| m.blocks() * 512);
        sample.replicas.push(ReplicaSize {
            metastore_bytes: on_disk("metastore.redb"),
            raft_log_bytes: on_disk("raft.redb"),
            raft_log_length: meta("raft.redb").map_or(0, |m| m.len()),
            snapshot_bytes: on_disk("raft-snapshot"),
            applied_index: m
                .get("ember_metastore_raft_applied_index")
                .copied()
                .unwrap_or_default(),
        });
        if m.get("ember_metastore_raft_leader").copied() == Some(1.0) {
            sample.blocks_by_level = production::blocks_by_level(&m);
        }
    }
    Ok(sample)
}

pub fn markdown(r: &GrowthReport) -> String {
    let mut md = format!(
        "# A replicated metastore over {} min\n\n{} replicas (every role in each), {} series \
         pushing one profile every interval spread over them, compaction levels {}; {} pushes, \
         {} failed. Sizes are on disk (allocated blocks); raft.redb's length, holes included, \
         in brackets.\n\n| minute | metastore.redb (MB, each replica) | raft.redb (MB) | \
         snapshot (MB) | applied index | blocks |\n| --- | --- | --- | --- | --- | --- |\n",
        r.minutes, REPLICAS, r.series, r.compaction_levels, r.pushes, r.failures
    );
    let mb = |v: &[u64]| {
        v.iter()
            .map(|b| format!("{:.1}", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for s in &r.samples {
        let pick = |f: fn(&ReplicaSize) -> u64| s.replicas.iter().map(f).collect::<Vec<_>>();
        let applied = s
            .replicas
            .iter()
            .map(|r| format!("{:.0}", r.applied_index))
            .collect::<Vec<_>>()
            .join(" / ");
        let blocks = s
            .blocks_by_level
            .iter()
            .map(|(l, n)| format!("L{l}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            md,
            "| {:.0} | {} | {} [{}] | {} | {applied} | {blocks} |",
            s.minute,
            mb(&pick(|r| r.metastore_bytes)),
            mb(&pick(|r| r.raft_log_bytes)),
            mb(&pick(|r| r.raft_log_length)),
            mb(&pick(|r| r.snapshot_bytes)),
        );
    }
    md
}
