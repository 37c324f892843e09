//! The metastore: the only stateful role. Every change is a [`Command`]
//! applied by a deterministic state machine to an embedded transactional
//! store (redb), so that a Raft log can later replicate the same commands.
//! The index is partitioned by 6 h window, then tenant, then shard; an
//! in-memory copy answers queries without touching the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use thiserror::Error;

use crate::block::{BlockMeta, DatasetMeta};

/// Width of an index partition.
pub const PARTITION_NANOS: i64 = 6 * 3600 * 1_000_000_000;

/// Most partitions one block may span. A block costs the index one entry
/// per partition and tenant, so a block whose profiles lie years apart
/// would cost thousands; segment writers cut a flush per partition and
/// compaction stays within one, so only a faulty writer reaches this.
pub const MAX_BLOCK_PARTITIONS: i64 = 4;

const BLOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("blocks");
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const APPLIED_INDEX: &str = "applied_index";

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
}

fn store_err<E: Into<redb::Error>>(e: E) -> MetastoreError {
    MetastoreError::Store(e.into())
}

/// A state-machine command. Protobuf so that a Raft log can carry it.
#[derive(Clone, PartialEq, Message)]
pub struct Command {
    #[prost(oneof = "command::Kind", tags = "1")]
    pub kind: Option<command::Kind>,
}

pub mod command {
    use crate::block::BlockMeta;

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        AddBlock(BlockMeta),
    }
}

impl Command {
    pub fn add_block(meta: BlockMeta) -> Self {
        Self {
            kind: Some(command::Kind::AddBlock(meta)),
        }
    }
}

#[derive(Clone, PartialEq, Message)]
struct Snapshot {
    #[prost(uint64, tag = "1")]
    applied_index: u64,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<SnapshotEntry>,
}

#[derive(Clone, PartialEq, Message)]
struct SnapshotEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
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

/// Datasets of one (partition, tenant), by service, in arrival order.
type ServiceIndex = HashMap<String, Vec<DatasetRef>>;

/// The in-memory index: a lookup touches only the partitions of its time
/// range and, within them, only the services it names.
#[derive(Default)]
struct Index {
    /// partition start -> tenant -> service -> datasets.
    partitions: BTreeMap<i64, HashMap<String, ServiceIndex>>,
    /// Every block indexed, so that registering one again changes nothing.
    blocks: HashSet<Arc<str>>,
    entries: usize,
}

impl Index {
    fn insert(&mut self, partition: i64, tenant: String, meta: BlockMeta) {
        let services = self
            .partitions
            .entry(partition)
            .or_default()
            .entry(tenant)
            .or_default();
        let block_id: Arc<str> = match self.blocks.get(meta.id.as_str()) {
            Some(id) => id.clone(),
            None => Arc::from(meta.id.as_str()),
        };
        self.blocks.insert(block_id.clone());
        let path: Arc<str> = Arc::from(meta.path.as_str());
        for d in meta.datasets {
            services
                .entry(d.service_name.clone())
                .or_default()
                .push(DatasetRef {
                    block_id: block_id.clone(),
                    path: path.clone(),
                    dataset: Arc::new(d),
                });
        }
        self.entries += 1;
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
            let lists: Vec<&Vec<DatasetRef>> = match &q.service_names {
                Some(names) => names.iter().filter_map(|n| services.get(n)).collect(),
                None => services.values().collect(),
            };
            for d in lists.into_iter().flatten() {
                if !q.matches(&d.dataset) {
                    continue;
                }
                // A dataset spanning partitions is indexed in each of them.
                if spans_partitions && !seen.insert((&d.block_id, &d.dataset.service_name)) {
                    continue;
                }
                out.push(d.clone());
            }
        }
        out
    }
}

pub struct Metastore {
    db: Database,
    index: RwLock<Index>,
    /// Serialises commands, so that the check for blocks already indexed
    /// and the write that follows are one step.
    apply_lock: std::sync::Mutex<()>,
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

impl Metastore {
    /// Opens (or creates) the metastore file and loads its index.
    pub fn open(path: &Path) -> Result<Self, MetastoreError> {
        let db = Database::create(path).map_err(store_err)?;
        let tx = db.begin_write().map_err(store_err)?;
        tx.open_table(BLOCKS).map_err(store_err)?;
        tx.open_table(STATE).map_err(store_err)?;
        tx.commit().map_err(store_err)?;
        let store = Self {
            db,
            index: RwLock::new(Index::default()),
            apply_lock: std::sync::Mutex::new(()),
        };
        store.reload_index()?;
        Ok(store)
    }

    fn reload_index(&self) -> Result<(), MetastoreError> {
        let mut index = Index::default();
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(BLOCKS).map_err(store_err)?;
        for row in table.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            let key = k.value();
            let meta =
                BlockMeta::decode_from(v.value()).map_err(|source| MetastoreError::Decode {
                    key: key.to_string(),
                    source,
                })?;
            let partition = partition_from_key(key).unwrap_or_default();
            let tenant = key.split('/').nth(1).unwrap_or_default().to_string();
            index.insert(partition, tenant, meta);
        }
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = index;
        Ok(())
    }

