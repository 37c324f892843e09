//! `ember-bench`: the end-to-end benchmark. Generates a workload from the
//! recorded profiles, pushes it through a real `ember serve` it starts,
//! queries it over Flight SQL and the Pyroscope query API, runs the same
//! aggregation in the peers on the same data, and writes `report.json`,
//! `report.md` and PNG charts. A crate of its own so that the server binary
//! carries none of its plotting, fonts or peers.

mod cluster_growth;
mod export;
mod history;
mod ingest;
mod job_memory;
mod labels;
mod lookup;
mod peers;
mod production;
mod queries;
mod replay;
mod replication;
mod report;
mod server;
mod workload;

pub(crate) use ember_engine::profile::now_nanos;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Int64Type, TimestampNanosecondType, UInt64Type};
use ember_distributor::formats::pprof::FlatProfile;
use ember_distributor::normalise::{normalise, validate_labels, Destination};
use serde::Serialize;
use tracing::info;

use ingest::Latency;
use queries::{Call, FlameQuery, QueryRun, TENANT};
use server::Server;

/// The end-to-end benchmark against a server it starts, and the peers
/// (DuckDB, chDB, DataFusion) on the same data. See BENCHMARKS.md.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "ember-bench")]
pub struct BenchArgs {
    /// The `ember` binary to benchmark (by default the one built beside
    /// this benchmark).
    #[arg(long, env = "EMBER_BIN")]
    ember: Option<PathBuf>,
    /// Where the data, the Parquet export and the report go (emptied first).
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The recorded profiles the workload is drawn from.
    #[arg(long, env = "EMBER_FIXTURES", default_value = "../shared/fixtures")]
    fixtures: PathBuf,
    #[arg(long, default_value_t = 8)]
    services: usize,
    #[arg(long, default_value_t = 8)]
    series_per_service: usize,
    /// Samples to generate, as Ember stores them (one per stack, profile
    /// type and profile).
    #[arg(long, default_value_t = 24_000_000)]
    samples: u64,
    /// Seconds of simulated time between two profiles of a series.
    #[arg(long, default_value_t = 10)]
    interval_s: i64,
    /// Series per push request (agents such as Alloy batch them).
    #[arg(long, default_value_t = 16)]
    series_per_request: usize,
    /// Concurrent clients for the full-load ingest.
    #[arg(long, default_value_t = 128)]
    clients: usize,
    /// Flame graph sizes to measure, in stored samples.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    scales: Vec<u64>,
    /// Warm runs of each query.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seconds of each half of the mixed workload.
    #[arg(long, default_value_t = 20)]
    mixed_seconds: u64,
    /// Index sizes for the metastore lookup.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    metastore_blocks: Vec<usize>,
    /// Python with duckdb and chdb; empty to skip those peers.
    #[arg(long, default_value = ".venv/bin/python")]
    python: String,
    #[arg(long, default_value = "benches/e2e/peers.py")]
    peers_script: PathBuf,
    /// Lone-client pushes for the idle ack latency.
    #[arg(long, default_value_t = 40)]
    lone_pushes: usize,
    /// Series of the label calls' tenant (LabelValues over this many
    /// series); 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    label_series: usize,
    /// Series of the production-shaped run (one agent each, one profile
    /// per request); 0 skips it.
    #[arg(long, default_value_t = 32)]
    production_series: usize,
    /// Minutes of current time the production-shaped run covers.
    #[arg(long, default_value_t = 60)]
    production_minutes: i64,
    /// Compaction thresholds of the production-shaped run, as
    /// `--compaction-levels` takes them (Pyroscope v2's by default; small
    /// ones let a short run reach level 2 without waiting 12 min).
    #[arg(long, default_value = "20:36,10:720,10:10800")]
    production_compaction_levels: String,
    /// Compaction workers of the production-shaped run's server (one per
    /// CPU, as `ember serve` has by default, when not given).
    #[arg(long)]
    production_compaction_workers: Option<usize>,
    /// Minutes of the production-shaped run's agents pushing at their own
    /// pace (one profile per series every `--interval-s`, in real time) on
    /// a fresh server, for the write-to-first-compaction lag at the
    /// production rate; 0 skips it.
    #[arg(long, default_value_t = 5)]
    production_paced_minutes: u64,
    /// An argument for every `ember serve` of the flat-out run, repeatable:
    /// `--server-arg=--object-store-url --server-arg=s3://bucket/prefix`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Only the production-shaped run (writes production.md/json).
    #[arg(long)]
    production_only: bool,
    /// Only the replicated metastore's size over a long run: three
    /// processes with every role take `--production-series` agents' pushes
    /// at their own pace for `--cluster-growth-minutes` (writes
    /// cluster_growth.md/json).
    #[arg(long)]
    cluster_growth_only: bool,
    #[arg(long, default_value_t = 60)]
    cluster_growth_minutes: u64,
    /// Only the cold flame graphs over a long history: `--history-hours`
    /// of `--production-series` agents (one profile every `--interval-s`)
    /// written as blocks and compacted offline, then the last hour, day
    /// and week queried cold (writes history.md/json).
    #[arg(long)]
    history_only: bool,
    #[arg(long, default_value_t = 24)]
    history_hours: i64,
    /// Seconds between two measurements of the replicas' files.
    #[arg(long, default_value_t = 300)]
    cluster_growth_sample_seconds: u64,
    /// Compaction jobs whose peak memory to measure, as SAMPLES:STACKS
    /// (20 source blocks each); empty to skip.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "500000:10000,5000000:10000,50000000:10000,5000000:1000000"
    )]
    compaction_jobs: Vec<String>,
    /// Only the label calls over `--label-series` series (writes
    /// labels.md).
    #[arg(long)]
    labels_only: bool,
    /// Only the compaction job measurements (writes compaction_jobs.md).
    #[arg(long)]
    compaction_jobs_only: bool,
    /// Only the metastore's commit latency unreplicated and with 1 and 3
    /// Raft replicas, and leader failover (writes replication.md/json).
    #[arg(long)]
    metastore_commits_only: bool,
    /// Only the ingest and storage figures of the default run (writes
    /// report.md/json without queries or peers).
    #[arg(long)]
    ingest_only: bool,
    /// Only the write path in this process, no server: replays the
    /// requests in this file (writing the first `--replay-requests` of the
    /// workload there first if it is missing).
    #[arg(long)]
    replay: Option<PathBuf>,
    #[arg(long, default_value_t = 400)]
    replay_requests: usize,
    /// With `--replay`: write on a second thread, as the server does.
    #[arg(long)]
    replay_split: bool,
    #[arg(long, hide = true)]
    compaction_job_prepare: Option<String>,
    #[arg(long, hide = true)]
    compaction_job_run: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: String,
    pub config: String,
    pub workload: WorkloadReport,
    pub ingest: IngestReport,
    pub storage: StorageReport,
    pub queries: Vec<QueryRun>,
    pub flame_queries: Vec<FlameQuery>,
    pub peers: Vec<peers::PeerRun>,
    pub mixed: MixedReport,
    pub memory_limit: MemoryLimitReport,
    pub metastore: Vec<lookup::LookupRun>,
    pub label_queries: Vec<QueryRun>,
    pub production: Option<production::ProductionReport>,
    pub compaction_jobs: Vec<job_memory::JobMemoryRun>,
    pub checks: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct WorkloadReport {
    pub series: usize,
    pub ticks: usize,
    pub simulated_hours: f64,
    pub requests: usize,
    pub profiles: usize,
    pub pprof_values: u64,
    pub stored_samples: u64,
    pub request_bytes: u64,
    pub pprof_gzip_bytes: u64,
    pub generate_seconds: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct IngestReport {
    pub clients: usize,
    pub seconds: f64,
    pub server_cpu_seconds: f64,
    pub profiles_per_second: f64,
    pub samples_per_second: f64,
    pub samples_per_cpu_second: f64,
    pub mb_per_second: f64,
    pub failures: usize,
    /// Attempts refused with 429 under full load (each retried).
    pub refusals: usize,
    /// Under full load: the accepted attempt, sent to acknowledged.
    pub under_load: Latency,
    /// Under full load: from a push's first attempt to its acknowledgement.
    pub under_load_with_retries: Latency,
    pub lone: Latency,
    pub flushes: f64,
    pub puts: f64,
    pub puts_per_second_per_shard: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct StorageReport {
    pub object_bytes: u64,
    pub bytes_per_sample: f64,
    pub pprof_gzip_bytes_per_sample: f64,
    pub ratio_to_gzip_pprof: f64,
    pub export_normalised_bytes: u64,
    pub export_denormalised_bytes: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct MixedReport {
    pub clients: usize,
    pub alone: Latency,
    pub with_queries: Latency,
    pub queries_run: usize,
    pub p99_change_percent: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct MemoryLimitReport {
    pub limit_bytes: usize,
    pub query: String,
    pub error: Option<String>,
    pub healthy_after: bool,
    pub small_query_after: bool,
}

fn main() -> anyhow::Result<()> {
    ember::allocator::no_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = <BenchArgs as clap::Parser>::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

/// The `ember` binary the benchmark starts.
fn ember_binary(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    let path = match &args.ember {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("ember"),
    };
    anyhow::ensure!(
        path.is_file(),
        "no ember binary at {}: build it (cargo build --release --bin ember) or pass --ember",
        path.display()
    );
    Ok(path)
}

pub(crate) const SHARDS: u32 = 4;
pub(crate) const FLUSH_MS: u64 = 500;

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    // The children of the compaction job measurement.
    if let Some(spec) = &args.compaction_job_prepare {
        return job_memory::prepare(spec, &args.out).await;
    }
    if args.compaction_job_run {
        let run = job_memory::run(&args.out).await?;
        println!("{}", serde_json::to_string(&run)?);
        return Ok(());
    }
    if let Some(path) = &args.replay {
        replay::dump(&args, path, args.replay_requests)?;
        return replay::run(path, args.replay_split);
    }
    server::use_binary(ember_binary(&args)?);
    let started = Instant::now();
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("emptying {}", args.out.display()))?;
    }
    std::fs::create_dir_all(&args.out)?;
    let args = BenchArgs {
        out: args.out.canonicalize()?,
        ..args
    };
    let mut report = Report {
        machine: machine(),
        config: format!("{args:?}"),
        ..Report::default()
    };

    if args.labels_only {
        let runs = label_calls(&args, &mut report).await?;
        std::fs::write(args.out.join("labels.md"), report::label_table(&runs))?;
        info!(
            "label calls measured: {}",
            args.out.join("labels.md").display()
        );
        return Ok(());
    }
    if args.metastore_commits_only {
        let r = replication::run().await?;
        std::fs::write(args.out.join("replication.md"), replication::markdown(&r))?;
        std::fs::write(
            args.out.join("replication.json"),
            serde_json::to_string_pretty(&r)?,
        )?;
        info!(
            "metastore commits measured: {}",
            args.out.join("replication.md").display()
        );
        return Ok(());
    }
    if args.compaction_jobs_only {
        let runs = job_memory::run_all(&args.out, &args.compaction_jobs)?;
        std::fs::write(
            args.out.join("compaction_jobs.md"),
            job_memory::markdown(&runs),
        )?;
        info!(
            "compaction jobs measured: {}",
            args.out.join("compaction_jobs.md").display()
        );
        return Ok(());
    }
    if args.cluster_growth_only {
        let r = cluster_growth::run(&args).await?;
        info!(
            "cluster growth measured over {} min: {}",
            r.minutes,
            args.out.join("cluster_growth.md").display()
        );
        return Ok(());
    }
    if args.history_only {
        let r = history::run(&args).await?;
        info!(
            "history of {} hours measured in {:.0} s: {}",
            r.hours,
            started.elapsed().as_secs_f64(),
            args.out.join("history.md").display()
        );
        return Ok(());
    }
    if args.production_only {
        let p = production::run(&args).await?;
        info!(
            "production shape done in {:.0} s: {}",
            started.elapsed().as_secs_f64(),
            args.out.join("production.md").display()
        );
        report.production = Some(p);
        return Ok(());
    }
    info!("generating the workload");
    let generated = generate(&args)?;
    report.workload = generated.report;
    let requests = Arc::new(generated.requests);

    let data_dir = args.out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let server_args = server_args(&args);
    let mut server = Server::start(&data_dir, &server_args).await?;

    info!("lone client: {} pushes", args.lone_pushes);
    let lone = ingest::push_lone(
        &server.http,
        "lone",
        &generated.lone,
        Duration::from_millis(FLUSH_MS + 50),
    )
    .await;
    anyhow::ensure!(
        lone.failures.is_empty(),
        "lone pushes failed: {:?}",
        lone.failures.first()
    );
    report.ingest.lone = Latency::of(lone.latencies);

    info!(
        "full load: {} requests by {} clients",
        requests.len(),
        args.clients
    );
    let m0 = server.metrics().await?;
    let cpu0 = server.cpu_seconds()?;
    let load = ingest::push_all(&server.http, TENANT, requests.clone(), args.clients).await;
    let cpu1 = server.cpu_seconds()?;
    let m1 = server.metrics().await?;
    anyhow::ensure!(
        load.failures.is_empty(),
        "{} pushes failed, first: {:?}",
        load.failures.len(),
        load.failures.first()
    );
    let delta = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);

    let truth = stored_series(&server).await?;
    report.workload.stored_samples = truth.iter().map(|s| s.samples).sum();
    let secs = load.elapsed.as_secs_f64();
    let w = &report.workload;
    report.ingest = IngestReport {
        clients: args.clients,
        seconds: secs,
        server_cpu_seconds: cpu1 - cpu0,
        profiles_per_second: w.profiles as f64 / secs,
        samples_per_second: w.stored_samples as f64 / secs,
        samples_per_cpu_second: w.stored_samples as f64 / (cpu1 - cpu0).max(1e-9),
        mb_per_second: w.request_bytes as f64 / secs / 1e6,
        failures: load.failures.len(),
        refusals: load.refusals,
        under_load: Latency::of(load.latencies),
        under_load_with_retries: Latency::of(load.with_retries),
        flushes: delta("ember_segment_flushes_total"),
        puts: delta("ember_object_store_requests_total{operation=\"put\"}"),
        puts_per_second_per_shard: delta("ember_object_store_requests_total{operation=\"put\"}")
            / secs
            / SHARDS as f64,
        ..std::mem::take(&mut report.ingest)
    };
    check_against_export(&truth, &generated.exported, &mut report.checks)?;

    let object_bytes = server::dir_bytes(&data_dir.join("objects"));
    let stored = report.workload.stored_samples.max(1) as f64;
    report.storage = StorageReport {
        object_bytes,
        bytes_per_sample: object_bytes as f64 / stored,
        pprof_gzip_bytes_per_sample: report.workload.pprof_gzip_bytes as f64 / stored,
        ratio_to_gzip_pprof: object_bytes as f64 / report.workload.pprof_gzip_bytes.max(1) as f64,
        export_normalised_bytes: server::dir_bytes(&generated.paths.normalised_dir),
        export_denormalised_bytes: server::dir_bytes(&generated.paths.denormalised_dir),
    };

    if args.ingest_only {
        report::write(&args.out, &report)?;
        info!("ingest measured: {}", args.out.join("report.md").display());
        return Ok(());
    }
    let flame = flame_queries(&server, &truth, &args.scales).await?;
    report.flame_queries = flame.clone();
    for q in &flame {
        let run = queries::measure(
            &mut server,
            &q.name,
            &Call::Sql(q.sql()),
            q.samples,
            args.repeats,
        )
        .await?;
        match run.root_total {
            Some(t) if t == q.total => report.checks.push(format!(
                "{}: flame graph root {t} equals the stored total",
                q.name
            )),
            other => anyhow::bail!(
                "{}: flame graph root {other:?}, stored total {}",
                q.name,
                q.total
            ),
        }
        report.queries.push(run);
    }
    for (name, sql) in other_queries(&flame) {
        let call = Call::Sql(sql);
        report
            .queries
            .push(queries::measure(&mut server, &name, &call, 0, args.repeats).await?);
    }
    for (name, call, q) in query_api_calls(&flame) {
        let run = queries::measure(&mut server, &name, &call, q.samples, args.repeats).await?;
        match run.root_total {
            Some(t) if t == q.total => report
                .checks
                .push(format!("{name}: total {t} equals the stored total")),
            other => anyhow::bail!("{name}: total {other:?}, stored total {}", q.total),
        }
        report.queries.push(run);
    }

    info!("peers: DataFusion");
    report
        .peers
        .extend(peers::datafusion_group_by(&generated.paths, &flame, args.repeats).await?);
    if !args.python.is_empty() {
        info!("peers: DuckDB and chDB");
        report.peers.extend(peers::python_peers(
            &PathBuf::from(&args.python),
            &args.peers_script,
            &args.out,
            &generated.paths,
            &flame,
            args.repeats,
        )?);
    }
    for p in &report.peers {
        let want = flame.iter().find(|q| q.name == p.query).map(|q| q.total);
        anyhow::ensure!(
            want == Some(p.total),
            "{} {} {}: total {} but Ember stored {:?}",
            p.engine,
            p.shape,
            p.query,
            p.total,
            want
        );
    }
    report.checks.push(format!(
        "{} peer runs: every total equals Ember's",
        report.peers.len()
    ));

    info!(
        "mixed workload: {} s alone, {} s with queries",
        args.mixed_seconds, args.mixed_seconds
    );
    report.mixed = mixed(&server, &generated.steady, &flame, args.mixed_seconds).await?;

    info!("memory limit");
    server.stop()?;
    // Room for ordinary queries, far less than every value of the store.
    let limit = (report.workload.stored_samples as usize * 2).clamp(1 << 20, 32 << 20);
    report.memory_limit = memory_limit(&data_dir, &server_args, limit).await?;

    for &blocks in &args.metastore_blocks {
        info!("metastore lookup over {blocks} blocks");
        report.metastore.push(lookup::run(blocks, 1000)?);
    }

    if args.label_series > 0 {
        report.label_queries = label_calls(&args, &mut report).await?;
    }

    if args.production_series > 0 {
        report.production = Some(production::run(&args).await?);
    }
    report.compaction_jobs = job_memory::run_all(&args.out, &args.compaction_jobs)?;
    report::write(&args.out, &report)?;
    info!(
        "bench done in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        args.out.join("report.md").display()
    );
    Ok(())
}

/// How the benchmark's servers run: 4 shards, a 500 ms flush window.
fn server_args(args: &BenchArgs) -> Vec<String> {
    let mut out = vec![
        "--shards".to_string(),
        SHARDS.to_string(),
        "--flush-interval-ms".to_string(),
        FLUSH_MS.to_string(),
    ];
    out.extend(args.server_args.iter().cloned());
    out
}

/// The label calls over a tenant of `--label-series` series, on a server
/// of their own.
async fn label_calls(args: &BenchArgs, report: &mut Report) -> anyhow::Result<Vec<QueryRun>> {
    info!("label calls over {} series", args.label_series);
    let dir = args.out.join("labels");
    std::fs::create_dir_all(&dir)?;
    let server_args = server_args(args);
    let mut server = Server::start(&dir, &server_args).await?;
    let templates = workload::load_templates(&args.fixtures)?;
    let template = templates.first().context("no template profile")?;
    let (runs, checks) =
        labels::run(&mut server, template, args.label_series, args.repeats).await?;
    server.stop()?;
    report.checks.extend(checks);
    Ok(runs)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} x {cpu}")
}

