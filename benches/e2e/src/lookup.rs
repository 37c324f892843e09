//! Metastore lookups over an index of many blocks: a query's first step,
//! which must stay well under a millisecond however many blocks exist.

use std::time::{Duration, Instant};

use ember_fixtures::level0_block;
use ember_metastore::{BlockQuery, Command, Metastore};
use serde::Serialize;

use super::ingest::Latency;

const SERVICES: usize = 50;
const BLOCK_NANOS: i64 = 10_000_000_000;

#[derive(Debug, Clone, Serialize)]
pub struct LookupRun {
    pub blocks: usize,
    pub datasets_found: usize,
    pub load_seconds: f64,
    pub latency: Latency,
}

/// Loads `blocks` blocks into a fresh metastore, then times lookups of one
/// service over one hour at random points of the range.
pub fn run(blocks: usize, lookups: usize) -> anyhow::Result<LookupRun> {
    let dir = tempfile::tempdir()?;
    let metastore = Metastore::open(&dir.path().join("metastore.redb"))?;
    let t = Instant::now();
    for chunk in (0..blocks).collect::<Vec<_>>().chunks(20_000) {
        metastore.apply_all(
            chunk
                .iter()
                .map(|&i| Command::add_block(level0_block(i, SERVICES)))
                .collect(),
        )?;
    }
    let load_seconds = t.elapsed().as_secs_f64();
    let span = blocks as i64 / 4 * BLOCK_NANOS;
    let hour = 3600 * 1_000_000_000i64;
    let mut rng = super::workload::Rng::new(7);
    let mut latencies: Vec<Duration> = Vec::with_capacity(lookups);
    let mut found = 0;
    for n in 0..lookups {
        let start = (rng.unit() * (span - hour).max(1) as f64) as i64;
        let q = BlockQuery {
            tenant: "bench".into(),
            start,
            end: start + hour,
            service_names: Some(vec![format!("svc-{:02}", n % SERVICES)]),
            profile_types: Some(vec!["process_cpu:cpu:nanoseconds:cpu:nanoseconds".into()]),
            skip_level0: false,
        };
        let t = Instant::now();
        let d = metastore.query(&q);
        latencies.push(t.elapsed());
        found += d.len();
    }
    Ok(LookupRun {
        blocks,
        datasets_found: found / lookups.max(1),
        load_seconds,
        latency: Latency::of(latencies),
    })
}
