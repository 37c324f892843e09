//! The write path on the recorded fixtures: decode, normalise, encode a
//! block, store it, read it back.

use std::collections::HashMap;
use std::sync::Arc;

use ember_engine::block::{read_footer, read_section, write_block, Section, StackNodes};
use ember_engine::Profile;
use ember_fixtures::pprof_fixtures;
use ember_metastore::{BlockQuery, Command, Metastore};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::formats::pprof::{self, FlatProfile};
use crate::jump_hash;
use crate::normalise::{normalise, validate_labels, Destination};

fn dest(service: &str) -> Destination {
    Destination {
        tenant: "t".into(),
        labels: validate_labels(vec![
            ("service_name".into(), service.into()),
            ("__name__".into(), "fx".into()),
        ])
        .unwrap(),
        received_at_nanos: 1_700_000_000_000_000_000,
        limits: Default::default(),
    }
}

/// Sum of each sample type's values straight from the decoded message.
fn raw_totals(p: &pprof::Profile) -> Vec<i64> {
    (0..p.sample_type.len())
        .map(|i| p.sample.iter().map(|s| s.value[i]).sum())
        .collect()
}

fn totals_by_type(profiles: &[Profile]) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for p in profiles {
        *out.entry(p.profile_type.clone()).or_default() += p.total();
    }
    out
}

#[test]
fn every_fixture_decodes_and_normalising_keeps_totals() {
    let fixtures = pprof_fixtures();
    assert!(fixtures.len() >= 20);
    for (name, bytes) in fixtures {
        let p = pprof::decode(&bytes, 64 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
        let raw = pprof::maybe_gunzip(&bytes, 64 << 20, "t").unwrap();
        let flat = FlatProfile::decode(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Read in place, the profile holds what prost's messages hold.
        assert_eq!(flat, FlatProfile::of(&p), "{name}");
        let profiles = normalise(&flat, &dest("s")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!profiles.is_empty(), "{name}: no profiles");
        let by_type = totals_by_type(&profiles);
        let raw: i64 = raw_totals(&p).into_iter().sum();
        assert_eq!(by_type.values().sum::<i64>(), raw, "{name}: totals changed");
        assert!(by_type.len() <= p.sample_type.len(), "{name}");
        assert!(
            by_type
                .keys()
                .all(|k| k.starts_with("fx:") && k.split(':').count() == 5),
            "{name}"
        );
        for prof in &profiles {
            assert!(
                prof.samples.iter().all(|s| s.value != 0),
                "{name}: zero sample kept"
            );
        }
    }
}

#[test]
fn truncated_and_bomb_inputs_are_errors() {
    let (_, bytes) = pprof_fixtures()
        .into_iter()
        .find(|(n, _)| n == "go-cpu.pb.gz")
        .unwrap();
    let raw = pprof::maybe_gunzip(&bytes, 1 << 20, "t").unwrap();
    for cut in [1, raw.len() / 3, raw.len() - 1] {
        // Either a decode error or a profile that fails validation; never a panic.
        if let Ok(p) = FlatProfile::decode(&raw[..cut]) {
            let _ = normalise(&p, &dest("s"));
        }
    }
    assert!(pprof::decode(&bytes[..bytes.len() / 2], 1 << 20).is_err());
    let bomb = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&vec![0u8; 8 << 20]).unwrap();
        e.finish().unwrap()
    };
    let err = pprof::decode(&bomb, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}

#[tokio::test]
async fn block_round_trips_through_the_object_store_and_metastore() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let mut profiles = Vec::new();
    for (name, bytes) in pprof_fixtures()
        .into_iter()
        .filter(|(n, _)| n.starts_with("go-cpu"))
    {
        let raw = pprof::maybe_gunzip(&bytes, 64 << 20, "t").unwrap();
        let p = FlatProfile::decode(&raw).unwrap();
        profiles.extend(normalise(&p, &dest(&name)).unwrap());
    }
    // One flush: the fixtures were recorded years apart, a segment is not.
    for p in &mut profiles {
        p.time_nanos = 1_700_000_000_000_000_000;
    }
    let want_total: i64 = profiles.iter().map(Profile::total).sum();
    let block = write_block(&profiles, 3, &mut StackNodes::default()).unwrap();
    store
        .put(
            &Path::from(block.meta.path.as_str()),
            PutPayload::from(block.bytes.clone()),
        )
        .await
        .unwrap();
    let footer = read_footer(store.as_ref(), &block.meta.path).await.unwrap();
    assert_eq!(footer, block.meta);
    assert!(block.meta.path.starts_with("segments/3/anonymous/"));

    let mut got_total = 0;
    let mut leaves = Vec::new();
    let mut nodes = std::collections::HashSet::new();
    for d in &block.meta.datasets {
        let samples = read_section(
            store.clone(),
            &block.meta.path,
            d.section(Section::Samples).unwrap(),
        )
        .await
        .unwrap();
        for b in &samples {
            use arrow::array::AsArray;
            let v = b
                .column_by_name("value")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            got_total += v.values().iter().sum::<i64>();
            let ids = b
                .column_by_name("stack_id")
                .unwrap()
                .as_primitive::<arrow::datatypes::UInt64Type>();
            leaves.extend(ids.values().iter().copied());
        }
        let stacks = read_section(
            store.clone(),
            &block.meta.path,
            d.section(Section::Stacks).unwrap(),
        )
        .await
        .unwrap();
        for b in &stacks {
            use arrow::array::AsArray;
            let ids = b.column(0).as_primitive::<arrow::datatypes::UInt64Type>();
            nodes.extend(ids.values().iter().copied());
        }
    }
    assert_eq!(got_total, want_total);
    assert!(
        leaves.iter().all(|l| nodes.contains(l)),
        "every sample's stack is in the tree"
    );

    let metastore = Metastore::open(&dir.path().join("m.redb")).unwrap();
    metastore
        .apply(Command::add_block(block.meta.clone()))
        .unwrap();
    let found = metastore.query(&BlockQuery {
        tenant: "t".into(),
        start: i64::MIN,
        end: i64::MAX,
        service_names: Some(vec!["go-cpu.pb.gz".into()]),
        profile_types: None,
        skip_level0: false,
    });
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].dataset.service_name, "go-cpu.pb.gz");
}

