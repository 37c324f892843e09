//! The SQL surface over blocks of recorded profiles, in one process.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::Int64Type;
use ember_distributor::formats::pprof::{self, FlatProfile};
use ember_distributor::normalise::{normalise, validate_labels, Destination};
use ember_engine::block::{write_block, StackNodes};
use ember_engine::Profile;
use ember_fixtures::pprof_fixtures;
use ember_metastore::{Command, Metastore};
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::flamegraph::{FlameGraphCall, Frame};
use crate::{QueryEngine, QueryEngineConfig, Settings};

mod hostile;

fn profiles(fixture: &str, service: &str, tenant: &str) -> Vec<Profile> {
    let (_, bytes) = pprof_fixtures()
        .into_iter()
        .find(|(n, _)| n == fixture)
        .unwrap();
    let p = pprof::decode(&bytes, 64 << 20).unwrap();
    let dest = Destination {
        tenant: tenant.into(),
        labels: validate_labels(vec![
            ("service_name".into(), service.into()),
            ("__name__".into(), "fx".into()),
        ])
        .unwrap(),
        received_at_nanos: 1_700_000_000_000_000_000,
        limits: Default::default(),
    };
    let flat = FlatProfile::of(&p);
    normalise(&flat, &dest).unwrap()
}

async fn engine_with(
    blocks: Vec<Vec<Profile>>,
    memory_limit: usize,
) -> (tempfile::TempDir, QueryEngine) {
    engine_with_config(
        blocks,
        QueryEngineConfig {
            memory_limit,
            ..QueryEngineConfig::default()
        },
    )
    .await
}

async fn engine_with_config(
    blocks: Vec<Vec<Profile>>,
    config: QueryEngineConfig,
) -> (tempfile::TempDir, QueryEngine) {
    let (dir, engine, _) = engine_and_metastore(blocks, config).await;
    (dir, engine)
}

/// The engine over `blocks`, and the metastore it reads (for tests that
/// compact or inspect the index).
async fn engine_and_metastore(
    blocks: Vec<Vec<Profile>>,
    config: QueryEngineConfig,
) -> (tempfile::TempDir, QueryEngine, Arc<Metastore>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let metastore = Arc::new(Metastore::open(&dir.path().join("m.redb")).unwrap());
    // One shard, as one service's pushes always land on one.
    for profiles in &blocks {
        add_level0_block(store.as_ref(), &metastore, profiles).await;
    }
    let engine = QueryEngine::new(store, metastore.clone(), config).unwrap();
    (dir, engine, metastore)
}

/// Writes `profiles` as one level-0 block (shard 0), stores it and adds it
/// to the metastore; returns the block's metadata.
async fn add_level0_block(
    store: &dyn ObjectStore,
    metastore: &Metastore,
    profiles: &[Profile],
) -> ember_engine::BlockMeta {
    let block = write_block(profiles, 0, &mut StackNodes::default()).unwrap();
    store
        .put(
            &Path::from(block.meta.path.as_str()),
            PutPayload::from(block.bytes),
        )
        .await
        .unwrap();
    metastore
        .apply(Command::add_block(block.meta.clone()))
        .unwrap();
    block.meta
}

async fn run(engine: &QueryEngine, tenant: &str, sql: &str) -> Vec<RecordBatch> {
    run_with(engine, tenant, sql, &Settings::default()).await
}

async fn run_with(
    engine: &QueryEngine,
    tenant: &str,
    sql: &str,
    settings: &Settings,
) -> Vec<RecordBatch> {
    engine
        .execute(tenant, sql, settings)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// 'a;b;c' -> value of the input profiles of one type.
fn input_stacks(profiles: &[Profile], ty: &str) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for p in profiles.iter().filter(|p| p.profile_type == ty) {
        for s in &p.samples {
            let names: Vec<&str> = p
                .stack(s)
                .iter()
                .map(|f| p.functions.get(*f as usize).unwrap())
                .collect();
            *out.entry(names.join(";")).or_default() += s.value;
        }
    }
    out
}

/// 'a;b;c' -> self value, from the depth-first frame.
fn frame_stacks(batches: &[RecordBatch]) -> (i64, HashMap<String, i64>) {
    rows_stacks(Frame::Batches(batches))
}

/// The root's total and `a;b;c` -> self of flame graph rows.
fn rows_stacks(frame: Frame<'_>) -> (i64, HashMap<String, i64>) {
    let mut path: Vec<String> = Vec::new();
    let mut out = HashMap::new();
    let mut total = None;
    frame
        .for_each_row(|row| {
            if row.depth == 0 {
                total = Some(row.total);
                return Ok(());
            }
            path.truncate(row.depth - 1);
            path.push(row.label.to_string());
            if row.own != 0 {
                *out.entry(path.join(";")).or_default() += row.own;
            }
            Ok(())
        })
        .unwrap();
    (total.unwrap(), out)
}

/// The profiles of a fixture for one pod at a time (seconds past the base).
fn profiles_at(fixture: &str, pod: &str, seconds: i64) -> Vec<Profile> {
    profiles(fixture, "heap", "t")
        .into_iter()
        .map(|mut p| {
            p.labels.push(("pod".into(), pod.into()));
            p.labels.sort();
            p.time_nanos += seconds * 1_000_000_000;
            p
        })
        .collect()
}

#[tokio::test]
async fn flamegraph_mixes_whole_and_partial_datasets() {
    let ty = "fx:inuse_space:bytes:space:bytes";
    let early = profiles_at("go-heap.pb.gz", "p1", 0);
    let (p1_late, p2_late) = (
        profiles_at("go-heap.pb.gz", "p1", 100),
        profiles_at("go-heap.pb.gz", "p2", 100),
    );
    let later = profiles_at("go-heap.pb.gz", "p1", 200);
    let mixed: Vec<Profile> = [p1_late.clone(), p2_late, later].concat();
    let (_dir, engine) = engine_with(vec![early.clone(), mixed], 1 << 30).await;
    // Until 50 s after the p1 profiles at +100 s: the first block whole
    // (its totals), the second in part (time and series).
    let start_ms = early[0].time_nanos / 1_000_000;
    let end_ms = p1_late[0].time_nanos / 1_000_000 + 50_000;
    let mut want = input_stacks(&early, ty);
    for (k, v) in input_stacks(&p1_late, ty) {
        *want.entry(k).or_default() += v;
    }
    let sql = format!(
        "SELECT * FROM flamegraph('{ty}', '{{service_name=\"heap\", pod=\"p1\"}}', {start_ms}, {end_ms})"
    );
    let (total, got) = frame_stacks(&run(&engine, "t", &sql).await);
    assert_eq!(total, want.values().sum::<i64>());
    assert_eq!(got, want);
}