struct Generated {
    report: WorkloadReport,
    requests: Vec<workload::Request>,
    lone: Vec<workload::Request>,
    steady: Arc<Vec<workload::Request>>,
    paths: export::ExportPaths,
    /// (service, profile type) -> (stored samples, total value) exported.
    exported: BTreeMap<(String, String), (u64, i64)>,
}

/// The default run's workload, as the flags shape it.
fn workload_config(args: &BenchArgs) -> workload::WorkloadConfig {
    let interval = args.interval_s * 1_000_000_000;
    workload::WorkloadConfig {
        services: args.services,
        series_per_service: args.series_per_service,
        target_samples: args.samples,
        interval_nanos: interval,
        series_per_request: args.series_per_request,
        // Whole hours ago, so that the data sits in fixed index partitions.
        start_nanos: (now_nanos() / interval - 24 * 3600 / args.interval_s) * interval,
        seed: 42,
    }
}

fn generate(args: &BenchArgs) -> anyhow::Result<Generated> {
    let t = Instant::now();
    let templates = workload::load_templates(&args.fixtures)?;
    let names: Vec<&str> = templates.iter().map(|t| t.name.as_str()).collect();
    info!("templates: {}", names.join(", "));
    let config = workload_config(args);
    let all = workload::series(&config, &templates);
    let mut rng = workload::Rng::new(config.seed);
    let mut exporter = export::Exporter::create(&args.out.join("export"))?;
    let mut exported: BTreeMap<(String, String), (u64, i64)> = BTreeMap::new();
    let mut report = WorkloadReport {
        series: all.len(),
        ..WorkloadReport::default()
    };
    let mut requests = Vec::new();
    let mut tick = 0;
    let mut samples = 0u64;
    while samples < config.target_samples {
        let profiles = workload::tick_profiles(&config, &templates, &all, tick, &mut rng);
        for (i, p, _) in &profiles {
            let dest = Destination {
                tenant: TENANT.into(),
                labels: validate_labels(all[*i].labels.clone())?,
                received_at_nanos: p.time_nanos,
                limits: Default::default(),
            };
            for n in normalise(&FlatProfile::of(p), &dest)? {
                let e = exported
                    .entry((n.service_name().to_string(), n.profile_type.clone()))
                    .or_default();
                e.0 += n.samples.len() as u64;
                samples += n.samples.len() as u64;
                e.1 += n.total();
                exporter.add(&n)?;
            }
        }
        for r in workload::tick_requests(&config, &all, &profiles) {
            report.requests += 1;
            report.profiles += r.profiles;
            report.pprof_values += r.values;
            report.request_bytes += r.body.len() as u64;
            report.pprof_gzip_bytes += r.pprof_bytes as u64;
            requests.push(r);
        }
        tick += 1;
        if tick % 50 == 0 {
            info!(
                "generated {tick} ticks, {samples} of {} samples",
                config.target_samples
            );
        }
    }
    report.ticks = tick;
    report.simulated_hours = (tick as i64 * args.interval_s) as f64 / 3600.0;
    // Pushes outside the measured data: one series per request, as a lone
    // agent sends, to another tenant; and a steady load on later ticks.
    let single = workload::WorkloadConfig {
        series_per_request: 1,
        ..config.clone()
    };
    let extra = workload::tick_profiles(&single, &templates, &all, tick, &mut rng);
    let lone: Vec<_> = workload::tick_requests(&single, &all, &extra)
        .into_iter()
        .cycle()
        .take(args.lone_pushes)
        .collect();
    let mut steady = Vec::new();
    for k in 1..=4 {
        let p = workload::tick_profiles(&single, &templates, &all, tick + k, &mut rng);
        steady.extend(workload::tick_requests(&single, &all, &p));
    }
    let paths = exporter.finish()?;
    report.generate_seconds = t.elapsed().as_secs_f64();
    Ok(Generated {
        report,
        requests,
        lone,
        steady: Arc::new(steady),
        paths,
        exported,
    })
}

