//! Compaction: the worker role.
//!
//! The metastore plans jobs (`engine/metastore/src/jobs.rs`); a worker
//! leases one, merges its sources with DataFusion plans under its own
//! memory pool (sorts spill to local disk), writes one block of the next
//! level in the level-0 format, uploads it and commits. The commit swaps
//! the sources for the output in the index and tombstones the retired
//! objects, which the metastore's lifecycle (`engine/metastore/src/
//! lifecycle.rs`) deletes after a delay so that queries which found them
//! first can finish.
//!
//! The worker ([`Compactor`]) reaches the metastore through a
//! [`MetastoreClient`], so it runs in the metastore's process or in one of
//! its own (`ember serve --roles compaction-worker`); the planner, the
//! deleter and retention run beside the metastore.
//!
//! Retried pushes (at-least-once) are dropped here: a profile with the same
//! type, series, time, total and sample count as one in an earlier source
//! block is the same push stored twice.

use ember_engine::profile::now_nanos;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanArray, Int64Builder, RecordBatch, StringBuilder, UInt64Builder,
};
use datafusion::arrow::compute::{concat_batches, filter_record_batch, lexsort_to_indices, take};
use datafusion::arrow::compute::{SortColumn, SortOptions};
use datafusion::arrow::datatypes::{Int64Type, TimestampNanosecondType, UInt64Type};
use datafusion::datasource::provider_as_source;
use datafusion::execution::memory_pool::{FairSpillPool, MemoryConsumer, MemoryReservation};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::utils::disjunction;
use datafusion::logical_expr::{col, lit, Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use ember_engine::block::{block_path, read_section, Section, FORMAT_VERSION};
use ember_engine::{BlockMeta, DatasetMeta, SectionMeta};
use ember_metastore::DatasetRef;
use ember_metastore::{
    command::Kind, idle, Applied, CommitJob, FailJob, Job, LeaseJob, MetastoreClient,
    MetastoreError, MetastoreIndex, RenewLease,
};
use futures::{StreamExt, TryStreamExt};
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, WriteMultipart};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tracing::{info, warn};

use crate::storage::BlockStoreOnly;
use crate::tables::{DatasetSource, SectionTable};

#[derive(Debug, Error)]
pub enum CompactionError {
    #[error("compaction job {job}: {source}")]
    Plan {
        job: String,
        source: datafusion::error::DataFusionError,
    },
    #[error("compaction job {job}: {source}")]
    Block {
        job: String,
        source: ember_engine::block::BlockError,
    },
    #[error("compaction job {job}: local file: {source}")]
    Io { job: String, source: std::io::Error },
    #[error("compaction job {job}: writing section: {source}")]
    Parquet {
        job: String,
        source: datafusion::parquet::errors::ParquetError,
    },
    #[error("compaction job {job}: fetching {path}: {source}")]
    Download {
        job: String,
        path: String,
        source: object_store::Error,
    },
    #[error("compaction job {job}: uploading {path}: {source}")]
    Upload {
        job: String,
        path: String,
        source: object_store::Error,
    },
    #[error("listing {prefix}: {source}")]
    List {
        prefix: String,
        source: object_store::Error,
    },
    #[error(transparent)]
    Metastore(#[from] MetastoreError),
    #[error("compaction job {job}: {reason}")]
    Invalid { job: String, reason: String },
}

/// Source blocks a job fetches at once when it reads them whole.
const SOURCE_FETCHES: usize = 8;

#[derive(Debug, Clone)]
pub struct CompactionConfig {
    /// Memory one job may hold; sorts beyond it spill to `spill_dir`.
    pub job_memory_limit: usize,
    /// Where sorts spill and output blocks are assembled (the OS temp
    /// directory when unset).
    pub spill_dir: Option<PathBuf>,
    pub lease: Duration,
    /// Retired objects are deleted this long after the commit.
    pub delete_delay: Duration,
    /// How often an idle worker looks for a job again.
    pub poll: Duration,
    /// An output block larger than this goes up in parts of this size (a
    /// multipart upload: retried part by part, never held whole in memory);
    /// a smaller one in one conditional PUT.
    pub upload_part_bytes: usize,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            job_memory_limit: 256 << 20,
            spill_dir: None,
            lease: Duration::from_secs(15),
            delete_delay: Duration::from_secs(15 * 60),
            poll: Duration::from_secs(1),
            upload_part_bytes: 16 << 20,
        }
    }
}

/// A point of a job where a test can stop the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionStep {
    /// The sources are merged into a local file; nothing uploaded yet.
    AfterRead,
    /// The output block is uploaded, not committed.
    AfterUpload,
    /// The commit is the next thing the worker does.
    BeforeCommit,
    /// Committed; the retired objects are not deleted yet.
    AfterCommit,
}

impl CompactionStep {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "compaction_after_read" => Self::AfterRead,
            "compaction_after_upload" => Self::AfterUpload,
            "compaction_before_commit" => Self::BeforeCommit,
            "compaction_after_commit" => Self::AfterCommit,
            _ => return None,
        })
    }
}

