//! How the stateless roles reach the metastore: in process, or over the
//! network when a compaction worker (or another stateless role) runs in a
//! process of its own. Both carry the same protobuf [`Command`]s, so what a
//! remote worker asks for is exactly what the state machine applies.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Applied, Command, Metastore, MetastoreError};
use crate::messages::{AppliedReply, ErrorReply};
use ember_engine::block::BlockMeta;

/// The metastore's commands, wherever the metastore runs.
#[async_trait]
pub trait MetastoreClient: Send + Sync {
    /// Applies one command durably (see [`Metastore::apply`]).
    async fn apply(&self, command: Command) -> Result<Applied, MetastoreError>;

    /// Registers blocks in one durable transaction: all or none (a flush).
    async fn add_blocks(&self, blocks: Vec<BlockMeta>) -> Result<(), MetastoreError>;
}

/// What a reader of this process's copy of the index waits on first, so
/// that it sees every write acknowledged before the read began (a replica
/// of a replicated metastore may lag its leader).
#[async_trait]
pub trait ReadBarrier: Send + Sync {
    async fn caught_up(&self) -> Result<(), MetastoreError>;
}

/// The metastore of this process; commands run off the async executor,
/// since redb fsyncs.
pub struct InProcess(pub Arc<Metastore>);

#[async_trait]
impl MetastoreClient for InProcess {
    async fn apply(&self, command: Command) -> Result<Applied, MetastoreError> {
        let metastore = self.0.clone();
        tokio::task::spawn_blocking(move || metastore.apply(command))
            .await
            .map_err(|e| MetastoreError::Unavailable(format!("apply task: {e}")))?
    }

    async fn add_blocks(&self, blocks: Vec<BlockMeta>) -> Result<(), MetastoreError> {
        let metastore = self.0.clone();
        let commands = blocks.into_iter().map(Command::add_block).collect();
        tokio::task::spawn_blocking(move || metastore.apply_all(commands))
            .await
            .map_err(|e| MetastoreError::Unavailable(format!("apply task: {e}")))?
    }
}

impl From<Applied> for AppliedReply {
    fn from(applied: Applied) -> Self {
        let (kind, count, job) = match applied {
            Applied::Done => (0, 0, None),
            Applied::Planned(n) => (1, n as u64, None),
            Applied::Expired(n) => (2, n as u64, None),
            Applied::Leased(job) => (3, 0, job),
        };
        Self { kind, count, job }
    }
}

impl AppliedReply {
    pub fn into_applied(self) -> Result<Applied, MetastoreError> {
        let count = usize::try_from(self.count).unwrap_or(usize::MAX);
        match self.kind {
            0 => Ok(Applied::Done),
            1 => Ok(Applied::Planned(count)),
            2 => Ok(Applied::Expired(count)),
            3 => Ok(Applied::Leased(self.job)),
            k => Err(MetastoreError::Unavailable(format!(
                "metastore replied with unknown result kind {k}"
            ))),
        }
    }
}

impl From<&MetastoreError> for ErrorReply {
    fn from(e: &MetastoreError) -> Self {
        match e {
            MetastoreError::Lease { job, reason } => Self {
                kind: 1,
                job: job.clone(),
                message: reason.clone(),
            },
            MetastoreError::InvalidCommand(m) => Self {
                kind: 2,
                job: String::new(),
                message: m.clone(),
            },
            other => Self {
                kind: 3,
                job: String::new(),
                message: other.to_string(),
            },
        }
    }
}

impl From<ErrorReply> for MetastoreError {
    fn from(e: ErrorReply) -> Self {
        match e.kind {
            1 => MetastoreError::Lease {
                job: e.job,
                reason: e.message,
            },
            2 => MetastoreError::InvalidCommand(e.message),
            _ => MetastoreError::Unavailable(e.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::Job;

    #[test]
    fn results_and_errors_survive_the_wire() {
        let job = Job {
            id: "j1".into(),
            tenant: "acme".into(),
            lease_token: 42,
            ..Job::default()
        };
        for applied in [
            Applied::Done,
            Applied::Planned(3),
            Applied::Expired(2),
            Applied::Leased(None),
            Applied::Leased(Some(job)),
        ] {
            let bytes = AppliedReply::from(applied.clone()).encode_to_vec();
            let back = AppliedReply::decode(bytes.as_slice()).unwrap();
            assert_eq!(back.into_applied().unwrap(), applied);
        }
        let lease = MetastoreError::Lease {
            job: "j1".into(),
            reason: "stale token".into(),
        };
        let back = MetastoreError::from(ErrorReply::from(&lease));
        assert!(
            matches!(&back, MetastoreError::Lease { job, reason } if job == "j1" && reason == "stale token")
        );
        let bad = MetastoreError::InvalidCommand("empty command".into());
        assert!(matches!(
            MetastoreError::from(ErrorReply::from(&bad)),
            MetastoreError::InvalidCommand(m) if m == "empty command"
        ));
        let unknown = AppliedReply {
            kind: 9,
            ..AppliedReply::default()
        };
        assert!(unknown.into_applied().is_err());
    }
}
