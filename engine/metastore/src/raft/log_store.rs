//! The Raft log, the vote and the commit point in a redb file of their own:
//! every write is one durable transaction before it is acknowledged. After a
//! purge the file is compacted once most of it is free: redb reuses freed
//! pages but places new ones across the file it has grown, so without it
//! the disk a log takes kept growing (to 29 MB for 8 MB of entries over 35
//! minutes of a cluster's ingest, and toward the file's 240 MB length).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{blocking, NodeId, ReplicationError, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// The log of one replica; clones share the file. Transactions take the
/// lock to read; compaction, which needs the file alone, to write.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<RwLock<Database>>,
}

/// Free space in the file, beyond the bytes in use, worth compacting away.
const COMPACT_AFTER_FREE_BYTES: u64 = 16 << 20;

impl LogStore {
    pub fn open(path: &Path) -> Result<Self, ReplicationError> {
        let log_err = |e: redb::Error| ReplicationError::Log {
            path: path.display().to_string(),
            source: e,
        };
        let db = Database::create(path).map_err(|e| log_err(e.into()))?;
        let tx = db.begin_write().map_err(|e| log_err(e.into()))?;
        tx.open_table(LOG).map_err(|e| log_err(e.into()))?;
        tx.open_table(META).map_err(|e| log_err(e.into()))?;
        tx.commit().map_err(|e| log_err(e.into()))?;
        Ok(Self {
            db: Arc::new(RwLock::new(db)),
        })
    }

