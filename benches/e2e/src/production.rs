//! The production-shaped workload: a fleet of agents, each pushing one
//! profile per request every 10 s of simulated time with current
//! timestamps, so that a level-0 block holds about one profile per dataset.
//!
//! The same requests are ingested twice: once with compaction off, to
//! measure level-0 as it lands, and once with compaction on while the
//! agents push, to measure the lag from a write to its first compaction,
//! the compaction cost, and the state and the hour's flame graph once the
//! queues are drained. DuckDB and chDB run the same GROUP BY over the same
//! rows in Parquet, in the same run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_distributor::formats::pprof::FlatProfile;
use ember_distributor::normalise::{normalise, validate_labels, Destination};
use serde::Serialize;
use tracing::info;

use super::export::Exporter;
use super::peers::{self, PeerRun};
use super::queries::{self, FlameQuery, QueryRun, TENANT};
use super::server::{self, Server};
use super::{ingest, workload, BenchArgs, FLUSH_MS, SHARDS};

#[derive(Debug, Default, Serialize)]
pub struct ProductionReport {
    pub series: usize,
    pub requests: usize,
    pub simulated_minutes: i64,
    pub stored_samples: u64,
    pub pprof_gzip_bytes: u64,
    pub ingest_seconds: f64,
    pub compaction_levels: String,
    pub level0: ShapeState,
    pub compacted: ShapeState,
    /// Write-to-first-compaction lag of the blocks compacted while the
    /// agents pushed flat out, read when the last push was acknowledged.
    pub lag: Lag,
    /// The same over every level-0 block, read once none was left: it adds
    /// the last partial batch of each queue, which goes on age (36 s) once
    /// the pushes stop, not on count.
    pub lag_with_drain: Lag,
    /// From the end of the pushes until no level-0 block was left, and
    /// until every block had reached level 2 (L1 -> L2 waits 12 min).
    pub level0_drain_seconds: f64,
    pub drain_seconds: f64,
    pub compaction_cpu_seconds: f64,
    pub compaction_samples_in: f64,
    pub compaction_samples_per_cpu_second: f64,
    /// The metastore file of the compacted run, sampled every second from
    /// the first push to the drain: its largest size, and its size once the
    /// pushes ended.
    pub metastore_peak_bytes: u64,
    pub metastore_after_pushes_bytes: u64,
    pub flame: Option<FlameQuery>,
    pub peers: Vec<PeerRun>,
    pub paced: Option<PacedLag>,
}

/// The server's level-0 lag histogram as read at one moment: seconds,
/// interpolated within its buckets, and how many blocks it counts.
#[derive(Debug, Default, Serialize)]
pub struct Lag {
    pub p50_s: f64,
    pub p99_s: f64,
    pub blocks: f64,
    /// From each job's newest block to its commit: with batches of 20
    /// blocks 0.5 s apart, half of a batch's lags are at most 4.5 s plus
    /// this and half at least 5.0 s plus this, so this is the part of the
    /// p50 that a job's speed decides.
    pub batch_delay_p50_s: f64,
    pub batch_delay_max_s: f64,
}

impl Lag {
    const METRIC: &'static str = "ember_compaction_level0_lag_seconds";
    const BATCH_DELAY: &'static str = "ember_compaction_level0_batch_delay_seconds";

    fn of(metrics: &std::collections::HashMap<String, f64>) -> Self {
        Self {
            batch_delay_p50_s: histogram_quantile(metrics, Self::BATCH_DELAY, 0.5),
            batch_delay_max_s: histogram_quantile(metrics, Self::BATCH_DELAY, 1.0),
            p50_s: histogram_quantile(metrics, Self::METRIC, 0.5),
            p99_s: histogram_quantile(metrics, Self::METRIC, 0.99),
            blocks: metrics
                .get(&format!("{}_count", Self::METRIC))
                .copied()
                .unwrap_or_default(),
        }
    }
}

