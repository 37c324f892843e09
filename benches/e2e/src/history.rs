//! Days of the production shape, without pushing them in real time: the
//! fleet's profiles (one per series every `--interval-s`, ending now) are
//! generated as the production run's are, written as level-0 blocks of
//! one tick per shard (about what Pyroscope v2's first level makes of a
//! shard's 15 s), and compacted by the real planner and compactor with v2's
//! upper thresholds (10 blocks or 12 min, 10 blocks or 3 h), so that the top
//! level holds what v2's does: about 25 minutes of a shard per block. Then
//! `ember serve` opens the directory and the whole-fleet flame graph of the
//! last hour, day and week is measured cold, on the local store and with
//! every GET 30 ms late, as a cloud bucket's first byte is.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ember_distributor::formats::pprof::FlatProfile;
use ember_distributor::normalise::{normalise, validate_labels, Destination};
use ember_distributor::shard_for;
use ember_engine::block::{write_block, StackNodes};
use ember_engine::Profile;
use ember_metastore::{
    command::Kind, Command, InProcess, LevelRule, Lifecycle, LifecycleConfig, Metastore,
    PlanCompaction,
};
use ember_sql::compaction::{CompactionConfig, Compactor};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;
use tracing::info;

use super::production::{block_objects, fleet, server_args, CLOUD_GET_DELAY_MS};
use super::queries::{self, FlameQuery, QueryRun, TENANT};
use super::server::{self, Server};
use super::{workload, BenchArgs, SHARDS};

/// The thresholds above v2's first level: a level-0 block here is already
/// what its first level makes.
const LEVELS: &str = "10:720,10:10800";
const HOUR_NANOS: i64 = 3_600_000_000_000;

#[derive(Debug, Default, Serialize)]
pub struct HistoryReport {
    pub series: usize,
    pub hours: i64,
    pub interval_s: i64,
    pub profiles: u64,
    pub stored_samples: u64,
    pub generate_seconds: f64,
    /// Of the generation, the compaction jobs' share.
    pub compaction_seconds: f64,
    pub compaction_jobs: u64,
    pub blocks_by_level: BTreeMap<u32, usize>,
    pub objects: u64,
    pub object_bytes: u64,
    pub metastore_file_bytes: u64,
    pub ranges: Vec<RangeRun>,
}

#[derive(Debug, Serialize)]
pub struct RangeRun {
    pub query: FlameQuery,
    pub local: QueryRun,
    pub cloud: QueryRun,
}

/// One stored profile as the flame graph's check needs it.
struct Stored {
    profile_type: u16,
    time: i64,
    samples: u32,
    total: i64,
}

/// The blocks written so far and their compaction.
struct Writer {
    store: Arc<dyn ObjectStore>,
    metastore: Arc<Metastore>,
    lifecycle: Lifecycle,
    compactor: Compactor,
    nodes: Vec<StackNodes>,
    jobs: u64,
    compaction_seconds: f64,
}

impl Writer {
    fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let objects = data_dir.join("objects");
        std::fs::create_dir_all(&objects)?;
        let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&objects)?);
        let metastore = Arc::new(Metastore::open(&data_dir.join("metastore.redb"))?);
        let lifecycle = Lifecycle::new(
            store.clone(),
            metastore.clone(),
            LifecycleConfig {
                levels: levels(),
                delete_delay: std::time::Duration::ZERO,
                ..LifecycleConfig::default()
            },
        );
        let compactor = Compactor::new(
            store.clone(),
            Arc::new(InProcess(metastore.clone())),
            metastore.clone(),
            // Retired sources go at once: the disk holds what a server
            // holds once its delete delay has passed.
            CompactionConfig {
                delete_delay: std::time::Duration::ZERO,
                ..CompactionConfig::default()
            },
        )?;
        Ok(Self {
            store,
            metastore,
            lifecycle,
            compactor,
            nodes: (0..SHARDS).map(|_| StackNodes::default()).collect(),
            jobs: 0,
            compaction_seconds: 0.0,
        })
    }

    /// One level-0 block per shard of `profiles`, indexed in one commit.
    async fn add(&mut self, profiles: Vec<Profile>) -> anyhow::Result<()> {
        let mut by_shard: BTreeMap<u32, Vec<Profile>> = BTreeMap::new();
        for p in profiles {
            by_shard
                .entry(shard_for(&p.tenant, p.service_name(), SHARDS))
                .or_default()
                .push(p);
        }
        let mut commands = Vec::new();
        for (shard, profiles) in by_shard {
            let block = write_block(&profiles, shard, &mut self.nodes[shard as usize])?;
            self.store
                .put(
                    &ObjectPath::from(block.meta.path.as_str()),
                    PutPayload::from(block.bytes),
                )
                .await?;
            commands.push(Command::add_block(block.meta));
        }
        self.metastore.apply_all(commands)?;
        Ok(())
    }

    /// Runs every job the planner finds at `now` (None: the wall clock),
    /// level after level, and deletes what they retired.
    async fn compact(&mut self, now: Option<i64>) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let planned = match now {
                None => self.lifecycle.plan_once().await?,
                Some(now) => {
                    let cmd = PlanCompaction {
                        now,
                        levels: levels(),
                        max_jobs: 1024,
                    };
                    match self.metastore.apply(Kind::PlanCompaction(cmd).into())? {
                        ember_metastore::Applied::Planned(n) => n,
                        _ => 0,
                    }
                }
            };
            if planned == 0 {
                break;
            }
            while self.compactor.work_once("history").await? {
                self.jobs += 1;
            }
        }
        self.lifecycle.delete_due().await?;
        self.compaction_seconds += t.elapsed().as_secs_f64();
        Ok(())
    }
}