    fn db(&self) -> RwLockReadGuard<'_, Database> {
        self.db.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Compacts the file when its free space passes both the bytes in use
    /// and [`COMPACT_AFTER_FREE_BYTES`]; whether it did.
    fn compact_if_sparse(&self) -> Result<bool, String> {
        let (used, free) = {
            let db = self.db();
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            let stats = tx.stats().map_err(|e| e.to_string())?;
            tx.abort().map_err(|e| e.to_string())?;
            (
                stats.allocated_pages() * stats.page_size() as u64,
                stats.fragmented_bytes(),
            )
        };
        if free < used.max(COMPACT_AFTER_FREE_BYTES) {
            return Ok(false);
        }
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        db.compact().map_err(|e| e.to_string())
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| e.to_string())?;
        let table = tx.open_table(META).map_err(|e| e.to_string())?;
        let Some(value) = table.get(key).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| format!("{key}: {e}"))
    }

    fn write_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        let db = self.db();
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = tx.open_table(META).map_err(|e| e.to_string())?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())
    }

    fn entries(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, String> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| e.to_string())?;
        let table = tx.open_table(LOG).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for row in table
            .range::<u64>((start, end))
            .map_err(|e| e.to_string())?
        {
            let (index, bytes) = row.map_err(|e| e.to_string())?;
            let entry = serde_json::from_slice(bytes.value())
                .map_err(|e| format!("entry {}: {e}", index.value()))?;
            out.push(entry);
        }
        Ok(out)
    }

    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, String> {
        let db = self.db();
        let tx = db.begin_read().map_err(|e| e.to_string())?;
        let table = tx.open_table(LOG).map_err(|e| e.to_string())?;
        let Some((_, bytes)) = table.last().map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let entry: Entry<TypeConfig> =
            serde_json::from_slice(bytes.value()).map_err(|e| e.to_string())?;
        Ok(Some(entry.log_id))
    }

    fn append_entries(&self, entries: &[Entry<TypeConfig>]) -> Result<(), String> {
        let db = self.db();
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = tx.open_table(LOG).map_err(|e| e.to_string())?;
            for entry in entries {
                let bytes = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }

    /// Removes the entries in `range`, recording `purged` as the last one
    /// purged if given, in one transaction.
    fn remove(
        &self,
        range: (Bound<u64>, Bound<u64>),
        purged: Option<&LogId<NodeId>>,
    ) -> Result<(), String> {
        let db = self.db();
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = tx.open_table(LOG).map_err(|e| e.to_string())?;
            table
                .retain_in::<u64, _>(range, |_, _| false)
                .map_err(|e| e.to_string())?;
            if let Some(purged) = purged {
                let bytes = serde_json::to_vec(purged).map_err(|e| e.to_string())?;
                let mut meta = tx.open_table(META).map_err(|e| e.to_string())?;
                meta.insert(LAST_PURGED, bytes.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }
}

fn io_err(e: String) -> std::io::Error {
    std::io::Error::other(e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let store = self.clone();
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        blocking(move || store.entries(start, end))
            .await
            .map_err(|e| StorageIOError::read_logs(&io_err(e)).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let store = self.clone();
        let (purged, last) = blocking(move || {
            let purged: Option<LogId<NodeId>> = store.read_meta(LAST_PURGED)?;
            Ok((purged, store.last_entry_id()?))
        })
        .await
        .map_err(|e: String| StorageIOError::read_logs(&io_err(e)))?;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let (store, vote) = (self.clone(), *vote);
        blocking(move || store.write_meta(VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&io_err(e)).into())
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        let store = self.clone();
        blocking(move || store.read_meta(VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&io_err(e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        let store = self.clone();
        blocking(move || store.write_meta(COMMITTED, &committed))
            .await
            .map_err(|e| StorageIOError::write(&io_err(e)).into())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        let store = self.clone();
        blocking(move || store.read_meta::<Option<LogId<NodeId>>>(COMMITTED))
            .await
            .map(Option::flatten)
            .map_err(|e| StorageIOError::read(&io_err(e)).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let store = self.clone();
        let written = blocking(move || store.append_entries(&entries)).await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io_err(e.clone())));
                Err(StorageIOError::write_logs(&io_err(e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let store = self.clone();
        blocking(move || store.remove((Bound::Included(log_id.index), Bound::Unbounded), None))
            .await
            .map_err(|e| StorageIOError::write_logs(&io_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let store = self.clone();
        blocking(move || {
            store.remove(
                (Bound::Unbounded, Bound::Included(log_id.index)),
                Some(&log_id),
            )?;
            // Compaction only saves disk: a failure leaves the log as it was.
            match store.compact_if_sparse() {
                Ok(true) => tracing::info!(purged_to = log_id.index, "raft log compacted"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "compacting the raft log"),
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&io_err(e)).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(super::super::Payload(vec![index as u8; 1000])),
        }
    }

    /// A purge that leaves most of the file free compacts it: the file
    /// shrinks to about what the kept entries take, and the log reads and
    /// takes entries as before.
    #[test]
    fn a_purged_log_gives_its_disk_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let store = LogStore::open(&path).unwrap();
        for batch in 0..300u64 {
            let entries: Vec<_> = (batch * 100..(batch + 1) * 100).map(entry).collect();
            store.append_entries(&entries).unwrap();
        }
        let before = std::fs::metadata(&path).unwrap().len();
        assert!(before > 30 << 20, "{before} bytes for 30 MB of entries");

        let purged = entry(28_999).log_id;
        store
            .remove((Bound::Unbounded, Bound::Included(28_999)), Some(&purged))
            .unwrap();
        assert!(
            store.compact_if_sparse().unwrap(),
            "a sparse file is compacted"
        );
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(
            after < 8 << 20,
            "{after} bytes after compaction, {before} before"
        );
        assert!(!store.compact_if_sparse().unwrap(), "and only once");

        let kept = store.entries(Bound::Unbounded, Bound::Unbounded).unwrap();
        assert_eq!(kept.len(), 1000);
        assert_eq!(kept[0].log_id.index, 29_000);
        assert_eq!(
            store.read_meta::<LogId<NodeId>>(LAST_PURGED).unwrap(),
            Some(purged)
        );
        store.append_entries(&[entry(30_000)]).unwrap();
        assert_eq!(store.last_entry_id().unwrap(), Some(entry(30_000).log_id));
    }
}
