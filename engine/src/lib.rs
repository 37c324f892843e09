//! Ember's storage engine: the profile model every role shares, the block
//! format that segment writers flush to object storage, the metastore that
//! indexes every block, and label selectors used to prune them.

pub mod block;
pub mod metastore;
pub mod profile;
pub mod selector;
pub mod stack;

pub use block::{BlockMeta, DatasetMeta, SectionMeta};
pub use metastore::{BlockQuery, Command, DatasetRef, Metastore, MetastoreError};
pub use profile::{Labels, Profile, Sample};

/// Support for tests and benchmarks across the workspace.
#[doc(hidden)]
pub mod testing {
    use std::path::PathBuf;

    /// The recorded profiles of `../shared/fixtures` (or `$EMBER_FIXTURES`).
    pub fn fixtures_dir() -> PathBuf {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let candidates = [
            std::env::var_os("EMBER_FIXTURES").map(PathBuf::from),
            Some(manifest.join("../../shared/fixtures")),
            Some(PathBuf::from("/work/shared/fixtures")),
        ];
        candidates
            .into_iter()
            .flatten()
            .find(|p| p.join("pprof").is_dir())
            .expect("shared fixtures not found: set EMBER_FIXTURES")
    }

    /// Every valid pprof fixture: (file name, bytes).
    pub fn pprof_fixtures() -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures_dir().join("pprof"))
            .expect("fixtures readable")
            .filter_map(|e| e.ok())
            .map(|e| {
                let bytes = std::fs::read(e.path()).expect("fixture readable");
                (e.file_name().to_string_lossy().into_owned(), bytes)
            })
            .collect();
        out.sort();
        out
    }
}
