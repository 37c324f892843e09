//! Ember's write path: wire formats (pprof, push.v1, the legacy `/ingest`
//! formats), validation and normalisation (the distributor), and the segment
//! writer that makes profiles durable in object storage before acking them.

pub mod decode;
pub mod distributor;
pub mod error;
pub mod faults;
#[doc(hidden)]
pub mod fuzzing;
pub mod jfr;
pub mod legacy;
pub mod limits;
pub mod normalise;
pub mod otlp;
pub mod pool;
pub mod pprof;
pub mod push;
pub mod segment;

pub use error::IngestError;

#[cfg(test)]
mod tests;
