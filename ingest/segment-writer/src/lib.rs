//! The segment writer: accumulates profiles per shard and flushes each
//! shard's open segment as ONE block object, registers it in the metastore,
//! and only then acknowledges every request in it. No WAL, no local disk.
//!
//! Flush policy (group commit under a cap): a shard flushes as soon as it
//! has data, unless it flushed less than `min_flush_interval` ago, in which
//! case it waits out the rest of the interval while requests accumulate,
//! or until `max_segment_bytes` is reached. One task per shard, so never
//! two flushes of a shard in flight. An idle shard acks in one PUT's time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ember_engine::block::{write_block, BlockMeta, StackNodes};
use ember_engine::profile::Profile;
use ember_metastore::{partition_of, MetastoreClient};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

pub use crate::dlq::{recover_dlq, recover_dlq_forever, DlqReport};
pub use crate::error::SegmentError;

mod dlq;
mod error;
mod messages {
    //! The segment writer's network messages, from
    //! `proto/ember/segmentwriter/v1/segmentwriter.proto`.
    include!(concat!(env!("OUT_DIR"), "/ember.segmentwriter.v1.rs"));
}
pub mod remote;
mod wire;

#[derive(Debug, Clone)]
pub struct SegmentConfig {
    pub shards: u32,
    pub min_flush_interval: Duration,
    pub max_segment_bytes: usize,
    pub upload_timeout: Duration,
    pub upload_retries: u32,
    pub metadata_timeout: Duration,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            shards: 4,
            min_flush_interval: Duration::from_millis(500),
            max_segment_bytes: 64 << 20,
            upload_timeout: Duration::from_secs(2),
            upload_retries: 3,
            metadata_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Clone)]
pub struct SegmentMetrics {
    pub flushes: Counter,
    pub flush_failures: Counter,
    pub flush_seconds: Histogram,
    pub flushed_bytes: Counter,
    pub profiles: Counter,
    pub acks: Counter,
    pub dlq_writes: Counter,
    pub dlq_recovered: Counter,
    pub dlq_quarantined: Counter,
    pub stack_node_bytes: Gauge,
}

impl Default for SegmentMetrics {
    fn default() -> Self {
        Self {
            flushes: Counter::default(),
            flush_failures: Counter::default(),
            flush_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            flushed_bytes: Counter::default(),
            profiles: Counter::default(),
            acks: Counter::default(),
            dlq_writes: Counter::default(),
            dlq_recovered: Counter::default(),
            dlq_quarantined: Counter::default(),
            stack_node_bytes: Gauge::default(),
        }
    }
}

impl SegmentMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "ember_segment_flushes",
            "Segments flushed to object storage",
            self.flushes.clone(),
        );
        r.register(
            "ember_segment_flush_failures",
            "Segment flushes that failed",
            self.flush_failures.clone(),
        );
        r.register(
            "ember_segment_flush_seconds",
            "Time to encode, upload and index a segment",
            self.flush_seconds.clone(),
        );
        r.register(
            "ember_segment_flushed_bytes",
            "Bytes of segments written",
            self.flushed_bytes.clone(),
        );
        r.register(
            "ember_segment_profiles",
            "Profiles made durable",
            self.profiles.clone(),
        );
        r.register(
            "ember_segment_acks",
            "Requests acknowledged after their segment was durable",
            self.acks.clone(),
        );
        r.register(
            "ember_segment_dlq_writes",
            "Block metadata written to dlq/ because the metastore failed",
            self.dlq_writes.clone(),
        );
        r.register(
            "ember_dlq_recovered",
            "dlq/ entries whose blocks were registered by recovery",
            self.dlq_recovered.clone(),
        );
        r.register(
            "ember_segment_stack_node_bytes",
            "Bytes of stack node ids the shards keep across flushes",
            self.stack_node_bytes.clone(),
        );
        r.register(
            "ember_dlq_quarantined",
            "dlq/ entries that could not be decoded or registered, moved to dlq-quarantine/",
            self.dlq_quarantined.clone(),
        );
    }
}

struct Pending {
    profiles: Vec<Profile>,
    ack: oneshot::Sender<Result<(), String>>,
}

pub struct SegmentWriter {
    shards: Vec<mpsc::Sender<Pending>>,
}

/// Where a flush writes: the object store and the metastore.
#[derive(Clone)]
pub struct Sink {
    pub store: Arc<dyn ObjectStore>,
    /// In this process, or the metastore's over the network.
    pub metastore: Arc<dyn MetastoreClient>,
    /// Called at each step of a flush; none but in fault-injection tests
    /// (`--faults crash_at=...`).
    pub flush_hook: Option<Arc<dyn FlushHook>>,
}

/// A step of a segment flush, where a [`FlushHook`] is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushStep {
    /// The block is encoded; nothing is written yet.
    BeforeUpload,
    /// The block is in object storage, not in the index.
    AfterUpload,
    /// The block is indexed; no request is acknowledged yet.
    AfterIndex,
}

