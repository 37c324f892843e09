use super::*;
use arrow::array::{Int64Array, StringArray};
use std::sync::Arc;

fn frame(rows: &[(i64, i64, i64, &str)]) -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "level",
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as _,
        ),
        (
            "value",
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))) as _,
        ),
        (
            "self",
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))) as _,
        ),
        (
            "label",
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))) as _,
        ),
    ])
    .unwrap()
}

/// (x, total, self, name) of every bar, offsets decoded as Grafana does.
fn bars(g: &FlameGraph) -> Vec<Vec<(i64, i64, i64, String)>> {
    g.levels
        .iter()
        .map(|l| {
            let mut end = 0;
            l.values
                .chunks(4)
                .map(|v| {
                    let x = end + v[0];
                    end = x + v[1];
                    (x, v[1], v[2], g.names[v[3] as usize].clone())
                })
                .collect()
        })
        .collect()
}

#[test]
fn a_depth_first_frame_becomes_delta_encoded_levels() {
    // total 11: gc 1; main 10 = a 5 (x 3, self 2) + b 5.
    let g = flame_graph(Frame::Batches(&[frame(&[
        (0, 11, 0, "total"),
        (1, 1, 1, "gc"),
        (1, 10, 0, "main"),
        (2, 5, 2, "a"),
        (3, 3, 3, "x"),
        (2, 5, 5, "b"),
    ])]))
    .unwrap();
    assert_eq!(g.names[0], "total");
    assert_eq!(g.levels[0].values, vec![0, 11, 0, 0]);
    assert_eq!((g.total, g.max_self), (11, 5));
    let s = |x: &str| x.to_string();
    assert_eq!(
        bars(&g),
        vec![
            vec![(0, 11, 0, s("total"))],
            vec![(0, 1, 1, s("gc")), (1, 10, 0, s("main"))],
            vec![(1, 5, 2, s("a")), (6, 5, 5, s("b"))],
            vec![(1, 3, 3, s("x"))],
        ]
    );
    // Offsets are relative to the previous bar's end on the level.
    assert_eq!(g.levels[2].values, vec![1, 5, 2, 3, 0, 5, 5, 5]);
}

#[test]
fn the_tree_lays_out_as_its_frame_does_for_every_fixture() {
    use ember_distributor::formats::pprof::FlatProfile;
    use ember_distributor::normalise::{normalise, validate_labels, Destination};
    use ember_sql::flamegraph::{stack_tree, FlameTree, NodeSources};

    let dest = Destination {
        tenant: "t".into(),
        labels: validate_labels(vec![("service_name".into(), "svc".into())]).unwrap(),
        received_at_nanos: 1_700_000_000_000_000_000,
        limits: Default::default(),
    };
    let mut checked = 0;
    for (name, bytes) in ember_fixtures::pprof_fixtures() {
        let Ok(raw) = ember_distributor::formats::pprof::maybe_gunzip(&bytes, 64 << 20, "pprof")
        else {
            continue;
        };
        let Ok(flat) = FlatProfile::decode(&raw) else {
            continue;
        };
        for p in normalise(&flat, &dest).unwrap() {
            let (nodes, values) = stack_tree(std::slice::from_ref(&p));
            // Small enough that the larger fixtures fold into `other`.
            let tree = FlameTree::build(NodeSources::of(&nodes), &values, 512).unwrap();
            let frame = [tree.frame().unwrap()];
            assert_eq!(
                flame_graph(Frame::Tree(&tree)).unwrap(),
                flame_graph(Frame::Batches(&frame)).unwrap(),
                "{name} {}",
                p.profile_type
            );
            assert_eq!(
                tree_bytes(Frame::Tree(&tree)).unwrap(),
                tree_bytes(Frame::Batches(&frame)).unwrap()
            );
            let g = flame_graph(Frame::Tree(&tree)).unwrap();
            assert_eq!(g.response_bytes(), response(g.clone()), "{name}");
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} fixture profiles checked");
}

/// What prost writes for the flame graph answer.
fn response(g: FlameGraph) -> Vec<u8> {
    let response = SelectMergeStacktracesResponse {
        flamegraph: Some(g),
        tree: Vec::new(),
    };
    response.encode_to_vec()
}

#[test]
fn a_flame_graph_answer_encodes_as_prost_does_with_empty_parts() {
    let mut g = FlameGraph {
        names: vec!["total".into(), String::new()],
        levels: vec![
            Level {
                values: vec![0, 300, -1, 0],
            },
            Level::default(),
            Level {
                values: vec![i64::MIN, i64::MAX, 0, 1],
            },
        ],
        total: 300,
        max_self: -1,
    };
    assert_eq!(g.response_bytes(), response(g.clone()));
    (g.total, g.max_self) = (0, 0);
    assert_eq!(g.response_bytes(), response(g.clone()));
    assert_eq!(
        FlameGraph::default().response_bytes(),
        response(FlameGraph::default())
    );
}

/// Reads tree bytes back as Pyroscope's `UnmarshalTree` does: a stack
/// of parents, each pushed once per child. Returns `a;b` -> self.
fn read_tree(b: &[u8]) -> std::collections::BTreeMap<String, i64> {
    let mut buf = b;
    let mut parents: Vec<Vec<String>> = vec![Vec::new()];
    let mut first = true;
    let mut out = std::collections::BTreeMap::new();
    while let Some(parent) = parents.pop() {
        let len = prost::encoding::decode_varint(&mut buf).unwrap() as usize;
        let name = String::from_utf8(buf[..len].to_vec()).unwrap();
        buf = &buf[len..];
        let own = prost::encoding::decode_varint(&mut buf).unwrap() as i64;
        let kids = prost::encoding::decode_varint(&mut buf).unwrap();
        let mut path = parent.clone();
        if !first {
            path.push(name);
        }
        first = false;
        if own > 0 {
            *out.entry(path.join(";")).or_default() += own;
        }
        for _ in 0..kids {
            parents.push(path.clone());
        }
    }
    assert!(buf.is_empty());
    out
}

#[test]
fn tree_bytes_read_back_as_pyroscope_reads_them() {
    let bytes = tree_bytes(Frame::Batches(&[frame(&[
        (0, 11, 0, "total"),
        (1, 1, 1, "gc"),
        (1, 10, 0, "main"),
        (2, 5, 2, "a"),
        (3, 3, 3, "x"),
        (2, 5, 5, "b"),
    ])]))
    .unwrap();
    // The nameless root with its two children comes first.
    assert_eq!(&bytes[..3], &[0, 0, 2]);
    let got = read_tree(&bytes);
    let want: std::collections::BTreeMap<String, i64> =
        [("gc", 1), ("main;a", 2), ("main;a;x", 3), ("main;b", 5)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(got, want);
    assert!(tree_bytes(Frame::Batches(&[frame(&[
        (0, 1, 0, "total"),
        (2, 1, 1, "a")
    ])]))
    .is_err());
}

#[test]
fn a_frame_out_of_order_is_an_error() {
    assert!(flame_graph(Frame::Batches(&[frame(&[(1, 1, 1, "a")])])).is_err());
    assert!(flame_graph(Frame::Batches(&[frame(&[
        (0, 1, 0, "total"),
        (2, 1, 1, "a")
    ])]))
    .is_err());
}