/// The lag at the production rate: the same agents, each pushing one
/// profile per interval in real time.
#[derive(Debug, Default, Serialize)]
pub struct PacedLag {
    pub minutes: u64,
    pub requests: usize,
    /// Read when the last push was acknowledged, as the flat-out figures.
    pub lag: Lag,
    /// Segment flushes while pushing (a flush is one level-0 block unless
    /// it spans a partition boundary): how fast a batch fills.
    pub flushes: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct ShapeState {
    pub blocks_by_level: BTreeMap<String, f64>,
    pub objects: u64,
    pub object_bytes: u64,
    pub bytes_per_sample: f64,
    pub ratio_to_gzip_pprof: f64,
    pub metastore_file_bytes: u64,
    /// Over Flight SQL (`flamegraph()`), and over Connect as Grafana's
    /// Pyroscope data source asks (SelectMergeStacktraces).
    pub flame: Option<QueryRun>,
    pub connect_flame: Option<QueryRun>,
    /// The Connect flame graph with every GET of the object store
    /// `CLOUD_GET_DELAY_MS` late, as a same-region cloud bucket's first
    /// byte is (the fault wrapper's delay on the local store).
    pub connect_flame_cloud: Option<QueryRun>,
}

/// About an S3 GET's time to first byte within its region.
pub(crate) const CLOUD_GET_DELAY_MS: u64 = 30;

pub(crate) struct Generated {
    pub(crate) requests: Arc<Vec<workload::Request>>,
    pprof_gzip_bytes: u64,
    paths: super::export::ExportPaths,
}

/// The production shape's fleet over `ticks` intervals ending now: one
/// agent per series, one profile per request.
pub(crate) fn fleet(args: &BenchArgs, ticks: i64) -> workload::WorkloadConfig {
    let interval = args.interval_s * 1_000_000_000;
    let services = args.services.min(args.production_series).max(1);
    workload::WorkloadConfig {
        services,
        series_per_service: (args.production_series / services).max(1),
        target_samples: u64::MAX,
        interval_nanos: interval,
        series_per_request: 1,
        // Ends now: the agents' clocks are current.
        start_nanos: super::now_nanos() - ticks * interval,
        seed: 7,
    }
}

pub(crate) fn generate(args: &BenchArgs, out: &Path) -> anyhow::Result<Generated> {
    let templates = workload::load_templates(&args.fixtures)?;
    let ticks = (args.production_minutes * 60 / args.interval_s).max(1);
    let config = fleet(args, ticks);
    let all = workload::series(&config, &templates);
    let mut rng = workload::Rng::new(config.seed);
    let mut exporter = Exporter::create(&out.join("export"))?;
    let mut requests = Vec::new();
    let mut gzip_bytes = 0u64;
    for tick in 0..ticks as usize {
        let profiles = workload::tick_profiles(&config, &templates, &all, tick, &mut rng);
        for (i, p, _) in &profiles {
            let dest = Destination {
                tenant: TENANT.into(),
                labels: validate_labels(all[*i].labels.clone())?,
                received_at_nanos: p.time_nanos,
                limits: Default::default(),
            };
            for n in normalise(&FlatProfile::of(p), &dest)? {
                exporter.add(&n)?;
            }
        }
        for r in workload::tick_requests(&config, &all, &profiles) {
            gzip_bytes += r.pprof_bytes as u64;
            requests.push(r);
        }
    }
    Ok(Generated {
        requests: Arc::new(requests),
        pprof_gzip_bytes: gzip_bytes,
        paths: exporter.finish()?,
    })
}

/// The server's default (one per CPU) unless given: the harness's
/// servers otherwise start without workers.
pub(crate) fn compaction_workers(args: &BenchArgs) -> usize {
    args.production_compaction_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

pub(crate) fn server_args(extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--shards".to_string(),
        SHARDS.to_string(),
        "--flush-interval-ms".to_string(),
        FLUSH_MS.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts a server on `data_dir` and pushes every request, one client per
/// series taking them in time order.
async fn ingest(
    data_dir: &Path,
    extra: &[&str],
    g: &Generated,
    clients: usize,
) -> anyhow::Result<(Server, f64)> {
    std::fs::create_dir_all(data_dir)?;
    let server = Server::start(data_dir, &server_args(extra)).await?;
    let load = ingest::push_all(&server.http, TENANT, g.requests.clone(), clients).await;
    anyhow::ensure!(
        load.failures.is_empty(),
        "{} pushes failed, first: {:?}",
        load.failures.len(),
        load.failures.first()
    );
    Ok((server, load.elapsed.as_secs_f64()))
}

pub(crate) fn block_objects(objects: &Path) -> u64 {
    fn walk(dir: &Path, n: &mut u64) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, n);
            } else if p.file_name().is_some_and(|f| f == "block.bin") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(objects, &mut n);
    n
}

pub(crate) fn blocks_by_level(
    metrics: &std::collections::HashMap<String, f64>,
) -> BTreeMap<String, f64> {
    metrics
        .iter()
        .filter_map(|(k, v)| {
            let level = k
                .strip_prefix("ember_blocks{level=\"")?
                .strip_suffix("\"}")?;
            Some((level.to_string(), *v))
        })
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

async fn state(
    server: &mut Server,
    data_dir: &Path,
    query: &FlameQuery,
    stored_samples: u64,
    gzip_bytes: u64,
    repeats: usize,
) -> anyhow::Result<ShapeState> {
    let metrics = server.metrics().await?;
    let objects = data_dir.join("objects");
    let object_bytes = server::dir_bytes(&objects);
    let sql = queries::Call::Sql(query.sql());
    let connect = queries::Call::select_merge_stacktraces(query, queries::GRAFANA_MAX_NODES);
    let mut runs = Vec::new();
    for call in [sql, connect] {
        let run = queries::measure(server, &query.name, &call, query.samples, repeats).await?;
        anyhow::ensure!(
            run.root_total == Some(query.total),
            "{} ({}): flame graph root {:?}, stored total {}",
            query.name,
            call.describe(),
            run.root_total,
            query.total
        );
        runs.push(run);
    }
    server.add_args(&[
        "--faults".into(),
        format!("get_delay_ms={CLOUD_GET_DELAY_MS}"),
    ]);
    let connect = queries::Call::select_merge_stacktraces(query, queries::GRAFANA_MAX_NODES);
    let cloud = queries::measure(server, &query.name, &connect, query.samples, repeats).await?;
    anyhow::ensure!(
        cloud.root_total == Some(query.total),
        "{}: slow GETs changed the answer",
        query.name
    );
    let connect_flame = runs.pop();
    let flame = runs.pop();
    Ok(ShapeState {
        blocks_by_level: blocks_by_level(&metrics),
        objects: block_objects(&objects),
        object_bytes,
        bytes_per_sample: object_bytes as f64 / stored_samples.max(1) as f64,
        ratio_to_gzip_pprof: object_bytes as f64 / gzip_bytes.max(1) as f64,
        metastore_file_bytes: std::fs::metadata(data_dir.join("metastore.redb"))
            .map(|m| m.len())
            .unwrap_or(0),
        flame,
        connect_flame,
        connect_flame_cloud: Some(cloud),
    })
}

/// The `q`-quantile of a Prometheus histogram, interpolated linearly
/// within its bucket as Prometheus' `histogram_quantile` does.
fn histogram_quantile(metrics: &std::collections::HashMap<String, f64>, name: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix(&format!("{name}_bucket{{le=\""))?
                .strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, count) in buckets {
        if count >= rank && count > below {
            if bound.is_infinite() {
                return lower;
            }
            return lower + (bound - lower) * (rank - below) / (count - below);
        }
        (lower, below) = (bound, count);
    }
    f64::NAN
}

/// Samples a file's size every second until stopped, then says the largest
/// and the latest.
struct FileSizes {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl FileSizes {
    fn watch(path: std::path::PathBuf) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut peak, mut last) = (0, 0);
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                last = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(last);
                peak = peak.max(last);
                std::thread::sleep(Duration::from_secs(1));
            }
            (peak, last)
        });
        Self { stop, thread }
    }

    fn stop(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0))
    }
}

