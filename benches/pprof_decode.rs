//! Decode and normalise recorded pprof profiles: the distributor's CPU cost
//! per push. `cargo bench -p ember-ingest --bench pprof_decode`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_engine::testing::pprof_fixtures;
use ember_ingest::normalise::{normalise, validate_labels, Destination};
use ember_ingest::pprof;

fn bench(c: &mut Criterion) {
    let dest = Destination {
        tenant: "bench".into(),
        labels: validate_labels(vec![("service_name".into(), "bench".into())]).expect("labels"),
        received_at_nanos: 1,
        limits: Default::default(),
    };
    let mut group = c.benchmark_group("pprof");
    for name in [
        "go-heap-large.pb.gz",
        "go-cpu-deep-stacks.pb.gz",
        "dotnet-73.pb.gz",
    ] {
        let (_, bytes) = pprof_fixtures()
            .into_iter()
            .find(|(n, _)| n == name)
            .expect("fixture present");
        let decoded = pprof::decode(&bytes, 64 << 20).expect("decodes");
        let samples: usize = decoded.sample.len() * decoded.sample_type.len();
        group.throughput(Throughput::Elements(samples as u64));
        group.bench_function(format!("decode+normalise/{name}"), |b| {
            b.iter(|| {
                let raw = pprof::maybe_gunzip(&bytes, 64 << 20, "pprof").expect("gunzips");
                let p = pprof::FlatProfile::decode(&raw).expect("decodes");
                normalise(&p, &dest).expect("normalises")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