/// What Ember stored, per series profile: (service, type, time, samples, total).
pub(crate) struct StoredProfile {
    service: String,
    profile_type: String,
    time: i64,
    samples: u64,
    total: i64,
}

pub(crate) async fn stored_series(server: &Server) -> anyhow::Result<Vec<StoredProfile>> {
    let batches = queries::rows(
        server,
        "SELECT service_name, profile_type, time, samples, total FROM profiles ORDER BY time",
    )
    .await?;
    let mut out = Vec::new();
    for b in &batches {
        let service = b.column(0).as_string::<i32>();
        let ty = b.column(1).as_string::<i32>();
        let time = b.column(2).as_primitive::<TimestampNanosecondType>();
        let samples = b.column(3).as_primitive::<UInt64Type>();
        let total = b.column(4).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            if !time.is_valid(i) {
                continue;
            }
            out.push(StoredProfile {
                service: service.value(i).to_string(),
                profile_type: ty.value(i).to_string(),
                time: time.value(i),
                samples: samples.value(i),
                total: total.value(i),
            });
        }
    }
    Ok(out)
}

/// Ember must hold exactly what was exported for the peers.
fn check_against_export(
    stored: &[StoredProfile],
    exported: &BTreeMap<(String, String), (u64, i64)>,
    checks: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut got: BTreeMap<(String, String), (u64, i64)> = BTreeMap::new();
    for p in stored {
        let e = got
            .entry((p.service.clone(), p.profile_type.clone()))
            .or_default();
        e.0 += p.samples;
        e.1 += p.total;
    }
    anyhow::ensure!(
        &got == exported,
        "stored samples and totals differ from the export: stored {got:?}, exported {exported:?}"
    );
    checks.push(format!(
        "{} (service, profile type) pairs: stored samples and totals equal the export",
        got.len()
    ));
    Ok(())
}