fn levels() -> Vec<LevelRule> {
    LEVELS
        .split(',')
        .filter_map(|r| {
            let (blocks, secs) = r.split_once(':')?;
            Some(LevelRule {
                max_blocks: blocks.parse().ok()?,
                max_age_nanos: secs.parse::<i64>().ok()? * 1_000_000_000,
            })
        })
        .collect()
}

/// Writes and compacts `--history-hours` of the fleet into `data_dir`;
/// returns what was stored, for the flame graphs' checks.
async fn generate(
    args: &BenchArgs,
    data_dir: &Path,
    report: &mut HistoryReport,
) -> anyhow::Result<(Vec<String>, Vec<Stored>)> {
    let started = Instant::now();
    let templates = workload::load_templates(&args.fixtures)?;
    let ticks = (args.history_hours * 3600 / args.interval_s).max(1);
    let config = fleet(args, ticks);
    let all = workload::series(&config, &templates);
    let mut rng = workload::Rng::new(config.seed);
    let mut writer = Writer::open(data_dir)?;
    let mut types: Vec<String> = Vec::new();
    let mut stored = Vec::new();
    let ticks_per_hour = (3600 / args.interval_s).max(1) as usize;
    for tick in 0..ticks as usize {
        let mut profiles = Vec::new();
        for (i, p) in workload::tick_pprofs(&config, &templates, &all, tick, &mut rng) {
            let dest = Destination {
                tenant: TENANT.into(),
                labels: validate_labels(all[i].labels.clone())?,
                received_at_nanos: p.time_nanos,
                limits: Default::default(),
            };
            for n in normalise(&FlatProfile::of(&p), &dest)? {
                let ty = match types.iter().position(|t| *t == n.profile_type) {
                    Some(ty) => ty,
                    None => {
                        types.push(n.profile_type.clone());
                        types.len() - 1
                    }
                };
                stored.push(Stored {
                    profile_type: ty as u16,
                    time: n.time_nanos,
                    samples: n.samples.len() as u32,
                    total: n.total(),
                });
                profiles.push(n);
            }
            report.profiles += 1;
        }
        writer.add(profiles).await?;
        writer.compact(None).await?;
        if (tick + 1) % ticks_per_hour == 0 {
            info!(
                "history: {} of {} hours written, {} compaction jobs, {:.0} s",
                (tick + 1) / ticks_per_hour,
                args.history_hours,
                writer.jobs,
                started.elapsed().as_secs_f64()
            );
        }
    }
    // What a server reaches once every age has passed: the partial
    // batches compacted too, up to the top level.
    writer.compact(Some(i64::MAX)).await?;
    report.compaction_jobs = writer.jobs;
    report.compaction_seconds = writer.compaction_seconds;
    report.blocks_by_level = writer.metastore.blocks_by_level();
    report.generate_seconds = started.elapsed().as_secs_f64();
    Ok((types, stored))
}

