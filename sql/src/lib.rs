//! SQL over profiles: a DataFusion session per query whose tables read
//! dataset sections chosen by the metastore, plus profile functions such as
//! `flamegraph(...)`.

mod args;
pub mod compaction;
mod deadline;
pub mod diff;
pub mod flamegraph;
mod function_limits;
mod keyed_samples;
pub mod labels;
mod lru;
pub mod pprof;
mod profile_functions;
mod pruning;
mod queries;
mod query_threads;
mod regular_expressions;
pub mod selection;
pub mod series;
mod session;
pub mod settings;
pub mod stack_dictionary;
mod stack_totals;
mod statement;
mod storage;
pub mod system;
mod tables;
mod tenant_memory;

pub use profile_functions::profile_function_names;
pub use regular_expressions::MAX_PATTERN_BYTES;
pub use session::{QueryEngine, QueryEngineConfig, StatementSchema, CATALOG};
pub use statement::StatementLimits;

pub use settings::Settings;
pub use tables::TABLES;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SqlError {
    #[error("{0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("invalid tenant {0:?}")]
    Tenant(String),
    #[error("query timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// A statement refused before planning (too large, too deep).
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{0}")]
    Internal(String),
    /// The index could not be read as of now (a replica cut off from its
    /// leader): retry.
    #[error("{0}")]
    Unavailable(String),
}

/// What went wrong with a query, as every front end reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client's statement or arguments.
    InvalidArgument,
    /// The query needed more memory than it may hold.
    ResourceExhausted,
    /// The query ran past the timeout.
    DeadlineExceeded,
    /// The index could not be read as of now: retry.
    Unavailable,
    Internal,
}

impl SqlError {
    pub fn kind(&self) -> ErrorKind {
        use datafusion::error::DataFusionError as E;
        match self {
            SqlError::Tenant(_) | SqlError::InvalidQuery(_) => ErrorKind::InvalidArgument,
            SqlError::Timeout(_) => ErrorKind::DeadlineExceeded,
            SqlError::Internal(_) => ErrorKind::Internal,
            SqlError::Unavailable(_) => ErrorKind::Unavailable,
            SqlError::DataFusion(e) => match e.find_root() {
                E::ResourcesExhausted(_) => ErrorKind::ResourceExhausted,
                E::SQL(..)
                | E::Plan(_)
                | E::SchemaError(..)
                | E::NotImplemented(_)
                | E::Configuration(_)
                // What evaluating the client's expressions raised
                // (division by zero, a failed cast...).
                | E::Execution(_)
                | E::ArrowError(..) => ErrorKind::InvalidArgument,
                E::External(inner) => match inner.downcast_ref::<SqlError>() {
                    Some(e) => e.kind(),
                    None => ErrorKind::Internal,
                },
                _ => ErrorKind::Internal,
            },
        }
    }
}

#[cfg(test)]
mod tests;