pub type StepHook = Arc<dyn Fn(CompactionStep) + Send + Sync>;

/// What a worker counts: jobs, bytes and samples in and out, the
/// write-to-first-compaction lag. The index's side (jobs by state, blocks
/// by level, deletions) is [`LifecycleMetrics`], kept where the metastore is.
#[derive(Clone)]
pub struct CompactionMetrics {
    pub jobs_committed: Counter,
    pub jobs_failed: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub samples_in: Counter,
    pub samples_out: Counter,
    pub profiles_deduplicated: Counter,
    pub level0_lag_seconds: Histogram,
    /// From a level-0 job's newest source block to its commit: the lag's
    /// part that is not its batch filling (for a full batch, the job's own
    /// delay; for one that went on age, that age).
    pub level0_batch_delay_seconds: Histogram,
    /// What the workers' memory pools hold now (each worker has its own,
    /// the job's budget), and a pool's largest size during each job.
    pub memory_reserved_bytes: Gauge,
    pub job_peak_memory_bytes: Histogram,
}

impl Default for CompactionMetrics {
    fn default() -> Self {
        Self {
            jobs_committed: Counter::default(),
            jobs_failed: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            samples_in: Counter::default(),
            samples_out: Counter::default(),
            profiles_deduplicated: Counter::default(),
            // 0.1 s steps to 12 s: with 500 ms flushes and batches of 20,
            // level-0 lags fall on a 0.5 s grid plus the job's own delay,
            // and coarser buckets (0.5 s before) could not tell that delay,
            // or the 5 s goal, from the grid.
            level0_lag_seconds: Histogram::new(
                (1..=120)
                    .map(|i| f64::from(i) / 10.0)
                    .chain([15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0]),
            ),
            level0_batch_delay_seconds: Histogram::new([
                0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0,
                5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
            memory_reserved_bytes: Gauge::default(),
            // 1 MiB to 16 GiB.
            job_peak_memory_bytes: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(
                    1024.0 * 1024.0,
                    2.0,
                    15,
                ),
            ),
        }
    }
}

impl CompactionMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "ember_compaction_jobs_committed",
                "Compaction jobs committed",
                &self.jobs_committed,
            ),
            (
                "ember_compaction_jobs_failed",
                "Compaction job attempts that failed",
                &self.jobs_failed,
            ),
            (
                "ember_compaction_bytes_in",
                "Bytes of source blocks compacted",
                &self.bytes_in,
            ),
            (
                "ember_compaction_bytes_out",
                "Bytes of blocks written by compaction",
                &self.bytes_out,
            ),
            (
                "ember_compaction_samples_in",
                "Sample rows read by compaction",
                &self.samples_in,
            ),
            (
                "ember_compaction_samples_out",
                "Sample rows written by compaction",
                &self.samples_out,
            ),
            (
                "ember_compaction_profiles_deduplicated",
                "Profiles stored twice (retried pushes) dropped by compaction",
                &self.profiles_deduplicated,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "ember_compaction_level0_lag_seconds",
            "Time from a level-0 block's write to its first compaction",
            self.level0_lag_seconds.clone(),
        );
        registry.register(
            "ember_compaction_level0_batch_delay_seconds",
            "Time from a level-0 job's newest source block to its commit",
            self.level0_batch_delay_seconds.clone(),
        );
        registry.register(
            "ember_compaction_memory_reserved_bytes",
            "Memory the compaction workers' pools hold now",
            self.memory_reserved_bytes.clone(),
        );
        registry.register(
            "ember_compaction_job_peak_memory_bytes",
            "Largest size of a worker's memory pool during each job",
            self.job_peak_memory_bytes.clone(),
        );
    }
}