/// Told when a flush reaches each [`FlushStep`]: how tests stop a process
/// between the steps to prove that none of them loses an acknowledged
/// profile.
pub trait FlushHook: Send + Sync {
    fn reached(&self, step: FlushStep);
}

/// What the distributor needs of a segment writer: in this process, or
/// one across the network.
#[async_trait::async_trait]
pub trait SegmentWriterClient: Send + Sync {
    /// Shards profiles are routed over.
    fn shards(&self) -> u32;

    /// Adds profiles to a shard's open segment; resolves once they are
    /// durable in object storage and indexed by the metastore.
    async fn append(&self, shard: u32, profiles: Vec<Profile>) -> Result<(), SegmentError>;
}

impl SegmentWriter {
    pub fn start(config: SegmentConfig, sink: Sink, metrics: SegmentMetrics) -> Self {
        let shards = (0..config.shards.max(1))
            .map(|shard| {
                let (tx, rx) = mpsc::channel(1024);
                let worker = ShardWorker {
                    shard,
                    nodes: Default::default(),
                    config: config.clone(),
                    sink: sink.clone(),
                    metrics: metrics.clone(),
                };
                tokio::spawn(worker.run(rx));
                tx
            })
            .collect();
        Self { shards }
    }
}

#[async_trait::async_trait]
impl SegmentWriterClient for SegmentWriter {
    fn shards(&self) -> u32 {
        self.shards.len() as u32
    }

    async fn append(&self, shard: u32, profiles: Vec<Profile>) -> Result<(), SegmentError> {
        let tx = self
            .shards
            .get(shard as usize)
            .ok_or_else(|| SegmentError::Storage(format!("no shard {shard}")))?;
        let (ack, done) = oneshot::channel();
        tx.send(Pending { profiles, ack })
            .await
            .map_err(|_| SegmentError::ShuttingDown)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SegmentError::Storage(e)),
            Err(_) => Err(SegmentError::ShuttingDown),
        }
    }
}

/// A shard's stack node cache, and how much of it the gauge counts.
#[derive(Default)]
struct ShardNodes {
    cache: StackNodes,
    counted: usize,
}

struct ShardWorker {
    shard: u32,
    /// Stack node ids of the datasets this shard writes (a dataset always
    /// goes to the same shard), kept across flushes.
    nodes: Arc<Mutex<ShardNodes>>,
    config: SegmentConfig,
    sink: Sink,
    metrics: SegmentMetrics,
}

