//! Raft's state machine: the [`Metastore`] itself. Each entry is applied
//! with its log position (and the membership in force) in the same redb
//! transaction, so a restarted replica resumes exactly after its last
//! applied entry. A snapshot is the metastore's whole state; the latest one
//! is kept in a file so that a lagging replica can be sent it after a
//! restart.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, StorageError, StorageIOError, StoredMembership,
};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::{blocking, outcome_payload, NodeId, Payload, TypeConfig};
use crate::messages::{proposal, Proposal};
use crate::{Applied, Metastore, MetastoreError};

type StoreResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, BasicNode>;

/// What the metastore stores as its log position.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Position {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
}

/// A snapshot as kept on disk: its metadata and the metastore's bytes.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    #[serde(with = "super::base64_bytes")]
    data: Vec<u8>,
}

/// The replica's metastore as Raft's state machine; clones share it.
#[derive(Clone)]
pub struct StateMachine {
    metastore: Arc<Metastore>,
    /// Where the latest snapshot is kept.
    snapshot_path: Arc<PathBuf>,
}

impl StateMachine {
    pub fn new(metastore: Arc<Metastore>, snapshot_path: PathBuf) -> Self {
        Self {
            metastore,
            snapshot_path: Arc::new(snapshot_path),
        }
    }

    fn position(&self) -> Result<Position, String> {
        match self.metastore.log_position().map_err(|e| e.to_string())? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
            None => Ok(Position::default()),
        }
    }

    /// Applies one entry; a store error stops the replica (Raft cannot go
    /// on with a state that may have missed an entry).
    fn apply_entry(
        &self,
        entry: Entry<TypeConfig>,
        membership: &mut Membership,
    ) -> Result<Payload, String> {
        if let EntryPayload::Membership(m) = &entry.payload {
            *membership = StoredMembership::new(Some(entry.log_id), m.clone());
        }
        let position = serde_json::to_vec(&Position {
            last_applied: Some(entry.log_id),
            membership: membership.clone(),
        })
        .map_err(|e| e.to_string())?;
        let result = match entry.payload {
            EntryPayload::Normal(payload) => self.apply_proposal(&payload, &position),
            EntryPayload::Blank | EntryPayload::Membership(_) => self
                .metastore
                .record_entry(&position)
                .map(|()| Applied::Done),
        };
        match &result {
            Err(e) if !e.is_refusal() => Err(format!("entry {}: {e}", entry.log_id)),
            _ => Ok(outcome_payload(&result)),
        }
    }

    fn apply_proposal(
        &self,
        payload: &Payload,
        position: &[u8],
    ) -> Result<Applied, MetastoreError> {
        let proposal = match Proposal::decode(payload.0.as_slice()) {
            Ok(p) => p,
            Err(e) => {
                // Refused alike everywhere; the position still moves.
                self.metastore.record_entry(position)?;
                return Err(MetastoreError::InvalidCommand(format!("proposal: {e}")));
            }
        };
        match proposal.kind {
            Some(proposal::Kind::Command(command)) => self.metastore.apply_entry(command, position),
            Some(proposal::Kind::AddBlocks(b)) => self
                .metastore
                .add_blocks_entry(b.blocks, position)
                .map(|()| Applied::Done),
            None => {
                self.metastore.record_entry(position)?;
                Err(MetastoreError::InvalidCommand("empty proposal".into()))
            }
        }
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, String> {
        match std::fs::read(&*self.snapshot_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", self.snapshot_path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.snapshot_path.display())),
        }
    }

    /// Keeps `snapshot` durably, replacing the last one whole.
    fn keep_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), String> {
        let bytes = serde_json::to_vec(snapshot).map_err(|e| e.to_string())?;
        let tmp = self.snapshot_path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, &bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &*self.snapshot_path)?;
            if let Some(dir) = self.snapshot_path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| format!("{}: {e}", self.snapshot_path.display()))
    }

    fn build(&self) -> Result<StoredSnapshot, String> {
        let (data, position) = self
            .metastore
            .snapshot_with_position()
            .map_err(|e| e.to_string())?;
        let position: Position = match position {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string())?,
            None => Position::default(),
        };
        let snapshot_id = match position.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, ulid::Ulid::new()),
            None => format!("empty-{}", ulid::Ulid::new()),
        };
        let snapshot = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: position.last_applied,
                last_membership: position.membership,
                snapshot_id,
            },
            data,
        };
        self.keep_snapshot(&snapshot)?;
        Ok(snapshot)
    }
}

fn io_err(e: String) -> std::io::Error {
    std::io::Error::other(e)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let sm = self.clone();
        let built = blocking(move || sm.build())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &io_err(e)))?;
        Ok(Snapshot {
            meta: built.meta,
            snapshot: Box::new(Cursor::new(built.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StoreResult<(Option<LogId<NodeId>>, Membership)> {
        let sm = self.clone();
        let position = blocking(move || sm.position())
            .await
            .map_err(|e| StorageIOError::read_state_machine(&io_err(e)))?;
        Ok((position.last_applied, position.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Payload>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let sm = self.clone();
        blocking(move || {
            let mut membership = sm.position()?.membership;
            entries
                .into_iter()
                .map(|entry| sm.apply_entry(entry, &mut membership))
                .collect()
        })
        .await
        .map_err(|e| StorageIOError::write_state_machine(&io_err(e)).into())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let snapshot = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let sm = self.clone();
        blocking(move || {
            sm.metastore
                .restore(&snapshot.data)
                .map_err(|e| e.to_string())?;
            sm.keep_snapshot(&snapshot)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &io_err(e)).into())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let sm = self.clone();
        let stored = blocking(move || sm.read_snapshot())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &io_err(e)))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