/// The flame graphs to time: every service of the busiest profile type at
/// each scale (ranges from the start holding that many samples), the whole
/// range, and one service over its last hour and its whole range.
pub(crate) async fn flame_queries(
    _server: &Server,
    stored: &[StoredProfile],
    scales: &[u64],
) -> anyhow::Result<Vec<FlameQuery>> {
    let mut by_type: BTreeMap<&str, u64> = BTreeMap::new();
    for p in stored {
        *by_type.entry(&p.profile_type).or_default() += p.samples;
    }
    let ty = by_type
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(t, _)| t.to_string())
        .context("nothing stored")?;
    let of_type: Vec<&StoredProfile> = stored.iter().filter(|p| p.profile_type == ty).collect();
    let start = of_type.first().map(|p| p.time).unwrap_or_default();
    let end = of_type.last().map(|p| p.time).unwrap_or_default();
    let range = |service: Option<&str>, from: i64, to: i64, name: String| {
        let ps = of_type
            .iter()
            .filter(|p| service.is_none_or(|s| p.service == s) && p.time >= from && p.time <= to);
        let (samples, total) = ps.fold((0, 0), |(n, t), p| (n + p.samples, t + p.total));
        FlameQuery {
            name,
            profile_type: ty.clone(),
            service_name: service.map(str::to_string),
            start_ns: from,
            end_ns: to,
            samples,
            total,
        }
    };
    let mut out = Vec::new();
    for &scale in scales {
        let mut cumulative = 0;
        let Some(at) = of_type.iter().find(|p| {
            cumulative += p.samples;
            cumulative >= scale
        }) else {
            continue;
        };
        out.push(range(
            None,
            start,
            at.time,
            format!("all services, {}", human(scale)),
        ));
    }
    out.push(range(None, start, end, "all services, whole range".into()));
    let mut per_service: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &of_type {
        *per_service.entry(&p.service).or_default() += p.samples;
    }
    if let Some((service, _)) = per_service.iter().max_by_key(|(_, n)| **n) {
        let hour = 3600 * 1_000_000_000;
        out.push(range(
            Some(service),
            end - hour,
            end,
            format!("{service}, last hour"),
        ));
        out.push(range(
            Some(service),
            start,
            end,
            format!("{service}, whole range"),
        ));
    }
    Ok(out)
}

