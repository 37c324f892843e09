use thiserror::Error;

/// Why a segment writer did not make profiles durable.
#[derive(Debug, Error)]
pub enum SegmentError {
    /// Object storage or the metastore failed; nothing was acknowledged.
    #[error("{0}")]
    Storage(String),
    #[error("server is shutting down")]
    ShuttingDown,
}