/// A compaction worker: leases jobs from the metastore (in this process or
/// over the network), merges them and commits the result.
pub struct Compactor {
    store: Arc<dyn ObjectStore>,
    metastore: Arc<dyn MetastoreClient>,
    /// Asked whether a job waits before leasing one: a lease is a write
    /// to the (replicated) log, a look is not.
    index: Arc<dyn MetastoreIndex>,
    runtime: Arc<RuntimeEnv>,
    config: CompactionConfig,
    on_step: Option<StepHook>,
    /// The in-process metastore's activity, when it is in this process.
    wake: Option<watch::Receiver<u64>>,
    /// The highest level this worker takes jobs of (all when unset).
    max_level: Option<u32>,
    pub metrics: CompactionMetrics,
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Compactor {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        metastore: Arc<dyn MetastoreClient>,
        index: Arc<dyn MetastoreIndex>,
        config: CompactionConfig,
    ) -> datafusion::error::Result<Self> {
        let mut runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(config.job_memory_limit)))
            .with_object_store_registry(Arc::new(BlockStoreOnly::new(store.clone())));
        if let Some(dir) = &config.spill_dir {
            runtime = runtime.with_temp_file_path(dir.clone());
        }
        Ok(Self {
            store,
            metastore,
            index,
            runtime: runtime.build_arc()?,
            config,
            on_step: None,
            wake: None,
            max_level: None,
            metrics: CompactionMetrics::default(),
        })
    }

    /// Starts a job as soon as the metastore of this process plans it.
    pub fn with_wake(mut self, activity: watch::Receiver<u64>) -> Self {
        self.wake = Some(activity);
        self
    }

    /// Takes only jobs of level 0: kept free for them, a batch's first
    /// compaction starts as the batch completes instead of queuing behind
    /// a merge of older data (a level-1 job takes several times as long).
    pub fn for_level0_only(mut self) -> Self {
        self.max_level = Some(0);
        self
    }

    /// Reports into `metrics`, shared by the process's workers.
    pub fn with_metrics(mut self, metrics: CompactionMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Calls `hook` at each [`CompactionStep`] (fault injection in tests).
    pub fn with_step_hook(mut self, hook: StepHook) -> Self {
        self.on_step = Some(hook);
        self
    }

    fn step(&self, step: CompactionStep) {
        if let Some(hook) = &self.on_step {
            hook(step);
        }
    }

    async fn apply(&self, kind: Kind) -> Result<Applied, MetastoreError> {
        self.metastore.apply(kind.into()).await
    }

    /// Leases one job and runs it to its commit; false when none waited.
    pub async fn work_once(&self, worker: &str) -> Result<bool, CompactionError> {
        let now = now_nanos();
        if !self.index.job_waiting(now, self.max_level).await? {
            return Ok(false);
        }
        let lease = LeaseJob {
            worker: worker.to_string(),
            now,
            lease_nanos: nanos(self.config.lease),
            max_level: self.max_level,
        };
        let Applied::Leased(Some(job)) = self.apply(Kind::LeaseJob(lease)).await? else {
            return Ok(false);
        };
        self.run_job(job).await?;
        Ok(true)
    }

    pub async fn work_forever(self: Arc<Self>, worker: String) {
        let mut wake = self.wake.clone();
        loop {
            match self.work_once(&worker).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => warn!(worker, error = %e, "compaction job failed"),
            }
            idle(&mut wake, self.config.poll).await;
        }
    }

    /// Runs a leased job, renewing its lease meanwhile; a job that fails is
    /// reported to the metastore, which retries it or sets it aside.
    async fn run_job(&self, job: Job) -> Result<(), CompactionError> {
        let started = std::time::Instant::now();
        let peak = AtomicU64::new(0);
        let shown = AtomicI64::new(0);
        let merged = tokio::select! {
            r = self.compact(&job) => r,
            lost = self.keep_lease(&job) => Err(lost),
            never = self.sample_memory(&peak, &shown) => match never {},
        };
        self.metrics
            .memory_reserved_bytes
            .dec_by(shown.load(Ordering::Relaxed));
        self.metrics
            .job_peak_memory_bytes
            .observe(peak.load(Ordering::Relaxed) as f64);
        let output = match merged {
            Ok(output) => output,
            Err(e) => {
                self.metrics.jobs_failed.inc();
                if !matches!(e, CompactionError::Metastore(MetastoreError::Lease { .. })) {
                    let fail = FailJob {
                        job_id: job.id.clone(),
                        token: job.lease_token,
                        error: e.to_string(),
                    };
                    if let Err(f) = self.apply(Kind::FailJob(fail)).await {
                        warn!(job = job.id, error = %f, "could not record the failure");
                    }
                }
                return Err(e);
            }
        };
        self.step(CompactionStep::BeforeCommit);
        let out_path = output.as_ref().map(|o| o.path.clone());
        let samples_out: u64 = output
            .iter()
            .flat_map(|o| &o.datasets)
            .map(|d| d.samples)
            .sum();
        let bytes_out = output.as_ref().map_or(0, |o| o.size);
        let commit = CommitJob {
            job_id: job.id.clone(),
            token: job.lease_token,
            output,
            delete_after: now_nanos().saturating_add(nanos(self.config.delete_delay)),
        };
        if let Err(e) = self.apply(Kind::CommitJob(commit)).await {
            // The output is referenced by nothing: remove it, and let the
            // job run again under its next lease.
            if let Some(path) = out_path {
                let _ = self.store.delete(&ObjectPath::from(path)).await;
            }
            self.metrics.jobs_failed.inc();
            return Err(e.into());
        }
        self.step(CompactionStep::AfterCommit);
        self.record(&job, samples_out, bytes_out);
        info!(
            job = job.id,
            sources = job.sources.len(),
            samples_in = job.source_samples(),
            samples_out,
            bytes_in = job.source_bytes(),
            bytes_out,
            ms = started.elapsed().as_millis() as u64,
            "compaction job committed"
        );
        Ok(())
    }

    fn record(&self, job: &Job, samples_out: u64, bytes_out: u64) {
        let m = &self.metrics;
        m.jobs_committed.inc();
        m.bytes_in.inc_by(job.source_bytes());
        m.bytes_out.inc_by(bytes_out);
        m.samples_in.inc_by(job.source_samples());
        m.samples_out.inc_by(samples_out);
        if job.level == 0 {
            let now_ms = (now_nanos() / 1_000_000) as u64;
            let mut newest = None;
            for src in &job.sources {
                let Ok(id) = ulid::Ulid::from_string(&src.id) else {
                    continue;
                };
                let at = id.timestamp_ms();
                let lag = now_ms.saturating_sub(at);
                m.level0_lag_seconds.observe(lag as f64 / 1000.0);
                newest = newest.max(Some(at));
            }
            if let Some(newest) = newest {
                let delay = now_ms.saturating_sub(newest);
                m.level0_batch_delay_seconds.observe(delay as f64 / 1000.0);
            }
        }
    }

    /// Samples this worker's memory pool every 100 ms into `peak` and into
    /// the gauge, which sums the workers' pools (`shown` is this worker's
    /// part of it), until dropped with its job.
    async fn sample_memory(&self, peak: &AtomicU64, shown: &AtomicI64) -> std::convert::Infallible {
        loop {
            let held = self.runtime.memory_pool.reserved();
            peak.fetch_max(held as u64, Ordering::Relaxed);
            let held = i64::try_from(held).unwrap_or(i64::MAX);
            let before = shown.swap(held, Ordering::Relaxed);
            self.metrics.memory_reserved_bytes.inc_by(held - before);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Renews the lease every third of its length; returns only when the
    /// lease is lost (the job then stops: someone else owns it).
    async fn keep_lease(&self, job: &Job) -> CompactionError {
        loop {
            tokio::time::sleep(self.config.lease / 3).await;
            let renew = RenewLease {
                job_id: job.id.clone(),
                token: job.lease_token,
                now: now_nanos(),
                lease_nanos: nanos(self.config.lease),
            };
            match self.apply(Kind::RenewLease(renew)).await {
                Ok(_) => {}
                Err(e @ MetastoreError::Lease { .. }) => return e.into(),
                Err(e) => warn!(job = job.id, error = %e, "lease renewal failed; retrying"),
            }
        }
    }

    /// Merges the job's sources into one uploaded block of the next level.
    pub async fn compact(&self, job: &Job) -> Result<Option<BlockMeta>, CompactionError> {
        let dir = match &self.config.spill_dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir(),
        };
        let io = |source| CompactionError::Io {
            job: job.id.clone(),
            source,
        };
        let file = tempfile::tempfile_in(&dir).map_err(io)?;
        let mut out = BlockFile::new(file, &job.id, job.level + 1);
        let (reads, _held) = self.source_reads(job).await?;
        let mut datasets = Vec::new();
        for (service, sources) in sources_by_service(job) {
            if let Some(d) = self
                .merge_dataset(job, &reads, &service, &sources, &mut out)
                .await?
            {
                datasets.push(d);
            }
        }
        self.step(CompactionStep::AfterRead);
        if datasets.is_empty() {
            return Ok(None);
        }
        let id = ulid::Ulid::new().to_string();
        let level = job.level + 1;
        let meta = BlockMeta {
            format_version: FORMAT_VERSION,
            path: block_path(level, job.shard, &job.tenant, &id),
            id,
            shard: job.shard,
            compaction_level: level,
            min_time: datasets
                .iter()
                .map(|d| d.min_time)
                .min()
                .unwrap_or_default(),
            max_time: datasets
                .iter()
                .map(|d| d.max_time)
                .max()
                .unwrap_or_default(),
            size: 0,
            datasets,
            sources: ancestors(&job.sources),
        };
        let (file, size) = out.finish(&meta)?;
        let meta = BlockMeta { size, ..meta };
        self.upload(job, &meta.path, file, size).await?;
        self.step(CompactionStep::AfterUpload);
        Ok(Some(meta))
    }

    /// Where the job reads its sources from. Sources that fit in a quarter
    /// of the job's memory (level 0's, always at v2's thresholds) are
    /// fetched whole, one GET each, side by side, and read from memory:
    /// read in place, every dataset's every section would cost its own
    /// ranged reads (footer, metadata, pages), a few hundred small requests
    /// for a level-0 job. The reservation holds their memory in the job's
    /// pool until the job ends.
    pub(crate) async fn source_reads(
        &self,
        job: &Job,
    ) -> Result<(Arc<dyn ObjectStore>, Option<MemoryReservation>), CompactionError> {
        let bytes = job.source_bytes() as usize;
        if bytes > self.config.job_memory_limit / 4 {
            return Ok((self.store.clone(), None));
        }
        let held = MemoryConsumer::new(format!("compaction sources of {}", job.id))
            .register(&self.runtime.memory_pool);
        if held.try_grow(bytes).is_err() {
            return Ok((self.store.clone(), None));
        }
        let memory = InMemory::new();
        let download_err = |path: &str| {
            let path = path.to_string();
            move |source| CompactionError::Download {
                job: job.id.clone(),
                path,
                source,
            }
        };
        futures::stream::iter(&job.sources)
            .map(|block| async move {
                let location = ObjectPath::from(block.path.as_str());
                let fetch = async {
                    let got = self.store.get(&location).await?;
                    got.bytes().await
                };
                let bytes = fetch.await.map_err(download_err(&block.path))?;
                Ok::<_, CompactionError>((location, bytes))
            })
            .buffer_unordered(SOURCE_FETCHES)
            .try_for_each(|(location, bytes)| {
                let memory = &memory;
                async move {
                    let kept = memory.put(&location, PutPayload::from(bytes)).await;
                    kept.map_err(download_err(location.as_ref()))?;
                    Ok::<(), CompactionError>(())
                }
            })
            .await?;
        Ok((Arc::new(memory), Some(held)))
    }

    async fn upload(
        &self,
        job: &Job,
        path: &str,
        mut file: File,
        size: u64,
    ) -> Result<(), CompactionError> {
        let part = self.config.upload_part_bytes.max(1);
        let location = ObjectPath::from(path);
        let upload_err = |source| CompactionError::Upload {
            job: job.id.clone(),
            path: path.to_string(),
            source,
        };
        let io = |source| CompactionError::Io {
            job: job.id.clone(),
            source,
        };
        file.rewind().map_err(io)?;
        if size as usize <= part {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).map_err(io)?;
            self.store
                .put_opts(&location, PutPayload::from(bytes), PutMode::Create.into())
                .await
                .map_err(upload_err)?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&location)
            .await
            .map_err(upload_err)?;
        // Output paths are new ULIDs, so a multipart upload (which has no
        // conditional form) cannot overwrite another job's block.
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
        let mut buf = vec![0u8; part];
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(2).await.map_err(upload_err)?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(upload_err)?;
        Ok(())
    }

    /// A session on the compaction runtime: its memory pool, its spill
    /// directory, one partition (the worker runs beside ingest and queries).
    fn session(&self) -> SessionContext {
        let mut config = SessionConfig::new().with_target_partitions(1);
        let options = config.options_mut();
        options.execution.parquet.schema_force_view_types = false;
        // A sort keeps this much aside to merge its spills; under a small
        // budget the default (10 MiB) would take the whole pool.
        options.execution.sort_spill_reservation_bytes =
            (self.config.job_memory_limit / 8).min(10 << 20);
        SessionContext::new_with_config_rt(config, self.runtime.clone())
    }

    /// Merges one service's datasets into the four sections of one dataset.
    async fn merge_dataset(
        &self,
        job: &Job,
        reads: &Arc<dyn ObjectStore>,
        service: &str,
        sources: &[DatasetRef],
        out: &mut BlockFile,
    ) -> Result<Option<DatasetMeta>, CompactionError> {
        let plan_err = |source| CompactionError::Plan {
            job: job.id.clone(),
            source,
        };
        let profiles = self.merged_profiles(job, reads, sources).await?;
        if profiles.batch.num_rows() == 0 {
            return Ok(None);
        }
        let ctx = self.session();
        let samples = self
            .samples_plan(reads, sources, &profiles.dropped)
            .map_err(plan_err)?;
        // Every source is sorted by the section's order, so these sorts
        // plan as streaming merges of the sources (no sort, no spill).
        let sorted_samples = LogicalPlanBuilder::from(samples.clone())
            .sort(sort_exprs(Section::Samples))
            .and_then(|b| b.build())
            .map_err(plan_err)?;
        let totals_input = if profiles.dropped.iter().all(Vec::is_empty) {
            self.scan(reads, Section::Totals, sources.to_vec())
                .and_then(|b| b.build())
                .map_err(plan_err)?
        } else {
            samples
        };
        // Sorted by (type, stack): equal neighbours are summed while written.
        let totals = LogicalPlanBuilder::from(totals_input)
            .project(vec![col("profile_type"), col("stack_id"), col("value")])
            .and_then(|b| b.sort(sort_exprs(Section::Totals)))
            .and_then(|b| b.build())
            .map_err(plan_err)?;
        let stacks = self
            .scan(reads, Section::Stacks, sources.to_vec())
            .and_then(|b| b.sort(sort_exprs(Section::Stacks)))
            .and_then(|b| b.build())
            .map_err(plan_err)?;

        let profiles_meta = out.write_batches(Section::Profiles, vec![profiles.batch.clone()])?;
        let samples_meta = out
            .write_plan(&ctx, Section::Samples, sorted_samples, &mut Keep)
            .await?;
        let stacks_meta = out
            .write_plan(&ctx, Section::Stacks, stacks, &mut DistinctNodes::default())
            .await?;
        let totals_meta = out
            .write_plan(&ctx, Section::Totals, totals, &mut SumTotals::default())
            .await?;
        let b = &profiles.batch;
        let times = b.column(0).as_primitive::<TimestampNanosecondType>();
        let mut series = distinct_strings(b.column(3));
        series.sort();
        let mut profile_types = distinct_strings(b.column(2));
        profile_types.sort();
        Ok(Some(DatasetMeta {
            tenant: job.tenant.clone(),
            service_name: service.to_string(),
            min_time: times.values().iter().copied().min().unwrap_or_default(),
            max_time: times.values().iter().copied().max().unwrap_or_default(),
            profile_types,
            series,
            profiles: b.num_rows() as u64,
            samples: samples_meta.rows,
            sections: vec![profiles_meta, samples_meta, stacks_meta, totals_meta],
        }))
    }

    fn scan(
        &self,
        reads: &Arc<dyn ObjectStore>,
        section: Section,
        datasets: Vec<DatasetRef>,
    ) -> datafusion::error::Result<LogicalPlanBuilder> {
        let table = SectionTable::new(
            section,
            reads.clone(),
            DatasetSource::Fixed(Arc::new(datasets)),
        )
        .sorted();
        LogicalPlanBuilder::scan(section.name(), provider_as_source(Arc::new(table)), None)
    }

    /// Every source's samples, less those of the profiles dropped as
    /// duplicates: the sources without duplicates in one scan, each other
    /// source in its own, filtered.
    fn samples_plan(
        &self,
        reads: &Arc<dyn ObjectStore>,
        sources: &[DatasetRef],
        dropped: &[Vec<ProfileKey>],
    ) -> datafusion::error::Result<LogicalPlan> {
        let clean: Vec<DatasetRef> = sources
            .iter()
            .zip(dropped)
            .filter(|(_, d)| d.is_empty())
            .map(|(s, _)| s.clone())
            .collect();
        let mut plan: Option<LogicalPlanBuilder> = None;
        if !clean.is_empty() {
            plan = Some(self.scan(reads, Section::Samples, clean)?);
        }
        for (source, keys) in sources.iter().zip(dropped) {
            if keys.is_empty() {
                continue;
            }
            let is_dropped = disjunction(keys.iter().map(|k| {
                col("profile_type")
                    .eq(lit(k.profile_type.clone()))
                    .and(col("labels").eq(lit(k.labels.clone())))
                    .and(col("time").eq(lit(ScalarValue::TimestampNanosecond(
                        Some(k.time),
                        Some("UTC".into()),
                    ))))
            }))
            .unwrap_or(lit(false));
            let scan = self
                .scan(reads, Section::Samples, vec![source.clone()])?
                .filter(Expr::Not(Box::new(is_dropped)))?
                .build()?;
            plan = Some(match plan {
                Some(p) => p.union(scan)?,
                None => LogicalPlanBuilder::from(scan),
            });
        }
        match plan {
            Some(p) => p.build(),
            None => self.scan(reads, Section::Samples, Vec::new())?.build(),
        }
    }

    /// The sources' profiles rows, sorted as the writer sorts them, less
    /// the duplicates of profiles in earlier sources.
    async fn merged_profiles(
        &self,
        job: &Job,
        reads: &Arc<dyn ObjectStore>,
        sources: &[DatasetRef],
    ) -> Result<MergedProfiles, CompactionError> {
        let block_err = |source| CompactionError::Block {
            job: job.id.clone(),
            source,
        };
        let mut first_source: HashMap<(ProfileKey, i64, u64), usize> = HashMap::new();
        let mut kept = Vec::new();
        let mut dropped = vec![Vec::new(); sources.len()];
        for (i, d) in sources.iter().enumerate() {
            let Some(section) = d.dataset.section(Section::Profiles) else {
                continue;
            };
            let batches = read_section(reads.clone(), &d.path, section)
                .await
                .map_err(block_err)?;
            for b in batches {
                let times = b.column(0).as_primitive::<TimestampNanosecondType>();
                let types = b.column(2).as_string::<i32>();
                let labels = b.column(3).as_string::<i32>();
                let samples = b.column(6).as_primitive::<UInt64Type>();
                let totals = b.column(7).as_primitive::<Int64Type>();
                let mut keep = Vec::with_capacity(b.num_rows());
                for r in 0..b.num_rows() {
                    let key = ProfileKey {
                        profile_type: types.value(r).to_string(),
                        labels: labels.value(r).to_string(),
                        time: times.value(r),
                    };
                    let full = (key, totals.value(r), samples.value(r));
                    let first = *first_source.entry(full.clone()).or_insert(i);
                    keep.push(first == i);
                    if first != i {
                        dropped[i].push(full.0);
                    }
                }
                let mask = BooleanArray::from(keep);
                let b = filter_record_batch(&b, &mask).map_err(|e| CompactionError::Plan {
                    job: job.id.clone(),
                    source: e.into(),
                })?;
                kept.push(b);
            }
        }
        let n: usize = dropped.iter().map(Vec::len).sum();
        if n > 0 {
            self.metrics.profiles_deduplicated.inc_by(n as u64);
            info!(job = job.id, profiles = n, "duplicate profiles dropped");
        }
        let arrow_err = |e: datafusion::arrow::error::ArrowError| CompactionError::Plan {
            job: job.id.clone(),
            source: e.into(),
        };
        let all = concat_batches(&Section::Profiles.schema(), &kept).map_err(arrow_err)?;
        Ok(MergedProfiles {
            batch: sort_profiles(&all).map_err(arrow_err)?,
            dropped,
        })
    }
}