    /// Applies one command durably, then to the in-memory index.
    pub fn apply(&self, command: Command) -> Result<(), MetastoreError> {
        self.apply_all(vec![command])
    }

    /// Applies commands in one durable transaction: all or none of them.
    pub fn apply_all(&self, commands: Vec<Command>) -> Result<(), MetastoreError> {
        let _serial = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut blocks = Vec::with_capacity(commands.len());
        for command in commands {
            match command.kind {
                Some(command::Kind::AddBlock(meta)) => blocks.push(meta),
                None => return Err(MetastoreError::InvalidCommand("empty command".into())),
            }
        }
        // At-least-once delivery (a retried flush, a dlq entry whose block
        // did get registered) must not count a block twice.
        let mut seen = HashSet::new();
        blocks.retain(|b| seen.insert(b.id.clone()));
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            blocks.retain(|b| !index.blocks.contains(b.id.as_str()));
        }
        let mut entries = Vec::new();
        for meta in &blocks {
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
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(BLOCKS).map_err(store_err)?;
            for (key, _, _, entry) in &entries {
                table
                    .insert(key.as_str(), entry.encode_to_bytes().as_slice())
                    .map_err(store_err)?;
            }
            let mut state = tx.open_table(STATE).map_err(store_err)?;
            let applied = state
                .get(APPLIED_INDEX)
                .map_err(store_err)?
                .map(|v| v.value())
                .unwrap_or(0);
            state
                .insert(APPLIED_INDEX, applied + blocks.len() as u64)
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for (_, partition, tenant, entry) in entries {
            index.insert(partition, tenant, entry);
        }
        Ok(())
    }

    /// Datasets that can hold rows matching the query, each once.
    pub fn query(&self, q: &BlockQuery) -> Vec<DatasetRef> {
        if q.start > q.end {
            return Vec::new();
        }
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .query(q)
    }

    /// Number of index entries (a block spanning partitions counts once per partition).
    pub fn entry_count(&self) -> usize {
        self.index.read().unwrap_or_else(|e| e.into_inner()).entries
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
        let tx = self.db.begin_read().map_err(store_err)?;
        let table = tx.open_table(BLOCKS).map_err(store_err)?;
        let mut entries = Vec::new();
        for row in table.iter().map_err(store_err)? {
            let (k, v) = row.map_err(store_err)?;
            entries.push(SnapshotEntry {
                key: k.value().to_string(),
                value: v.value().to_vec(),
            });
        }
        let snapshot = Snapshot {
            applied_index: self.applied_index()?,
            entries,
        };
        Ok(snapshot.encode_to_vec())
    }

