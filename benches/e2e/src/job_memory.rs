//! Peak memory of one compaction job against its size: synthetic source
//! blocks of a given number of samples and distinct stacks, merged by one
//! job under the worker's memory budget. One child process writes the
//! sources (`ember bench --compaction-job-prepare SAMPLES:STACKS`), a fresh
//! one runs the job (`--compaction-job-run`), so that its peak RSS is the
//! job's own.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ember_engine::block::{write_block, StackNodes};
use ember_engine::profile::Functions;
use ember_engine::{Profile, Stacks};
use ember_metastore::InProcess;
use ember_metastore::{command::Kind, Applied, Command, LevelRule, Metastore, PlanCompaction};
use ember_sql::compaction::{CompactionConfig, Compactor};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::workload::Rng;

/// Blocks a job merges: a full level-0 batch.
const SOURCES: usize = 20;
const DEPTH: usize = 24;
const BUDGET: usize = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobMemoryRun {
    pub samples: u64,
    pub distinct_stacks: u64,
    pub sources: usize,
    pub source_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    /// Peak resident memory of the process that ran the job (and nothing
    /// else), runtime included.
    pub peak_rss_bytes: u64,
    pub budget_bytes: usize,
}

/// `ROOT;f1;...;fN` stacks: `distinct` leaves under a shared trunk, so the
/// tree holds about `distinct * 2` nodes.
fn functions(distinct: u64) -> Vec<String> {
    let mut f: Vec<String> = (0..DEPTH).map(|d| format!("runtime.trunk_{d}")).collect();
    f.extend((0..distinct).map(|i| format!("app/pkg{}.Handler{i}", i % 97)));
    f
}

fn source_profiles(
    block: usize,
    samples: u64,
    distinct: u64,
    functions: &Arc<Functions>,
    rng: &mut Rng,
) -> Vec<Profile> {
    let per_block = samples / SOURCES as u64;
    let pods = 8u64;
    (0..pods)
        .map(|pod| {
            let n = per_block / pods;
            let (stacks, samples) = Stacks::with_samples((0..n).map(|k| {
                // Each block covers its own slice of the stacks, and
                // some of every other's: distinct stacks across the job.
                let leaf = (k * SOURCES as u64 + block as u64 + rng.next_u64() % 7) % distinct;
                let mut stack: Vec<u32> = (0..(DEPTH as u32 / 2)).collect();
                stack.push(DEPTH as u32 + leaf as u32);
                (stack, 1 + (rng.next_u64() % 1000) as i64, None)
            }));
            Profile {
                tenant: "bench".into(),
                labels: vec![
                    ("pod".into(), format!("pod-{pod}")),
                    ("service_name".into(), "svc".into()),
                ],
                profile_type: "process_cpu:cpu:nanoseconds:cpu:nanoseconds".into(),
                time_nanos: 1_700_000_000_000_000_000 + block as i64 * 10_000_000_000,
                duration_nanos: 10_000_000_000,
                period: 10_000_000,
                functions: functions.clone(),
                stacks,
                samples,
            }
        })
        .collect()
}

/// Peak RSS since the last reset, from /proc (Linux).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[derive(Serialize, Deserialize)]
struct Prepared {
    samples: u64,
    distinct_stacks: u64,
    source_bytes: u64,
}

/// Writes the sources of one job of `SAMPLES:STACKS` into `dir`.
pub async fn prepare(spec: &str, dir: &Path) -> anyhow::Result<()> {
    let (samples, distinct) = spec
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?.max(1))))
        .context("--compaction-job-prepare takes SAMPLES:STACKS")?;
    std::fs::create_dir_all(dir)?;
    let store = LocalFileSystem::new_with_prefix(dir)?;
    let metastore = Metastore::open(&dir.join("metastore.redb"))?;
    let functions: Arc<Functions> = Arc::new(functions(distinct).into_iter().collect());
    let mut rng = Rng::new(11);
    let mut source_bytes = 0;
    for b in 0..SOURCES {
        let profiles = source_profiles(b, samples, distinct, &functions, &mut rng);
        let block = write_block(&profiles, 0, &mut StackNodes::default())?;
        source_bytes += block.bytes.len() as u64;
        store
            .put(
                &ObjectPath::from(block.meta.path.as_str()),
                PutPayload::from(block.bytes),
            )
            .await?;
        metastore.apply(Command::add_block(block.meta))?;
    }
    let prepared = Prepared {
        samples,
        distinct_stacks: distinct,
        source_bytes,
    };
    std::fs::write(dir.join("prepared.json"), serde_json::to_vec(&prepared)?)?;
    Ok(())
}