/// The whole fleet's flame graph of the type with the most samples over
/// the last `hours` of what was stored.
fn flame_query(types: &[String], stored: &[Stored], hours: i64, name: &str) -> FlameQuery {
    let mut samples_by_type = vec![0u64; types.len()];
    for s in stored {
        samples_by_type[s.profile_type as usize] += u64::from(s.samples);
    }
    let ty = (0..types.len())
        .max_by_key(|t| samples_by_type[*t])
        .unwrap_or(0);
    let of_type = || stored.iter().filter(move |s| s.profile_type as usize == ty);
    // Whole milliseconds, as Connect carries them: the range asked is
    // then exactly the range counted.
    let last = of_type().map(|s| s.time).max().unwrap_or_default();
    let end = (last + 999_999).div_euclid(1_000_000) * 1_000_000;
    let start = end - hours * HOUR_NANOS;
    let (samples, total) = of_type()
        .filter(|s| s.time >= start && s.time <= end)
        .fold((0u64, 0i64), |(n, t), s| {
            (n + u64::from(s.samples), t + s.total)
        });
    FlameQuery {
        name: name.to_string(),
        profile_type: types.get(ty).cloned().unwrap_or_default(),
        service_name: None,
        start_ns: start,
        end_ns: end,
        samples,
        total,
    }
}

async fn measure_checked(
    server: &mut Server,
    query: &FlameQuery,
    repeats: usize,
) -> anyhow::Result<QueryRun> {
    let call = queries::Call::select_merge_stacktraces(query, queries::GRAFANA_MAX_NODES);
    let run = queries::measure(server, &query.name, &call, query.samples, repeats).await?;
    anyhow::ensure!(
        run.root_total == Some(query.total),
        "{}: flame graph root {:?}, stored total {}",
        query.name,
        run.root_total,
        query.total
    );
    Ok(run)
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<HistoryReport> {
    let out = args.out.join("history");
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    info!(
        "history: {} series, one profile each every {} s, {} hours",
        args.production_series, args.interval_s, args.history_hours
    );
    let mut report = HistoryReport {
        series: args.production_series,
        hours: args.history_hours,
        interval_s: args.interval_s,
        ..HistoryReport::default()
    };
    let (types, stored) = generate(args, &data_dir, &mut report).await?;
    report.stored_samples = stored.iter().map(|s| u64::from(s.samples)).sum();
    report.objects = block_objects(&data_dir.join("objects"));
    report.object_bytes = server::dir_bytes(&data_dir.join("objects"));
    report.metastore_file_bytes =
        std::fs::metadata(data_dir.join("metastore.redb")).map_or(0, |m| m.len());
    info!(
        "history written in {:.0} s: {} profiles, {} samples, {} objects, {:.0} MB",
        report.generate_seconds,
        report.profiles,
        report.stored_samples,
        report.objects,
        report.object_bytes as f64 / 1e6
    );

    let ranges: Vec<FlameQuery> = [(1, "last hour"), (24, "last day"), (168, "last week")]
        .into_iter()
        .filter(|(hours, _)| *hours <= args.history_hours)
        .map(|(hours, name)| flame_query(&types, &stored, hours, name))
        .collect();
    drop(stored);
    // No further compaction while measuring: the server's thresholds are
    // the generator's, and every batch is already compacted.
    let mut server =
        Server::start(&data_dir, &server_args(&["--compaction-levels", LEVELS])).await?;
    let mut local = Vec::new();
    for q in &ranges {
        local.push(measure_checked(&mut server, q, args.repeats).await?);
    }
    server.add_args(&[
        "--faults".into(),
        format!("get_delay_ms={CLOUD_GET_DELAY_MS}"),
    ]);
    for (q, local) in ranges.into_iter().zip(local) {
        let cloud = measure_checked(&mut server, &q, args.repeats).await?;
        report.ranges.push(RangeRun {
            query: q,
            local,
            cloud,
        });
    }
    server.stop()?;
    std::fs::write(
        args.out.join("history.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("history.md"), markdown(&report))?;
    Ok(report)
}

pub fn markdown(r: &HistoryReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} series, one profile each every {} s, {} hours ending now: {} profiles, {} samples; \
         written and compacted in {:.0} s ({} jobs, {:.0} s of them); blocks by level {:?}; \
         {} objects, {:.1} MB; metastore file {:.1} MB\n",
        r.series,
        r.interval_s,
        r.hours,
        r.profiles,
        r.stored_samples,
        r.generate_seconds,
        r.compaction_jobs,
        r.compaction_seconds,
        r.blocks_by_level,
        r.objects,
        r.object_bytes as f64 / 1e6,
        r.metastore_file_bytes as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "| whole fleet's flame graph (SelectMergeStacktraces) | samples | cold, local store | GETs | MB read | cold, every GET {CLOUD_GET_DELAY_MS} ms late | warm |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    for x in &r.ranges {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} ms | {} | {:.1} | {:.0} ms | {:.0} ms |",
            x.query.name,
            x.query.samples,
            x.local.cold_ms,
            x.local.cold_gets,
            x.local.cold_read_bytes / 1e6,
            x.cloud.cold_ms,
            x.local.warm_median_ms
        );
    }
    s
}
