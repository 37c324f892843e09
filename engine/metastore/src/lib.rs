//! The metastore: the only stateful role. Every change is a [`Command`]
//! applied by a deterministic state machine to an embedded transactional
//! store (redb), so that a Raft log can later replicate the same commands.
//! The index is partitioned by 6 h window, then tenant, then shard; an
//! in-memory copy answers queries without touching the file.
//!
//! Besides the blocks, the state holds compaction jobs (`jobs.rs`: planned,
//! leased, failed, committed by commands) and the tombstones of objects
//! that a commit retired and that are deleted after a delay.

mod client;
mod index;
mod instances;
mod jobs;
mod lifecycle;
mod messages;
pub mod raft;
mod rebuild;
pub mod rpc;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use thiserror::Error;

pub use client::{InProcess, MetastoreClient, ReadBarrier};
pub use index::{MetastoreIndex, ReplicaIndex};
pub use instances::{register_forever, LEASE as INSTANCE_LEASE};
pub use jobs::{JobStatus, MAX_JOB_FAILURES};
pub use lifecycle::{
    default_levels, idle, Lifecycle, LifecycleConfig, LifecycleError, LifecycleMetrics, Retention,
};
pub use messages::{
    command, AddBlocks, AppliedReply, ApplyRetention, Command, CommitJob, ErrorReply, FailJob,
    Instance, Job, LeaseJob, LevelRule, PlanCompaction, RegisterInstance, RemoveTombstones,
    RenewLease, TenantRetention, Tombstone,
};
use messages::{Snapshot, SnapshotEntry};
pub use rebuild::{rebuild_index, Rebuilt};

use ember_engine::block::{BlockMeta, DatasetMeta};

/// Width of an index partition.
pub const PARTITION_NANOS: i64 = 6 * 3600 * 1_000_000_000;

/// Most partitions one block may span. A block costs the index one entry
/// per partition and tenant, so a block whose profiles lie years apart
/// would cost thousands; segment writers cut a flush per partition and
/// compaction stays within one, so only a faulty writer reaches this.
pub const MAX_BLOCK_PARTITIONS: i64 = 4;

const BLOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("blocks");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const TOMBSTONES: TableDefinition<&str, &[u8]> = TableDefinition::new("tombstones");
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const APPLIED_INDEX: &str = "applied_index";
/// Where the replicated log stands, beside the state it produced.
const REPLICATION: TableDefinition<&str, &[u8]> = TableDefinition::new("replication");
/// The cluster's processes, by instance id.
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const LOG_POSITION: &str = "log_position";

/// A replicated log's position after the command being applied, opaque to
/// the metastore: stored in the command's own transaction, so that a
/// replica that restarts re-applies exactly the entries it had not applied.
pub type LogPosition<'a> = Option<&'a [u8]>;

#[derive(Debug, Error)]
pub enum MetastoreError {
    #[error("metastore store: {0}")]
    Store(#[from] redb::Error),
    #[error("metastore entry {key}: {source}")]
    Decode {
        key: String,
        source: prost::DecodeError,
    },
    #[error("metastore snapshot: {0}")]
    Snapshot(prost::DecodeError),
    #[error("metastore command: {0}")]
    InvalidCommand(String),
    /// The job is gone or leased to someone else: the caller must stop.
    #[error("compaction job {job}: {reason}")]
    Lease { job: String, reason: String },
    /// The metastore could not be reached or did not answer.
    #[error("metastore unavailable: {0}")]
    Unavailable(String),
}

impl MetastoreError {
    /// Whether the state refused the command: every replica applying the
    /// same command to the same state refuses it the same way.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Lease { .. } | Self::InvalidCommand(_))
    }
}

fn store_err<E: Into<redb::Error>>(e: E) -> MetastoreError {
    MetastoreError::Store(e.into())
}

impl Command {
    pub fn add_block(meta: BlockMeta) -> Self {
        Self::from(command::Kind::AddBlock(meta))
    }
}

impl From<command::Kind> for Command {
    fn from(kind: command::Kind) -> Self {
        Self { kind: Some(kind) }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Done,
    /// Jobs planned by a `PlanCompaction`.
    Planned(usize),
    /// Tenants' block parts dropped by an `ApplyRetention`.
    Expired(usize),
    /// The job a `LeaseJob` granted, if any was waiting.
    Leased(Option<Job>),
}

/// A dataset that a query must read, with the object holding it. Shared:
/// the index hands out clones of the same entry, never copies.
#[derive(Debug, Clone)]
pub struct DatasetRef {
    pub block_id: Arc<str>,
    pub path: Arc<str>,
    pub dataset: Arc<DatasetMeta>,
}

/// What identifies a dataset everywhere a cache or plan keeps one: its
/// block, its tenant and its service. A level-0 block holds several tenants
/// that may share a service name, so a key without the tenant would let one
/// tenant's cached data answer another's query.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DatasetKey {
    pub block_id: Arc<str>,
    pub tenant: String,
    pub service: String,
}

impl DatasetRef {
    pub fn key(&self) -> DatasetKey {
        DatasetKey {
            block_id: self.block_id.clone(),
            tenant: self.dataset.tenant.clone(),
            service: self.dataset.service_name.clone(),
        }
    }

    pub fn tenant(&self) -> &str {
        &self.dataset.tenant
    }
}

/// What a query asks the index for. `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct BlockQuery {
    pub tenant: String,
    pub start: i64,
    pub end: i64,
    pub service_names: Option<Vec<String>>,
    pub profile_types: Option<Vec<String>>,
    /// Leave out level-0 blocks: for dashboards that can trail by the
    /// compaction lag and want the fewest, largest blocks.
    pub skip_level0: bool,
}

