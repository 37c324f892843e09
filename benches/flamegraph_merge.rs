//! The flame graph merge: the fold of per-stack sums up the stack tree, and
//! the whole `flamegraph()` SQL plan over blocks in a local object store.
//! `cargo bench -p ember-sql --bench flamegraph_merge`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_distributor::formats::pprof::{self, FlatProfile};
use ember_distributor::normalise::{normalise, validate_labels, Destination};
use ember_engine::block::{write_block, StackNodes};
use ember_engine::Profile;
use ember_fixtures::pprof_fixtures;
use ember_metastore::{Command, Metastore};
use ember_sql::flamegraph::stack_tree;
use ember_sql::flamegraph::{build_flame_graph, NodeSources};
use ember_sql::{QueryEngine, QueryEngineConfig};
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const HEAP: &str = "go-heap-large.pb.gz";
const TYPE: &str = "memory:alloc_objects:count:space:bytes";

fn heap_profiles(copies: usize) -> Vec<Profile> {
    let (_, bytes) = pprof_fixtures()
        .into_iter()
        .find(|(n, _)| n == HEAP)
        .expect("fixture");
    let p = pprof::decode(&bytes, 64 << 20).expect("decodes");
    let mut out = Vec::new();
    for i in 0..copies {
        let dest = Destination {
            tenant: "bench".into(),
            labels: validate_labels(vec![
                ("service_name".into(), "heap".into()),
                ("__name__".into(), "memory".into()),
                ("pod".into(), format!("pod-{}", i % 8)),
            ])
            .expect("labels"),
            received_at_nanos: 1_700_000_000_000_000_000 + i as i64 * 10_000_000_000,
            limits: Default::default(),
        };
        out.extend(
            normalise(&FlatProfile::of(&p), &dest)
                .expect("normalises")
                .into_iter()
                .filter(|p| p.profile_type == TYPE),
        );
    }
    out
}

fn bench(c: &mut Criterion) {
    let profiles = heap_profiles(1);
    let (nodes, values) = stack_tree(&profiles);
    assert!(values.len() > 1000, "the bench needs the fixture's stacks");
    let mut group = c.benchmark_group("flamegraph");
    group.throughput(Throughput::Elements(values.len() as u64));
    group.bench_function("fold/go-heap-large", |b| {
        b.iter(|| build_flame_graph(NodeSources::of(&nodes), &values, 16384).expect("builds"))
    });

    // The whole SQL plan: 40 profiles in 4 blocks.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("store"));
    let metastore = Arc::new(Metastore::open(&dir.path().join("m.redb")).expect("metastore"));
    let all = heap_profiles(40);
    let samples: usize = all.iter().map(|p| p.samples.len()).sum();
    runtime.block_on(async {
        for (shard, chunk) in all.chunks(10).enumerate() {
            let block =
                write_block(chunk, shard as u32, &mut StackNodes::default()).expect("block");
            store
                .put(
                    &Path::from(block.meta.path.as_str()),
                    PutPayload::from(block.bytes),
                )
                .await
                .expect("put");
            metastore
                .apply(Command::add_block(block.meta))
                .expect("index");
        }
    });
    let engine = QueryEngine::new(store, metastore, QueryEngineConfig::default()).expect("engine");
    let sql = format!(
        "SELECT * FROM flamegraph('{TYPE}', '{{service_name=\"heap\"}}', 0, 9999999999999)"
    );
    group.throughput(Throughput::Elements(samples as u64));
    group.bench_function(format!("sql/{samples}-samples"), |b| {
        b.iter(|| {
            runtime.block_on(async {
                let stream = engine
                    .execute("bench", &sql, &ember_sql::Settings::default())
                    .await
                    .expect("plans");
                let batches: Vec<_> = stream.try_collect().await.expect("runs");
                assert!(batches[0].num_rows() > 1);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
