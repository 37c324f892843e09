//! Two flame graphs side by side: the frame Grafana's flame graph panel
//! shows as a diff (`level`, `label`, `value`, `self`, `valueRight`,
//! `selfRight`, depth first, children by name), behind Pyroscope's `Diff`.
//! Each side is a flame graph of its own selection (truncated at
//! `max_nodes` into `other`, as a flame graph is), merged node by node on
//! the path of frame names.
//!
//! SQL: `diff_flamegraph(profile_type, left_selector, left_start, left_end,
//! right_selector, right_start, right_end [, max_nodes])`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::array::{Int64Builder, RecordBatch, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, DataFusionError};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::{collect, ExecutionPlan};

use crate::args;
use crate::flamegraph::{for_each_frame_row, FlameGraphQuery, FlameGraphTable, DEFAULT_MAX_NODES};
use crate::storage::Storage;

const NAME: &str = "diff_flamegraph";

pub fn diff_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("level", DataType::Int64, false),
            Field::new("label", DataType::Utf8, false),
            Field::new("value", DataType::Int64, false),
            Field::new("self", DataType::Int64, false),
            Field::new("valueRight", DataType::Int64, false),
            Field::new("selfRight", DataType::Int64, false),
        ]))
    })
    .clone()
}

#[derive(Default)]
struct Node {
    name: String,
    children: BTreeMap<String, usize>,
    /// (total, self) on the left and on the right.
    left: (i64, i64),
    right: (i64, i64),
}

/// The union of two flame graph trees, the root at index 0.
struct DiffTree {
    nodes: Vec<Node>,
}

#[derive(Clone, Copy)]
enum Side {
    Left,
    Right,
}

impl DiffTree {
    fn new() -> Self {
        Self {
            nodes: vec![Node {
                name: "total".into(),
                ..Node::default()
            }],
        }
    }

    /// Adds a flame graph frame (`level`, `value`, `self`, `label`, depth
    /// first) as one side.
    fn add(&mut self, batches: &[RecordBatch], side: Side) -> std::result::Result<(), String> {
        let mut path: Vec<usize> = Vec::new();
        for_each_frame_row(batches, |row| {
            path.truncate(row.depth);
            let node = match path.last() {
                None => 0,
                Some(&parent) => self.child(parent, row.label),
            };
            path.push(node);
            let n = &mut self.nodes[node];
            let slot = match side {
                Side::Left => &mut n.left,
                Side::Right => &mut n.right,
            };
            slot.0 += row.total;
            slot.1 += row.own;
            Ok(())
        })
    }

    fn child(&mut self, parent: usize, name: &str) -> usize {
        if let Some(&i) = self.nodes[parent].children.get(name) {
            return i;
        }
        let i = self.nodes.len();
        self.nodes.push(Node {
            name: name.to_string(),
            ..Node::default()
        });
        self.nodes[parent].children.insert(name.to_string(), i);
        i
    }

    /// The frame, depth first, children by name.
    fn frame(&self) -> Result<RecordBatch> {
        let n = self.nodes.len();
        let mut level = Int64Builder::with_capacity(n);
        let mut label = StringBuilder::with_capacity(n, n * 16);
        let (mut value, mut own) = (
            Int64Builder::with_capacity(n),
            Int64Builder::with_capacity(n),
        );
        let (mut value_r, mut own_r) = (
            Int64Builder::with_capacity(n),
            Int64Builder::with_capacity(n),
        );
        let mut stack = vec![(0usize, 0i64)];
        while let Some((i, depth)) = stack.pop() {
            let node = &self.nodes[i];
            level.append_value(depth);
            label.append_value(&node.name);
            value.append_value(node.left.0);
            own.append_value(node.left.1);
            value_r.append_value(node.right.0);
            own_r.append_value(node.right.1);
            stack.extend(node.children.values().rev().map(|&c| (c, depth + 1)));
        }
        Ok(RecordBatch::try_new(
            diff_schema(),
            vec![
                Arc::new(level.finish()),
                Arc::new(label.finish()),
                Arc::new(value.finish()),
                Arc::new(own.finish()),
                Arc::new(value_r.finish()),
                Arc::new(own_r.finish()),
            ],
        )?)
    }
}