impl BlockQuery {
    fn matches(&self, d: &DatasetMeta) -> bool {
        d.overlaps(self.start, self.end)
            && self
                .profile_types
                .as_ref()
                .is_none_or(|t| t.iter().any(|t| d.profile_types.contains(t)))
    }
}

/// A dataset in the index: its reference and its block's level.
#[derive(Debug, Clone)]
struct IndexedDataset {
    level: u32,
    dataset: DatasetRef,
}

/// Datasets of one (partition, tenant), by service, in arrival order.
type ServiceIndex = HashMap<String, Vec<IndexedDataset>>;

/// One tenant's part of a block: what compaction plans and commits with.
#[derive(Debug, Clone)]
struct TenantBlock {
    id: Arc<str>,
    path: Arc<str>,
    shard: u32,
    level: u32,
    min_time: i64,
    max_time: i64,
    size: u64,
    partitions: Vec<i64>,
    datasets: Vec<Arc<DatasetMeta>>,
    /// Every block merged into this one, at any level before it.
    sources: Arc<[String]>,
}

impl TenantBlock {
    fn meta(&self) -> BlockMeta {
        BlockMeta {
            format_version: ember_engine::block::FORMAT_VERSION,
            id: self.id.to_string(),
            path: self.path.to_string(),
            shard: self.shard,
            compaction_level: self.level,
            min_time: self.min_time,
            max_time: self.max_time,
            size: self.size,
            datasets: self.datasets.iter().map(|d| d.as_ref().clone()).collect(),
            sources: self.sources.to_vec(),
        }
    }

    /// When the block was written: its ULID's time, else its newest profile.
    fn created(&self) -> i64 {
        ulid::Ulid::from_string(&self.id)
            .map(|u| (u.timestamp_ms() as i64).saturating_mul(1_000_000))
            .unwrap_or(self.max_time)
    }
}

/// The in-memory index: a lookup touches only the partitions of its time
/// range and, within them, only the services it names.
#[derive(Default)]
struct Index {
    /// partition start -> tenant -> service -> datasets.
    partitions: BTreeMap<i64, HashMap<String, ServiceIndex>>,
    /// Every block indexed -> the tenants with entries of it.
    blocks: HashMap<Arc<str>, BTreeSet<String>>,
    /// (tenant, block id) -> the tenant's part of the block.
    tenant_blocks: BTreeMap<(String, Arc<str>), TenantBlock>,
    entries: usize,
    jobs: BTreeMap<String, Job>,
    /// (tenant, block id) of every source of a job.
    in_jobs: HashSet<(String, Arc<str>)>,
    /// path -> tombstone of an object retired by compaction.
    tombstones: BTreeMap<String, Tombstone>,
    /// Ids of retired blocks: registering one again must change nothing.
    retired: HashSet<String>,
    /// The cluster's processes, by instance id.
    instances: BTreeMap<String, Instance>,
}

impl Index {
    fn knows_block(&self, id: &str) -> bool {
        self.blocks.contains_key(id) || self.retired.contains(id)
    }

    fn insert(&mut self, partition: i64, tenant: String, meta: BlockMeta) {
        let block_id: Arc<str> = match self.blocks.get_key_value(meta.id.as_str()) {
            Some((id, _)) => id.clone(),
            None => Arc::from(meta.id.as_str()),
        };
        self.blocks
            .entry(block_id.clone())
            .or_default()
            .insert(tenant.clone());
        let key = (tenant.clone(), block_id.clone());
        let part = match self.tenant_blocks.get_mut(&key) {
            Some(b) => {
                b.partitions.push(partition);
                b.clone()
            }
            None => {
                let b = TenantBlock {
                    id: block_id.clone(),
                    path: Arc::from(meta.path.as_str()),
                    shard: meta.shard,
                    level: meta.compaction_level,
                    min_time: meta.min_time,
                    max_time: meta.max_time,
                    size: meta.size,
                    partitions: vec![partition],
                    datasets: meta.datasets.into_iter().map(Arc::new).collect(),
                    sources: meta.sources.into(),
                };
                self.tenant_blocks.insert(key, b.clone());
                b
            }
        };
        let services = self
            .partitions
            .entry(partition)
            .or_default()
            .entry(tenant)
            .or_default();
        for d in &part.datasets {
            services
                .entry(d.service_name.clone())
                .or_default()
                .push(IndexedDataset {
                    level: part.level,
                    dataset: DatasetRef {
                        block_id: block_id.clone(),
                        path: part.path.clone(),
                        dataset: d.clone(),
                    },
                });
        }
        self.entries += 1;
    }

    /// Drops a tenant's part of a block; true when no tenant has one left.
    fn remove(&mut self, tenant: &str, block: &TenantBlock) -> bool {
        let key = (tenant.to_string(), block.id.clone());
        self.tenant_blocks.remove(&key);
        for p in &block.partitions {
            let Some(tenants) = self.partitions.get_mut(p) else {
                continue;
            };
            if let Some(services) = tenants.get_mut(tenant) {
                for d in &block.datasets {
                    if let Some(list) = services.get_mut(&d.service_name) {
                        list.retain(|x| x.dataset.block_id != block.id);
                        if list.is_empty() {
                            services.remove(&d.service_name);
                        }
                    }
                }
                if services.is_empty() {
                    tenants.remove(tenant);
                }
            }
            if tenants.is_empty() {
                self.partitions.remove(p);
            }
            self.entries = self.entries.saturating_sub(1);
        }
        match self.blocks.get_mut(&block.id) {
            Some(tenants) => {
                tenants.remove(tenant);
                if tenants.is_empty() {
                    self.blocks.remove(&block.id);
                    return true;
                }
                false
            }
            None => true,
        }
    }

    fn add_job(&mut self, job: Job) {
        for s in &job.sources {
            self.in_jobs
                .insert((job.tenant.clone(), Arc::from(s.id.as_str())));
        }
        self.jobs.insert(job.id.clone(), job);
    }