impl ShardWorker {
    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        let interval = self.config.min_flush_interval;
        // As if the last flush came `phase` less than an interval before the
        // start, so the first one waits out this shard's phase.
        let mut last_flush = Instant::now().checked_sub(interval.saturating_sub(self.phase()));
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let mut size: usize = batch[0].profiles.iter().map(Profile::size_bytes).sum();
            let deadline = last_flush.map(|t| t + interval);
            // Group commit: gather what arrives until the cap allows a flush.
            loop {
                while size < self.config.max_segment_bytes {
                    match rx.try_recv() {
                        Ok(p) => {
                            size += p.profiles.iter().map(Profile::size_bytes).sum::<usize>();
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                let now = Instant::now();
                match deadline {
                    Some(d) if d > now && size < self.config.max_segment_bytes => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(d.into()) => {}
                            next = rx.recv() => match next {
                                Some(p) => {
                                    size += p.profiles.iter().map(Profile::size_bytes).sum::<usize>();
                                    batch.push(p);
                                }
                                None => break,
                            }
                        }
                    }
                    _ => break,
                }
            }
            last_flush = Some(Instant::now());
            self.flush(batch).await;
        }
    }

    /// How far into the flush interval this shard's first flush may come.
    /// Shards started together and kept busy would otherwise flush in step
    /// for as long as the process runs, so their level-0 compaction queues
    /// fill in step and their jobs fall due at the same moment, each
    /// waiting for the others' workers. Spread over the interval, a level-0
    /// job starts as its batch completes.
    fn phase(&self) -> Duration {
        self.config.min_flush_interval * self.shard / self.config.shards.max(1)
    }

    fn reached(&self, step: FlushStep) {
        if let Some(hook) = &self.sink.flush_hook {
            hook.reached(step);
        }
    }

    async fn flush(&self, batch: Vec<Pending>) {
        let started = Instant::now();
        let (profiles, acks): (Vec<Vec<Profile>>, Vec<_>) =
            batch.into_iter().map(|p| (p.profiles, p.ack)).unzip();
        let profiles: Vec<Profile> = profiles.into_iter().flatten().collect();
        let count = profiles.len() as u64;
        let result = self.write(profiles).await;
        if result.is_ok() {
            self.reached(FlushStep::AfterIndex);
        }
        match &result {
            Ok(metas) => {
                let bytes: u64 = metas.iter().map(|m| m.size).sum();
                self.metrics.flushes.inc();
                self.metrics.flushed_bytes.inc_by(bytes);
                self.metrics.profiles.inc_by(count);
                self.metrics.acks.inc_by(acks.len() as u64);
                tracing::debug!(
                    shard = self.shard,
                    blocks = metas.len(),
                    bytes,
                    profiles = count,
                    requests = acks.len(),
                    "segment flushed"
                );
            }
            Err(e) => {
                self.metrics.flush_failures.inc();
                warn!(shard = self.shard, error = %e, "segment flush failed; requests are not acknowledged");
            }
        }
        self.metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        let result = result.map(|_| ()).map_err(|e| e.to_string());
        for ack in acks {
            let _ = ack.send(result.clone());
        }
    }

    /// Writes the segment as one block per 6 h partition its profiles fall
    /// in (one block, except across a partition boundary or for profiles
    /// of odd times), so no block costs the index more than one entry per
    /// tenant. Returns once every block is uploaded and registered (or its
    /// metadata is safe in `dlq/`).
    async fn write(&self, profiles: Vec<Profile>) -> Result<Vec<BlockMeta>, SegmentError> {
        let shard = self.shard;
        let nodes = self.nodes.clone();
        let node_bytes = self.metrics.stack_node_bytes.clone();
        let blocks = tokio::task::spawn_blocking(move || {
            // A flush that panicked may have left the cache half-updated:
            // start it over rather than trust it.
            let mut nodes = nodes.lock().unwrap_or_else(|poisoned| {
                let mut nodes = poisoned.into_inner();
                nodes.cache = StackNodes::default();
                nodes
            });
            let blocks = by_partition(profiles)
                .iter()
                .map(|p| write_block(p, shard, &mut nodes.cache))
                .collect::<Result<Vec<_>, _>>();
            let now = nodes.cache.bytes();
            node_bytes.inc_by(now as i64 - nodes.counted as i64);
            nodes.counted = now;
            blocks
        })
        .await
        .map_err(|e| SegmentError::Storage(format!("encoding task: {e}")))?
        .map_err(|e| SegmentError::Storage(e.to_string()))?;
        self.reached(FlushStep::BeforeUpload);
        futures::future::try_join_all(
            blocks
                .iter()
                .map(|b| self.upload(&b.meta.path, b.bytes.clone())),
        )
        .await?;
        self.reached(FlushStep::AfterUpload);
        let metas: Vec<BlockMeta> = blocks.into_iter().map(|b| b.meta).collect();
        if let Err(e) = self.register(metas.clone()).await {
            // The metastore may still apply a timed-out command: AddBlock is
            // idempotent, so the dlq copy then registers nothing twice.
            warn!(blocks = metas.len(), error = %e, "metastore unavailable; writing block metadata to dlq/");
            let mut written = Vec::with_capacity(metas.len());
            for meta in &metas {
                match dlq::write_dlq(self.sink.store.as_ref(), meta).await {
                    Ok(path) => written.push(path),
                    Err(e) => {
                        // The request is not acknowledged, so its retry must
                        // not meet this flush's blocks registered later.
                        for path in &written {
                            let _ = self.sink.store.delete(path).await;
                        }
                        return Err(e);
                    }
                }
                self.metrics.dlq_writes.inc();
            }
        }
        Ok(metas)
    }

    async fn upload(&self, path: &str, bytes: Bytes) -> Result<(), SegmentError> {
        let location = Path::from(path);
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            // Never over another object: the name is a fresh ULID, so one
            // already there of the same size is this upload's own earlier
            // attempt, whose answer was lost (a PUT is all or nothing).
            let put = self.sink.store.put_opts(
                &location,
                PutPayload::from(bytes.clone()),
                PutMode::Create.into(),
            );
            let err = match tokio::time::timeout(self.config.upload_timeout, put).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(object_store::Error::AlreadyExists { .. })) => {
                    match self.sink.store.head(&location).await {
                        Ok(meta) if meta.size == bytes.len() as u64 => return Ok(()),
                        Ok(meta) => {
                            format!("another object of {} bytes is already at {path}", meta.size)
                        }
                        Err(e) => e.to_string(),
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {:?}", self.config.upload_timeout),
            };
            attempt += 1;
            if attempt > self.config.upload_retries {
                return Err(SegmentError::Storage(format!("uploading {path}: {err}")));
            }
            warn!(path, attempt, error = %err, "segment upload failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    async fn register(&self, metas: Vec<BlockMeta>) -> Result<(), String> {
        // A task of its own: like a metastore across the network, it may
        // still apply the command after this flush gave up waiting.
        let metastore = self.sink.metastore.clone();
        let apply = tokio::spawn(async move { metastore.add_blocks(metas).await });
        match tokio::time::timeout(self.config.metadata_timeout, apply).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("metastore timed out".into()),
        }
    }
}

/// The profiles grouped by the index partition of their time.
fn by_partition(profiles: Vec<Profile>) -> Vec<Vec<Profile>> {
    let mut groups: std::collections::BTreeMap<i64, Vec<Profile>> = Default::default();
    for p in profiles {
        groups
            .entry(partition_of(p.time_nanos))
            .or_default()
            .push(p);
    }
    groups.into_values().collect()
}