    /// Replaces the whole state with a snapshot.
    pub fn restore(&self, bytes: &[u8]) -> Result<(), MetastoreError> {
        let snapshot = Snapshot::decode(bytes).map_err(MetastoreError::Snapshot)?;
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut blocks = tx.open_table(BLOCKS).map_err(store_err)?;
            blocks.retain(|_, _| false).map_err(store_err)?;
            for e in &snapshot.entries {
                blocks
                    .insert(e.key.as_str(), e.value.as_slice())
                    .map_err(store_err)?;
            }
            let mut state = tx.open_table(STATE).map_err(store_err)?;
            state
                .insert(APPLIED_INDEX, snapshot.applied_index)
                .map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        self.reload_index()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::SectionMeta;

    const HOUR: i64 = 3600 * 1_000_000_000;

    fn block(id: &str, datasets: Vec<DatasetMeta>) -> BlockMeta {
        BlockMeta {
            format_version: 1,
            id: id.into(),
            path: format!("segments/0/anonymous/{id}/block.bin"),
            shard: 0,
            compaction_level: 0,
            min_time: datasets.iter().map(|d| d.min_time).min().unwrap(),
            max_time: datasets.iter().map(|d| d.max_time).max().unwrap(),
            size: 1,
            datasets,
        }
    }

    fn dataset(tenant: &str, service: &str, min: i64, max: i64) -> DatasetMeta {
        DatasetMeta {
            tenant: tenant.into(),
            service_name: service.into(),
            min_time: min,
            max_time: max,
            profile_types: vec!["process_cpu:cpu:nanoseconds:cpu:nanoseconds".into()],
            series: vec![],
            sections: vec![SectionMeta::default()],
            profiles: 1,
            samples: 1,
        }
    }

    fn ids(refs: &[DatasetRef]) -> Vec<String> {
        let mut v: Vec<String> = refs
            .iter()
            .map(|r| format!("{}/{}", r.block_id, r.dataset.service_name))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn query_prunes_by_tenant_time_and_service_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metastore.redb");
        {
            let m = Metastore::open(&path).unwrap();
            m.apply(Command::add_block(block(
                "A",
                vec![
                    dataset("t1", "api", HOUR, 2 * HOUR),
                    dataset("t2", "api", HOUR, HOUR),
                ],
            )))
            .unwrap();
            // Spans two 6 h partitions.
            m.apply(Command::add_block(block(
                "B",
                vec![dataset("t1", "db", 5 * HOUR, 7 * HOUR)],
            )))
            .unwrap();
            m.apply(Command::add_block(block(
                "C",
                vec![dataset("t1", "api", 30 * HOUR, 30 * HOUR)],
            )))
            .unwrap();
            assert_eq!(m.applied_index().unwrap(), 3);
        }
        let m = Metastore::open(&path).unwrap();
        let q = |start, end, services: Option<Vec<&str>>| BlockQuery {
            tenant: "t1".into(),
            start,
            end,
            service_names: services.map(|s| s.into_iter().map(String::from).collect()),
            profile_types: None,
        };
        assert_eq!(
            ids(&m.query(&q(0, 100 * HOUR, None))),
            ["A/api", "B/db", "C/api"]
        );
        assert_eq!(ids(&m.query(&q(0, 3 * HOUR, None))), ["A/api"]);
        assert_eq!(ids(&m.query(&q(6 * HOUR + 1, 8 * HOUR, None))), ["B/db"]);
        assert_eq!(
            ids(&m.query(&q(0, 100 * HOUR, Some(vec!["api"])))),
            ["A/api", "C/api"]
        );
        let t2 = BlockQuery {
            tenant: "t2".into(),
            start: 0,
            end: 100 * HOUR,
            ..Default::default()
        };
        assert_eq!(ids(&m.query(&t2)), ["A/api"]);
        assert!(m.query(&q(50 * HOUR, 60 * HOUR, None)).is_empty());
        assert_eq!(m.query(&q(i64::MIN, i64::MAX, None)).len(), 3);
        assert_eq!(m.applied_index().unwrap(), 3);
    }

    #[test]
    fn snapshot_restores_into_another_store() {
        let dir = tempfile::tempdir().unwrap();
        let a = Metastore::open(&dir.path().join("a.redb")).unwrap();
        a.apply(Command::add_block(block(
            "A",
            vec![dataset("t", "s", HOUR, HOUR)],
        )))
        .unwrap();
        let b = Metastore::open(&dir.path().join("b.redb")).unwrap();
        b.apply(Command::add_block(block(
            "X",
            vec![dataset("t", "s", HOUR, HOUR)],
        )))
        .unwrap();
        b.restore(&a.snapshot().unwrap()).unwrap();
        let all = BlockQuery {
            tenant: "t".into(),
            start: 0,
            end: 10 * HOUR,
            ..Default::default()
        };
        assert_eq!(ids(&b.query(&all)), ["A/s"]);
        assert_eq!(b.applied_index().unwrap(), 1);
    }

    #[test]
    fn negative_and_far_times_keep_key_order() {
        assert!(entry_key(-PARTITION_NANOS, "t", 0, "a") < entry_key(0, "t", 0, "a"));
        assert_eq!(
            partition_from_key(&entry_key(-PARTITION_NANOS, "t", 0, "a")),
            Some(-PARTITION_NANOS)
        );
    }

    #[test]
    fn a_block_registered_twice_is_one_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let b = block("A", vec![dataset("t", "s", HOUR, HOUR)]);
        let all = BlockQuery {
            tenant: "t".into(),
            start: 0,
            end: 10 * HOUR,
            ..Default::default()
        };
        {
            let m = Metastore::open(&path).unwrap();
            m.apply(Command::add_block(b.clone())).unwrap();
            m.apply(Command::add_block(b.clone())).unwrap();
            m.apply_all(vec![
                Command::add_block(b.clone()),
                Command::add_block(b.clone()),
            ])
            .unwrap();
            assert_eq!(ids(&m.query(&all)), ["A/s"]);
            assert_eq!(m.entry_count(), 1);
        }
        let m = Metastore::open(&path).unwrap();
        m.apply(Command::add_block(b)).unwrap();
        assert_eq!(ids(&m.query(&all)), ["A/s"]);
        assert_eq!(m.entry_count(), 1);
    }

    #[test]
    fn a_block_spanning_years_is_refused_and_costs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
        let year = 365 * 24 * HOUR;
        let wide = block(
            "W",
            vec![dataset("t", "s", 0, year), dataset("t", "s2", HOUR, HOUR)],
        );
        let err = m.apply(Command::add_block(wide)).unwrap_err().to_string();
        assert!(err.contains("spans 1461 partitions"), "{err}");
        assert_eq!(m.entry_count(), 0);
        // Four partitions is the most a block may cost.
        let edge = block("E", vec![dataset("t", "s", 0, 4 * PARTITION_NANOS - 1)]);
        m.apply(Command::add_block(edge)).unwrap();
        assert_eq!(m.entry_count(), 4);
        let over = block("O", vec![dataset("t", "s", 0, 4 * PARTITION_NANOS)]);
        assert!(m.apply(Command::add_block(over)).is_err());
    }

    #[test]
    fn rejects_empty_command() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metastore::open(&dir.path().join("m.redb")).unwrap();
        assert!(m.apply(Command { kind: None }).is_err());
    }
}