    fn remove_job(&mut self, id: &str) -> Option<Job> {
        let job = self.jobs.remove(id)?;
        for s in &job.sources {
            self.in_jobs
                .remove(&(job.tenant.clone(), Arc::from(s.id.as_str())));
        }
        Some(job)
    }

    fn add_tombstone(&mut self, t: Tombstone) {
        self.retired.insert(t.block_id.clone());
        self.tombstones.insert(t.path.clone(), t);
    }

    fn query(&self, q: &BlockQuery) -> Vec<DatasetRef> {
        let partitions = self
            .partitions
            .range(partition_of(q.start)..=partition_of(q.end));
        let spans_partitions = partition_of(q.start) != partition_of(q.end);
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        let mut out = Vec::new();
        for (_, tenants) in partitions {
            let Some(services) = tenants.get(&q.tenant) else {
                continue;
            };
            let lists: Vec<&Vec<IndexedDataset>> = match &q.service_names {
                Some(names) => names.iter().filter_map(|n| services.get(n)).collect(),
                None => services.values().collect(),
            };
            for d in lists.into_iter().flatten() {
                if (q.skip_level0 && d.level == 0) || !q.matches(&d.dataset.dataset) {
                    continue;
                }
                let d = &d.dataset;
                // A dataset spanning partitions is indexed in each of them.
                if spans_partitions && !seen.insert((&d.block_id, &d.dataset.service_name)) {
                    continue;
                }
                out.push(d.clone());
            }
        }
        out
    }

    /// Jobs for every queue that is ready, at most `room` of them. A queue
    /// is (tenant, shard, level, partition): a job never mixes tenants,
    /// shards, levels or partitions. Blocks spanning partitions (only a
    /// tenant allowed to replay old profiles writes them) stay as they are.
    fn plan(&self, cmd: &PlanCompaction, room: usize) -> Vec<Job> {
        type Queue<'a> = Vec<&'a TenantBlock>;
        let mut queues: BTreeMap<(&str, u32, u32, i64), Queue> = BTreeMap::new();
        for ((tenant, id), b) in &self.tenant_blocks {
            if (b.level as usize) >= cmd.levels.len()
                || b.partitions.len() != 1
                || self.in_jobs.contains(&(tenant.clone(), id.clone()))
            {
                continue;
            }
            queues
                .entry((tenant, b.shard, b.level, b.partitions[0]))
                .or_default()
                .push(b);
        }
        let mut jobs = Vec::new();
        for ((tenant, shard, level, partition), mut queue) in queues {
            let rule = &cmd.levels[level as usize];
            let max = rule.max_blocks.max(1) as usize;
            queue.sort_by_key(|b| (b.created(), b.id.clone()));
            for batch in queue.chunks(max) {
                if jobs.len() >= room {
                    return jobs;
                }
                let oldest = batch[0].created();
                let full = batch.len() == max;
                let aged = cmd.now.saturating_sub(oldest) >= rule.max_age_nanos;
                if !(full || aged) {
                    break;
                }
                jobs.push(Job {
                    id: format!("L{level}-{shard}-{}-{tenant}", batch[0].id),
                    tenant: tenant.to_string(),
                    shard,
                    level,
                    partition,
                    sources: batch.iter().map(|b| b.meta()).collect(),
                    status: JobStatus::Pending as u32,
                    created: cmd.now,
                    ..Default::default()
                });
            }
        }
        jobs
    }
}

pub struct Metastore {
    db: Database,
    index: RwLock<Index>,
    /// Serialises commands, so that the check for blocks already indexed
    /// and the write that follows are one step.
    apply_lock: std::sync::Mutex<()>,
    /// Counts the commands that can make work for the planner or the
    /// workers (blocks added, jobs planned, committed or failed), so that
    /// they start at once instead of at their next poll.
    activity: tokio::sync::watch::Sender<u64>,
}

/// Start of the 6 h partition holding `nanos`.
pub fn partition_of(nanos: i64) -> i64 {
    nanos
        .div_euclid(PARTITION_NANOS)
        .saturating_mul(PARTITION_NANOS)
}

fn entry_key(partition: i64, tenant: &str, shard: u32, block_id: &str) -> String {
    // Partition first and zero-padded so that keys sort by time; the
    // offset keeps negative times ordered.
    let p = (partition as i128 - i64::MIN as i128) as u128;
    format!("{p:020}/{tenant}/{shard:010}/{block_id}")
}

fn partition_from_key(key: &str) -> Option<i64> {
    let p: i128 = key.split('/').next()?.parse().ok()?;
    i64::try_from(p + i64::MIN as i128).ok()
}

/// Splits a block's metadata into one entry per (partition, tenant).
fn index_entries(meta: &BlockMeta) -> Vec<(i64, String, BlockMeta)> {
    let mut by_tenant: BTreeMap<&str, Vec<DatasetMeta>> = BTreeMap::new();
    for d in &meta.datasets {
        by_tenant.entry(&d.tenant).or_default().push(d.clone());
    }
    let mut out = Vec::new();
    for (tenant, datasets) in by_tenant {
        let min = datasets
            .iter()
            .map(|d| d.min_time)
            .min()
            .unwrap_or(meta.min_time);
        let max = datasets
            .iter()
            .map(|d| d.max_time)
            .max()
            .unwrap_or(meta.max_time);
        let entry = BlockMeta {
            min_time: min,
            max_time: max,
            datasets,
            ..meta.clone()
        };
        let mut p = partition_of(min);
        while p <= max {
            out.push((p, tenant.to_string(), entry.clone()));
            p = p.saturating_add(PARTITION_NANOS);
            if p == i64::MAX {
                break;
            }
        }
    }
    out
}