/// Waits until every block has reached level 2 and no runnable job and no
/// retired object waiting for deletion is left; returns the seconds until no
/// level-0 block was left, and until then.
async fn drain(server: &Server) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30 * 60);
    let mut level0_gone = None;
    loop {
        let m = server.metrics().await?;
        let level0 = m.get("ember_blocks{level=\"0\"}").copied().unwrap_or(0.0);
        let level1 = m.get("ember_blocks{level=\"1\"}").copied().unwrap_or(0.0);
        if level0 == 0.0 && level0_gone.is_none() {
            level0_gone = Some(started.elapsed().as_secs_f64());
        }
        let runnable: f64 = m
            .iter()
            .filter(|(k, _)| {
                k.starts_with("ember_compaction_jobs{")
                    && (k.contains("pending") || k.contains("running"))
            })
            // Not `sum()`: an empty f64 sum is -0, printed "-0 jobs".
            .fold(0.0, |n, (_, v)| n + v);
        let tombstones = m.get("ember_tombstones").copied().unwrap_or(0.0);
        if level0 == 0.0 && level1 == 0.0 && runnable == 0.0 && tombstones == 0.0 {
            let done = started.elapsed().as_secs_f64();
            return Ok((level0_gone.unwrap_or(done), done));
        }
        anyhow::ensure!(Instant::now() < deadline, "compaction did not drain");
        info!(
            "compaction: {level0} level-0 and {level1} level-1 blocks, {runnable} jobs, {tombstones} objects to delete"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<ProductionReport> {
    let out = args.out.join("production");
    std::fs::create_dir_all(&out)?;
    info!(
        "production shape: {} series, one profile per request, {} min",
        args.production_series, args.production_minutes
    );
    let g = generate(args, &out)?;
    let clients = args.production_series;
    let mut report = ProductionReport {
        series: args.production_series,
        requests: g.requests.len(),
        simulated_minutes: args.production_minutes,
        pprof_gzip_bytes: g.pprof_gzip_bytes,
        compaction_levels: format!(
            "{}; {} compaction workers; retired objects deleted after 1 s",
            args.production_compaction_levels,
            compaction_workers(args)
        ),
        ..ProductionReport::default()
    };

    info!("production shape, level 0: ingest with compaction off");
    let level0_dir = out.join("level0");
    let (mut server, secs) =
        ingest(&level0_dir, &["--compaction-workers", "0"], &g, clients).await?;
    report.ingest_seconds = secs;
    // What the same pushes cost without compaction: the compacted run's
    // CPU beyond it is what compaction cost.
    let ingest_cpu = server.cpu_seconds()?;
    let stored = super::stored_series(&server).await?;
    report.stored_samples = stored.iter().map(|p| p.samples).sum();
    let query = super::flame_queries(&server, &stored, &[])
        .await?
        .into_iter()
        .find(|q| q.service_name.is_none())
        .ok_or_else(|| anyhow::anyhow!("no flame query"))?;
    report.level0 = state(
        &mut server,
        &level0_dir,
        &query,
        report.stored_samples,
        g.pprof_gzip_bytes,
        args.repeats,
    )
    .await?;
    server.stop()?;

    info!("production shape, compacted: ingest with compaction on");
    let compacted_dir = out.join("compacted");
    // Retired objects go 1 s after their commit (15 min by default), so
    // that the objects counted are the compacted ones alone.
    let workers = compaction_workers(args).to_string();
    let compacted_args = [
        "--compaction-workers",
        workers.as_str(),
        "--compaction-delete-delay-seconds",
        "1",
        "--compaction-levels",
        args.production_compaction_levels.as_str(),
    ];
    let metastore_file = compacted_dir.join("metastore.redb");
    let sizes = FileSizes::watch(metastore_file.clone());
    let (mut server, _) = ingest(&compacted_dir, &compacted_args, &g, clients).await?;
    report.metastore_after_pushes_bytes = std::fs::metadata(&metastore_file).map_or(0, |m| m.len());
    report.lag = Lag::of(&server.metrics().await?);
    (report.level0_drain_seconds, report.drain_seconds) = drain(&server).await?;
    report.metastore_peak_bytes = sizes.stop().0;
    let m = server.metrics().await?;
    report.lag_with_drain = Lag::of(&m);
    // The same pushes, plus every level of compaction and its deletes.
    report.compaction_cpu_seconds = (server.cpu_seconds()? - ingest_cpu).max(0.0);
    report.compaction_samples_in = m
        .get("ember_compaction_samples_in_total")
        .copied()
        .unwrap_or(0.0);
    report.compaction_samples_per_cpu_second =
        report.compaction_samples_in / report.compaction_cpu_seconds.max(1e-9);
    report.compacted = state(
        &mut server,
        &compacted_dir,
        &query,
        report.stored_samples,
        g.pprof_gzip_bytes,
        args.repeats,
    )
    .await?;
    server.stop()?;

    info!("production shape: peers");
    let flame = std::slice::from_ref(&query);
    report.peers = peers::datafusion_group_by(&g.paths, flame, args.repeats).await?;
    if !args.python.is_empty() {
        report.peers.extend(peers::python_peers(
            &std::path::PathBuf::from(&args.python),
            &args.peers_script,
            &out,
            &g.paths,
            flame,
            args.repeats,
        )?);
    }
    for p in &report.peers {
        anyhow::ensure!(
            p.total == query.total,
            "{} {}: total {} but Ember stored {}",
            p.engine,
            p.shape,
            p.total,
            query.total
        );
    }
    report.flame = Some(query);
    if args.production_paced_minutes > 0 {
        report.paced = Some(paced_lag(args, &g, &out).await?);
    }
    std::fs::write(
        args.out.join("production.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("production.md"), markdown(&report))?;
    Ok(report)
}

/// Pushes for `--production-paced-minutes` at the agents' own pace (each
/// series its next profile every interval, the series spread over it) on
/// a fresh server with the run's thresholds, and reads the lag.
async fn paced_lag(args: &BenchArgs, g: &Generated, out: &Path) -> anyhow::Result<PacedLag> {
    info!(
        "production shape, at the agents' own pace: {} min of one push per series every {} s",
        args.production_paced_minutes, args.interval_s
    );
    let dir = out.join("paced");
    std::fs::create_dir_all(&dir)?;
    let workers = compaction_workers(args).to_string();
    let extra = [
        "--compaction-workers",
        workers.as_str(),
        "--compaction-levels",
        args.production_compaction_levels.as_str(),
    ];
    let server = Server::start(&dir, &server_args(&extra)).await?;
    let period = Duration::from_secs(args.interval_s.max(1) as u64);
    let load = ingest::push_steady(
        std::slice::from_ref(&server.http),
        TENANT,
        g.requests.clone(),
        args.production_series,
        period,
        Duration::from_secs(args.production_paced_minutes * 60),
    )
    .await;
    anyhow::ensure!(
        load.failures.is_empty(),
        "{} paced pushes failed, first: {:?}",
        load.failures.len(),
        load.failures.first()
    );
    let m = server.metrics().await?;
    let paced = PacedLag {
        minutes: args.production_paced_minutes,
        requests: load.latencies.len(),
        lag: Lag::of(&m),
        flushes: m
            .get("ember_segment_flushes_total")
            .copied()
            .unwrap_or_default(),
    };
    server.stop()?;
    Ok(paced)
}

fn levels(b: &BTreeMap<String, f64>) -> String {
    b.iter()
        .map(|(l, n)| format!("L{l}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn markdown(r: &ProductionReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Production shape: {} series, one profile per request every 10 s for {} min of current time ({} requests, {} stored samples, {:.1} MB of gzipped pprof). Compaction thresholds: {}.\n",
        r.series,
        r.simulated_minutes,
        r.requests,
        r.stored_samples,
        r.pprof_gzip_bytes as f64 / 1e6,
        r.compaction_levels
    );
    let _ = writeln!(s, "| figure | level 0 (compaction off) | compacted |");
    let _ = writeln!(s, "| --- | --- | --- |");
    let (a, b) = (&r.level0, &r.compacted);
    let row = |s: &mut String, name: &str, x: String, y: String| {
        let _ = writeln!(s, "| {name} | {x} | {y} |");
    };
    row(
        &mut s,
        "blocks by level",
        levels(&a.blocks_by_level),
        levels(&b.blocks_by_level),
    );
    row(
        &mut s,
        "block objects",
        a.objects.to_string(),
        b.objects.to_string(),
    );
    row(
        &mut s,
        "stored bytes per sample",
        format!("{:.1}", a.bytes_per_sample),
        format!("{:.1}", b.bytes_per_sample),
    );
    row(
        &mut s,
        "stored bytes / gzipped pprof in",
        format!("{:.2}x", a.ratio_to_gzip_pprof),
        format!("{:.2}x", b.ratio_to_gzip_pprof),
    );
    row(
        &mut s,
        "metastore file",
        format!("{:.1} MB", a.metastore_file_bytes as f64 / 1e6),
        format!("{:.1} MB", b.metastore_file_bytes as f64 / 1e6),
    );
    if let (Some(x), Some(y)) = (&a.flame, &b.flame) {
        row(
            &mut s,
            "hour flame graph, cold (median of runs each after a restart)",
            format!(
                "{:.0} ms, {} GETs, {:.1} MB",
                x.cold_ms,
                x.cold_gets,
                x.cold_read_bytes / 1e6
            ),
            format!(
                "{:.0} ms, {} GETs, {:.1} MB",
                y.cold_ms,
                y.cold_gets,
                y.cold_read_bytes / 1e6
            ),
        );
        row(
            &mut s,
            "hour flame graph, warm (median)",
            format!("{:.1} ms", x.warm_median_ms),
            format!("{:.1} ms", y.warm_median_ms),
        );
    }
    if let (Some(x), Some(y)) = (&a.connect_flame, &b.connect_flame) {
        row(
            &mut s,
            "hour flame graph over Connect (SelectMergeStacktraces), cold",
            format!("{:.0} ms, {} GETs", x.cold_ms, x.cold_gets),
            format!("{:.0} ms, {} GETs", y.cold_ms, y.cold_gets),
        );
        row(
            &mut s,
            "hour flame graph over Connect, warm (median)",
            format!("{:.1} ms", x.warm_median_ms),
            format!("{:.1} ms", y.warm_median_ms),
        );
    }
    if let (Some(x), Some(y)) = (&a.connect_flame_cloud, &b.connect_flame_cloud) {
        row(
            &mut s,
            &format!("hour flame graph over Connect, cold, every GET {CLOUD_GET_DELAY_MS} ms late"),
            format!("{:.0} ms, {} GETs", x.cold_ms, x.cold_gets),
            format!("{:.0} ms, {} GETs", y.cold_ms, y.cold_gets),
        );
    }
    let _ = writeln!(
        s,
        "\nIngest (compaction off): {:.0} s. With compaction on, write-to-first-compaction lag (interpolated in the histogram's buckets) while pushing flat out: p50 {:.2} s, p99 {:.2} s ({:.0} level-0 blocks compacted by the last ack; each job committed p50 {:.3} s, at most {:.2} s after its batch's newest block); with the drain (each queue's last partial batch goes on age once the pushes stop): p50 {:.2} s, p99 {:.1} s ({:.0} blocks). No level-0 block was left {:.0} s after the last push, and every block was at level 2 after {:.0} s. Compaction cost {:.1} server CPU-s beyond the same ingest without it, for {:.0} sample rows read (all levels, deletes included): {:.0} k samples per CPU-second.\n",
        r.ingest_seconds,
        r.lag.p50_s,
        r.lag.p99_s,
        r.lag.blocks,
        r.lag.batch_delay_p50_s,
        r.lag.batch_delay_max_s,
        r.lag_with_drain.p50_s,
        r.lag_with_drain.p99_s,
        r.lag_with_drain.blocks,
        r.level0_drain_seconds,
        r.drain_seconds,
        r.compaction_cpu_seconds,
        r.compaction_samples_in,
        r.compaction_samples_per_cpu_second / 1e3
    );
    let _ = writeln!(
        s,
        "Metastore file of the compacted run, sampled every second: {:.1} MB when the last push was acknowledged, {:.1} MB at its largest, {:.1} MB once drained (level 0 alone: {:.1} MB).\n",
        r.metastore_after_pushes_bytes as f64 / 1e6,
        r.metastore_peak_bytes as f64 / 1e6,
        r.compacted.metastore_file_bytes as f64 / 1e6,
        r.level0.metastore_file_bytes as f64 / 1e6
    );
    if let Some(p) = &r.paced {
        let _ = writeln!(
            s,
            "At the agents' own pace (each series one push every 10 s, in real time, for {} min; {} requests, {:.0} segment flushes), same thresholds: write-to-first-compaction lag p50 {:.1} s, p99 {:.1} s ({:.0} blocks compacted by the last ack).\n",
            p.minutes, p.requests, p.flushes, p.lag.p50_s, p.lag.p99_s, p.lag.blocks
        );
    }
    let _ = writeln!(
        s,
        "| peer, same rows in Parquet | shape | first ms | median ms |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    for p in &r.peers {
        let _ = writeln!(
            s,
            "| {} {} ({}) | {} | {:.1} | {:.1} |",
            p.engine, p.version, p.kind, p.shape, p.first_ms, p.median_ms
        );
    }
    s
}
