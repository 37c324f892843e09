//! Grafana's flame graph frame laid out as Pyroscope's answers: levels
//! (`FlameGraph`, `FlameGraphDiff`) and tree bytes.

use super::*;

/// Depth-first flame graph rows laid out as Pyroscope's levels: per bar
/// and per side (one, or left and right for a diff), the x offset from the
/// end of the previous bar on that level, the total and the self value;
/// then the index of the bar's name. Level 0 is the root, `names[0]` its
/// name ("total").
struct Levels<'a, const SIDES: usize> {
    names: Vec<String>,
    /// Borrowed from the frame: a name costs an allocation once, not per bar.
    name_index: foldhash::HashMap<&'a str, i64>,
    levels: Vec<Level>,
    /// Per depth and side: where the last bar ended.
    last_end: Vec<[i64; SIDES]>,
    /// Per depth and side: where the next child of the last bar there starts.
    child_x: Vec<[i64; SIDES]>,
    max_self: i64,
}

impl<'a, const SIDES: usize> Levels<'a, SIDES> {
    fn new() -> Self {
        Self {
            names: Vec::new(),
            name_index: foldhash::HashMap::default(),
            levels: Vec::new(),
            last_end: Vec::new(),
            child_x: Vec::new(),
            max_self: 0,
        }
    }

    /// The index of `name` in `names`, numbered in the order first seen.
    /// Rows from the tree carry that number already (the tree numbers names
    /// in the same order), so only a frame's labels are hashed here.
    fn name(&mut self, name: &'a str, number: Option<u32>) -> Result<i64, String> {
        let next = self.names.len();
        match number.map(|n| n as usize) {
            Some(n) if n < next => Ok(n as i64),
            Some(n) if n == next => {
                self.names.push(name.to_string());
                Ok(n as i64)
            }
            Some(n) => Err(format!("name number {n} skips past {next}")),
            None => Ok(*self.name_index.entry(name).or_insert_with(|| {
                self.names.push(name.to_string());
                next as i64
            })),
        }
    }

    /// Adds the next row: its depth, name index and (total, self) per side.
    fn push(&mut self, depth: usize, index: i64, sides: [(i64, i64); SIDES]) -> Result<(), String> {
        if depth > self.levels.len() || (depth == 0) != self.levels.is_empty() {
            return Err(format!(
                "a row at level {depth} is out of depth-first order"
            ));
        }
        let mut x = [0; SIDES];
        if depth > 0 {
            x = self.child_x[depth - 1];
            for (side, (total, _)) in sides.iter().enumerate() {
                self.child_x[depth - 1][side] += total;
            }
        }
        self.child_x.truncate(depth);
        self.child_x.push(x);
        if depth == self.levels.len() {
            self.levels.push(Level::default());
            self.last_end.push([0; SIDES]);
        }
        let values = &mut self.levels[depth].values;
        for (side, (total, own)) in sides.iter().enumerate() {
            values.extend([x[side] - self.last_end[depth][side], *total, *own]);
            self.last_end[depth][side] = x[side] + total;
            self.max_self = self.max_self.max(*own);
        }
        values.push(index);
        Ok(())
    }
}

fn int_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::Int64Array, String> {
    b.column_by_name(name)
        .map(|c| c.as_primitive::<Int64Type>())
        .ok_or_else(|| format!("flame graph frame without {name}"))
}

fn label_column(b: &RecordBatch) -> Result<&arrow::array::StringArray, String> {
    b.column_by_name("label")
        .map(|c| c.as_string::<i32>())
        .ok_or_else(|| "flame graph frame without label".to_string())
}

/// Grafana's flame graph frame (`level`, `value`, `self`, `label`, depth
/// first, children by name) as Pyroscope's `FlameGraph`: level 0 is
/// `[0, total, self, 0]` with `names[0] = "total"`.
pub fn flame_graph(frame: Frame<'_>) -> Result<FlameGraph, String> {
    let mut levels = Levels::<1>::new();
    let mut total = 0;
    frame.for_each_row(|row| {
        if row.depth == 0 {
            total = row.total;
        }
        let name = levels.name(row.label, row.name)?;
        levels.push(row.depth, name, [(row.total, row.own)])
    })?;
    Ok(FlameGraph {
        names: levels.names,
        levels: levels.levels,
        total,
        max_self: levels.max_self,
    })
}

/// The flame graph frame as Pyroscope's tree bytes (the `TREE` format):
/// nodes in pre-order, each as varints `name length`, the name, `self`,
/// `child count`, from a nameless root whose children are the frame's
/// level-1 nodes.
pub fn tree_bytes(frame: Frame<'_>) -> Result<Vec<u8>, String> {
    let mut rows: Vec<(usize, &str, i64)> = Vec::new();
    frame.for_each_row(|row| {
        rows.push((row.depth, row.label, row.own));
        Ok(())
    })?;
    // Children per row: the rows one level deeper before the next row at
    // the same level or above.
    let mut children = vec![0u64; rows.len()];
    let mut open: Vec<usize> = Vec::new();
    for (i, (depth, _, _)) in rows.iter().enumerate() {
        open.truncate(*depth);
        if let Some(&parent) = open.last() {
            children[parent] += 1;
        }
        open.push(i);
    }
    let mut out = Vec::new();
    for (i, (depth, name, own)) in rows.iter().enumerate() {
        let name = if *depth == 0 { "" } else { name };
        let own = if *depth == 0 { 0 } else { *own };
        prost::encoding::encode_varint(name.len() as u64, &mut out);
        out.extend_from_slice(name.as_bytes());
        prost::encoding::encode_varint(own.max(0) as u64, &mut out);
        prost::encoding::encode_varint(children[i], &mut out);
    }
    Ok(out)
}

/// The diff frame (`value`/`self` left, `valueRight`/`selfRight`) as
/// Pyroscope's `FlameGraphDiff`: seven numbers per bar, each side's x
/// offsets delta encoded on their own.
pub fn flame_graph_diff(batches: &[RecordBatch]) -> Result<FlameGraphDiff, String> {
    let mut levels = Levels::<2>::new();
    let (mut left_ticks, mut right_ticks) = (0, 0);
    for b in batches {
        let (level, value, own) = (
            int_column(b, "level")?,
            int_column(b, "value")?,
            int_column(b, "self")?,
        );
        let (value_r, own_r) = (int_column(b, "valueRight")?, int_column(b, "selfRight")?);
        let label = label_column(b)?;
        for i in 0..b.num_rows() {
            let depth = usize::try_from(level.value(i)).map_err(|e| e.to_string())?;
            if depth == 0 {
                (left_ticks, right_ticks) = (value.value(i), value_r.value(i));
            }
            let name = levels.name(label.value(i), None)?;
            levels.push(
                depth,
                name,
                [
                    (value.value(i), own.value(i)),
                    (value_r.value(i), own_r.value(i)),
                ],
            )?;
        }
    }
    Ok(FlameGraphDiff {
        names: levels.names,
        levels: levels.levels,
        total: left_ticks + right_ticks,
        max_self: levels.max_self,
        left_ticks,
        right_ticks,
    })
}

#[cfg(test)]
mod tests {
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
            let Ok(raw) =
                ember_distributor::formats::pprof::maybe_gunzip(&bytes, 64 << 20, "pprof")
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
}