fn human(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{}M samples", n / 1_000_000)
    } else if n >= 1000 {
        format!("{}k samples", n / 1000)
    } else {
        format!("{n} samples")
    }
}

/// A time series, a series listing and the other profile functions for
/// the busiest service: `pprof()` is SelectMergeProfile's engine path,
/// `series()` SelectSeries' and `label_values()` LabelValues'.
fn other_queries(flame: &[FlameQuery]) -> Vec<(String, String)> {
    let Some(q) = flame.iter().rev().find(|q| q.service_name.is_some()) else {
        return Vec::new();
    };
    let service = q.service_name.clone().unwrap_or_default();
    let args = format!(
        "'{}', '{{service_name=\"{service}\"}}', {}, {}",
        q.profile_type,
        q.start_ns / 1_000_000,
        q.end_ns / 1_000_000
    );
    vec![
        (
            format!("{service}, time series (1 min steps)"),
            format!(
                "SELECT date_bin(INTERVAL '1 minute', time) AS t, sum(total) AS v FROM profiles \
                 WHERE service_name = '{service}' AND profile_type = '{}' GROUP BY 1 ORDER BY 1",
                q.profile_type
            ),
        ),
        (
            "series of every service (label sets)".to_string(),
            "SELECT DISTINCT service_name, labels FROM profiles".to_string(),
        ),
        (
            format!("{}: pprof() (SelectMergeProfile)", q.name),
            format!("SELECT profile FROM pprof({args})"),
        ),
        (
            format!("{}: series() by pod, 15 s steps (SelectSeries)", q.name),
            format!("SELECT * FROM series({args}, 15, 'pod')"),
        ),
        (
            "label_values('service_name') (LabelValues)".to_string(),
            "SELECT value FROM label_values('service_name', '{}', 0, 9999999999999)".to_string(),
        ),
    ]
}

