//! Encoding a segment: the segment writer's CPU cost per flush, for 64
//! profiles of recorded Go CPU and heap profiles across 8 services.
//! `cargo bench -p ember-distributor --bench segment_write`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_distributor::formats::pprof::{self, FlatProfile};
use ember_distributor::normalise::{normalise, validate_labels, Destination};
use ember_engine::block::{write_block, StackNodes};
use ember_engine::Profile;
use ember_fixtures::pprof_fixtures;

fn segment_profiles() -> Vec<Profile> {
    let mut out = Vec::new();
    for (f, name) in ["go-cpu-deep-stacks.pb.gz", "go-heap.pb.gz"]
        .iter()
        .enumerate()
    {
        let (_, bytes) = pprof_fixtures()
            .into_iter()
            .find(|(n, _)| n == name)
            .expect("fixture present");
        let p = pprof::decode(&bytes, 64 << 20).expect("decodes");
        for i in 0..32 {
            let dest = Destination {
                tenant: "bench".into(),
                labels: validate_labels(vec![
                    ("service_name".into(), format!("svc-{}", f * 4 + i % 4)),
                    ("pod".into(), format!("pod-{i}")),
                ])
                .expect("labels"),
                received_at_nanos: 1,
                limits: Default::default(),
            };
            out.extend(normalise(&FlatProfile::of(&p), &dest).expect("normalises"));
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let profiles = segment_profiles();
    let samples: usize = profiles.iter().map(|p| p.samples.len()).sum();
    let mut group = c.benchmark_group("segment");
    group.throughput(Throughput::Elements(samples as u64));
    // Every node hashed: a writer's first block, or a cache just dropped.
    group.bench_function("write_block/64_profiles/cold", |b| {
        b.iter(|| write_block(&profiles, 0, &mut StackNodes::default()).expect("encodes"))
    });
    // The steady state: the services' frames were seen in earlier blocks.
    let mut nodes = StackNodes::default();
    group.bench_function("write_block/64_profiles/warm", |b| {
        b.iter(|| write_block(&profiles, 0, &mut nodes).expect("encodes"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