/// The diff frame of two flame graphs.
pub(crate) async fn diff_frame(
    state: &dyn Session,
    left: &FlameGraphTable,
    right: &FlameGraphTable,
) -> Result<RecordBatch> {
    let mut tree = DiffTree::new();
    for (table, side) in [(left, Side::Left), (right, Side::Right)] {
        let plan = table.scan(state, None, &[], None).await?;
        let frame = collect(plan, state.task_ctx()).await?;
        tree.add(&frame, side)
            .map_err(|e| DataFusionError::Internal(format!("{NAME}: {e}")))?;
    }
    tree.frame()
}

/// `diff_flamegraph(...)` bound to the session's tenant.
pub struct DiffFunction {
    storage: Storage,
    tenant: String,
}

impl fmt::Debug for DiffFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiffFunction({})", self.tenant)
    }
}

impl DiffFunction {
    pub(crate) fn new(storage: Storage, tenant: String) -> Self {
        Self { storage, tenant }
    }
}

impl TableFunctionImpl for DiffFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let values = args::literals(NAME, args.exprs(), args.session())?;
        if !(7..=8).contains(&values.len()) {
            return plan_err!(
                "{NAME}(profile_type, left_selector, left_start, left_end, right_selector, right_start, right_end [, max_nodes]) takes 7 or 8 arguments, got {}",
                values.len()
            );
        }
        let profile_type = args::string_arg(NAME, "profile_type", &values[0])?;
        let max_nodes = match values.get(7) {
            Some(v) => args::count_arg(NAME, "max_nodes", v)?,
            None => DEFAULT_MAX_NODES,
        };
        let side = |selector: usize, name: &str| -> Result<FlameGraphTable> {
            Ok(FlameGraphTable {
                storage: self.storage.clone(),
                query: FlameGraphQuery::checked(
                    &format!("{NAME}: {name}"),
                    &self.tenant,
                    profile_type.clone(),
                    &args::string_arg(NAME, name, &values[selector])?,
                    (
                        args::time_arg(NAME, "start", &values[selector + 1])?,
                        args::time_arg(NAME, "end", &values[selector + 2])?,
                    ),
                    max_nodes,
                    None,
                )?,
            })
        };
        Ok(Arc::new(DiffTable {
            left: side(1, "left_selector")?,
            right: side(4, "right_selector")?,
        }))
    }
}

struct DiffTable {
    left: FlameGraphTable,
    right: FlameGraphTable,
}

impl fmt::Debug for DiffTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DiffTable({:?} | {:?})",
            self.left.query, self.right.query
        )
    }
}

#[async_trait]
impl TableProvider for DiffTable {
    fn schema(&self) -> SchemaRef {
        diff_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = diff_frame(state, &self.left, &self.right).await?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            diff_schema(),
            projection.cloned(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::flamegraph::frame_of as frame;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;

    #[test]
    fn nodes_of_either_side_merge_on_their_path() {
        let mut tree = DiffTree::new();
        let left = frame(&[(0, 10, 0, "total"), (1, 10, 4, "main"), (2, 6, 6, "work")]);
        let right = frame(&[
            (0, 7, 0, "total"),
            (1, 7, 0, "main"),
            (2, 2, 2, "io"),
            (2, 5, 5, "work"),
        ]);
        tree.add(&[left], Side::Left).unwrap();
        tree.add(&[right], Side::Right).unwrap();
        let b = tree.frame().unwrap();
        let rows: Vec<(i64, String, i64, i64, i64, i64)> = (0..b.num_rows())
            .map(|i| {
                let int = |c: usize| b.column(c).as_primitive::<Int64Type>().value(i);
                (
                    int(0),
                    b.column(1).as_string::<i32>().value(i).to_string(),
                    int(2),
                    int(3),
                    int(4),
                    int(5),
                )
            })
            .collect();
        let s = |x: &str| x.to_string();
        assert_eq!(
            rows,
            vec![
                (0, s("total"), 10, 0, 7, 0),
                (1, s("main"), 10, 4, 7, 0),
                (2, s("io"), 0, 0, 2, 2),
                (2, s("work"), 6, 6, 5, 5),
            ]
        );
    }

    #[test]
    fn a_frame_out_of_order_is_an_error() {
        let mut tree = DiffTree::new();
        assert!(tree.add(&[frame(&[(1, 1, 1, "x")])], Side::Left).is_err());
        assert!(tree
            .add(&[frame(&[(0, 1, 0, "total"), (2, 1, 1, "x")])], Side::Right)
            .is_err());
    }
}