/// Grafana's calls through Pyroscope's query API (Connect, protobuf) over
/// the flame graph ranges of each size: the flame graph and the merged
/// profile with Grafana's default `max_nodes`, and the time series by
/// service at Grafana's resolution. Each total must be the stored one.
fn query_api_calls(flame: &[FlameQuery]) -> Vec<(String, Call, &FlameQuery)> {
    use queries::GRAFANA_MAX_NODES;
    let mut calls = Vec::new();
    for q in flame.iter().filter(|q| q.service_name.is_none()) {
        calls.push((
            format!("{}: SelectMergeStacktraces", q.name),
            Call::select_merge_stacktraces(q, GRAFANA_MAX_NODES),
            q,
        ));
        calls.push((
            format!("{}: SelectMergeProfile", q.name),
            Call::select_merge_profile(q, GRAFANA_MAX_NODES),
            q,
        ));
        calls.push((
            format!("{}: SelectSeries by service", q.name),
            Call::select_series(q, "service_name"),
            q,
        ));
    }
    calls
}

/// Ingest latency of a steady load alone, then with a loop of the heaviest
/// flame graph running beside it.
async fn mixed(
    server: &Server,
    steady: &Arc<Vec<workload::Request>>,
    flame: &[FlameQuery],
    seconds: u64,
) -> anyhow::Result<MixedReport> {
    let clients = 16;
    let period = Duration::from_millis(250);
    let duration = Duration::from_secs(seconds);
    let alone = ingest::push_steady(
        std::slice::from_ref(&server.http),
        "steady",
        steady.clone(),
        clients,
        period,
        duration,
    )
    .await;
    let heavy = flame
        .iter()
        .max_by_key(|q| q.samples)
        .map(|q| q.sql())
        .context("no flame graph query")?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loop_task = {
        let (stop, flight, sql) = (stop.clone(), server.flight.clone(), heavy.clone());
        tokio::spawn(async move {
            let mut runs = 0usize;
            let Ok(mut client) = ember::query::connect(&flight, TENANT).await else {
                return runs;
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if ember::query::run_sql(&mut client, &sql).await.is_ok() {
                    runs += 1;
                }
            }
            runs
        })
    };
    let loaded = ingest::push_steady(
        std::slice::from_ref(&server.http),
        "steady",
        steady.clone(),
        clients,
        period,
        duration,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = loop_task.await.unwrap_or(0);
    anyhow::ensure!(
        alone.failures.is_empty() && loaded.failures.is_empty(),
        "mixed workload pushes failed"
    );
    let (alone, with_queries) = (Latency::of(alone.latencies), Latency::of(loaded.latencies));
    Ok(MixedReport {
        clients,
        p99_change_percent: (with_queries.p99_ms / alone.p99_ms.max(1e-9) - 1.0) * 100.0,
        alone,
        with_queries,
        queries_run: runs,
    })
}

/// A heavy query under a small memory limit must fail with a clear error
/// and leave the server serving.
async fn memory_limit(
    data_dir: &std::path::Path,
    server_args: &[String],
    limit: usize,
) -> anyhow::Result<MemoryLimitReport> {
    let mut extra = server_args.to_vec();
    extra.extend(["--query-memory-limit".to_string(), limit.to_string()]);
    let server = Server::start(data_dir, &extra).await?;
    // One group collecting every value: nothing to spill, so it must fail.
    let sql = "SELECT array_agg(value) AS v FROM samples".to_string();
    let error = match queries::rows(&server, &sql).await {
        Ok(_) => None,
        Err(e) => Some(format!("{e:#}")),
    };
    let healthy_after = server.is_healthy().await;
    let small_query_after = queries::rows(&server, "SELECT count(*) FROM profiles")
        .await
        .is_ok();
    server.stop()?;
    Ok(MemoryLimitReport {
        limit_bytes: limit,
        query: sql,
        error,
        healthy_after,
        small_query_after,
    })
}
