use super::*;
use crate::formats::pprof;

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

/// main -> work (inlined into main's location) -> leaf, with labels.
fn sample_profile() -> pprof::Profile {
    pprof::Profile {
        string_table: strings(&[
            "",
            "cpu",
            "nanoseconds",
            "samples",
            "count",
            "main",
            "work",
            "leaf",
            "handler",
            "a",
            "b",
            "span_id",
            "00000000000000ff",
        ]),
        sample_type: vec![
            pprof::ValueType { r#type: 3, unit: 4 },
            pprof::ValueType { r#type: 1, unit: 2 },
        ],
        period_type: Some(pprof::ValueType { r#type: 1, unit: 2 }),
        period: 10_000_000,
        function: vec![
            pprof::Function {
                id: 1,
                name: 5,
                ..Default::default()
            },
            pprof::Function {
                id: 2,
                name: 6,
                ..Default::default()
            },
            pprof::Function {
                id: 3,
                name: 7,
                ..Default::default()
            },
        ],
        location: vec![
            // line[0] is the innermost: work inlined into main.
            pprof::Location {
                id: 10,
                line: vec![
                    pprof::Line {
                        function_id: 2,
                        ..Default::default()
                    },
                    pprof::Line {
                        function_id: 1,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            pprof::Location {
                id: 11,
                line: vec![pprof::Line {
                    function_id: 3,
                    ..Default::default()
                }],
                ..Default::default()
            },
            pprof::Location {
                id: 12,
                address: 0xabc,
                ..Default::default()
            },
        ],
        sample: vec![
            pprof::Sample {
                location_id: vec![11, 10],
                value: vec![1, 10],
                label: vec![pprof::Label {
                    key: 8,
                    str: 9,
                    ..Default::default()
                }],
            },
            pprof::Sample {
                location_id: vec![11, 10],
                value: vec![2, 20],
                label: vec![pprof::Label {
                    key: 8,
                    str: 9,
                    ..Default::default()
                }],
            },
            pprof::Sample {
                location_id: vec![11, 10],
                value: vec![3, 30],
                label: vec![
                    pprof::Label {
                        key: 8,
                        str: 10,
                        ..Default::default()
                    },
                    pprof::Label {
                        key: 11,
                        str: 12,
                        ..Default::default()
                    },
                ],
            },
            pprof::Sample {
                location_id: vec![12],
                value: vec![0, 0],
                label: vec![],
            },
            pprof::Sample {
                location_id: vec![12],
                value: vec![4, 0],
                label: vec![],
            },
        ],
        ..Default::default()
    }
}

fn dest() -> Destination {
    Destination {
        tenant: "t".into(),
        labels: validate_labels(vec![
            ("service_name".into(), "api".into()),
            ("__name__".into(), "process_cpu".into()),
        ])
        .unwrap(),
        received_at_nanos: 42,
        limits: ProfileLimits::default(),
    }
}

/// What `normalise` makes of `p` as agents send it (encoded, so its
/// location ids stay packed), checked against what it makes of the
/// same profile built in memory (every id decoded).
fn normalised(p: &pprof::Profile, d: &Destination) -> Result<Vec<Profile>, IngestError> {
    let bytes = prost::Message::encode_to_vec(p);
    let sent = FlatProfile::decode(&bytes).map(|flat| normalise(&flat, d));
    let built = normalise(&FlatProfile::of(p), d);
    assert_eq!(format!("{sent:?}"), format!("Ok({built:?})"));
    built
}

fn stacks(p: &Profile) -> Vec<(String, i64, Option<u64>)> {
    p.samples
        .iter()
        .map(|s| {
            let names: Vec<&str> = p
                .stack(s)
                .iter()
                .map(|i| p.functions.get(*i as usize).unwrap())
                .collect();
            (names.join(";"), s.value, s.span_id)
        })
        .collect()
}

#[test]
fn splits_types_and_label_sets_sums_and_drops_zeros() {
    let out = normalised(&sample_profile(), &dest()).unwrap();
    let find = |ty: &str, handler: Option<&str>| {
        out.iter()
            .find(|p| {
                p.profile_type.starts_with(ty)
                    && ember_engine::profile::label_value(&p.labels, "handler") == handler
            })
            .unwrap_or_else(|| panic!("no {ty} {handler:?} in {out:#?}"))
    };
    let a = find("process_cpu:samples:count:cpu:nanoseconds", Some("a"));
    assert_eq!(stacks(a), vec![("main;work;leaf".to_string(), 3, None)]);
    let b = find("process_cpu:cpu:nanoseconds:cpu:nanoseconds", Some("b"));
    assert_eq!(
        stacks(b),
        vec![("main;work;leaf".to_string(), 30, Some(0xff))]
    );
    let none = find("process_cpu:samples:count", None);
    assert_eq!(stacks(none), vec![("0xabc".to_string(), 4, None)]);
    // The cpu type of the unlabelled series had only zeros: no profile.
    assert!(!out
        .iter()
        .any(|p| p.profile_type.starts_with("process_cpu:cpu") && p.labels.len() == 2));
    assert_eq!(out.len(), 5);
    assert!(out
        .iter()
        .all(|p| p.time_nanos == 42 && p.service_name() == "api"));
}

/// A label set's samples land in one series whether they come together
/// or apart, and a neighbour that differs only by its span keeps it.
#[test]
fn label_sets_are_one_series_whether_their_samples_are_together_or_apart() {
    let mut p = sample_profile();
    let mut again = p.sample[0].clone();
    again.value = vec![5, 50];
    let mut with_span = again.clone();
    with_span.value = vec![6, 60];
    with_span.label.push(pprof::Label {
        key: 11,
        str: 12,
        ..Default::default()
    });
    // a, a, b + span, unlabelled, a, a + span
    p.sample.extend([again, with_span]);
    let out = normalised(&p, &dest()).unwrap();
    let handler_a: Vec<&Profile> = out
        .iter()
        .filter(|p| ember_engine::profile::label_value(&p.labels, "handler") == Some("a"))
        .collect();
    assert_eq!(handler_a.len(), 2, "one series, two types: {out:#?}");
    let samples = handler_a
        .iter()
        .find(|p| p.profile_type.starts_with("process_cpu:samples"))
        .unwrap();
    assert_eq!(
        stacks(samples),
        vec![
            ("main;work;leaf".to_string(), 1 + 2 + 5, None),
            ("main;work;leaf".to_string(), 6, Some(0xff)),
        ]
    );
    assert_eq!(out.len(), 5);
}

/// Two locations of one function (two call sites' addresses) make one
/// stack, summed; every type's samples come sorted by stack.
#[test]
fn location_lists_making_one_stack_are_summed_and_stacks_come_sorted() {
    let mut p = sample_profile();
    // Location 13 is `leaf` again, at another address.
    let mut again = p.location[1].clone();
    again.id = 13;
    again.address = 0x99;
    p.location.push(again);
    p.sample = [
        (vec![13, 10], vec![5, 50]),
        (vec![12], vec![7, 70]),
        (vec![11, 10], vec![2, 20]),
        (vec![10], vec![1, 10]),
    ]
    .into_iter()
    .map(|(location_id, value)| pprof::Sample {
        location_id,
        value,
        label: vec![],
    })
    .collect();
    let out = normalised(&p, &dest()).unwrap();
    assert_eq!(out.len(), 2);
    for profile in &out {
        let m = if profile.profile_type.starts_with("process_cpu:cpu") {
            10
        } else {
            1
        };
        let mut got = stacks(profile);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("0xabc".to_string(), 7 * m, None),
                ("main;work".to_string(), m, None),
                ("main;work;leaf".to_string(), 7 * m, None),
            ]
        );
        let frames: Vec<&[u32]> = profile.samples.iter().map(|s| profile.stack(s)).collect();
        assert!(frames.windows(2).all(|w| w[0] < w[1]), "{frames:?}");
    }
}

#[test]
fn negative_values_are_dropped_not_stored() {
    let mut p = sample_profile();
    // Sample 1 (handler=a) becomes (-2, 20), sample 0 stays (1, 10).
    p.sample[1].value[0] = -2;
    let out = normalised(&p, &dest()).unwrap();
    let a = out
        .iter()
        .find(|q| {
            q.profile_type.starts_with("process_cpu:samples")
                && ember_engine::profile::label_value(&q.labels, "handler") == Some("a")
        })
        .unwrap();
    assert_eq!(stacks(a), vec![("main;work;leaf".to_string(), 1, None)]);
    assert!(out.iter().all(|q| q.samples.iter().all(|s| s.value > 0)));
    let mut p = sample_profile();
    for s in &mut p.sample {
        s.value.iter_mut().for_each(|v| *v = -(*v).abs() - 1);
    }
    assert!(normalised(&p, &dest()).unwrap().is_empty());
}

#[test]
fn rejects_dangling_references() {
    let mut p = sample_profile();
    p.sample[0].location_id.push(99);
    assert!(matches!(
        normalised(&p, &dest()),
        Err(IngestError::Invalid(_))
    ));
    let mut p = sample_profile();
    p.function[0].name = 1000;
    assert!(matches!(
        normalised(&p, &dest()),
        Err(IngestError::Invalid(_))
    ));
    let mut p = sample_profile();
    p.sample[0].value.pop();
    assert!(matches!(
        normalised(&p, &dest()),
        Err(IngestError::Invalid(_))
    ));
}

/// Location ids far apart (an address as id, as some profilers use)
/// are found by hash instead of by table: the same profiles, the same
/// refusal of an id no location has.
#[test]
fn locations_with_large_ids_normalise_as_small_ones_do() {
    let far = |id: u64| id * 1_000_000_007;
    let mut p = sample_profile();
    for l in &mut p.location {
        l.id = far(l.id);
    }
    for s in &mut p.sample {
        s.location_id.iter_mut().for_each(|id| *id = far(*id));
    }
    let near = normalised(&sample_profile(), &dest()).unwrap();
    assert_eq!(normalised(&p, &dest()).unwrap(), near);
    p.sample[0].location_id.push(12);
    let err = normalised(&p, &dest()).unwrap_err();
    assert!(err.to_string().contains("unknown location 12"), "{err}");
    // In the table's range but never defined.
    let mut p = sample_profile();
    p.sample[0].location_id.push(3);
    let err = normalised(&p, &dest()).unwrap_err();
    assert!(err.to_string().contains("unknown location 3"), "{err}");
}

/// A profile with one sample whose stack is `depth` distinct frames.
fn deep_profile(depth: usize, name_len: usize) -> pprof::Profile {
    let mut strings = vec![String::new(), "cpu".into(), "nanoseconds".into()];
    let mut function = Vec::new();
    let mut location = Vec::new();
    for i in 0..depth {
        strings.push(format!("f{i:06}{}", "x".repeat(name_len)));
        function.push(pprof::Function {
            id: i as u64 + 1,
            name: strings.len() as i64 - 1,
            ..Default::default()
        });
        location.push(pprof::Location {
            id: i as u64 + 1,
            line: vec![pprof::Line {
                function_id: i as u64 + 1,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    pprof::Profile {
        string_table: strings.iter().map(|s| s.to_string()).collect(),
        sample_type: vec![pprof::ValueType { r#type: 1, unit: 2 }],
        period_type: Some(pprof::ValueType { r#type: 1, unit: 2 }),
        function,
        location,
        // location_id[0] is the leaf: f0 is the leaf, f{depth-1} the root.
        sample: vec![pprof::Sample {
            location_id: (1..=depth as u64).collect(),
            value: vec![7],
            label: vec![],
        }],
        ..Default::default()
    }
}

#[test]
fn functions_sharing_one_long_name_reserve_room_for_it_once() {
    // 2,000 functions naming one 64 KB string: room for each name
    // would be 128 MB for a profile of a few kilobytes.
    let mut p = deep_profile(2_000, 8);
    p.string_table.push("x".repeat(64 << 10));
    let long = p.string_table.len() as i64 - 1;
    for f in &mut p.function {
        f.name = long;
    }
    let profiles = normalised(&p, &dest()).unwrap();
    let functions = &profiles[0].functions;
    let table: usize = p.string_table.iter().map(String::len).sum();
    // Room for the table's bytes at most, and an end per function.
    let ends = (p.function.len() + 1) * std::mem::size_of::<usize>();
    assert!(
        functions.size_bytes() <= table + TRUNCATED_FRAME.len() + ends,
        "{} bytes held for a string table of {table}",
        functions.size_bytes()
    );
    // One name, truncated to the symbol limit, then the truncation frame.
    assert_eq!(functions.len(), 2);
}

#[test]
fn deep_stacks_keep_their_root_and_end_in_a_truncation_frame() {
    let out = normalised(&deep_profile(200_000, 0), &dest()).unwrap();
    let s = &out[0].samples[0];
    assert_eq!(s.stack.len(), 1000);
    assert_eq!(s.value, 7);
    let names: Vec<&str> = out[0]
        .stack(s)
        .iter()
        .map(|i| out[0].functions.get(*i as usize).unwrap())
        .collect();
    assert_eq!(names[0], "f199999");
    assert_eq!(names[998], "f199001");
    assert_eq!(names[999], TRUNCATED_FRAME);
    // A stack at the limit is untouched.
    let out = normalised(&deep_profile(1000, 0), &dest()).unwrap();
    let s = &out[0].samples[0];
    assert_eq!(s.stack.len(), 1000);
    assert_eq!(
        out[0].functions.get(out[0].stack(s)[999] as usize),
        Some("f000000")
    );
    assert!(!out[0]
        .stack(s)
        .iter()
        .any(|i| out[0].functions.get(*i as usize) == Some(TRUNCATED_FRAME)));
}

/// Locations of several inlined frames each, so that the limit (1,000
/// frames, 999 kept before the truncation frame) falls inside a
/// location or just past one: each depth around it keeps what the
/// whole stack cut at the limit keeps.
#[test]
fn the_limit_cuts_inside_a_location_of_inlined_frames() {
    // Seven lines: 994 frames whole, then cuts after 5 of a location's
    // 7. Eight lines: exactly 1,000 frames whole, then one location
    // more, which goes past the limit with nothing of it kept.
    let cases = [(7, 142), (7, 143), (7, 144), (7, 200), (8, 125), (8, 126)];
    for (lines, locations) in cases {
        let mut p = deep_profile(lines * locations, 0);
        p.location = (0..locations)
            .map(|i| pprof::Location {
                id: i as u64 + 1,
                line: (0..lines as u64)
                    .map(|j| pprof::Line {
                        function_id: (lines * i) as u64 + j + 1,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        p.sample[0].location_id = (1..=locations as u64).collect();
        let out = normalised(&p, &dest()).unwrap();
        let functions = &out[0].functions;
        let got: Vec<&str> = out[0]
            .stack(&out[0].samples[0])
            .iter()
            .map(|i| functions.get(*i as usize).unwrap())
            .collect();
        // Root first: the last location's outermost line is the root.
        let whole: Vec<String> = (0..lines * locations)
            .rev()
            .map(|f| format!("f{f:06}"))
            .collect();
        let want: Vec<&str> = if whole.len() <= 1000 {
            whole.iter().map(String::as_str).collect()
        } else {
            whole[..999]
                .iter()
                .map(String::as_str)
                .chain([TRUNCATED_FRAME])
                .collect()
        };
        assert_eq!(got, want, "{locations} locations of {lines} lines");
    }
    // A dangling location past the limit still refuses the profile.
    let mut p = deep_profile(2_000, 0);
    p.sample[0].location_id[0] = 9_999;
    let err = normalised(&p, &dest()).unwrap_err();
    assert!(err.to_string().contains("9999"), "{err}");
}

/// Stacks of one-frame locations are mapped as their ids are read;
/// any other takes the general path. Both give the frames pprof says.
#[test]
fn stacks_read_the_same_whether_their_locations_are_one_frame_or_more() {
    let names = |out: &[Profile], at: usize| -> Vec<String> {
        let p = &out[0];
        p.stack(&p.samples[at])
            .iter()
            .map(|i| p.functions.get(*i as usize).unwrap().to_string())
            .collect()
    };
    let root_first = |ids: std::ops::RangeInclusive<u64>| -> Vec<String> {
        ids.rev().map(|id| format!("f{:06}", id - 1)).collect()
    };
    // Ids of three-byte varints, a stack exactly at the depth limit.
    let mut p = deep_profile(20_000, 0);
    p.sample[0].location_id = (19_000..=19_999).collect();
    let out = normalised(&p, &dest()).unwrap();
    assert_eq!(names(&out, 0), root_first(19_000..=19_999));
    // Location 2 holds two inlined frames (function 2 inlined into 5):
    // its stacks take the general path, the others do not.
    let mut p = deep_profile(6, 0);
    p.location[1].line.push(pprof::Line {
        function_id: 5,
        ..Default::default()
    });
    p.sample = [vec![1, 2, 3], vec![3, 4], vec![6]]
        .into_iter()
        .map(|location_id| pprof::Sample {
            location_id,
            value: vec![1],
            label: vec![],
        })
        .collect();
    let out = normalised(&p, &dest()).unwrap();
    let stacks: Vec<Vec<String>> = (0..3).map(|i| names(&out, i)).collect();
    let f = |i: u32| format!("f{i:06}");
    // Sorted by frames, root first.
    assert_eq!(
        stacks,
        vec![vec![f(2), f(4), f(1), f(0)], vec![f(3), f(2)], vec![f(5)],]
    );
}

#[test]
fn long_symbols_are_truncated_and_limits_refuse_with_their_names() {
    let out = normalised(&deep_profile(2, 100_000), &dest()).unwrap();
    assert!(out[0].functions.iter().all(|f| f.len() <= 65535));
    let mut d = dest();
    d.limits.max_profile_stacktrace_samples = 3;
    let mut p = sample_profile();
    p.sample.push(p.sample[0].clone());
    let err = normalised(&p, &d).unwrap_err().to_string();
    assert!(
        err.contains("6 samples, over max_profile_stacktrace_samples (3)"),
        "{err}"
    );
    let mut d = dest();
    d.limits.max_profile_stacktrace_sample_labels = 1;
    let err = normalised(&sample_profile(), &d).unwrap_err().to_string();
    assert!(
        err.contains("max_profile_stacktrace_sample_labels (1)"),
        "{err}"
    );
}

/// The same location ids sent packed and one per key (as proto2
/// writers send them) are one stack, whose values are summed.
#[test]
fn location_ids_in_either_form_make_one_stack() {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let mut p = sample_profile();
    p.sample.retain(|s| s.label.is_empty());
    p.sample[0].location_id = vec![11, 10];
    p.sample[0].value = vec![1, 10];
    let mut bytes = prost::Message::encode_to_vec(&p);
    let mut sample = Vec::new();
    for id in [11u64, 10] {
        encode_key(1, WireType::Varint, &mut sample);
        encode_varint(id, &mut sample);
    }
    for value in [5u64, 50] {
        encode_key(2, WireType::Varint, &mut sample);
        encode_varint(value, &mut sample);
    }
    encode_key(2, WireType::LengthDelimited, &mut bytes);
    encode_varint(sample.len() as u64, &mut bytes);
    bytes.extend_from_slice(&sample);
    let flat = FlatProfile::decode(&bytes).unwrap();
    let kinds: Vec<_> = flat
        .samples
        .iter()
        .map(|s| matches!(flat.location_ids(s), LocationIds::Packed(_)))
        .collect();
    assert_eq!(kinds, [true, true, false]);
    let out = normalise(&flat, &dest()).unwrap();
    let by_type: Vec<_> = out
        .iter()
        .map(|p| (p.profile_type.as_str(), stacks(p)))
        .collect();
    let stack = |s: &str, v: i64| (s.to_string(), v, None);
    assert_eq!(
        by_type,
        [
            (
                "process_cpu:cpu:nanoseconds:cpu:nanoseconds",
                vec![stack("main;work;leaf", 60)]
            ),
            (
                "process_cpu:samples:count:cpu:nanoseconds",
                vec![stack("main;work;leaf", 6), stack("0xabc", 4)]
            ),
        ]
    );
}

#[test]
fn one_function_table_is_shared_by_every_profile_of_a_pprof() {
    let out = normalised(&sample_profile(), &dest()).unwrap();
    assert!(out.len() > 1);
    assert!(out
        .iter()
        .all(|p| Arc::ptr_eq(&p.functions, &out[0].functions)));
}

#[test]
fn labels_are_validated_and_service_defaulted() {
    let l = validate_labels(vec![("env".into(), "prod".into())]).unwrap();
    assert_eq!(
        ember_engine::profile::label_value(&l, SERVICE_NAME),
        Some(DEFAULT_SERVICE)
    );
    assert!(validate_labels(vec![("bad-name".into(), "x".into())]).is_err());
    assert!(validate_labels(vec![("x".into(), "v".repeat(5000))]).is_err());
}