/// Shards started together flush out of step: shard `i` of `n` flushes no
/// sooner than `i / n` of the interval after the start, so busy shards'
/// level-0 queues do not fill (and fall due for compaction) together.
#[tokio::test]
async fn shards_started_together_flush_out_of_step() {
    use ember_metastore::InProcess;
    use ember_segment_writer::{
        SegmentConfig, SegmentMetrics, SegmentWriter, SegmentWriterClient, Sink,
    };
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let metastore = Arc::new(Metastore::open(&dir.path().join("metastore.redb")).unwrap());
    let (name, bytes) = pprof_fixtures()
        .into_iter()
        .find(|(n, _)| n.starts_with("go-cpu"))
        .unwrap();
    let raw = pprof::maybe_gunzip(&bytes, 64 << 20, "t").unwrap();
    let profiles = normalise(&FlatProfile::decode(&raw).unwrap(), &dest(&name)).unwrap();

    let interval = Duration::from_millis(400);
    let started = Instant::now();
    let writer = SegmentWriter::start(
        SegmentConfig {
            shards: 2,
            min_flush_interval: interval,
            ..SegmentConfig::default()
        },
        Sink {
            store,
            metastore: Arc::new(InProcess(metastore.clone())),
            flush_hook: None,
        },
        SegmentMetrics::default(),
    );
    let acked_after = |shard: u32| {
        let writer = &writer;
        let profiles = profiles.clone();
        async move {
            writer.append(shard, profiles).await.unwrap();
            started.elapsed()
        }
    };
    let (_, second) = tokio::join!(acked_after(0), acked_after(1));
    assert!(
        second >= interval / 2,
        "shard 1 of 2 flushed {second:?} after the start, before half the interval"
    );
    let mut shards: Vec<u32> = metastore.blocks("t").iter().map(|b| b.shard).collect();
    shards.sort();
    assert_eq!(
        shards,
        vec![0, 1],
        "each shard's profiles are one registered block"
    );
}

#[test]
fn jump_hash_is_stable_and_in_range() {
    for key in 0..1000u64 {
        assert!(jump_hash(key, 7) < 7);
    }
    assert_eq!(jump_hash(42, 1), 0);
    // Growing from 10 to 11 buckets moves about 1/11 of the keys.
    let moved = (0..10_000u64)
        .filter(|k| {
            jump_hash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), 10)
                != jump_hash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), 11)
        })
        .count();
    assert!((500..1500).contains(&moved), "{moved}");
}
