//! `dlq/`: block metadata a flush could not register because the
//! metastore was unreachable, and its recovery.

use std::sync::Arc;
use std::time::Duration;

use ember_engine::block::BlockMeta;
use ember_metastore::{Command, MetastoreClient};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use tracing::{info, warn};

use crate::{SegmentError, SegmentMetrics};

const DLQ_PREFIX: &str = "dlq";

pub(crate) async fn write_dlq(
    store: &dyn ObjectStore,
    meta: &BlockMeta,
) -> Result<Path, SegmentError> {
    let path = Path::from(format!("{DLQ_PREFIX}/{}/{}.meta", meta.shard, meta.id));
    // One entry per block: an entry already there is this block's.
    let written = store
        .put_opts(
            &path,
            PutPayload::from(meta.encode_framed()),
            PutMode::Create.into(),
        )
        .await;
    match written {
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(path),
        Err(e) => Err(SegmentError::Storage(format!("writing {path}: {e}"))),
    }
}

const QUARANTINE_PREFIX: &str = "dlq-quarantine";

/// What one pass over `dlq/` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DlqReport {
    /// Entries whose blocks are now registered (or already were).
    pub recovered: usize,
    /// Entries that could not be decoded or registered, moved aside to
    /// `dlq-quarantine/` for an operator.
    pub quarantined: usize,
}

/// Registers the blocks whose metadata a segment writer left in `dlq/`
/// when the metastore was unreachable. Run at start and then periodically;
/// registering is idempotent, so an entry whose block did get registered
/// (the metastore applied a command that timed out) is harmless. An entry
/// that cannot be read as block metadata (empty, torn) is moved aside with
/// a log line, never left to stop the server. A metastore that still fails
/// ends the pass; the next one retries.
/// Recovers `dlq/` now and then every `every`, for as long as the process
/// runs, counting what it does in `metrics`.
pub async fn recover_dlq_forever(
    store: Arc<dyn ObjectStore>,
    metastore: Arc<dyn MetastoreClient>,
    metrics: SegmentMetrics,
    every: Duration,
) {
    loop {
        match recover_dlq(store.as_ref(), metastore.as_ref()).await {
            Ok(r) => {
                metrics.dlq_recovered.inc_by(r.recovered as u64);
                metrics.dlq_quarantined.inc_by(r.quarantined as u64);
            }
            Err(e) => warn!(error = %e, "dlq recovery failed; retrying later"),
        }
        tokio::time::sleep(every).await;
    }
}

pub async fn recover_dlq(
    store: &dyn ObjectStore,
    metastore: &dyn MetastoreClient,
) -> Result<DlqReport, SegmentError> {
    use futures::TryStreamExt;
    let storage = |e: object_store::Error| SegmentError::Storage(e.to_string());
    let entries: Vec<_> = store
        .list(Some(&Path::from(DLQ_PREFIX)))
        .try_collect()
        .await
        .map_err(storage)?;
    let mut report = DlqReport::default();
    for entry in entries {
        let bytes = store
            .get(&entry.location)
            .await
            .map_err(storage)?
            .bytes()
            .await
            .map_err(storage)?;
        let meta = match dlq_block(store, &bytes).await {
            Ok(meta) => meta,
            Err(DlqProblem::Retry(e)) => return Err(e),
            Err(DlqProblem::Bad(reason)) => {
                quarantine(store, &entry.location, &reason).await?;
                report.quarantined += 1;
                continue;
            }
        };
        match metastore.apply(Command::add_block(meta)).await {
            Ok(_) => report.recovered += 1,
            Err(ember_metastore::MetastoreError::InvalidCommand(reason)) => {
                quarantine(store, &entry.location, &reason).await?;
                report.quarantined += 1;
                continue;
            }
            Err(e) => return Err(SegmentError::Storage(e.to_string())),
        }
        store.delete(&entry.location).await.map_err(storage)?;
    }
    if report.recovered > 0 {
        info!(recovered = report.recovered, "registered blocks from dlq/");
    }
    Ok(report)
}

/// Why a dlq entry is not registered now.
enum DlqProblem {
    /// The entry itself is bad: move it aside.
    Bad(String),
    /// The object store failed: try again on the next pass.
    Retry(SegmentError),
}

/// The block a dlq entry names, once the entry checks out (framing, CRC)
/// and the block object it names exists with the same metadata: a block
/// is registered only if a query can read it.
async fn dlq_block(store: &dyn ObjectStore, bytes: &[u8]) -> Result<BlockMeta, DlqProblem> {
    use ember_engine::block::BlockError;
    // Entries written before dlq entries were framed are bare messages;
    // the block's own footer below is what vouches for either kind.
    let meta = BlockMeta::decode_framed(bytes)
        .or_else(|framed| BlockMeta::decode_from(bytes).map_err(|_| framed))
        .map_err(DlqProblem::Bad)?;
    if meta.id.is_empty() || meta.path.is_empty() {
        return Err(DlqProblem::Bad("no block id or path".into()));
    }
    let stored = match ember_engine::block::read_footer(store, &meta.path).await {
        Ok(stored) => stored,
        Err(BlockError::Read {
            source: object_store::Error::NotFound { .. },
            ..
        }) => {
            return Err(DlqProblem::Bad(format!(
                "block {} does not exist",
                meta.path
            )))
        }
        Err(e @ BlockError::Read { .. }) => {
            return Err(DlqProblem::Retry(SegmentError::Storage(e.to_string())))
        }
        Err(e) => return Err(DlqProblem::Bad(e.to_string())),
    };
    // The footer inside the block is written before the block's size is
    // known; the size is the object's.
    let unsized_meta = |m: BlockMeta| BlockMeta { size: 0, ..m };
    if unsized_meta(stored) != unsized_meta(meta.clone()) {
        return Err(DlqProblem::Bad(format!(
            "block {} holds other metadata",
            meta.path
        )));
    }
    Ok(meta)
}

async fn quarantine(
    store: &dyn ObjectStore,
    location: &Path,
    reason: &str,
) -> Result<(), SegmentError> {
    let storage = |e: object_store::Error| SegmentError::Storage(e.to_string());
    let rest = location
        .as_ref()
        .strip_prefix(DLQ_PREFIX)
        .unwrap_or(location.as_ref());
    let target = Path::from(format!("{QUARANTINE_PREFIX}{rest}"));
    warn!(path = %location, to = %target, reason, "unreadable dlq entry quarantined");
    store.copy(location, &target).await.map_err(storage)?;
    store.delete(location).await.map_err(storage)
}
