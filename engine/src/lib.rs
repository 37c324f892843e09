//! What every role shares: the profile model, the block format that segment
//! writers flush to object storage and the metastore indexes
//! (`engine/metastore`), label selectors, tenants and credentials.

pub mod auth;
pub mod block;
pub mod pprof;
pub mod profile;
pub mod protojson;
pub mod selector;
pub mod stack;
pub mod tenant;

pub use auth::{AuthError, Authenticator};
pub use block::{BlockMeta, DatasetMeta, SectionMeta};
pub use profile::{Labels, Profile, Sample, Stack, Stacks};
pub use tenant::{TenantId, DEFAULT_TENANT};

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

    /// Level-0 block `i` of a synthetic index: one every 10 s per shard
    /// (4 shards), each with datasets of 3 of `services` services, as
    /// segment writers leave them. For metastore benchmarks.
    pub fn level0_block(i: usize, services: usize) -> crate::BlockMeta {
        use crate::block::{BlockMeta, DatasetMeta, SectionMeta};
        const BLOCK_NANOS: i64 = 10_000_000_000;
        let start = i as i64 / 4 * BLOCK_NANOS;
        let datasets = (0..3)
            .map(|k| {
                let service = format!("svc-{:02}", (i * 7 + k * 13) % services.max(1));
                DatasetMeta {
                    tenant: "bench".into(),
                    min_time: start,
                    max_time: start + BLOCK_NANOS - 1,
                    profile_types: vec!["process_cpu:cpu:nanoseconds:cpu:nanoseconds".into()],
                    series: vec![format!("{{pod=\"p{k}\", service_name=\"{service}\"}}")],
                    service_name: service,
                    sections: vec![SectionMeta {
                        kind: "samples".into(),
                        offset: 0,
                        size: 1000,
                        rows: 100,
                        keyed: false,
                    }],
                    profiles: 10,
                    samples: 1000,
                }
            })
            .collect();
        let id = format!("{i:026}");
        BlockMeta {
            format_version: 1,
            path: format!("segments/{}/anonymous/{id}/block.bin", i % 4),
            id,
            shard: (i % 4) as u32,
            compaction_level: 0,
            min_time: start,
            max_time: start + BLOCK_NANOS - 1,
            size: 3000,
            datasets,
        }
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
