//! SQL over profiles: a DataFusion session per query whose tables read
//! dataset sections chosen by the metastore, plus profile functions such as
//! `flamegraph(...)`.

mod args;
pub mod compaction;
pub mod diff;
pub mod flamegraph;
#[doc(hidden)]
pub mod fuzzing;
pub mod labels;
mod lru;
pub mod pprof;
mod pruning;
pub mod selection;
pub mod series;
mod session;
pub mod settings;
pub mod stack_dictionary;
mod stack_totals;
pub mod system;
mod tables;
mod tenant_memory;

pub use session::{QueryEngine, QueryEngineConfig, CATALOG};
pub use settings::Settings;
pub use tables::TABLES;

/// Ember's table functions over profiles.
pub const PROFILE_FUNCTIONS: [&str; 7] = [
    "diff_flamegraph",
    "flamegraph",
    "label_names",
    "label_values",
    "pprof",
    "series",
    "span_flamegraph",
];

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SqlError {
    #[error("{0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("invalid tenant {0:?}")]
    Tenant(String),
    #[error("query timed out after {0:?}")]
    Timeout(std::time::Duration),
}

#[cfg(test)]
mod tests;