/// Runs the prepared job in this (fresh) process and measures it: the
/// peak RSS is the whole process's, runtime included. The process is set
/// up as a compaction-worker process is (freed pages returned at once).
pub async fn run(dir: &Path) -> anyhow::Result<JobMemoryRun> {
    ember::allocator::return_freed_memory_at_once();
    let prepared: Prepared = serde_json::from_slice(&std::fs::read(dir.join("prepared.json"))?)?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir)?);
    let metastore = Arc::new(Metastore::open(&dir.join("metastore.redb"))?);
    let levels = vec![LevelRule {
        max_blocks: SOURCES as u32,
        max_age_nanos: i64::MAX,
    }];
    let planned = metastore.apply(
        Kind::PlanCompaction(PlanCompaction {
            now: 0,
            levels,
            max_jobs: 1,
        })
        .into(),
    )?;
    anyhow::ensure!(planned == Applied::Planned(1), "planned {planned:?}");
    let compactor = Compactor::new(
        store,
        Arc::new(InProcess(metastore.clone())),
        metastore.clone(),
        CompactionConfig {
            job_memory_limit: BUDGET,
            spill_dir: Some(dir.to_path_buf()),
            ..CompactionConfig::default()
        },
    )?;
    let t = Instant::now();
    anyhow::ensure!(compactor.work_once("bench").await?, "no job ran");
    let seconds = t.elapsed().as_secs_f64();
    let output_bytes = metastore.blocks("bench").iter().map(|b| b.size).sum();
    Ok(JobMemoryRun {
        samples: prepared.samples,
        distinct_stacks: prepared.distinct_stacks,
        sources: SOURCES,
        source_bytes: prepared.source_bytes,
        output_bytes,
        seconds,
        peak_rss_bytes: peak_rss(),
        budget_bytes: BUDGET,
    })
}

fn child(exe: &Path, args: &[&str], dir: &Path) -> anyhow::Result<Vec<u8>> {
    let output = std::process::Command::new(exe)
        .args(args)
        .arg("--out")
        .arg(dir)
        .env("EMBER_LOG", "warn")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running a compaction job child")?;
    anyhow::ensure!(
        output.status.success(),
        "{args:?} failed: {}",
        output.status
    );
    Ok(output.stdout)
}

/// Each job size: its sources written by one child process, the job run
/// by another, so that the second's peak RSS is the job's.
pub fn run_all(out: &Path, specs: &[String]) -> anyhow::Result<Vec<JobMemoryRun>> {
    let exe = std::env::current_exe()?;
    let mut runs = Vec::new();
    // `--compaction-jobs ''` asks for none.
    for (i, spec) in specs.iter().filter(|s| !s.is_empty()).enumerate() {
        tracing::info!("compaction job {spec} (samples:stacks): writing its sources");
        let dir = out.join(format!("job-memory-{i}"));
        child(&exe, &["--compaction-job-prepare", spec], &dir)?;
        tracing::info!("compaction job {spec}: running it");
        let stdout = child(&exe, &["--compaction-job-run"], &dir)?;
        let run: JobMemoryRun =
            serde_json::from_slice(&stdout).context("reading the job's figures")?;
        tracing::info!(
            "job {spec}: {:.1} s, peak RSS {:.0} MiB",
            run.seconds,
            run.peak_rss_bytes as f64 / (1 << 20) as f64
        );
        runs.push(run);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(runs)
}

pub fn markdown(runs: &[JobMemoryRun]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| job (20 source blocks) | distinct stacks | source bytes | output bytes | seconds | peak RSS of the job | budget |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    for r in runs {
        let _ = writeln!(
            s,
            "| {} samples | {} | {:.1} MB | {:.1} MB | {:.1} | {:.0} MiB | {} MiB |",
            r.samples,
            r.distinct_stacks,
            r.source_bytes as f64 / 1e6,
            r.output_bytes as f64 / 1e6,
            r.seconds,
            r.peak_rss_bytes as f64 / (1 << 20) as f64,
            r.budget_bytes >> 20
        );
    }
    s
}
