use thiserror::Error;

/// Why a push was refused. Every variant but the storage ones is the
/// client's fault and maps to a 4xx.
#[derive(Debug, Error)]
pub enum IngestError {
    #[error("request body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("decompressing {what}: {reason}")]
    Decompress { what: &'static str, reason: String },
    #[error("decoding {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("invalid profile: {0}")]
    Invalid(String),
    #[error("unsupported {0}")]
    Unsupported(String),
    #[error("storing the segment failed: {0}")]
    Storage(String),
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The tenant pushed past its ingestion rate: 429, retry later.
    #[error("{0}")]
    RateLimited(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
}

impl From<ember_engine::AuthError> for IngestError {
    fn from(e: ember_engine::AuthError) -> Self {
        match e {
            ember_engine::AuthError::Unauthenticated(m) => IngestError::Unauthenticated(m),
            ember_engine::AuthError::Forbidden(m) => IngestError::Forbidden(m),
            ember_engine::AuthError::InvalidTenant(e) => IngestError::Invalid(e.to_string()),
        }
    }
}

impl IngestError {
    /// A short stable reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::TooLarge { .. } => "too_large",
            IngestError::Decompress { .. } => "decompress",
            IngestError::Decode { .. } => "decode",
            IngestError::Invalid(_) => "invalid",
            IngestError::Unsupported(_) => "unsupported",
            IngestError::Storage(_) => "storage",
            IngestError::ShuttingDown => "shutting_down",
            IngestError::Overloaded(_) => "overloaded",
            IngestError::RateLimited(_) => "rate_limited",
            IngestError::Unauthenticated(_) => "unauthenticated",
            IngestError::Forbidden(_) => "forbidden",
        }
    }

    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            IngestError::Storage(_) | IngestError::ShuttingDown | IngestError::Overloaded(_)
        )
    }
}

impl From<ember_segment_writer::SegmentError> for IngestError {
    fn from(e: ember_segment_writer::SegmentError) -> Self {
        match e {
            ember_segment_writer::SegmentError::Storage(m) => IngestError::Storage(m),
            ember_segment_writer::SegmentError::ShuttingDown => IngestError::ShuttingDown,
        }
    }
}