/// The entries of `blocks`, checked: (key, partition, tenant, entry).
type Entries = Vec<(String, i64, String, BlockMeta)>;

fn checked_entries(blocks: &[BlockMeta]) -> Result<Entries, MetastoreError> {
    let mut entries = Vec::new();
    for meta in blocks {
        if meta.id.is_empty() || meta.path.is_empty() {
            return Err(MetastoreError::InvalidCommand(
                "block without id or path".into(),
            ));
        }
        let span = partition_of(meta.max_time).saturating_sub(partition_of(meta.min_time))
            / PARTITION_NANOS
            + 1;
        if meta.min_time > meta.max_time || span > MAX_BLOCK_PARTITIONS {
            return Err(MetastoreError::InvalidCommand(format!(
                "block {} spans {span} partitions of 6 h (at most {MAX_BLOCK_PARTITIONS})",
                meta.id
            )));
        }
        for (partition, tenant, entry) in index_entries(meta) {
            let key = entry_key(partition, &tenant, meta.shard, &meta.id);
            entries.push((key, partition, tenant, entry));
        }
    }
    Ok(entries)
}

/// Advances the applied index by `n` inside `tx`, records `position`, and
/// returns the new index.
fn advance_applied(
    tx: &WriteTransaction,
    n: u64,
    position: LogPosition,
) -> Result<u64, MetastoreError> {
    record_position(tx, position)?;
    let mut state = tx.open_table(STATE).map_err(store_err)?;
    let applied = state
        .get(APPLIED_INDEX)
        .map_err(store_err)?
        .map(|v| v.value())
        .unwrap_or(0)
        + n;
    state.insert(APPLIED_INDEX, applied).map_err(store_err)?;
    Ok(applied)
}

fn record_position(tx: &WriteTransaction, position: LogPosition) -> Result<(), MetastoreError> {
    if let Some(bytes) = position {
        let mut table = tx.open_table(REPLICATION).map_err(store_err)?;
        table.insert(LOG_POSITION, bytes).map_err(store_err)?;
    }
    Ok(())
}

fn put_job(tx: &WriteTransaction, job: &Job) -> Result<(), MetastoreError> {
    let mut jobs = tx.open_table(JOBS).map_err(store_err)?;
    jobs.insert(job.id.as_str(), job.encode_to_vec().as_slice())
        .map_err(store_err)?;
    Ok(())
}

fn lease_err(job: &str, reason: impl Into<String>) -> MetastoreError {
    MetastoreError::Lease {
        job: job.to_string(),
        reason: reason.into(),
    }
}

/// The job as the holder of `token` may use it.
fn leased_job<'a>(index: &'a Index, id: &str, token: u64) -> Result<&'a Job, MetastoreError> {
    let job = index
        .jobs
        .get(id)
        .ok_or_else(|| lease_err(id, "no such job (committed or dropped)"))?;
    if job.lease_token != token || job.status() != JobStatus::Running {
        return Err(lease_err(
            id,
            format!(
                "lease {token} is stale (job is {}, lease {})",
                job.status().name(),
                job.lease_token
            ),
        ));
    }
    Ok(job)
}

impl Metastore {
    /// Opens (or creates) the metastore file and loads its index.
    pub fn open(path: &Path) -> Result<Self, MetastoreError> {
        let db = Database::create(path).map_err(store_err)?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(BLOCKS).map_err(store_err)?;
        tx.open_table(JOBS).map_err(store_err)?;
        tx.open_table(TOMBSTONES).map_err(store_err)?;
        tx.open_table(STATE).map_err(store_err)?;
        tx.open_table(REPLICATION).map_err(store_err)?;
        tx.open_table(INSTANCES).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        let store = Self {
            db,
            index: RwLock::new(Index::default()),
            apply_lock: std::sync::Mutex::new(()),
            activity: tokio::sync::watch::Sender::new(0),
        };
        store.reload_index()?;
        Ok(store)
    }

    fn reload_index(&self) -> Result<(), MetastoreError> {
        let mut index = Index::default();
        let tx = self.db.begin_read().map_err(store_err)?;
        let decode_err = |key: &str| {
            let key = key.to_string();
            move |source| MetastoreError::Decode { key, source }
        };
        for row in tx
            .open_table(BLOCKS)
            .map_err(store_err)?
            .iter()
            .map_err(store_err)?
        {
            let (k, v) = row.map_err(store_err)?;
            let key = k.value();
            let meta = BlockMeta::decode_from(v.value()).map_err(decode_err(key))?;
            let partition = partition_from_key(key).unwrap_or_default();
            let tenant = key.split('/').nth(1).unwrap_or_default().to_string();
            index.insert(partition, tenant, meta);
        }
        for row in tx
            .open_table(JOBS)
            .map_err(store_err)?
            .iter()
            .map_err(store_err)?
        {
            let (k, v) = row.map_err(store_err)?;
            index.add_job(Job::decode(v.value()).map_err(decode_err(k.value()))?);
        }
        for row in tx
            .open_table(TOMBSTONES)
            .map_err(store_err)?
            .iter()
            .map_err(store_err)?
        {
            let (k, v) = row.map_err(store_err)?;
            index.add_tombstone(Tombstone::decode(v.value()).map_err(decode_err(k.value()))?);
        }
        for row in tx
            .open_table(INSTANCES)
            .map_err(store_err)?
            .iter()
            .map_err(store_err)?
        {
            let (k, v) = row.map_err(store_err)?;
            let instance = Instance::decode(v.value()).map_err(decode_err(k.value()))?;
            index.instances.insert(instance.id.clone(), instance);
        }
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = index;
        Ok(())
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one command durably, then to the in-memory index.
    pub fn apply(&self, command: Command) -> Result<Applied, MetastoreError> {
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.apply_at(command, None)
    }

    /// Applies the command of a replicated log's entry, recording
    /// `position` with it. A command the state refuses (a stale lease, an
    /// invalid command) is refused the same way on every replica, so its
    /// position is recorded all the same; a store error is not, and the
    /// entry is applied again once the replica restarts.
    pub fn apply_entry(
        &self,
        command: Command,
        position: &[u8],
    ) -> Result<Applied, MetastoreError> {
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let applied = self.apply_at(command, Some(position));
        self.settle_position(&applied, position)?;
        applied
    }

    /// Registers blocks for a replicated log's entry, recording `position`
    /// with them: all or none.
    pub fn add_blocks_entry(
        &self,
        blocks: Vec<BlockMeta>,
        position: &[u8],
    ) -> Result<(), MetastoreError> {
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let added = self.add_blocks(blocks, Some(position));
        self.settle_position(&added, position)?;
        if added.is_ok() {
            self.activity.send_modify(|n| *n += 1);
        }
        added
    }

    /// Records a log entry that changes no state (a leader's first entry, a
    /// change of members) or that the state refused.
    pub fn record_entry(&self, position: &[u8]) -> Result<(), MetastoreError> {
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.write_position(position)
    }

    /// The position recorded with the last log entry applied, if any.
    pub fn log_position(&self) -> Result<Option<Vec<u8>>, MetastoreError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(REPLICATION).map_err(store_err)?;
        let position = table.get(LOG_POSITION).map_err(store_err)?;
        Ok(position.map(|v| v.value().to_vec()))
    }

