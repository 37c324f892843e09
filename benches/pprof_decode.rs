//! Decode and normalise recorded pprof profiles: the distributor's CPU cost
//! per push. `cargo bench -p ember-distributor --bench pprof_decode`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_distributor::formats::pprof;
use ember_distributor::formats::push::{
    LabelPair, PushBody, PushRequest, RawProfileSeries, RawSample,
};
use ember_distributor::formats::{BodyEncoding, WireFormat};
use ember_distributor::limits::Limits;
use ember_distributor::normalise::{normalise, validate_labels, Destination};
use ember_fixtures::pprof_fixtures;
use prost::Message;

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
    push_request(c);
}

/// A push as the bench harness's agents send it: one series per recorded
/// profile an agent would send every 10 s (at most 300 KB gzipped, at
/// least 20 samples), each a gzipped pprof, decoded as the distributor
/// does (gunzip, read, normalise, limits).
fn push_request(c: &mut Criterion) {
    let mut series = Vec::new();
    let mut samples = 0usize;
    for (name, bytes) in pprof_fixtures() {
        let Ok(p) = pprof::decode(&bytes, 64 << 20) else {
            continue;
        };
        if bytes.len() > 300 << 10 || p.sample.len() < 20 || !bytes.starts_with(&[0x1f, 0x8b]) {
            continue;
        }
        samples += p.sample.len() * p.sample_type.len();
        series.push(RawProfileSeries {
            labels: vec![LabelPair {
                name: "service_name".into(),
                value: name,
            }],
            samples: vec![RawSample {
                raw_profile: bytes.into(),
                id: String::new(),
            }],
            ..Default::default()
        });
    }
    let body = bytes::Bytes::from(PushRequest { series }.encode_to_vec());
    let mut limits = Limits::default();
    limits.defaults.reject_older_than_seconds = 0;
    limits.defaults.reject_newer_than_seconds = 0;
    let encoding = BodyEncoding {
        json: false,
        gzip: false,
    };
    let mut group = c.benchmark_group("push");
    group.throughput(Throughput::Elements(samples as u64));
    group.bench_function("decode/recorded-agent-profiles", |b| {
        b.iter(|| {
            let push = PushBody {
                body: body.clone(),
                encoding,
            };
            push.profiles(&limits, "bench", 1).expect("decodes")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
