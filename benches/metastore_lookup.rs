//! Metastore lookups of one service over one hour, from indexes of 10 k and
//! 100 k level-0 blocks (`ember bench` goes to 1 M).
//! `cargo bench -p ember-engine --bench metastore_lookup`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ember_fixtures::level0_block;
use ember_metastore::{BlockQuery, Command, Metastore};

const SERVICES: usize = 50;
const HOUR: i64 = 3600 * 1_000_000_000;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("metastore");
    for blocks in [10_000usize, 100_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let metastore = Metastore::open(&dir.path().join("m.redb")).expect("opens");
        for chunk in (0..blocks).collect::<Vec<_>>().chunks(20_000) {
            let commands = chunk
                .iter()
                .map(|&i| Command::add_block(level0_block(i, SERVICES)))
                .collect();
            metastore.apply_all(commands).expect("applies");
        }
        // The middle of the indexed range, one hour wide.
        let start = blocks as i64 / 8 * 10_000_000_000;
        let query = BlockQuery {
            tenant: "bench".into(),
            start,
            end: start + HOUR,
            service_names: Some(vec!["svc-07".into()]),
            profile_types: None,
            skip_level0: false,
        };
        assert!(
            !metastore.query(&query).is_empty(),
            "the lookup finds blocks"
        );
        group.bench_with_input(
            BenchmarkId::new("lookup_1h_1_service", blocks),
            &query,
            |b, q| b.iter(|| metastore.query(q)),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