    /// After a command of a log entry: a command that wrote nothing (no
    /// work to plan, blocks already known) or that the state refused still
    /// moves the position; a store error does not.
    fn settle_position<T>(
        &self,
        outcome: &Result<T, MetastoreError>,
        position: &[u8],
    ) -> Result<(), MetastoreError> {
        if let Err(e) = outcome {
            if !e.is_refusal() {
                return Ok(());
            }
        }
        if self.log_position()?.as_deref() != Some(position) {
            self.write_position(position)?;
        }
        Ok(())
    }

    fn write_position(&self, position: &[u8]) -> Result<(), MetastoreError> {
        let tx = self.db.begin_write().map_err(store_err)?;
        record_position(&tx, Some(position))?;
        tx.commit().map_err(store_err)
    }

    /// Applies `command` with `position`; the caller holds `apply_lock`.
    fn apply_at(&self, command: Command, position: LogPosition) -> Result<Applied, MetastoreError> {
        use command::Kind;
        let kind = command
            .kind
            .ok_or_else(|| MetastoreError::InvalidCommand("empty command".into()))?;
        // Leases, renewals, deletions and registrations make no work for
        // anyone.
        let may_make_work = !matches!(
            kind,
            Kind::LeaseJob(_)
                | Kind::RenewLease(_)
                | Kind::RemoveTombstones(_)
                | Kind::RegisterInstance(_)
        );
        let applied = match kind {
            Kind::AddBlock(meta) => self.add_blocks(vec![meta], position).map(|_| Applied::Done),
            Kind::PlanCompaction(c) => self.plan_compaction(c, position).map(Applied::Planned),
            Kind::LeaseJob(c) => self.lease_job(c, position).map(Applied::Leased),
            Kind::RenewLease(c) => self.renew_lease(c, position).map(|_| Applied::Done),
            Kind::FailJob(c) => self.fail_job(c, position).map(|_| Applied::Done),
            Kind::CommitJob(c) => self.commit_job(c, position).map(|_| Applied::Done),
            Kind::RemoveTombstones(c) => self.remove_tombstones(c, position).map(|_| Applied::Done),
            Kind::ApplyRetention(c) => self.apply_retention(c, position).map(Applied::Expired),
            Kind::RegisterInstance(c) => self.register_instance(c, position).map(|_| Applied::Done),
        }?;
        if may_make_work && !matches!(applied, Applied::Planned(0) | Applied::Expired(0)) {
            self.activity.send_modify(|n| *n += 1);
        }
        Ok(applied)
    }

    /// Changes whenever a command may have made work for the planner or the
    /// workers of this process.
    pub fn activity(&self) -> tokio::sync::watch::Receiver<u64> {
        self.activity.subscribe()
    }

    /// Applies `AddBlock` commands in one durable transaction: all or none.
    pub fn apply_all(&self, commands: Vec<Command>) -> Result<(), MetastoreError> {
        let mut blocks = Vec::with_capacity(commands.len());
        for command in commands {
            match command.kind {
                Some(command::Kind::AddBlock(meta)) => blocks.push(meta),
                Some(_) => {
                    return Err(MetastoreError::InvalidCommand(
                        "apply_all takes AddBlock commands only".into(),
                    ))
                }
                None => return Err(MetastoreError::InvalidCommand("empty command".into())),
            }
        }
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.add_blocks(blocks, None)?;
        self.activity.send_modify(|n| *n += 1);
        Ok(())
    }