fn sort_exprs(section: Section) -> Vec<datafusion::logical_expr::SortExpr> {
    section
        .sort_order()
        .iter()
        .map(|c| col(*c).sort(true, true))
        .collect()
}

/// A profile as a duplicate is recognised (with its total and sample count).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ProfileKey {
    profile_type: String,
    labels: String,
    time: i64,
}

struct MergedProfiles {
    batch: RecordBatch,
    /// Per source, the profiles dropped from it.
    dropped: Vec<Vec<ProfileKey>>,
}

/// Sorted by profile type, series and time, as the level-0 writer sorts.
fn sort_profiles(b: &RecordBatch) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let columns: Vec<SortColumn> = [2, 3, 0]
        .iter()
        .map(|&i| SortColumn {
            values: b.column(i).clone(),
            options: Some(SortOptions::default()),
        })
        .collect();
    let indices = lexsort_to_indices(&columns, None)?;
    let sorted: Vec<ArrayRef> = b
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &indices, None))
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(b.schema(), sorted)
}

fn distinct_strings(a: &ArrayRef) -> Vec<String> {
    let a = a.as_string::<i32>();
    let mut out: Vec<String> = a.iter().flatten().map(str::to_string).collect();
    out.sort();
    out.dedup();
    out
}

/// What the writer does to each merged batch of a section.
trait Fold {
    fn fold(&mut self, batch: RecordBatch) -> Option<RecordBatch>;
    /// Rows held back until the end.
    fn finish(&mut self) -> Option<RecordBatch> {
        None
    }
}