#[tokio::test]
async fn flamegraph_over_several_blocks_equals_the_input() {
    let a = profiles("go-heap.pb.gz", "heap", "t");
    let b = profiles("go-heap.pb.gz", "heap", "t");
    let other = profiles("go-cpu.pb.gz", "cpu", "t");
    let ty = "fx:inuse_space:bytes:space:bytes";
    let mut want = input_stacks(&a, ty);
    for (k, v) in input_stacks(&b, ty) {
        *want.entry(k).or_default() += v;
    }
    let (_dir, engine) = engine_with(vec![a, b, other], 1 << 30).await;
    let sql = format!(
        "SELECT * FROM flamegraph('{ty}', '{{service_name=\"heap\"}}', 0, 9999999999999, 1000000)"
    );
    let (total, got) = frame_stacks(&run(&engine, "t", &sql).await);
    assert_eq!(total, want.values().sum::<i64>());
    assert_eq!(got, want);
    // Another tenant sees an empty graph.
    let (total, got) = frame_stacks(&run(&engine, "u", &sql).await);
    assert_eq!((total, got.len()), (0, 0));
}

/// Heap profiles of pods p1 and p2 at +0, +10, +20 s (p1) and +10 s (p2),
/// in two blocks.
async fn series_engine() -> (tempfile::TempDir, QueryEngine, Vec<Profile>) {
    let first: Vec<Profile> = [
        profiles_at("go-heap.pb.gz", "p1", 0),
        profiles_at("go-heap.pb.gz", "p1", 10),
    ]
    .concat();
    let second: Vec<Profile> = [
        profiles_at("go-heap.pb.gz", "p1", 20),
        profiles_at("go-heap.pb.gz", "p2", 10),
    ]
    .concat();
    let all = [first.clone(), second.clone()].concat();
    let (dir, engine) = engine_with(vec![first, second], 1 << 30).await;
    (dir, engine, all)
}

/// When the heap fixture was recorded (its profiles carry their time).
fn heap_base_nanos() -> i64 {
    profiles("go-heap.pb.gz", "heap", "t")[0].time_nanos
}

fn total_of(profiles: &[Profile], ty: &str, pod: &str, seconds: i64) -> f64 {
    let base = heap_base_nanos();
    profiles
        .iter()
        .filter(|p| p.profile_type == ty && p.time_nanos == base + seconds * 1_000_000_000)
        .filter(|p| p.labels.iter().any(|(n, v)| n == "pod" && v == pod))
        .map(|p| p.total() as f64)
        .sum()
}

/// The flame graph reads stacks and totals sections with their repeated
/// strings as dictionaries: what it gets must be what the plain read holds.
#[tokio::test]
async fn sections_read_with_dictionaries_hold_what_the_plain_read_holds() {
    use crate::stack_dictionary::{read_stacks_section, Nodes};
    use crate::stack_totals::{DatasetTotals, TotalsCache};
    use datafusion::arrow::datatypes::UInt64Type;
    use ember_engine::block::{read_section, Section};
    use ember_metastore::BlockQuery;

    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let metastore = Metastore::open(&dir.path().join("m.redb")).unwrap();
    for profiles in [
        profiles("go-heap-large.pb.gz", "heap", "t"),
        profiles("go-cpu-deep-stacks.pb.gz", "cpu", "t"),
    ] {
        let block = write_block(&profiles, 0, &mut StackNodes::default()).unwrap();
        let path = Path::from(block.meta.path.as_str());
        store
            .put(&path, PutPayload::from(block.bytes))
            .await
            .unwrap();
        metastore.apply(Command::add_block(block.meta)).unwrap();
    }
    let datasets = metastore.query(&BlockQuery {
        tenant: "t".into(),
        start: i64::MIN,
        end: i64::MAX,
        service_names: None,
        profile_types: None,
        skip_level0: false,
    });
    assert_eq!(datasets.len(), 2);
    for d in &datasets {
        let section = |s| d.dataset.section(s).unwrap();
        let mut want = Nodes::default();
        let mut ids = Vec::new();
        for b in read_section(store.clone(), &d.path, section(Section::Stacks))
            .await
            .unwrap()
        {
            let names = b.column(2).as_string::<i32>();
            for i in 0..b.num_rows() {
                let id = b.column(0).as_primitive::<UInt64Type>().value(i);
                let parent = b.column(1).as_primitive::<UInt64Type>().value(i);
                want.insert(id, parent, names.value(i));
                ids.push(id);
            }
        }
        let mut got = Nodes::default();
        for b in read_stacks_section(store.clone(), d).await.unwrap() {
            got.insert_batch(&b).unwrap();
        }
        assert!(want.len() > 100, "{} nodes", want.len());
        assert_eq!((got.len(), got.bytes()), (want.len(), want.bytes()));
        for id in ids {
            assert_eq!(got.get(id), want.get(id));
        }

        let mut want = DatasetTotals::new();
        for b in read_section(store.clone(), &d.path, section(Section::Totals))
            .await
            .unwrap()
        {
            let types = b.column(0).as_string::<i32>();
            for i in 0..b.num_rows() {
                want.entry(types.value(i).to_string()).or_default().push((
                    b.column(1).as_primitive::<UInt64Type>().value(i),
                    b.column(2).as_primitive::<Int64Type>().value(i),
                ));
            }
        }
        let got = TotalsCache::new(1 << 30)
            .totals(store.clone(), d)
            .await
            .unwrap();
        assert!(!want.is_empty());
        assert_eq!(*got, want);
    }
}

