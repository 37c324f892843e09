//! What a client can reach, one function per fuzz target: `fuzz/` runs
//! them under libFuzzer, and `cargo test` replays their checked-in corpora
//! (`fuzz/corpus/<target>/`). Each must answer any input with a value or an
//! error, never a panic, within the limits. A test-only crate: nothing in a
//! server links it.

pub mod ingest;
#[cfg(feature = "sql")]
pub mod sql;

#[cfg(test)]
mod tests;
