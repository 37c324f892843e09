use std::collections::BTreeMap;

use super::*;
use crate::limits::ProfileLimits;

fn fixture(name: &str) -> Vec<u8> {
    let path = ember_fixtures::fixtures_dir().join("jfr").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn limits() -> Limits {
    Limits {
        defaults: ProfileLimits {
            reject_older_than_seconds: 0,
            reject_newer_than_seconds: 0,
            ..ProfileLimits::default()
        },
        ..Limits::default()
    }
}

fn params(name: &str) -> IngestParams {
    let q = HashMap::from([
        ("name".to_string(), name.to_string()),
        ("spyName".to_string(), "javaspy".to_string()),
    ]);
    IngestParams::from_query(&q).unwrap()
}

/// (profile type, 'root;...;leaf') -> value, over the profiles.
fn stacks(profiles: &[ember_engine::Profile]) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    for p in profiles {
        for s in &p.samples {
            let path: Vec<&str> = p
                .stack(s)
                .iter()
                .map(|&f| p.functions.get(f as usize).unwrap())
                .collect();
            *out.entry((p.profile_type.clone(), path.join(";")))
                .or_default() += s.value;
        }
    }
    out
}

/// The expected pprof's stacks of its first sample type.
fn expected(name: &str, profile_type: &str) -> BTreeMap<(String, String), i64> {
    let p = crate::formats::pprof::decode(&fixture(name), 1 << 30).unwrap();
    let text = |i: i64| p.string_table[i as usize].clone();
    let function: HashMap<u64, String> = p.function.iter().map(|f| (f.id, text(f.name))).collect();
    let location: HashMap<u64, Vec<String>> = p
        .location
        .iter()
        .map(|l| {
            (
                l.id,
                l.line
                    .iter()
                    .map(|line| function[&line.function_id].clone())
                    .collect(),
            )
        })
        .collect();
    let mut out = BTreeMap::new();
    for s in &p.sample {
        let mut frames: Vec<String> = s
            .location_id
            .iter()
            .flat_map(|id| location[id].iter().cloned())
            .collect();
        frames.reverse();
        *out.entry((profile_type.to_string(), frames.join(";")))
            .or_default() += s.value[0];
    }
    out
}

fn of_type(
    all: &BTreeMap<(String, String), i64>,
    profile_type: &str,
) -> BTreeMap<(String, String), i64> {
    all.iter()
        .filter(|((t, _), _)| t == profile_type)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

#[test]
fn kafka_cpu_is_the_profile_pyroscope_made_of_it() {
    let profiles = jfr_profiles(
        &limits(),
        &params("kafka"),
        &fixture("kafka-cpu.jfr.gz"),
        None,
        "t",
        1,
    )
    .unwrap();
    let cpu = "process_cpu:cpu:nanoseconds:cpu:nanoseconds";
    let got = stacks(&profiles);
    let want = expected("kafka-cpu.expected.process_cpu.pb.gz", cpu);
    assert_eq!(of_type(&got, cpu), want);
    assert_eq!(want.values().sum::<i64>(), 4_780_000_000);
    let labels = &profiles[0].labels;
    for (k, v) in [
        ("service_name", "kafka"),
        ("pyroscope_spy", "javaspy"),
        ("jfr_event", "cpu"),
    ] {
        assert!(
            labels.contains(&(k.to_string(), v.to_string())),
            "{labels:?}"
        );
    }
}

#[test]
fn cpu_and_allocations_of_one_recording_are_each_pyroscopes() {
    let jfr = fixture("kafka-cpu-lock-alloc.jfr.gz");
    let got = stacks(&jfr_profiles(&limits(), &params("kafka"), &jfr, None, "t", 1).unwrap());
    for (file, ty) in [
        (
            "kafka-cpu-lock-alloc.expected.process_cpu_cpu_nanoseconds_cpu_nanoseconds.pb.gz",
            "process_cpu:cpu:nanoseconds:cpu:nanoseconds",
        ),
        (
            "kafka-cpu-lock-alloc.expected.memory_alloc_in_new_tlab_objects_count_space_bytes.pb.gz",
            "memory:alloc_in_new_tlab_objects:count:space:bytes",
        ),
        (
            "kafka-cpu-lock-alloc.expected.memory_alloc_in_new_tlab_bytes_bytes_space_bytes.pb.gz",
            "memory:alloc_in_new_tlab_bytes:bytes:space:bytes",
        ),
    ] {
        assert_eq!(of_type(&got, ty), expected(file, ty), "{ty}");
    }
    let total = |ty: &str| of_type(&got, ty).values().sum::<i64>();
    assert_eq!(
        total("memory:alloc_in_new_tlab_objects:count:space:bytes"),
        766
    );
    assert_eq!(
        total("memory:alloc_in_new_tlab_bytes:bytes:space:bytes"),
        1_606_418_432
    );
}

#[test]
fn context_labels_become_series_labels() {
    let jfr = fixture("dump2.jfr.gz");
    let labels = fixture("dump2.labels.pb.gz");
    let profiles = jfr_profiles(&limits(), &params("app"), &jfr, Some(&labels), "t", 1).unwrap();
    let total = |ty: &str, thread: Option<&str>| -> i64 {
        profiles
            .iter()
            .filter(|p| p.profile_type == ty)
            .filter(|p| {
                let t = p
                    .labels
                    .iter()
                    .find(|(k, _)| k == "thread_name")
                    .map(|(_, v)| v.as_str());
                thread.is_none() || t == thread
            })
            .flat_map(|p| &p.samples)
            .map(|s| s.value)
            .sum()
    };
    let wall = "wall:wall:nanoseconds:wall:nanoseconds";
    assert_eq!(total(wall, None), 147_230_000_000);
    assert_eq!(
        total("process_cpu:cpu:nanoseconds:cpu:nanoseconds", None),
        33_580_000_000
    );
    assert_eq!(total(wall, Some("pool-2-thread-1")), 4_350_000_000);
    assert_eq!(total(wall, Some("pool-2-thread-6")), 3_050_000_000);
    assert_eq!(total("memory:live:count:objects:count", None), 4);
    // Spans stay on samples: a profile id is never a series label.
    assert!(profiles
        .iter()
        .all(|p| p.labels.iter().all(|(k, _)| k != "profile_id")));
    assert!(profiles
        .iter()
        .flat_map(|p| &p.samples)
        .any(|s| s.span_id.is_some()));
}

#[test]
fn damaged_recordings_are_errors_not_panics() {
    let jfr = maybe_gunzip(&fixture("kafka-cpu.jfr.gz"), 1 << 30, "t").unwrap();
    let l = limits();
    for cut in [0, 3, 10, 67, 68, 500, jfr.len() / 2, jfr.len() - 1] {
        assert!(
            jfr_profiles(&l, &params("k"), &jfr[..cut], None, "t", 1).is_err(),
            "cut at {cut}"
        );
    }
    // Bytes of the header and of the body, flipped.
    for i in (0..jfr.len())
        .step_by(jfr.len() / 20)
        .chain((0..80).step_by(7))
    {
        let mut bad = jfr.clone();
        bad[i] ^= 0xff;
        let _ = jfr_profiles(&l, &params("k"), &bad, None, "t", 1);
    }
    assert!(jfr_profiles(&l, &params("k"), b"FLR\0garbage", None, "t", 1).is_err());
}