#[tokio::test]
async fn series_sum_each_step_of_each_group_as_the_input_does() {
    use crate::selection::ProfileSelection;
    use crate::series::{Aggregation, SeriesQuery};
    use ember_engine::selector::Selector;
    let (_dir, engine, input) = series_engine().await;
    let ty = "fx:inuse_space:bytes:space:bytes";
    let base_ms = heap_base_nanos() / 1_000_000;
    let mut q = SeriesQuery {
        selection: ProfileSelection {
            tenant: "t".into(),
            profile_type: ty.into(),
            selector: Selector::parse(r#"{service_name="heap"}"#).unwrap(),
            start: (base_ms - 5_000) * 1_000_000,
            end: (base_ms + 60_000) * 1_000_000,
        },
        // Steps end at -5, +15, +35 s: +0 and +10 share the one ending +15.
        step_nanos: 20_000_000_000,
        group_by: vec!["pod".into()],
        aggregation: Aggregation::Sum,
        limit: None,
    };
    let series = engine
        .select_series(&q, &Settings::default())
        .await
        .unwrap();
    let pod = |v: &str| vec![("pod".to_string(), v.to_string())];
    assert_eq!(series.len(), 2);
    assert_eq!(series[0].labels, pod("p1"));
    let points: Vec<(i64, f64)> = series[0]
        .points
        .iter()
        .map(|p| (p.time_ms, p.value))
        .collect();
    let (t0, t10, t20) = (
        total_of(&input, ty, "p1", 0),
        total_of(&input, ty, "p1", 10),
        total_of(&input, ty, "p1", 20),
    );
    assert!(t0 > 0.0);
    assert_eq!(
        points,
        vec![(base_ms + 15_000, t0 + t10), (base_ms + 35_000, t20)]
    );
    assert_eq!(series[1].labels, pod("p2"));
    let p2: Vec<(i64, f64)> = series[1]
        .points
        .iter()
        .map(|p| (p.time_ms, p.value))
        .collect();
    assert_eq!(p2, vec![(base_ms + 15_000, total_of(&input, ty, "p2", 10))]);

    // Average: the two p1 profiles of the first step, halved.
    q.aggregation = Aggregation::Average;
    let avg = engine
        .select_series(&q, &Settings::default())
        .await
        .unwrap();
    assert_eq!(avg[0].points[0].value, (t0 + t10) / 2.0);
    // Ungrouped, limited, and another tenant's view.
    q.aggregation = Aggregation::Sum;
    q.group_by.clear();
    let all = engine
        .select_series(&q, &Settings::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].labels.is_empty());
    assert_eq!(
        all[0].points[0].value,
        t0 + t10 + total_of(&input, ty, "p2", 10)
    );
    q.group_by = vec!["pod".into()];
    q.limit = Some(1);
    let top = engine
        .select_series(&q, &Settings::default())
        .await
        .unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].labels, pod("p1"));
    q.selection.tenant = "u".into();
    assert!(engine
        .select_series(&q, &Settings::default())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn series_function_is_the_wide_frame_of_the_same_series() {
    let (_dir, engine, input) = series_engine().await;
    let ty = "fx:inuse_space:bytes:space:bytes";
    let base_ms = heap_base_nanos() / 1_000_000;
    let sql = format!(
        "SELECT * FROM series('{ty}', '{{service_name=\"heap\"}}', {}, {}, interval '20 second', 'pod')",
        base_ms - 5_000,
        base_ms + 60_000
    );
    let batches = run(&engine, "t", &sql).await;
    let schema = batches[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, vec!["time", r#"{pod="p1"}"#, r#"{pod="p2"}"#]);
    let b = &batches[0];
    let time = b
        .column(0)
        .as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
    assert_eq!(
        time.values().to_vec(),
        vec![base_ms + 15_000, base_ms + 35_000]
    );
    let p1 = b
        .column(1)
        .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
    let p2 = b
        .column(2)
        .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
    assert_eq!(
        p1.value(0),
        total_of(&input, ty, "p1", 0) + total_of(&input, ty, "p1", 10)
    );
    assert_eq!(p2.value(0), total_of(&input, ty, "p2", 10));
    assert!(p2.is_null(1), "p2 has no profile in the second step");
    // Grafana's macros and bad steps.
    let rfc3339 = |ms: i64| {
        datafusion::arrow::temporal_conversions::timestamp_ms_to_datetime(ms)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string()
    };
    let grafana = format!(
        "SELECT * FROM series('{ty}', '{{}}', cast('{}' as timestamp), cast('{}' as timestamp), interval '20 second')",
        rfc3339(base_ms - 5_000),
        rfc3339(base_ms + 60_000)
    );
    let b = run(&engine, "t", &grafana).await;
    assert_eq!(b[0].schema().field(1).name(), "value");
    let total: f64 = b[0]
        .column(1)
        .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
        .iter()
        .flatten()
        .sum();
    let want: f64 = input
        .iter()
        .filter(|p| p.profile_type == ty)
        .map(|p| p.total() as f64)
        .sum();
    assert_eq!(total, want);
    let tiny = format!("SELECT * FROM series('{ty}', '{{}}', 0, 9999999999999, 1)");
    let e = engine
        .execute("t", &tiny, &Settings::default())
        .await
        .err()
        .expect("a one-second step over centuries is refused");
    assert!(e.to_string().contains("widen the step"), "{e}");
}

#[tokio::test]
async fn pprof_is_the_flame_graph_as_a_profile_of_the_input_stacks() {
    use prost::Message;
    let (_dir, engine, input) = series_engine().await;
    let ty = "fx:inuse_space:bytes:space:bytes";
    let args = format!("'{ty}', '{{pod=\"p1\"}}', 0, 9999999999999");
    let batches = run(&engine, "t", &format!("SELECT profile FROM pprof({args})")).await;
    let bytes = batches[0].column(0).as_binary::<i32>().value(0);
    let p = ember_api::google::v1::Profile::decode(bytes).unwrap();
    let name = |id: u64| {
        let f = p.function.iter().find(|f| f.id == id).unwrap();
        p.string_table[f.name as usize].clone()
    };
    let mut got: HashMap<String, i64> = HashMap::new();
    for s in &p.sample {
        let frames: Vec<String> = s.location_id.iter().rev().map(|id| name(*id)).collect();
        *got.entry(frames.join(";")).or_default() += s.value[0];
    }
    let p1: Vec<Profile> = input
        .iter()
        .filter(|p| p.labels.iter().any(|(n, v)| n == "pod" && v == "p1"))
        .cloned()
        .collect();
    let want = input_stacks(&p1, ty);
    assert_eq!(got, want);
    let sample_type = &p.sample_type[0];
    assert_eq!(p.string_table[sample_type.r#type as usize], "inuse_space");
    assert_eq!(p.string_table[sample_type.unit as usize], "bytes");
    // The same engine as the flame graph: same total.
    let (total, _) =
        frame_stacks(&run(&engine, "t", &format!("SELECT * FROM flamegraph({args})")).await);
    assert_eq!(total, want.values().sum::<i64>());
}

#[tokio::test]
async fn samples_table_prunes_and_sums() {
    let heap = profiles("go-heap.pb.gz", "heap", "t");
    let cpu = profiles("go-cpu.pb.gz", "cpu", "t");
    let cpu_total: i64 = cpu
        .iter()
        .filter(|p| p.profile_type.starts_with("fx:cpu"))
        .map(Profile::total)
        .sum();
    let (_dir, engine) = engine_with(vec![heap, cpu], 1 << 30).await;
    let sql = "SELECT sum(value) FROM samples WHERE service_name = 'cpu' AND profile_type = 'fx:cpu:nanoseconds:cpu:nanoseconds' \
               AND time >= cast('2000-01-01T00:00:00Z' as timestamp) AND time < cast('2100-01-01T00:00:00Z' as timestamp)";
    let batches = run(&engine, "t", sql).await;
    assert_eq!(
        batches[0].column(0).as_primitive::<Int64Type>().value(0),
        cpu_total
    );
    // Pushed-down filters reach the scan: the plan reads one dataset's file.
    let plan = engine
        .plan("t", &format!("EXPLAIN {sql}"), &Settings::default())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let text = format!(
        "{}",
        datafusion::arrow::util::pretty::pretty_format_batches(&plan).unwrap()
    );
    assert!(text.contains("file_groups={1 group"), "{text}");
}

#[tokio::test]
async fn statements_that_touch_files_or_settings_are_refused() {
    let (_dir, engine) = engine_with(vec![profiles("go-cpu.pb.gz", "cpu", "t")], 1 << 30).await;
    for sql in [
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
        "COPY (SELECT 1) TO '/tmp/ember-should-not-exist.csv'",
        "SET datafusion.execution.batch_size = 1",
        "SELECT * FROM '/etc/passwd'",
    ] {
        assert!(
            engine.plan("t", sql, &Settings::default()).await.is_err(),
            "{sql} was accepted"
        );
    }
    assert!(!std::path::Path::new("/tmp/ember-should-not-exist.csv").exists());
}

#[tokio::test]
async fn a_query_over_the_memory_limit_fails_with_a_clear_error() {
    let (_dir, engine) =
        engine_with(vec![profiles("go-heap-large.pb.gz", "heap", "t")], 1 << 20).await;
    let sql = "SELECT count(DISTINCT s.stack_id * 1000 + g.value) FROM samples s CROSS JOIN generate_series(1, 1000) g";
    let err = match engine.execute("t", sql, &Settings::default()).await {
        Ok(stream) => stream
            .try_collect::<Vec<_>>()
            .await
            .unwrap_err()
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(err.to_lowercase().contains("resources exhausted"), "{err}");
}

/// The profiles of a fixture for a tenant, all at one time (one flush).
fn tenant_profiles(fixture: &str, tenant: &str) -> Vec<Profile> {
    profiles(fixture, "api", tenant)
        .into_iter()
        .map(|mut p| {
            p.time_nanos = 1_700_000_000_000_000_000;
            p
        })
        .collect()
}

#[tokio::test]
async fn tenants_sharing_a_service_and_a_block_see_only_their_own_flame_graph() {
    let ty = "fx:cpu:nanoseconds:cpu:nanoseconds";
    let a = tenant_profiles("go-cpu.pb.gz", "team-a");
    let b = tenant_profiles("go-cpu-labels.pprof", "team-b");
    let (want_a, want_b) = (input_stacks(&a, ty), input_stacks(&b, ty));
    assert_ne!(want_a, want_b, "the two inputs must differ to tell a leak");
    let sql = format!(
        "SELECT * FROM flamegraph('{ty}', '{{service_name=\"api\"}}', 0, 9999999999999, 1000000)"
    );
    for order in [["team-a", "team-b"], ["team-b", "team-a"]] {
        // One block holding both tenants' dataset of service "api", on a
        // fresh engine (fresh caches and cached sessions) per order.
        let (_dir, engine) = engine_with(vec![[a.clone(), b.clone()].concat()], 1 << 30).await;
        for _warm in 0..2 {
            for tenant in order {
                let want = if tenant == "team-a" { &want_a } else { &want_b };
                // The query API's path first: it runs the plan without SQL.
                let call = FlameGraphCall {
                    profile_type: ty.to_string(),
                    selector: "{service_name=\"api\"}".to_string(),
                    start: 0,
                    end: 9999999999999,
                    max_nodes: 1000000,
                    spans: None,
                };
                let direct = engine
                    .flame_graph(tenant, &Settings::default(), call.clone(), rows_stacks)
                    .await
                    .unwrap();
                let (total, got) = frame_stacks(&run(&engine, tenant, &sql).await);
                assert_eq!(&got, want, "{tenant} after {order:?}");
                assert_eq!(direct, (total, got), "{tenant} after {order:?}");
                // Truncated, row for row, `other` rows included.
                let small = FlameGraphCall {
                    max_nodes: 16,
                    ..call.clone()
                };
                let rows = |frame: Frame<'_>| {
                    let mut rows = Vec::new();
                    frame
                        .for_each_row(|r| {
                            rows.push((r.depth, r.total, r.own, r.label.to_string()));
                            Ok(())
                        })
                        .map(|()| rows)
                };
                let direct = engine
                    .flame_graph(tenant, &Settings::default(), small, rows)
                    .await
                    .unwrap()
                    .unwrap();
                let sql16 = sql.replace(", 1000000)", ", 16)");
                let frame = run(&engine, tenant, &sql16).await;
                assert_eq!(direct, rows(Frame::Batches(&frame)).unwrap());
                assert!(direct.iter().any(|r| r.3 == "other"), "{direct:?}");
                assert_eq!(
                    total,
                    want.values().sum::<i64>(),
                    "{tenant} after {order:?}"
                );
                let sums = run(
                    &engine,
                    tenant,
                    &format!("SELECT sum(value) FROM samples WHERE profile_type = '{ty}'"),
                )
                .await;
                assert_eq!(
                    sums[0].column(0).as_primitive::<Int64Type>().value(0),
                    total
                );
            }
        }
    }
}

#[tokio::test]
async fn label_calls_answer_from_the_index_what_sql_reads() {
    use crate::labels::LabelQuery;
    use ember_engine::selector::Selector;
    let ty = "fx:cpu:nanoseconds:cpu:nanoseconds";
    let a = profiles("go-cpu.pb.gz", "api", "t");
    let b = profiles("go-cpu-labels.pprof", "web", "t");
    let other = profiles("go-cpu.pb.gz", "secret", "u");
    let (_dir, engine) = engine_with(vec![[a, other].concat(), b], 1 << 30).await;
    let q = |selector: Option<&str>| LabelQuery {
        tenant: "t".into(),
        selectors: selector
            .map(|s| Selector::parse(s).unwrap())
            .into_iter()
            .collect(),
        start: i64::MIN,
        end: i64::MAX,
    };
    let column = |batches: Vec<RecordBatch>| -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| {
                let c = b.column(0).as_string::<i32>();
                (0..b.num_rows())
                    .map(|i| c.value(i).to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let services = column(
        run(
            &engine,
            "t",
            "SELECT DISTINCT service_name FROM profiles ORDER BY 1",
        )
        .await,
    );
    assert_eq!(
        engine.label_values("service_name", &q(None)).await.unwrap(),
        services
    );
    assert_eq!(services, ["api", "web"]);
    let types = column(
        run(
            &engine,
            "t",
            "SELECT DISTINCT profile_type FROM profiles ORDER BY 1",
        )
        .await,
    );
    assert_eq!(
        engine.profile_types("t", i64::MIN, i64::MAX).await.unwrap(),
        types
    );
    assert!(types.iter().any(|t| t == ty));
    let series = column(
        run(
            &engine,
            "t",
            &format!(
                "SELECT DISTINCT labels FROM profiles WHERE service_name = 'web' AND profile_type = '{ty}' ORDER BY 1"
            ),
        )
        .await,
    );
    let selector = format!("{{service_name=\"web\", __profile_type__=\"{ty}\"}}");
    let got = engine.series_labels(&q(Some(&selector))).await.unwrap();
    assert_eq!(got.len(), series.len());
    assert!(got
        .iter()
        .all(|l| l.contains(&("service_name".into(), "web".into()))));
    assert!(engine
        .label_names(&q(None))
        .await
        .unwrap()
        .contains(&"__profile_type__".to_string()));
    assert!(!engine
        .label_values("service_name", &q(None))
        .await
        .unwrap()
        .contains(&"secret".to_string()));
}

#[tokio::test]
async fn sql_reaches_no_object_store_but_the_blocks() {
    use datafusion::execution::object_store::ObjectStoreUrl;
    let (_dir, engine) = engine_with(vec![tenant_profiles("go-cpu.pb.gz", "t")], 1 << 30).await;
    let ctx = engine.session("t", &Settings::default()).unwrap();
    let rt = ctx.runtime_env();
    assert!(rt.object_store(ObjectStoreUrl::local_filesystem()).is_err());
    assert!(rt
        .object_store(ObjectStoreUrl::parse("s3://bucket").unwrap())
        .is_err());
    assert!(rt.object_store(crate::tables::store_url()).is_ok());
    for sql in [
        "SELECT * FROM 'file:///etc/passwd'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('file:///etc/passwd')",
        "CREATE VIEW v AS SELECT 1",
        "INSERT INTO samples SELECT * FROM samples",
        "DROP TABLE samples",
    ] {
        assert!(
            engine
                .execute("t", sql, &Settings::default())
                .await
                .is_err(),
            "{sql} was accepted"
        );
    }
}

#[tokio::test]
async fn tenant_ids_valid_for_push_are_valid_for_sql() {
    let (_dir, engine) =
        engine_with(vec![tenant_profiles("go-cpu.pb.gz", "acme.prod")], 1 << 30).await;
    let batches = run(&engine, "acme.prod", "SELECT count(*) FROM samples").await;
    assert!(batches[0].column(0).as_primitive::<Int64Type>().value(0) > 0);
    assert!(engine.session("../x", &Settings::default()).is_err());
}

#[tokio::test]
async fn a_query_past_its_timeout_fails_and_says_so() {
    let config = QueryEngineConfig {
        query_timeout: std::time::Duration::from_millis(1),
        ..QueryEngineConfig::default()
    };
    let (_dir, engine) =
        engine_with_config(vec![profiles("go-heap-large.pb.gz", "heap", "t")], config).await;
    let sql = "SELECT count(DISTINCT s.stack_id * 100 + g.value) FROM samples s CROSS JOIN generate_series(1, 100) g";
    let err = match engine.execute("t", sql, &Settings::default()).await {
        Ok(stream) => stream
            .try_collect::<Vec<_>>()
            .await
            .unwrap_err()
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("timed out"), "{err}");
}

mod compaction {
    use super::*;
    use crate::compaction::{CompactionConfig, Compactor};
    use ember_metastore::InProcess;
    use ember_metastore::{BlockQuery, LevelRule, Lifecycle, LifecycleConfig};
    use std::time::Duration;

    fn at(profiles: &[Profile], pod: &str, seconds: i64) -> Vec<Profile> {
        profiles
            .iter()
            .cloned()
            .map(|mut p| {
                p.labels.push(("pod".into(), pod.into()));
                p.labels.sort();
                p.time_nanos += seconds * 1_000_000_000;
                p
            })
            .collect()
    }

    /// Runs planner and workers until nothing is left to do, then deletes
    /// what was retired.
    async fn compact_all(c: &Compaction) -> usize {
        let mut jobs = 0;
        loop {
            let planned = c.lifecycle.plan_once().await.unwrap();
            let mut worked = false;
            while c.worker.work_once("w").await.unwrap() {
                worked = true;
                jobs += 1;
            }
            if planned == 0 && !worked {
                break;
            }
        }
        c.lifecycle.delete_due().await.unwrap();
        jobs
    }

    /// Both sides of compaction over one metastore: the lifecycle beside
    /// it, a worker reaching it as any worker does, through a client.
    struct Compaction {
        lifecycle: Lifecycle,
        worker: Compactor,
    }

    fn compaction(
        store: Arc<dyn ObjectStore>,
        metastore: Arc<Metastore>,
        levels: Vec<LevelRule>,
        config: CompactionConfig,
    ) -> Compaction {
        let lifecycle = LifecycleConfig {
            levels,
            delete_delay: config.delete_delay,
            ..LifecycleConfig::default()
        };
        Compaction {
            lifecycle: Lifecycle::new(store.clone(), metastore.clone(), lifecycle),
            worker: Compactor::new(
                store,
                Arc::new(InProcess(metastore.clone())),
                metastore,
                config,
            )
            .unwrap(),
        }
    }

    /// A compactor with [`rules`]`(2)`, deleting retired objects after
    /// `delete_delay`.
    fn compactor(
        store: Arc<dyn ObjectStore>,
        metastore: Arc<Metastore>,
        delete_delay: Duration,
    ) -> Compaction {
        let config = CompactionConfig {
            delete_delay,
            ..CompactionConfig::default()
        };
        compaction(store, metastore, rules(2), config)
    }

    fn rules(max_blocks: u32) -> Vec<LevelRule> {
        vec![
            LevelRule {
                max_blocks,
                max_age_nanos: 0,
            },
            LevelRule {
                max_blocks: 10,
                max_age_nanos: 0,
            },
        ]
    }

    /// Everything a tenant can ask, as text, to compare before and after.
    async fn answers(engine: &QueryEngine, tenant: &str, ty: &str) -> Vec<String> {
        let queries = [
            format!("SELECT * FROM flamegraph('{ty}', '{{service_name=\"api\"}}', 0, 9999999999999, 1000000)"),
            format!("SELECT * FROM flamegraph('{ty}', '{{service_name=\"api\", pod=\"p2\"}}', 0, 9999999999999, 1000000)"),
            "SELECT profile_type, count(*), sum(value) FROM samples GROUP BY 1 ORDER BY 1".into(),
            "SELECT labels, time, total, samples FROM profiles ORDER BY 1, 2, 3".into(),
            "SELECT DISTINCT labels FROM samples ORDER BY 1".into(),
            "SELECT count(DISTINCT stack_id) FROM stacks".into(),
        ];
        let mut out = Vec::new();
        for q in queries {
            let batches = run(engine, tenant, &q).await;
            out.push(
                datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                    .unwrap()
                    .to_string(),
            );
        }
        out
    }

    #[tokio::test]
    async fn an_engine_reading_the_index_over_the_network_answers_as_one_in_process() {
        use ember_metastore::rpc::{router, RemoteMetastore};
        let ty = "fx:cpu:nanoseconds:cpu:nanoseconds";
        let a = tenant_profiles("go-cpu.pb.gz", "team-a");
        let b = tenant_profiles("go-cpu-labels.pprof", "team-b");
        let blocks = vec![
            [at(&a, "p1", 0), at(&b, "p1", 0)].concat(),
            [at(&a, "p2", 10), at(&b, "p2", 10)].concat(),
        ];
        let (dir, local, metastore) =
            engine_and_metastore(blocks, QueryEngineConfig::default()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let routes = router(
            Arc::new(InProcess(metastore.clone())),
            metastore,
            "a-cluster-token-for-tests",
        );
        tokio::spawn(async move { axum::serve(listener, routes).await });
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let index = Arc::new(
            RemoteMetastore::new(
                &url,
                ember_engine::cluster_call::ClusterClient::new("a-cluster-token-for-tests"),
            )
            .unwrap(),
        );
        let remote = QueryEngine::new(store, index, QueryEngineConfig::default()).unwrap();
        for tenant in ["team-a", "team-b"] {
            let want = answers(&local, tenant, ty).await;
            assert!(want[0].lines().count() > 10, "{}", want[0]);
            assert_eq!(answers(&remote, tenant, ty).await, want, "{tenant}");
            let blocks = "SELECT block_id, level, samples FROM system.blocks ORDER BY 1";
            assert_eq!(
                run(&remote, tenant, blocks).await,
                run(&local, tenant, blocks).await
            );
        }
    }

    #[tokio::test]
    async fn answers_are_identical_after_compaction_and_retried_pushes_count_once() {
        let ty = "fx:cpu:nanoseconds:cpu:nanoseconds";
        let a = tenant_profiles("go-cpu.pb.gz", "team-a");
        let b = tenant_profiles("go-cpu-labels.pprof", "team-b");
        // Level-0 blocks mix both tenants (same service name); the last one
        // is team-a's first push stored again (a retry after a timeout).
        let blocks = vec![
            [at(&a, "p1", 0), at(&b, "p1", 0)].concat(),
            [at(&a, "p2", 10), at(&b, "p2", 10)].concat(),
            at(&a, "p1", 20),
            at(&a, "p1", 0),
        ];
        let (dir, engine, metastore) =
            engine_and_metastore(blocks.clone(), QueryEngineConfig::default()).await;
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let before_b = answers(&engine, "team-b", ty).await;
        let mut want_a = HashMap::new();
        for block in &blocks[..3] {
            for (k, v) in input_stacks(
                &block
                    .iter()
                    .filter(|p| p.tenant == "team-a")
                    .cloned()
                    .collect::<Vec<_>>(),
                ty,
            ) {
                *want_a.entry(k).or_default() += v;
            }
        }
        let flame = format!(
            "SELECT * FROM flamegraph('{ty}', '{{service_name=\"api\"}}', 0, 9999999999999, 1000000)"
        );
        let (total, _) = frame_stacks(&run(&engine, "team-a", &flame).await);
        let dup: i64 = input_stacks(&at(&a, "p1", 0), ty).values().sum();
        assert_eq!(
            total,
            want_a.values().sum::<i64>() + dup,
            "the retry counts twice before"
        );

        let compactor = compactor(store.clone(), metastore.clone(), Duration::ZERO);
        let jobs = compact_all(&compactor).await;
        assert!(jobs >= 4, "{jobs} jobs");

        // One level-2 block per tenant; every level-0 object is gone.
        for tenant in ["team-a", "team-b"] {
            let blocks = metastore.blocks(tenant);
            assert_eq!(blocks.len(), 1, "{tenant}: {blocks:?}");
            assert_eq!(blocks[0].compaction_level, 2);
            assert!(blocks[0].datasets.iter().all(|d| d.tenant == tenant));
        }
        let objects: Vec<_> = store.list(None).try_collect().await.unwrap();
        let blocks: Vec<_> = objects
            .iter()
            .map(|o| o.location.to_string())
            .filter(|p| p.ends_with("block.bin"))
            .collect();
        assert_eq!(blocks.len(), 2, "{blocks:?}");
        assert!(
            blocks.iter().all(|p| p.starts_with("blocks/")),
            "{blocks:?}"
        );
        assert_eq!(compactor.worker.metrics.profiles_deduplicated.get(), 2);

        assert_eq!(answers(&engine, "team-b", ty).await, before_b);
        let (total, got) = frame_stacks(&run(&engine, "team-a", &flame).await);
        assert_eq!(got, want_a);
        assert_eq!(total, want_a.values().sum::<i64>());
        let only_level0 = BlockQuery {
            tenant: "team-a".into(),
            start: i64::MIN,
            end: i64::MAX,
            skip_level0: true,
            ..Default::default()
        };
        assert_eq!(metastore.query(&only_level0).len(), 1);
        // The operator's view, per tenant.
        for tenant in ["team-a", "team-b"] {
            let rows = run(
                &engine,
                tenant,
                "SELECT level, path FROM system.blocks UNION ALL \
                 SELECT level, job_id FROM system.compaction_jobs",
            )
            .await;
            let rows: Vec<(u32, String)> = rows
                .iter()
                .flat_map(|b| {
                    let level = b
                        .column(0)
                        .as_primitive::<datafusion::arrow::datatypes::UInt32Type>();
                    let path = b.column(1).as_string::<i32>();
                    (0..b.num_rows())
                        .map(|i| (level.value(i), path.value(i).to_string()))
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(rows.len(), 1, "{tenant}: {rows:?}");
            assert_eq!(rows[0].0, 2);
            assert!(rows[0].1.contains(&format!("/{tenant}/")), "{rows:?}");
        }
    }

    /// Counts the multipart uploads and single PUTs of compacted blocks.
    #[derive(Default)]
    struct Uploads {
        multipart: std::sync::atomic::AtomicUsize,
        single: std::sync::atomic::AtomicUsize,
    }

    struct Counted(Arc<Uploads>);

    #[async_trait::async_trait]
    impl ember_engine::store_layer::StoreLayer for Counted {
        fn name(&self) -> &'static str {
            "uploads"
        }

        fn saw(&self, request: &ember_engine::store_layer::Request<'_>) {
            use ember_engine::store_layer::Request;
            use std::sync::atomic::Ordering::Relaxed;
            match request {
                Request::PutMultipart { location } if location.as_ref().starts_with("blocks/") => {
                    self.0.multipart.fetch_add(1, Relaxed);
                }
                Request::Put { location, .. } if location.as_ref().starts_with("blocks/") => {
                    self.0.single.fetch_add(1, Relaxed);
                }
                _ => {}
            }
        }
    }

    /// Blocks over the part size go up in parts and read back whole; at
    /// the default size the same blocks go in one conditional PUT each.
    #[tokio::test]
    async fn blocks_over_the_part_size_are_uploaded_in_parts_and_answer_the_same() {
        let ty = "fx:cpu:nanoseconds:cpu:nanoseconds";
        let a = tenant_profiles("go-cpu.pb.gz", "team-a");
        let blocks = vec![at(&a, "p1", 0), at(&a, "p2", 10)];
        for (part, multipart) in [(1024, true), (16 << 20, false)] {
            let (dir, engine, metastore) =
                engine_and_metastore(blocks.clone(), QueryEngineConfig::default()).await;
            let before = answers(&engine, "team-a", ty).await;
            let uploads = Arc::new(Uploads::default());
            let store: Arc<dyn ObjectStore> = Arc::new(ember_engine::store_layer::Layered::new(
                Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
                Counted(uploads.clone()),
            ));
            let config = CompactionConfig {
                delete_delay: Duration::ZERO,
                upload_part_bytes: part,
                ..CompactionConfig::default()
            };
            let c = compaction(store, metastore.clone(), rules(2), config);
            assert!(compact_all(&c).await >= 1);
            let (parts, single) = (
                uploads.multipart.load(std::sync::atomic::Ordering::Relaxed),
                uploads.single.load(std::sync::atomic::Ordering::Relaxed),
            );
            if multipart {
                assert!(
                    parts >= 1 && single == 0,
                    "{parts} multipart, {single} single"
                );
            } else {
                assert!(
                    parts == 0 && single >= 1,
                    "{parts} multipart, {single} single"
                );
            }
            assert!(metastore
                .blocks("team-a")
                .iter()
                .all(|b| b.compaction_level > 0));
            assert_eq!(
                answers(&engine, "team-a", ty).await,
                before,
                "part size {part}"
            );
        }
    }

    #[tokio::test]
    async fn skip_level0_leaves_out_what_is_not_compacted_yet() {
        let ty = "fx:cpu:nanoseconds:cpu:nanoseconds";
        let a = tenant_profiles("go-cpu.pb.gz", "t");
        let early = [at(&a, "p1", 0), at(&a, "p2", 10)];
        let (dir, engine, metastore) =
            engine_and_metastore(early.to_vec(), QueryEngineConfig::default()).await;
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let compactor = compactor(store.clone(), metastore.clone(), Duration::ZERO);
        assert!(compact_all(&compactor).await > 0);
        // A push that arrives after the compaction: level 0 until the next.
        let late = at(&a, "p3", 20);
        add_level0_block(store.as_ref(), &metastore, &late).await;

        let compacted: i64 = input_stacks(&early.concat(), ty).values().sum();
        let recent: i64 = input_stacks(&late, ty).values().sum();
        assert!(compacted > 0 && recent > 0);
        let skip = Settings { skip_level0: true };
        let flame = format!("SELECT * FROM flamegraph('{ty}', '{{}}', 0, 9999999999999)");
        let sum = format!("SELECT sum(value) FROM samples WHERE profile_type = '{ty}'");
        for (settings, want) in [(Settings::default(), compacted + recent), (skip, compacted)] {
            let (total, _) = frame_stacks(&run_with(&engine, "t", &flame, &settings).await);
            assert_eq!(total, want, "{settings:?}");
            let sums = run_with(&engine, "t", &sum, &settings).await;
            assert_eq!(
                sums[0].column(0).as_primitive::<Int64Type>().value(0),
                want,
                "{settings:?}"
            );
        }
        let shown = run_with(
            &engine,
            "t",
            "SELECT value FROM information_schema.df_settings WHERE name = 'skip_level0'",
            &Settings { skip_level0: true },
        )
        .await;
        assert_eq!(shown[0].column(0).as_string::<i32>().value(0), "true");
    }

    /// Level-0 blocks key their samples' type and series; compacted ones
    /// store the strings. A scan over both, of two tenants sharing a
    /// service name and a block, must read the rows each tenant pushed, by
    /// series, whichever kind of block holds them.
    #[tokio::test]
    async fn keyed_and_compacted_samples_read_as_the_rows_pushed() {
        use ember_engine::profile::labels_to_string;
        let a = tenant_profiles("go-cpu.pb.gz", "team-a");
        let b = tenant_profiles("go-cpu-labels.pprof", "team-b");
        let early = vec![
            [at(&a, "p1", 0), at(&b, "p1", 0)].concat(),
            [at(&a, "p2", 10), at(&b, "p2", 10)].concat(),
        ];
        let (dir, engine, metastore) =
            engine_and_metastore(early.clone(), QueryEngineConfig::default()).await;
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let compactor = compactor(store.clone(), metastore.clone(), Duration::ZERO);
        assert!(compact_all(&compactor).await > 0);
        let late = [at(&a, "p3", 20), at(&b, "p3", 20)].concat();
        let block = add_level0_block(store.as_ref(), &metastore, &late).await;
        assert!(block.datasets.iter().all(|d| d
            .section(ember_engine::block::Section::Samples)
            .unwrap()
            .keyed));
        for tenant in ["team-a", "team-b"] {
            let levels: Vec<u32> = metastore
                .blocks(tenant)
                .iter()
                .map(|b| b.compaction_level)
                .collect();
            assert!(
                levels.contains(&0) && levels.iter().any(|&l| l > 0),
                "{levels:?}"
            );
            // (service, type, series) -> (rows, sum) as pushed.
            let mut want: std::collections::BTreeMap<(String, String, String), (i64, i64)> =
                Default::default();
            for p in early.iter().flatten().chain(&late) {
                if p.tenant != tenant {
                    continue;
                }
                let key = (
                    p.service_name().to_string(),
                    p.profile_type.clone(),
                    labels_to_string(&p.labels),
                );
                let slot = want.entry(key).or_default();
                slot.0 += p.samples.len() as i64;
                slot.1 += p.total();
            }
            let rows = run(
                &engine,
                tenant,
                "SELECT service_name, profile_type, labels, count(*), sum(value) FROM samples \
                 GROUP BY 1, 2, 3",
            )
            .await;
            let mut got = std::collections::BTreeMap::new();
            for r in &rows {
                let text = |i: usize| r.column(i).as_string::<i32>().clone();
                let (service, ty, labels) = (text(0), text(1), text(2));
                let (n, v) = (
                    r.column(3).as_primitive::<Int64Type>(),
                    r.column(4).as_primitive::<Int64Type>(),
                );
                for i in 0..r.num_rows() {
                    let key = (
                        service.value(i).to_string(),
                        ty.value(i).to_string(),
                        labels.value(i).to_string(),
                    );
                    got.insert(key, (n.value(i), v.value(i)));
                }
            }
            assert_eq!(got, want, "{tenant}");
            // A series filter reaches keyed rows too, and counting rows
            // reads no column.
            for pod in ["p1", "p3"] {
                let (rows, sum) = want
                    .iter()
                    .filter(|(k, _)| k.2.contains(&format!("pod=\"{pod}\"")))
                    .fold((0, 0), |(n, s), (_, (rn, rs))| (n + rn, s + rs));
                assert!(rows > 0);
                let labels = want
                    .keys()
                    .map(|k| k.2.clone())
                    .filter(|l| l.contains(&format!("pod=\"{pod}\"")))
                    .map(|l| format!("'{}'", l.replace('\'', "''")))
                    .collect::<Vec<_>>()
                    .join(", ");
                let got = run(
                    &engine,
                    tenant,
                    &format!("SELECT count(*), sum(value) FROM samples WHERE labels IN ({labels})"),
                )
                .await;
                let col = |i: usize| got[0].column(i).as_primitive::<Int64Type>().value(0);
                assert_eq!((col(0), col(1)), (rows, sum), "{tenant} {pod}");
            }
        }
    }

    #[tokio::test]
    async fn the_sweeper_deletes_only_outputs_never_committed() {
        let ty = "fx:cpu:nanoseconds:cpu:nanoseconds";
        let a = tenant_profiles("go-cpu.pb.gz", "t");
        let (dir, engine, metastore) = engine_and_metastore(
            vec![at(&a, "p1", 0), at(&a, "p2", 10)],
            QueryEngineConfig::default(),
        )
        .await;
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let compactor = compactor(store.clone(), metastore.clone(), Duration::from_secs(3600));
        assert!(compact_all(&compactor).await > 0);
        let before = answers(&engine, "t", ty).await;
        // A worker that died between upload and commit left this behind; a
        // segment whose metadata waits in the dlq looks just as unknown.
        let orphan = Path::from("blocks/0/t/01JORPHAN0000000000000000/block.bin");
        let pending = Path::from("segments/0/anonymous/01JPENDING000000000000000/block.bin");
        for p in [&orphan, &pending] {
            store.put(p, PutPayload::from_static(b"x")).await.unwrap();
        }
        let objects = |store: Arc<dyn ObjectStore>| async move {
            let mut paths: Vec<String> = store
                .list(None)
                .map_ok(|o| o.location.to_string())
                .try_collect()
                .await
                .unwrap();
            paths.sort();
            paths
        };
        let all = objects(store.clone()).await;
        assert_eq!(
            compactor
                .lifecycle
                .sweep_orphans(Duration::from_secs(3600))
                .await
                .unwrap(),
            0,
            "too young to be an orphan"
        );
        assert_eq!(
            compactor
                .lifecycle
                .sweep_orphans(Duration::ZERO)
                .await
                .unwrap(),
            1
        );
        let left = objects(store.clone()).await;
        let gone: Vec<&String> = all.iter().filter(|p| !left.contains(p)).collect();
        assert_eq!(gone, vec![&orphan.to_string()]);
        // Retired sources wait for their tombstones, the output is indexed.
        assert!(left.contains(&pending.to_string()));
        assert_eq!(answers(&engine, "t", ty).await, before);
    }

    /// Tenant `t`'s service `api`: `n` level-0 blocks of the large Go heap
    /// profile, 10 s apart, and the store they are in.
    async fn heap_blocks(
        n: i64,
    ) -> (
        tempfile::TempDir,
        QueryEngine,
        Arc<dyn ObjectStore>,
        Arc<Metastore>,
    ) {
        let heap = profiles("go-heap-large.pb.gz", "api", "t");
        let blocks: Vec<Vec<Profile>> = (0..n)
            .map(|i| at(&heap, &format!("p{i}"), i * 10))
            .collect();
        let (dir, engine, metastore) =
            engine_and_metastore(blocks, QueryEngineConfig::default()).await;
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        (dir, engine, store, metastore)
    }

    #[tokio::test]
    async fn sources_within_a_quarter_of_the_budget_are_fetched_whole_and_larger_ones_read_in_place(
    ) {
        let (_dir, _engine, store, metastore) = heap_blocks(3).await;
        let job = ember_metastore::Job {
            id: "j".into(),
            tenant: "t".into(),
            sources: metastore.blocks("t"),
            ..Default::default()
        };
        assert_eq!(job.sources.len(), 3);
        let bytes = job.source_bytes() as usize;
        let with_budget = |job_memory_limit| {
            let config = CompactionConfig {
                job_memory_limit,
                ..CompactionConfig::default()
            };
            Compactor::new(
                store.clone(),
                Arc::new(InProcess(metastore.clone())),
                metastore.clone(),
                config,
            )
            .unwrap()
        };
        let (roomy, tight) = (with_budget(bytes * 4), with_budget(bytes * 4 - 4));
        let (in_memory, held) = roomy.source_reads(&job).await.unwrap();
        assert_eq!(held.as_ref().map(|h| h.size()), Some(bytes));
        let (in_place, none) = tight.source_reads(&job).await.unwrap();
        assert!(none.is_none());
        // Once gone from the store, the sources are still in the fetched copy.
        for b in &job.sources {
            store.delete(&Path::from(b.path.as_str())).await.unwrap();
        }
        for b in &job.sources {
            let location = Path::from(b.path.as_str());
            let got = in_memory.get(&location).await.unwrap().bytes().await;
            assert_eq!(got.unwrap().len() as u64, b.size);
            assert!(in_place.get(&location).await.is_err());
        }
    }

    #[tokio::test]
    async fn a_job_larger_than_its_memory_budget_completes_and_changes_nothing() {
        let ty = "fx:inuse_space:bytes:space:bytes";
        let (_dir, engine, store, metastore) = heap_blocks(6).await;
        let before = answers(&engine, "t", ty).await;
        let spill = tempfile::tempdir().unwrap();
        // 6 x 41 k sample rows: about 32 MB decoded, twice the budget.
        let compactor = compaction(
            store,
            metastore.clone(),
            rules(10),
            CompactionConfig {
                job_memory_limit: 16 << 20,
                spill_dir: Some(spill.path().to_path_buf()),
                delete_delay: Duration::ZERO,
                ..CompactionConfig::default()
            },
        );
        assert!(compact_all(&compactor).await >= 1);
        assert_eq!(metastore.blocks("t").len(), 1);
        assert_eq!(answers(&engine, "t", ty).await, before);
    }
}