    fn add_blocks(
        &self,
        mut blocks: Vec<BlockMeta>,
        position: LogPosition,
    ) -> Result<(), MetastoreError> {
        // At-least-once delivery (a retried flush, a dlq entry whose block
        // did get registered) must not count a block twice, nor bring back
        // one that compaction retired.
        let mut seen = HashSet::new();
        blocks.retain(|b| seen.insert(b.id.clone()));
        {
            let index = self.read_index();
            blocks.retain(|b| !index.knows_block(&b.id));
        }
        let entries = checked_entries(&blocks)?;
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(BLOCKS).map_err(store_err)?;
            for (key, _, _, entry) in &entries {
                table
                    .insert(key.as_str(), entry.encode_to_bytes().as_slice())
                    .map_err(store_err)?;
            }
        }
        advance_applied(&tx, blocks.len() as u64, position)?;
        tx.commit().map_err(store_err)?;
        let mut index = self.write_index();
        for (_, partition, tenant, entry) in entries {
            index.insert(partition, tenant, entry);
        }
        Ok(())
    }

    fn plan_compaction(
        &self,
        cmd: PlanCompaction,
        position: LogPosition,
    ) -> Result<usize, MetastoreError> {
        let jobs = self.jobs_to_plan(&cmd);
        if jobs.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(store_err)?;
        for job in &jobs {
            put_job(&tx, job)?;
        }
        advance_applied(&tx, 1, position)?;
        tx.commit().map_err(store_err)?;
        let n = jobs.len();
        let mut index = self.write_index();
        for job in jobs {
            index.add_job(job);
        }
        Ok(n)
    }

    /// The jobs `cmd` would plan now.
    fn jobs_to_plan(&self, cmd: &PlanCompaction) -> Vec<Job> {
        let index = self.read_index();
        let open = index
            .jobs
            .values()
            .filter(|j| j.status() != JobStatus::Failed)
            .count();
        let room = (cmd.max_jobs as usize).saturating_sub(open);
        index.plan(cmd, room)
    }

    /// Whether `cmd` would plan a job now: a planner asks first, so that a
    /// replicated log holds plans, not every look for one.
    pub fn would_plan(&self, cmd: &PlanCompaction) -> bool {
        !self.jobs_to_plan(cmd).is_empty()
    }

    /// Whether a worker leasing at `now` (up to `max_level`) would get a
    /// job: one waiting, or one whose lease has expired.
    pub fn job_waiting(&self, now: i64, max_level: Option<u32>) -> bool {
        self.read_index().jobs.values().any(|j| {
            let leasable = match j.status() {
                JobStatus::Pending => true,
                JobStatus::Running => j.lease_expires <= now,
                _ => false,
            };
            leasable && max_level.is_none_or(|max| j.level <= max)
        })
    }

    /// The smallest job waiting, or whose lease expired (an abandoned
    /// attempt counts as a failure, so a job that kills its workers is set
    /// aside instead of killing them forever).
    fn lease_job(
        &self,
        cmd: LeaseJob,
        position: LogPosition,
    ) -> Result<Option<Job>, MetastoreError> {
        let (mut changed, chosen) = {
            let index = self.read_index();
            let mut changed: Vec<Job> = Vec::new();
            // References, not copies: a job holds its sources' metadata.
            let mut waiting: Vec<&Job> = Vec::new();
            for job in index.jobs.values() {
                match job.status() {
                    JobStatus::Pending => waiting.push(job),
                    JobStatus::Running if job.lease_expires <= cmd.now => {
                        // Waiting again (counted once, whoever leases it).
                        let mut j = job.clone();
                        j.failures += 1;
                        j.last_error = format!("lease of worker {:?} expired", j.worker);
                        j.worker.clear();
                        j.status = if j.failures >= MAX_JOB_FAILURES {
                            JobStatus::Failed as u32
                        } else {
                            waiting.push(job);
                            JobStatus::Pending as u32
                        };
                        changed.push(j);
                    }
                    _ => {}
                }
            }
            let chosen = waiting
                .into_iter()
                .filter(|j| cmd.max_level.is_none_or(|max| j.level <= max))
                .min_by_key(|j| (j.source_bytes(), j.created, &j.id))
                .map(|j| match changed.iter().position(|c| c.id == j.id) {
                    // An expired lease: its updated copy, counted failure and all.
                    Some(i) => changed.swap_remove(i),
                    None => j.clone(),
                });
            (changed, chosen)
        };
        if changed.is_empty() && chosen.is_none() {
            return Ok(None);
        }
        let tx = self.db.begin_write().map_err(store_err)?;
        let token = advance_applied(&tx, 1, position)?;
        let leased = chosen.map(|mut j| {
            j.status = JobStatus::Running as u32;
            j.worker = cmd.worker.clone();
            j.lease_token = token;
            j.lease_expires = cmd.now.saturating_add(cmd.lease_nanos);
            j
        });
        changed.extend(leased.clone());
        for job in &changed {
            put_job(&tx, job)?;
        }
        tx.commit().map_err(store_err)?;
        let mut index = self.write_index();
        for job in changed {
            index.jobs.insert(job.id.clone(), job);
        }
        Ok(leased)
    }

    fn renew_lease(&self, cmd: RenewLease, position: LogPosition) -> Result<(), MetastoreError> {
        let mut job = leased_job(&self.read_index(), &cmd.job_id, cmd.token)?.clone();
        job.lease_expires = cmd.now.saturating_add(cmd.lease_nanos);
        let tx = self.db.begin_write().map_err(store_err)?;
        put_job(&tx, &job)?;
        advance_applied(&tx, 1, position)?;
        tx.commit().map_err(store_err)?;
        self.write_index().jobs.insert(job.id.clone(), job);
        Ok(())
    }

    fn fail_job(&self, cmd: FailJob, position: LogPosition) -> Result<(), MetastoreError> {
        let mut job = leased_job(&self.read_index(), &cmd.job_id, cmd.token)?.clone();
        job.failures += 1;
        job.last_error = cmd.error;
        job.worker.clear();
        job.status = if job.failures >= MAX_JOB_FAILURES {
            JobStatus::Failed
        } else {
            JobStatus::Pending
        } as u32;
        let tx = self.db.begin_write().map_err(store_err)?;
        put_job(&tx, &job)?;
        advance_applied(&tx, 1, position)?;
        tx.commit().map_err(store_err)?;
        self.write_index().jobs.insert(job.id.clone(), job);
        Ok(())
    }

    /// Sources out, output in, retired objects tombstoned: one transaction.
    fn commit_job(&self, cmd: CommitJob, position: LogPosition) -> Result<(), MetastoreError> {
        let (job, sources) = {
            let index = self.read_index();
            let job = leased_job(&index, &cmd.job_id, cmd.token)?.clone();
            let mut sources = Vec::new();
            for s in &job.sources {
                let key = (job.tenant.clone(), Arc::from(s.id.as_str()));
                let block = index.tenant_blocks.get(&key).ok_or_else(|| {
                    MetastoreError::InvalidCommand(format!(
                        "job {}: source {} is no longer indexed",
                        job.id, s.id
                    ))
                })?;
                sources.push((job.tenant.clone(), block.clone()));
            }
            (job, sources)
        };
        let output = match cmd.output {
            Some(meta) => {
                if meta.datasets.iter().any(|d| d.tenant != job.tenant) {
                    return Err(MetastoreError::InvalidCommand(format!(
                        "job {}: output holds another tenant's data",
                        job.id
                    )));
                }
                checked_entries(std::slice::from_ref(&meta))?
            }
            None => Vec::new(),
        };
        self.replace(sources, output, Some(&job.id), cmd.delete_after, position)
    }

    /// Drops every tenant's parts of blocks whose partitions all ended
    /// before the tenant's retention; returns how many parts went.
    fn apply_retention(
        &self,
        cmd: ApplyRetention,
        position: LogPosition,
    ) -> Result<usize, MetastoreError> {
        let expired: Vec<(String, TenantBlock)> = {
            let index = self.read_index();
            let retention = |tenant: &str| {
                cmd.tenants
                    .iter()
                    .find(|t| t.tenant == tenant)
                    .map_or(cmd.default_nanos, |t| t.retention_nanos)
            };
            index
                .tenant_blocks
                .iter()
                .filter(|((tenant, id), b)| {
                    let keep = retention(tenant);
                    let cutoff = cmd.now.saturating_sub(keep);
                    keep > 0
                        && !index.in_jobs.contains(&(tenant.clone(), id.clone()))
                        && b.partitions
                            .iter()
                            .all(|p| p.saturating_add(PARTITION_NANOS) <= cutoff)
                })
                .map(|((tenant, _), b)| (tenant.clone(), b.clone()))
                .collect()
        };
        if expired.is_empty() {
            return Ok(0);
        }
        let n = expired.len();
        self.replace(expired, Vec::new(), None, cmd.delete_after, position)?;
        Ok(n)
    }

    /// In one transaction: removes tenants' parts of blocks, adds `output`,
    /// tombstones every object no tenant has a part of any more, and drops
    /// the job that did it.
    fn replace(
        &self,
        parts: Vec<(String, TenantBlock)>,
        output: Entries,
        job: Option<&str>,
        delete_after: i64,
        position: LogPosition,
    ) -> Result<(), MetastoreError> {
        let retired: Vec<Tombstone> = {
            let index = self.read_index();
            let mut leaving: HashMap<&str, BTreeSet<&str>> = HashMap::new();
            for (tenant, b) in &parts {
                leaving.entry(&b.id).or_default().insert(tenant);
            }
            let mut seen = HashSet::new();
            parts
                .iter()
                .filter(|(_, b)| seen.insert(b.id.clone()))
                .filter(|(_, b)| {
                    index.blocks.get(&b.id).is_none_or(|tenants| {
                        tenants
                            .iter()
                            .all(|t| leaving[b.id.as_ref()].contains(t.as_str()))
                    })
                })
                .map(|(_, b)| Tombstone {
                    path: b.path.to_string(),
                    block_id: b.id.to_string(),
                    delete_after,
                })
                .collect()
        };
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(BLOCKS).map_err(store_err)?;
            for (tenant, b) in &parts {
                for &p in &b.partitions {
                    table
                        .remove(entry_key(p, tenant, b.shard, &b.id).as_str())
                        .map_err(store_err)?;
                }
            }
            for (key, _, _, entry) in &output {
                table
                    .insert(key.as_str(), entry.encode_to_bytes().as_slice())
                    .map_err(store_err)?;
            }
            let mut tombstones = tx.open_table(TOMBSTONES).map_err(store_err)?;
            for t in &retired {
                tombstones
                    .insert(t.path.as_str(), t.encode_to_vec().as_slice())
                    .map_err(store_err)?;
            }
            if let Some(id) = job {
                let mut jobs = tx.open_table(JOBS).map_err(store_err)?;
                jobs.remove(id).map_err(store_err)?;
            }
        }
        advance_applied(&tx, 1, position)?;
        tx.commit().map_err(store_err)?;
        let mut index = self.write_index();
        for (tenant, b) in &parts {
            index.remove(tenant, b);
        }
        for (_, partition, tenant, entry) in output {
            index.insert(partition, tenant, entry);
        }
        for t in retired {
            index.add_tombstone(t);
        }
        if let Some(id) = job {
            index.remove_job(id);
        }
        Ok(())
    }

    fn remove_tombstones(
        &self,
        cmd: RemoveTombstones,
        position: LogPosition,
    ) -> Result<(), MetastoreError> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut tombstones = tx.open_table(TOMBSTONES).map_err(store_err)?;
            for p in &cmd.paths {
                tombstones.remove(p.as_str()).map_err(store_err)?;
            }
        }
        advance_applied(&tx, 1, position)?;
        tx.commit().map_err(store_err)?;
        let mut index = self.write_index();
        for p in &cmd.paths {
            if let Some(t) = index.tombstones.remove(p) {
                index.retired.remove(&t.block_id);
            }
        }
        Ok(())
    }

    /// Datasets that can hold rows matching the query, each once.
    pub fn query(&self, q: &BlockQuery) -> Vec<DatasetRef> {
        if q.start > q.end {
            return Vec::new();
        }
        self.read_index().query(q)
    }

    /// Number of index entries (a block spanning partitions counts once per partition).
    pub fn entry_count(&self) -> usize {
        self.read_index().entries
    }

    /// Every compaction job not committed yet, failed ones included.
    pub fn jobs(&self) -> Vec<Job> {
        self.read_index().jobs.values().cloned().collect()
    }

    /// The tenant's jobs not committed yet, failed ones included.
    pub fn tenant_jobs(&self, tenant: &str) -> Vec<Job> {
        self.read_index()
            .jobs
            .values()
            .filter(|j| j.tenant == tenant)
            .cloned()
            .collect()
    }

    /// Jobs not committed, counted by (status, level).
    pub fn job_counts(&self) -> BTreeMap<(JobStatus, u32), usize> {
        let mut out = BTreeMap::new();
        for j in self.read_index().jobs.values() {
            *out.entry((j.status(), j.level)).or_default() += 1;
        }
        out
    }

    /// Tombstones whose delay has passed at `now`.
    pub fn due_tombstones(&self, now: i64) -> Vec<Tombstone> {
        self.read_index()
            .tombstones
            .values()
            .filter(|t| t.delete_after <= now)
            .cloned()
            .collect()
    }

    /// Whether `id` is a block the index holds or one retired and not yet
    /// deleted: an object under `blocks/` that is neither was never
    /// committed.
    pub fn knows_block(&self, id: &str) -> bool {
        self.read_index().knows_block(id)
    }

    pub fn tombstone_count(&self) -> usize {
        self.read_index().tombstones.len()
    }

    /// Every (tenant's part of a) block indexed, for `system.blocks`: the
    /// tenant's datasets only.
    pub fn blocks(&self, tenant: &str) -> Vec<BlockMeta> {
        self.read_index()
            .tenant_blocks
            .range((tenant.to_string(), Arc::from(""))..)
            .take_while(|((t, _), _)| t == tenant)
            .map(|(_, b)| b.meta())
            .collect()
    }

    /// Blocks indexed per compaction level, all tenants (for metrics).
    pub fn blocks_by_level(&self) -> BTreeMap<u32, usize> {
        let index = self.read_index();
        let mut levels: BTreeMap<u32, HashSet<&str>> = BTreeMap::new();
        for b in index.tenant_blocks.values() {
            levels.entry(b.level).or_default().insert(&b.id);
        }
        levels.into_iter().map(|(l, ids)| (l, ids.len())).collect()
    }

    pub fn applied_index(&self) -> Result<u64, MetastoreError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let state = tx.open_table(STATE).map_err(store_err)?;
        Ok(state
            .get(APPLIED_INDEX)
            .map_err(store_err)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// The whole state as bytes, for a Raft snapshot or a backup.
    pub fn snapshot(&self) -> Result<Vec<u8>, MetastoreError> {
        self.snapshot_with_position().map(|(bytes, _)| bytes)
    }

    /// The whole state as bytes, and the log position it is at.
    pub fn snapshot_with_position(&self) -> Result<(Vec<u8>, Option<Vec<u8>>), MetastoreError> {
        let tx = self.db.begin_read().map_err(store_err)?;
        let rows =
            |def: TableDefinition<&str, &[u8]>| -> Result<Vec<SnapshotEntry>, MetastoreError> {
                let table = tx.open_table(def).map_err(store_err)?;
                let mut out = Vec::new();
                for row in table.iter().map_err(store_err)? {
                    let (k, v) = row.map_err(store_err)?;
                    out.push(SnapshotEntry {
                        key: k.value().to_string(),
                        value: v.value().to_vec(),
                    });
                }
                Ok(out)
            };
        let state = tx.open_table(STATE).map_err(store_err)?;
        let applied_index = state.get(APPLIED_INDEX).map_err(store_err)?;
        let replication = tx.open_table(REPLICATION).map_err(store_err)?;
        let position = replication.get(LOG_POSITION).map_err(store_err)?;
        let snapshot = Snapshot {
            applied_index: applied_index.map(|v| v.value()).unwrap_or(0),
            entries: rows(BLOCKS)?,
            jobs: rows(JOBS)?,
            tombstones: rows(TOMBSTONES)?,
            log_position: position.map(|v| v.value().to_vec()),
            instances: rows(INSTANCES)?,
        };
        let position = snapshot.log_position.clone();
        Ok((snapshot.encode_to_vec(), position))
    }

    /// Replaces the whole state with a snapshot.
    pub fn restore(&self, bytes: &[u8]) -> Result<(), MetastoreError> {
        let snapshot = Snapshot::decode(bytes).map_err(MetastoreError::Snapshot)?;
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tx = self.db.begin_write().map_err(store_err)?;
        for (def, rows) in [
            (BLOCKS, &snapshot.entries),
            (JOBS, &snapshot.jobs),
            (TOMBSTONES, &snapshot.tombstones),
            (INSTANCES, &snapshot.instances),
        ] {
            let mut table = tx.open_table(def).map_err(store_err)?;
            table.retain(|_, _| false).map_err(store_err)?;
            for e in rows {
                table
                    .insert(e.key.as_str(), e.value.as_slice())
                    .map_err(store_err)?;
            }
        }
        {
            let mut state = tx.open_table(STATE).map_err(store_err)?;
            state
                .insert(APPLIED_INDEX, snapshot.applied_index)
                .map_err(store_err)?;
            let mut replication = tx.open_table(REPLICATION).map_err(store_err)?;
            match &snapshot.log_position {
                Some(position) => replication.insert(LOG_POSITION, position.as_slice()),
                None => replication.remove(LOG_POSITION),
            }
            .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        self.reload_index()
    }
}
#[cfg(test)]
mod tests;
