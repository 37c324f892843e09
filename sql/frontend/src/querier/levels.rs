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
mod tests;