/// Samples and profiles are written as merged.
struct Keep;

impl Fold for Keep {
    fn fold(&mut self, batch: RecordBatch) -> Option<RecordBatch> {
        Some(batch)
    }
}

/// Stack nodes merged by id: each node once (the same id is the same node
/// in every block).
#[derive(Default)]
struct DistinctNodes {
    last: Option<u64>,
}

impl Fold for DistinctNodes {
    fn fold(&mut self, b: RecordBatch) -> Option<RecordBatch> {
        let ids = b.column(0).as_primitive::<UInt64Type>();
        let keep: BooleanArray = ids
            .values()
            .iter()
            .map(|&id| {
                let new = self.last != Some(id);
                self.last = Some(id);
                Some(new)
            })
            .collect();
        filter_record_batch(&b, &keep).ok()
    }
}

/// Totals merged by (type, stack): equal neighbours summed (saturating,
/// as every sum of values is). The last key waits for the next batch.
#[derive(Default)]
struct SumTotals {
    pending: Option<(String, u64, i64)>,
}

impl SumTotals {
    fn batch(rows: Vec<(String, u64, i64)>) -> Option<RecordBatch> {
        if rows.is_empty() {
            return None;
        }
        let mut ty = StringBuilder::new();
        let mut id = UInt64Builder::with_capacity(rows.len());
        let mut value = Int64Builder::with_capacity(rows.len());
        for (t, i, v) in rows {
            ty.append_value(t);
            id.append_value(i);
            value.append_value(v);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(ty.finish()),
            Arc::new(id.finish()),
            Arc::new(value.finish()),
        ];
        RecordBatch::try_new(Section::Totals.schema(), columns).ok()
    }
}

impl Fold for SumTotals {
    fn fold(&mut self, b: RecordBatch) -> Option<RecordBatch> {
        let types = b.column(0).as_string::<i32>();
        let ids = b.column(1).as_primitive::<UInt64Type>();
        let values = b.column(2).as_primitive::<Int64Type>();
        let mut out = Vec::new();
        for r in 0..b.num_rows() {
            let (t, id, v) = (types.value(r), ids.value(r), values.value(r));
            match &mut self.pending {
                Some((pt, pid, sum)) if pt == t && *pid == id => *sum = sum.saturating_add(v),
                pending => {
                    if let Some(done) = pending.replace((t.to_string(), id, v)) {
                        out.push(done);
                    }
                }
            }
        }
        Self::batch(out)
    }

    fn finish(&mut self) -> Option<RecordBatch> {
        Self::batch(self.pending.take().into_iter().collect())
    }
}

/// Every block merged into the job's output: its sources and theirs, so
/// that an index rebuilt from the objects leaves all of them out, however
/// many compactions ago they were merged.
fn ancestors(sources: &[BlockMeta]) -> Vec<String> {
    let mut ids: Vec<String> = sources
        .iter()
        .flat_map(|s| s.sources.iter().cloned().chain([s.id.clone()]))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Each service of the job with its source datasets, in source order.
fn sources_by_service(job: &Job) -> BTreeMap<String, Vec<DatasetRef>> {
    let mut out: BTreeMap<String, Vec<DatasetRef>> = BTreeMap::new();
    for block in &job.sources {
        let id: Arc<str> = Arc::from(block.id.as_str());
        let path: Arc<str> = Arc::from(block.path.as_str());
        for d in &block.datasets {
            if d.tenant != job.tenant {
                continue;
            }
            out.entry(d.service_name.clone())
                .or_default()
                .push(DatasetRef {
                    block_id: id.clone(),
                    path: path.clone(),
                    dataset: Arc::new(d.clone()),
                });
        }
    }
    out
}

/// The output block being assembled in a local file: sections one after
/// another, then the footer, exactly as a segment writer lays them out.
struct BlockFile {
    file: BufWriter<File>,
    offset: u64,
    job: String,
    /// The output block's level, which decides how its sections are encoded.
    level: u32,
}

impl BlockFile {
    fn new(file: File, job: &str, level: u32) -> Self {
        Self {
            file: BufWriter::with_capacity(1 << 20, file),
            offset: 0,
            job: job.to_string(),
            level,
        }
    }

    fn parquet_err(&self) -> impl Fn(datafusion::parquet::errors::ParquetError) -> CompactionError {
        let job = self.job.clone();
        move |source| CompactionError::Parquet {
            job: job.clone(),
            source,
        }
    }

    fn writer(
        &mut self,
        section: Section,
    ) -> Result<ArrowWriter<&mut BufWriter<File>>, CompactionError> {
        let props = section.writer_properties(self.level);
        let err = self.parquet_err();
        ArrowWriter::try_new(&mut self.file, section.schema(), Some(props)).map_err(err)
    }

    fn write_batches(
        &mut self,
        section: Section,
        batches: Vec<RecordBatch>,
    ) -> Result<SectionMeta, CompactionError> {
        let err = self.parquet_err();
        let mut rows = 0u64;
        let mut writer = self.writer(section)?;
        for b in batches {
            rows += b.num_rows() as u64;
            writer.write(&b).map_err(&err)?;
        }
        writer.close().map_err(&err)?;
        self.section_written(section, rows)
    }

    /// Streams a plan's output into a section, through `each` (which may
    /// drop rows), in the section's schema.
    async fn write_plan(
        &mut self,
        ctx: &SessionContext,
        section: Section,
        plan: LogicalPlan,
        fold: &mut dyn Fold,
    ) -> Result<SectionMeta, CompactionError> {
        let job = format!("{}, section {}", self.job, section.name());
        let plan_err = |source| CompactionError::Plan {
            job: job.clone(),
            source,
        };
        let physical = ctx
            .state()
            .create_physical_plan(&plan)
            .await
            .map_err(plan_err)?;
        tracing::debug!(
            section = section.name(),
            plan = %datafusion::physical_plan::displayable(physical.as_ref()).indent(false),
            "compaction plan"
        );
        let mut stream = execute_stream(physical, ctx.task_ctx()).map_err(plan_err)?;
        let err = self.parquet_err();
        let schema = section.schema();
        let mut rows = 0u64;
        let mut writer = self.writer(section)?;
        loop {
            let next = stream.next().await;
            let done = next.is_none();
            let folded = match next {
                Some(batch) => fold.fold(batch.map_err(plan_err)?),
                None => fold.finish(),
            };
            if let Some(batch) = folded {
                // Same columns, declared as the section declares them.
                let batch = RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
                    .map_err(|e| plan_err(e.into()))?;
                rows += batch.num_rows() as u64;
                writer.write(&batch).map_err(&err)?;
            }
            if done {
                break;
            }
        }
        writer.close().map_err(&err)?;
        self.section_written(section, rows)
    }

    /// The section just written: from the previous end to the file's end.
    fn section_written(
        &mut self,
        section: Section,
        rows: u64,
    ) -> Result<SectionMeta, CompactionError> {
        let end = self
            .file
            .stream_position()
            .map_err(|source| CompactionError::Io {
                job: self.job.clone(),
                source,
            })?;
        let meta = SectionMeta {
            kind: section.name().to_string(),
            offset: self.offset,
            size: end - self.offset,
            rows,
            keyed: false,
        };
        self.offset = end;
        Ok(meta)
    }

    /// Appends the footer; returns the file and the block's size.
    fn finish(mut self, meta: &BlockMeta) -> Result<(File, u64), CompactionError> {
        let io = |source| CompactionError::Io {
            job: self.job.clone(),
            source,
        };
        let framed = meta.encode_framed();
        self.file.write_all(&framed).map_err(io)?;
        let size = self.offset + framed.len() as u64;
        let job = self.job.clone();
        let file = self.file.into_inner().map_err(|e| CompactionError::Io {
            job,
            source: e.into_error(),
        })?;
        Ok((file, size))
    }
}
