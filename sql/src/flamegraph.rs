//! `flamegraph(profile_type, selector, start, end [, max_nodes])`: Grafana's
//! flame graph frame (`level`, `value`, `self`, `label`, depth-first).
//!
//! The plan: scan the samples of the datasets the metastore picks, filter by
//! type, time and series, aggregate `sum(value)` by stack id (a DataFusion
//! aggregate), then [`FlameGraphExec`] folds the sums up the stack tree.

use std::fmt;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, Int64Builder, RecordBatch, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt64Type};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{plan_err, DataFusionError, ScalarValue};
use datafusion::datasource::provider_as_source;
use datafusion::error::Result;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::TaskContext;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::logical_expr::{col, Expr, LogicalPlanBuilder, TableType};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    execute_stream, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PhysicalExpr,
    PlanProperties, SendableRecordBatchStream,
};
use ember_engine::block::Section;
use ember_engine::selector::Selector;
use ember_metastore::DatasetRef;
use futures::{StreamExt, TryStreamExt};

use crate::args;
use crate::selection::ProfileSelection;
use crate::settings::Settings;
use crate::stack_dictionary::{
    self, read_stacks_section, Nodes, StackDictionary, TenantNodes, ROOT_SLOT,
};
use crate::stack_totals::DatasetTotals;
use crate::storage::Storage;
use crate::tables::{DatasetSource, SectionTable};

pub const DEFAULT_MAX_NODES: usize = 16384;
/// Summed value per leaf stack id.
pub type StackValues = foldhash::HashMap<u64, i64>;

/// The stack nodes of `profiles` and their leaves' summed values, as a
/// flame graph reads them from the blocks the profiles would make.
pub fn stack_tree(profiles: &[ember_engine::Profile]) -> (Nodes, StackValues) {
    let mut nodes = Nodes::default();
    let mut values = StackValues::default();
    for p in profiles {
        for s in &p.samples {
            let mut parent = ember_engine::stack::ROOT;
            for f in p.stack(s) {
                let name = p.functions.get(*f as usize).unwrap_or("");
                let id = ember_engine::stack::node_id(parent, name);
                nodes.insert(id, parent, name);
                parent = id;
            }
            *values.entry(parent).or_default() += s.value;
        }
    }
    (nodes, values)
}

/// Deeper stacks than any runtime records: only a cycle gets there.
const MAX_DEPTH: usize = 1 << 16;
const NAME: &str = "flamegraph";

/// One row of a flame graph frame.
#[derive(Debug, Clone, Copy)]
pub struct FrameRow<'a> {
    pub depth: usize,
    pub total: i64,
    pub own: i64,
    pub label: &'a str,
    /// The label's number, first seen first, when the rows come straight
    /// from the tree (a frame read back has only the text).
    pub name: Option<u32>,
}

/// Flame graph rows, depth first from one root at level 0: the frame as
/// SQL returns it, or the tree the frame is built from (the query API lays
/// out its answer from the tree, without the frame in between).
#[derive(Clone, Copy)]
pub enum Frame<'a> {
    Batches(&'a [RecordBatch]),
    Tree(&'a FlameTree<'a>),
}

impl<'a> Frame<'a> {
    /// Calls `f` on each row.
    pub fn for_each_row(
        self,
        f: impl FnMut(FrameRow<'a>) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        match self {
            Frame::Batches(batches) => for_each_frame_row(batches, f),
            Frame::Tree(tree) => tree.for_each_row(f),
        }
    }
}

/// Calls `f` on each row of a flame graph frame (`level`, `value`, `self`,
/// `label`), checked to be depth first from one root at level 0: the one
/// reader of the frame for every layout built from it (pprof, diff, the
/// query API's levels and tree bytes, the CLI).
pub fn for_each_frame_row<'a>(
    batches: &'a [RecordBatch],
    mut f: impl FnMut(FrameRow<'a>) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let mut previous: Option<usize> = None;
    for b in batches {
        let column = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| format!("flame graph frame without {name}"))
        };
        let level = column("level")?.as_primitive::<Int64Type>();
        let value = column("value")?.as_primitive::<Int64Type>();
        let own = column("self")?.as_primitive::<Int64Type>();
        let label = column("label")?.as_string::<i32>();
        for i in 0..b.num_rows() {
            let depth = usize::try_from(level.value(i)).map_err(|e| e.to_string())?;
            let in_order = match previous {
                None => depth == 0,
                Some(p) => depth >= 1 && depth <= p + 1,
            };
            if !in_order {
                return Err(format!(
                    "a row at level {depth} is out of depth-first order"
                ));
            }
            previous = Some(depth);
            f(FrameRow {
                depth,
                total: value.value(i),
                own: own.value(i),
                label: label.value(i),
                name: None,
            })?;
        }
    }
    Ok(())
}

/// A frame of `(level, value, self, label)` rows, for tests.
#[cfg(test)]
pub(crate) fn frame_of(rows: &[(i64, i64, i64, &str)]) -> RecordBatch {
    use datafusion::arrow::array::{Int64Array, StringArray};
    RecordBatch::try_from_iter(vec![
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
    .expect("a test frame builds")
}

/// The frame Grafana's flame graph panel reads.
pub fn flame_graph_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("level", DataType::Int64, false),
            Field::new("value", DataType::Int64, false),
            Field::new("self", DataType::Int64, false),
            Field::new("label", DataType::Utf8, false),
        ]))
    })
    .clone()
}

/// Where a flame graph finds its stack nodes: the tenant's dictionary, and
/// the query's own nodes when the dictionary had no room for them. A node
/// in both is one node, and a name in both one name: each has one key,
/// the dictionary's slot or name index, else its own offset past them.
#[derive(Clone, Copy)]
pub struct NodeSources<'a> {
    pub dictionary: &'a Nodes,
    pub own: Option<&'a Nodes>,
}

impl<'a> NodeSources<'a> {
    pub fn of(dictionary: &'a Nodes) -> Self {
        Self {
            dictionary,
            own: None,
        }
    }

    /// Keys of nodes are below this.
    fn node_keys(&self) -> usize {
        self.dictionary.slots() + self.own.map_or(0, Nodes::slots)
    }

    /// Keys of names are below this.
    fn name_keys(&self) -> usize {
        self.dictionary.names() + self.own.map_or(0, Nodes::names)
    }

    /// The nodes holding `leaf`, and its slot there.
    fn find(&self, leaf: u64) -> Option<(&'a Nodes, u32)> {
        let in_dictionary = self.dictionary.slot(leaf).map(|s| (self.dictionary, s));
        in_dictionary.or_else(|| self.own.and_then(|o| Some((o, o.slot(leaf)?))))
    }

    fn is_dictionary(&self, nodes: &Nodes) -> bool {
        std::ptr::eq(nodes, self.dictionary)
    }

    fn node_key(&self, nodes: &Nodes, slot: u32) -> usize {
        if self.is_dictionary(nodes) {
            return slot as usize;
        }
        match self.dictionary.slot(nodes.id(slot)) {
            Some(s) => s as usize,
            None => self.dictionary.slots() + slot as usize,
        }
    }

    fn name_key(&self, nodes: &Nodes, name: u32, text: &str) -> usize {
        if self.is_dictionary(nodes) {
            return name as usize;
        }
        match self.dictionary.name_index(text) {
            Some(n) => n as usize,
            None => self.dictionary.names() + name as usize,
        }
    }
}

/// A number per key, for keys below a known bound: an array while the
/// bound is within a small multiple of the keys expected (an index the
/// size of a large dictionary would cost more to clear than hashing the few
/// keys a small query uses), a hash map beyond.
enum KeyNumbers {
    Dense(Vec<u32>),
    Sparse(foldhash::HashMap<usize, u32>),
}

impl KeyNumbers {
    const NONE: u32 = u32::MAX;

    fn new(bound: usize, expected: usize) -> Self {
        if bound <= expected.max(4096).saturating_mul(16) {
            KeyNumbers::Dense(vec![Self::NONE; bound])
        } else {
            KeyNumbers::Sparse(foldhash::HashMap::with_capacity_and_hasher(
                expected,
                Default::default(),
            ))
        }
    }

    fn get(&self, key: usize) -> Option<u32> {
        match self {
            KeyNumbers::Dense(v) => v.get(key).copied().filter(|&n| n != Self::NONE),
            KeyNumbers::Sparse(m) => m.get(&key).copied(),
        }
    }

    fn insert(&mut self, key: usize, number: u32) {
        match self {
            KeyNumbers::Dense(v) => {
                if let Some(n) = v.get_mut(key) {
                    *n = number;
                }
            }
            KeyNumbers::Sparse(m) => {
                m.insert(key, number);
            }
        }
    }
}

/// The key of a label the tree adds itself (the root, `other`).
const ADDED: usize = usize::MAX;

/// The nodes that carry value, numbered so that a parent's index is below
/// its children's: a dictionary lookup per leaf, then slots up its stack,
/// then dense arrays.
struct DenseTree<'a> {
    names: Vec<&'a str>,
    /// Each node's name key (see [`NodeSources`]).
    name_keys: Vec<usize>,
    parent: Vec<u32>,
    own: Vec<i64>,
    total: Vec<i64>,
}

impl<'a> DenseTree<'a> {
    /// The tree of `values`' leaves. A node's ancestors are in the nodes
    /// that hold it (a stacks section holds whole paths), so a walk up a
    /// stack stays in one source.
    fn build(sources: NodeSources<'a>, values: &StackValues) -> Result<Self> {
        let expected = values.len().saturating_mul(2);
        // Node key -> this tree's index.
        let mut index = KeyNumbers::new(sources.node_keys(), expected);
        index.insert(ROOT_SLOT as usize, 0);
        let mut tree = DenseTree {
            names: Vec::with_capacity(expected),
            name_keys: Vec::with_capacity(expected),
            parent: Vec::with_capacity(expected),
            own: Vec::with_capacity(expected),
            total: Vec::new(),
        };
        tree.names.push(ADDED_LABELS[0]);
        tree.name_keys.push(ADDED);
        tree.parent.push(0);
        tree.own.push(0);
        let missing = |id: u64| {
            DataFusionError::Execution(format!("stack node {id:#x} missing from the stack tree"))
        };
        // The new nodes of a leaf's stack, leaf first, up to a known one:
        // (node key, name key, name).
        let mut chain: Vec<(usize, usize, &'a str)> = Vec::new();
        for (&leaf, &v) in values {
            let Some((nodes, mut slot)) = sources.find(leaf) else {
                return Err(missing(leaf));
            };
            chain.clear();
            let known = loop {
                let key = sources.node_key(nodes, slot);
                if let Some(i) = index.get(key) {
                    break i;
                }
                let Some((parent, name, text)) = nodes.node(slot) else {
                    return Err(missing(leaf));
                };
                if chain.len() > MAX_DEPTH {
                    return Err(DataFusionError::Execution(
                        "stack deeper than 65536 frames: a cycle in the stack tree".into(),
                    ));
                }
                chain.push((key, sources.name_key(nodes, name, text), text));
                slot = parent;
            };
            // Each new node's parent is the one numbered just before it.
            let mut at = known;
            for &(key, name_key, name) in chain.iter().rev() {
                let i = tree.names.len() as u32;
                index.insert(key, i);
                tree.parent.push(at);
                tree.names.push(name);
                tree.name_keys.push(name_key);
                tree.own.push(0);
                at = i;
            }
            let own = &mut tree.own[at as usize];
            *own = own.saturating_add(v);
        }
        tree.total = tree.own.clone();
        for i in (1..tree.names.len()).rev() {
            let p = tree.parent[i] as usize;
            tree.total[p] = tree.total[p].saturating_add(tree.total[i]);
        }
        Ok(tree)
    }

    /// Children of every node, sorted by name: `list[start[i]..start[i + 1]]`
    /// are node `i`'s (one allocation, not one per node).
    fn children(&self) -> Children {
        let n = self.names.len();
        let mut start = vec![0u32; n + 1];
        for i in 1..n {
            start[self.parent[i] as usize + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut next = start.clone();
        let mut list = vec![0u32; n.saturating_sub(1)];
        for i in 1..n {
            let p = self.parent[i] as usize;
            list[next[p] as usize] = i as u32;
            next[p] += 1;
        }
        for i in 0..n {
            let kids = &mut list[start[i] as usize..start[i + 1] as usize];
            if kids.len() > 1 {
                kids.sort_unstable_by(|a, b| {
                    self.names[*a as usize]
                        .cmp(self.names[*b as usize])
                        .then(a.cmp(b))
                });
            }
        }
        Children { start, list }
    }
}

struct Children {
    start: Vec<u32>,
    list: Vec<u32>,
}

impl Children {
    fn of(&self, i: usize) -> &[u32] {
        &self.list[self.start[i] as usize..self.start[i + 1] as usize]
    }
}

/// Numbers labels in the order first seen, by name key (see
/// [`NodeSources`]: one key per distinct name). Only the labels the tree
/// adds itself (`total`, `other`), and names that read the same, are
/// matched by text.
struct NameNumbers {
    by_key: KeyNumbers,
    added: [Option<u32>; 2],
    next: u32,
}

impl NameNumbers {
    fn new(keys: usize, rows: usize) -> Self {
        Self {
            by_key: KeyNumbers::new(keys, rows),
            added: [None; 2],
            next: 0,
        }
    }

    fn number(&mut self, key: usize, label: &str) -> u32 {
        if let Some(n) = self.by_key.get(key) {
            return n;
        }
        let next = self.next;
        let n = match ADDED_LABELS.iter().position(|a| *a == label) {
            Some(a) => *self.added[a].get_or_insert(next),
            None => next,
        };
        if n == next {
            self.next += 1;
        }
        if key != ADDED {
            self.by_key.insert(key, n);
        }
        n
    }
}

/// The labels the tree adds: the root, and the fold of small nodes.
const ADDED_LABELS: [&str; 2] = ["total", "other"];

/// Per-stack values folded up the tree, ready to be laid out depth-first,
/// children by name, nodes smaller than the `max_nodes`-th largest folded
/// into one `other` child per parent (as Pyroscope truncates).
pub struct FlameTree<'a> {
    tree: DenseTree<'a>,
    /// Name keys are below this.
    name_keys: usize,
    children: Children,
    threshold: i64,
    max_nodes: usize,
}

impl<'a> FlameTree<'a> {
    pub fn build(sources: NodeSources<'a>, values: &StackValues, max_nodes: usize) -> Result<Self> {
        let tree = DenseTree::build(sources, values)?;
        let threshold = min_value(&tree.total, max_nodes);
        let children = tree.children();
        Ok(Self {
            tree,
            name_keys: sources.name_keys(),
            children,
            threshold,
            max_nodes,
        })
    }

    /// Calls `f` on each row, depth first, children by name, each name
    /// numbered in the order first seen.
    pub fn for_each_row(
        &self,
        mut f: impl FnMut(FrameRow<'a>) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        let rows = self.tree.names.len().min(self.max_nodes.saturating_mul(2));
        let mut names = NameNumbers::new(self.name_keys, rows);
        self.walk(|mut row, node| {
            let key = node.map_or(ADDED, |i| self.tree.name_keys[i]);
            row.name = Some(names.number(key, row.label));
            f(row)
        })
    }

    /// The rows depth first, children by name, without name numbers, each
    /// with its node (none for an `other` row).
    fn walk<E>(
        &self,
        mut f: impl FnMut(FrameRow<'a>, Option<usize>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let tree = &self.tree;
        // (node, level, value of an `other` entry when node is None)
        let mut todo: Vec<(Option<u32>, usize, i64)> = vec![(Some(0), 0, 0)];
        while let Some((node, depth, other_value)) = todo.pop() {
            let Some(i) = node else {
                let row = FrameRow {
                    depth,
                    total: other_value,
                    own: other_value,
                    label: ADDED_LABELS[1],
                    name: None,
                };
                f(row, None)?;
                continue;
            };
            let i = i as usize;
            let row = FrameRow {
                depth,
                total: tree.total[i],
                own: tree.own[i],
                label: tree.names[i],
                name: None,
            };
            f(row, Some(i))?;
            let kids = self.children.of(i);
            let other = kids
                .iter()
                .map(|&k| tree.total[k as usize])
                .filter(|&t| t < self.threshold)
                .fold(0i64, i64::saturating_add);
            if other > 0 {
                todo.push((None, depth + 1, other));
            }
            // Pushed in reverse so that they pop in name order.
            for &k in kids.iter().rev() {
                if tree.total[k as usize] >= self.threshold {
                    todo.push((Some(k), depth + 1, 0));
                }
            }
        }
        Ok(())
    }

    /// The rows as the frame SQL returns (`level`, `value`, `self`, `label`).
    pub fn frame(&self) -> Result<RecordBatch> {
        let names = &self.tree.names;
        let rows = names.len().min(self.max_nodes.saturating_mul(2));
        let label_bytes = names.iter().map(|n| n.len()).sum::<usize>();
        let mut level = Int64Builder::with_capacity(rows);
        let mut value = Int64Builder::with_capacity(rows);
        let mut self_ = Int64Builder::with_capacity(rows);
        let mut label = StringBuilder::with_capacity(rows, label_bytes);
        self.walk(|row, _| {
            level.append_value(row.depth as i64);
            value.append_value(row.total);
            self_.append_value(row.own);
            label.append_value(row.label);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|never| match never {});
        let columns: Vec<ArrayRef> = vec![
            Arc::new(level.finish()),
            Arc::new(value.finish()),
            Arc::new(self_.finish()),
            Arc::new(label.finish()),
        ];
        Ok(RecordBatch::try_new(flame_graph_schema(), columns)?)
    }
}

/// The flame graph frame of per-stack values.
pub fn build_flame_graph(
    sources: NodeSources<'_>,
    values: &StackValues,
    max_nodes: usize,
) -> Result<RecordBatch> {
    FlameTree::build(sources, values, max_nodes)?.frame()
}

/// The total of the `max_nodes`-th largest node: smaller nodes are folded.
fn min_value(total: &[i64], max_nodes: usize) -> i64 {
    if total.len() <= max_nodes {
        return i64::MIN;
    }
    let mut values = total.to_vec();
    let (_, nth, _) = values.select_nth_unstable_by(max_nodes - 1, |a, b| b.cmp(a));
    *nth
}

/// Most span ids one span flame graph may name.
pub const MAX_SPAN_IDS: usize = 10_000;
const SPAN_NAME: &str = "span_flamegraph";

/// The table function, bound to the session's tenant: `flamegraph(...)`,
/// or `span_flamegraph(...)`, which also takes the span ids (hex, comma
/// separated) whose samples it keeps.
pub struct FlameGraphFunction {
    storage: Storage,
    tenant: String,
    of_spans: bool,
}

impl fmt::Debug for FlameGraphFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlameGraphFunction({})", self.tenant)
    }
}

impl FlameGraphFunction {
    pub(crate) fn new(storage: Storage, tenant: String) -> Self {
        Self {
            storage,
            tenant,
            of_spans: false,
        }
    }

    pub(crate) fn of_spans(storage: Storage, tenant: String) -> Self {
        Self {
            storage,
            tenant,
            of_spans: true,
        }
    }
}

impl TableFunctionImpl for FlameGraphFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let query = if self.of_spans {
            FlameGraphQuery::of_spans_from_args(&args, &self.tenant)?
        } else {
            FlameGraphQuery::from_args(NAME, &args, &self.tenant)?
        };
        Ok(Arc::new(FlameGraphTable {
            storage: self.storage.clone(),
            query,
        }))
    }
}

/// The arguments of `flamegraph()`, or of `span_flamegraph()` when it
/// names spans, for a caller that runs a flame graph without SQL around it.
#[derive(Debug, Clone)]
pub struct FlameGraphCall {
    pub profile_type: String,
    pub selector: String,
    /// Epoch milliseconds.
    pub start: i64,
    pub end: i64,
    pub max_nodes: i64,
    /// Span ids, hex, comma separated.
    pub spans: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct FlameGraphQuery {
    pub selection: ProfileSelection,
    pub max_nodes: usize,
    /// Only the samples of these spans (None: every sample).
    pub spans: Option<Vec<u64>>,
}

impl FlameGraphQuery {
    /// The query of a typed call from a front end: `flamegraph`, or
    /// `span_flamegraph` when the call names spans.
    pub(crate) fn of_call(call: FlameGraphCall, tenant: &str) -> Result<Self> {
        let function = if call.spans.is_some() {
            SPAN_NAME
        } else {
            NAME
        };
        let max_nodes = usize::try_from(call.max_nodes).ok().filter(|n| *n > 0);
        let Some(max_nodes) = max_nodes else {
            return plan_err!(
                "{function}: max_nodes must be a positive integer, got {}",
                call.max_nodes
            );
        };
        Self::checked(
            function,
            tenant,
            call.profile_type,
            &call.selector,
            (
                call.start.saturating_mul(1_000_000),
                call.end.saturating_mul(1_000_000),
            ),
            max_nodes,
            call.spans.as_deref(),
        )
    }

    /// The one place a flame graph's arguments are checked, whether they
    /// come from SQL or from a typed call. Times in nanoseconds.
    pub(crate) fn checked(
        function: &str,
        tenant: &str,
        profile_type: String,
        selector: &str,
        (start, end): (i64, i64),
        max_nodes: usize,
        spans: Option<&str>,
    ) -> Result<Self> {
        let selector = Selector::parse(selector)
            .map_err(|e| DataFusionError::Plan(format!("{function}: {e}")))?;
        let spans = spans
            .map(parse_span_ids)
            .transpose()
            .map_err(|e| DataFusionError::Plan(format!("{function}: {e}")))?;
        Ok(Self {
            selection: ProfileSelection {
                tenant: tenant.to_string(),
                profile_type,
                selector,
                start,
                end,
            },
            max_nodes,
            spans,
        })
    }

    /// `function(profile_type, selector, start, end [, max_nodes])`.
    pub(crate) fn from_args(
        function: &str,
        args: &TableFunctionArgs,
        tenant: &str,
    ) -> Result<Self> {
        let values = args::literals(function, args.exprs(), args.session())?;
        if !(4..=5).contains(&values.len()) {
            return plan_err!("{function}(profile_type, selector, start, end [, max_nodes]) takes 4 or 5 arguments, got {}", values.len());
        }
        Self::of_values(function, &values, None, tenant)
    }

    /// `span_flamegraph(profile_type, selector, start, end, span_ids
    /// [, max_nodes])`.
    fn of_spans_from_args(args: &TableFunctionArgs, tenant: &str) -> Result<Self> {
        let mut values = args::literals(SPAN_NAME, args.exprs(), args.session())?;
        if !(5..=6).contains(&values.len()) {
            return plan_err!("{SPAN_NAME}(profile_type, selector, start, end, span_ids [, max_nodes]) takes 5 or 6 arguments, got {}", values.len());
        }
        let spans = args::string_arg(SPAN_NAME, "span_ids", &values.remove(4))?;
        Self::of_values(SPAN_NAME, &values, Some(&spans), tenant)
    }

    /// `(profile_type, selector, start, end [, max_nodes])` as literals.
    fn of_values(
        function: &str,
        values: &[ScalarValue],
        spans: Option<&str>,
        tenant: &str,
    ) -> Result<Self> {
        let max_nodes = match values.get(4) {
            Some(v) => args::count_arg(function, "max_nodes", v)?,
            None => DEFAULT_MAX_NODES,
        };
        Self::checked(
            function,
            tenant,
            args::string_arg(function, "profile_type", &values[0])?,
            &args::string_arg(function, "selector", &values[1])?,
            (
                args::time_arg(function, "start", &values[2])?,
                args::time_arg(function, "end", &values[3])?,
            ),
            max_nodes,
            spans,
        )
    }
}

/// Span ids as Pyroscope's span selector gives them: 16 hex digits each.
pub fn parse_span_ids(text: &str) -> std::result::Result<Vec<u64>, String> {
    let ids: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if ids.len() > MAX_SPAN_IDS {
        return Err(format!("{} span ids is over {MAX_SPAN_IDS}", ids.len()));
    }
    ids.iter()
        .map(|id| {
            if id.len() > 16 {
                return Err(format!("span id {id:?} is longer than 16 hex digits"));
            }
            u64::from_str_radix(id, 16).map_err(|_| format!("span id {id:?} is not hex"))
        })
        .collect()
}

pub(crate) struct FlameGraphTable {
    pub storage: Storage,
    pub query: FlameGraphQuery,
}

impl fmt::Debug for FlameGraphTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlameGraphTable({:?})", self.query)
    }
}

#[async_trait]
impl TableProvider for FlameGraphTable {
    fn schema(&self) -> SchemaRef {
        flame_graph_schema()
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
        Ok(Arc::new(self.plan(state, projection.cloned()).await?))
    }
}

impl FlameGraphTable {
    /// The plan of the flame graph: the datasets the metastore picks, those
    /// taken in part summed by stack through a DataFusion aggregate.
    pub(crate) async fn plan(
        &self,
        state: &dyn Session,
        projection: Option<Vec<usize>>,
    ) -> Result<FlameGraphExec> {
        let q = &self.query;
        let datasets = q
            .selection
            .datasets(self.storage.index.as_ref(), Settings::of(state).skip_level0)
            .await?;
        let (whole, partial): (Vec<DatasetRef>, Vec<DatasetRef>) =
            datasets.iter().cloned().partition(|d| reads_whole(q, d));
        // Taken whole, a compacted range needs no aggregate to plan or run.
        let sums: Arc<dyn ExecutionPlan> = if partial.is_empty() {
            Arc::new(EmptyExec::new(sums_schema()))
        } else {
            let plan = samples_input(&self.storage, q, partial)?
                .aggregate(
                    vec![col("stack_id")],
                    vec![sum(col("value")).alias("value")],
                )?
                .build()?;
            state.create_physical_plan(&plan).await?
        };
        let tenant_nodes = self.storage.stacks.tenant(&q.selection.tenant);
        let missing = StackDictionary::missing(&tenant_nodes, &datasets);
        let reads = DirectReads {
            storage: self.storage.clone(),
            tenant: q.selection.tenant.clone(),
            tenant_nodes,
            missing,
            profile_type: q.selection.profile_type.clone(),
            whole,
        };
        Ok(FlameGraphExec::new(
            sums,
            Arc::new(reads),
            q.max_nodes,
            projection,
        ))
    }
}

/// What [`FlameGraphExec`] reads from its first child.
fn sums_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("stack_id", DataType::UInt64, true),
        Field::new("value", DataType::Int64, true),
    ]))
}

/// What a flame graph reads straight from its sections rather than through
/// a DataFusion scan: the stack nodes of the datasets its tenant's
/// dictionary lacks, and the cached totals of the datasets it takes whole.
struct DirectReads {
    storage: Storage,
    /// The query's tenant and its dictionary, held from planning on.
    tenant: String,
    tenant_nodes: TenantNodes,
    /// The datasets whose stack nodes are not in the dictionary.
    missing: Vec<DatasetRef>,
    profile_type: String,
    /// The datasets taken whole.
    whole: Vec<DatasetRef>,
}

/// Stacks sections read at once: enough that a day of compacted blocks is
/// a few round trips to a cloud bucket, few enough that a backlog of
/// thousands of level-0 datasets is never in memory at once.
const STACKS_READS_IN_FLIGHT: usize = 32;

impl DirectReads {
    /// The stack nodes of the missing datasets, read from their stacks
    /// sections. Level-0 blocks repeat the nodes of their profiles: only
    /// nodes not seen yet in this query cost memory, so a flame graph over a
    /// thousand blocks of one service costs its distinct stacks once.
    async fn stack_nodes(&self, grow: &mut impl FnMut(usize) -> Result<()>) -> Result<Nodes> {
        let mut nodes = Nodes::default();
        let reads = self.missing.iter().cloned().map(|d| {
            let store = self.storage.store.clone();
            async move { read_stacks_section(store, &d).await }
        });
        let mut sections = futures::stream::iter(reads).buffered(STACKS_READS_IN_FLIGHT);
        while let Some(batches) = sections.next().await {
            for batch in batches? {
                let before = nodes.bytes();
                nodes.insert_batch(&batch)?;
                grow(nodes.bytes() - before)?;
            }
        }
        Ok(nodes)
    }

    /// Adds every whole dataset's totals of the profile type to `values`.
    async fn add_totals(
        &self,
        values: &mut StackValues,
        grow: &mut impl FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let storage = &self.storage;
        // 32 datasets at a time: reads in parallel, and a backlog of
        // thousands of level-0 datasets never holds all their totals at once.
        for chunk in self.whole.chunks(32) {
            // Owned futures: a stream borrowing `self` would not be `Send`.
            let reads = chunk.iter().cloned().map(|d| {
                let storage = storage.clone();
                async move { storage.totals.totals(storage.store.clone(), &d).await }
            });
            let totals: Vec<Arc<DatasetTotals>> = futures::stream::iter(reads)
                .buffer_unordered(32)
                .try_collect()
                .await?;
            let lists: Vec<&Vec<(u64, i64)>> = totals
                .iter()
                .filter_map(|t| t.get(&self.profile_type))
                .collect();
            // Sized once per chunk: growing the map list by list rehashed it
            // several times per query.
            let entries: usize = lists.iter().map(|l| l.len()).sum();
            grow(entries * 24)?;
            values.reserve(entries);
            for list in lists {
                for &(id, v) in list {
                    let slot = values.entry(id).or_default();
                    *slot = slot.saturating_add(v);
                }
            }
        }
        Ok(())
    }
}

/// A dataset that the query takes whole (its whole time range, every one of
/// its series) is read from its per-stack totals, not its samples.
fn reads_whole(q: &FlameGraphQuery, d: &DatasetRef) -> bool {
    let spans = &q.spans;
    let q = &q.selection;
    spans.is_none()
        && d.dataset.section(Section::Totals).is_some()
        && d.dataset.min_time >= q.start
        && d.dataset.max_time <= q.end
        && d.dataset
            .series
            .iter()
            .all(|s| q.selector.matches_series(s))
}

/// `(stack_id, value)` from the samples of datasets the query takes in part.
fn samples_input(
    storage: &Storage,
    q: &FlameGraphQuery,
    datasets: Vec<DatasetRef>,
) -> Result<LogicalPlanBuilder> {
    let mut filter = q.selection.row_filter(&datasets);
    if let Some(spans) = &q.spans {
        let ids = spans
            .iter()
            .map(|id| datafusion::logical_expr::lit(*id))
            .collect();
        let of_spans = col("span_id").in_list(ids, false);
        filter = Some(match filter {
            Some(f) => f.and(of_spans),
            None => of_spans,
        });
    }
    let table = SectionTable::new(
        Section::Samples,
        storage.store.clone(),
        DatasetSource::Fixed(Arc::new(datasets)),
    );
    let mut plan = LogicalPlanBuilder::scan("samples", provider_as_source(Arc::new(table)), None)?;
    if let Some(filter) = filter {
        plan = plan.filter(filter)?;
    }
    plan.project(vec![col("stack_id"), col("value")])
}

/// Folds the `(stack_id, value)` sums of its child and the totals of the
/// datasets taken whole up the stack tree, and emits the flame graph frame
/// in one partition.
pub struct FlameGraphExec {
    sums: Arc<dyn ExecutionPlan>,
    reads: Arc<DirectReads>,
    max_nodes: usize,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl FlameGraphExec {
    fn new(
        sums: Arc<dyn ExecutionPlan>,
        reads: Arc<DirectReads>,
        max_nodes: usize,
        projection: Option<Vec<usize>>,
    ) -> Self {
        let full = flame_graph_schema();
        let schema = match &projection {
            Some(p) => Arc::new(full.project(p).unwrap_or_else(|_| full.as_ref().clone())),
            None => full,
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            sums,
            reads,
            max_nodes,
            projection,
            schema,
            properties,
        }
    }
}

impl FlameGraphExec {
    /// Runs the plan and hands its tree to `f` (the query API's layout;
    /// SQL's `execute` builds the frame from the same fold).
    pub(crate) async fn run<R>(
        &self,
        context: Arc<TaskContext>,
        f: impl FnOnce(&FlameTree<'_>) -> R + Send,
    ) -> Result<R> {
        let (sums, reads) = (self.sums.clone(), self.reads.clone());
        Self::fold(sums, reads, self.max_nodes, context, |tree| Ok(f(tree))).await
    }

    /// Folds the sums of `sums` and the totals `reads` finds into the tree.
    async fn fold<R>(
        sums: Arc<dyn ExecutionPlan>,
        reads: Arc<DirectReads>,
        max_nodes: usize,
        context: Arc<TaskContext>,
        f: impl FnOnce(&FlameTree<'_>) -> Result<R> + Send,
    ) -> Result<R> {
        let reservation = MemoryConsumer::new("FlameGraphExec").register(context.memory_pool());
        let (sums_reservation, totals_reservation) =
            (reservation.new_empty(), reservation.new_empty());
        let mut grow = |bytes: usize| reservation.try_grow(bytes);
        let mut grow_sums = |bytes: usize| sums_reservation.try_grow(bytes);
        let mut grow_totals = |bytes: usize| totals_reservation.try_grow(bytes);
        // The three reads wait on the store, not on each other: together, a
        // cold query pays the longest of their round trips, not their sum.
        let mut totals = StackValues::default();
        let (read, sums, added) = futures::join!(
            reads.stack_nodes(&mut grow),
            read_sums(sums, context, &mut grow_sums),
            reads.add_totals(&mut totals, &mut grow_totals),
        );
        let (read, sums) = (read?, sums?);
        added?;
        // Kept nodes are the dictionary's memory, not this query's.
        let local =
            reads
                .storage
                .stacks
                .offer(&reads.tenant, &reads.tenant_nodes, &reads.missing, read);
        if local.is_none() {
            reservation.free();
        }
        let values = merged(sums, totals);
        // The read guard covers the layout `f` too, since the tree borrows
        // the dictionary's names: a few milliseconds for the largest answers,
        // during which another query's `offer` waits to add its nodes.
        let global = stack_dictionary::read(&reads.tenant_nodes);
        let sources = NodeSources {
            dictionary: &global,
            own: local.as_ref(),
        };
        f(&FlameTree::build(sources, &values, max_nodes)?)
    }
}

impl fmt::Debug for FlameGraphExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlameGraphExec(max_nodes={})", self.max_nodes)
    }
}

impl DisplayAs for FlameGraphExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FlameGraphExec: max_nodes={}", self.max_nodes)
    }
}

/// The sums of `a` and `b`, the smaller added into the larger.
fn merged(a: StackValues, b: StackValues) -> StackValues {
    let (mut into, from) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (id, v) in from {
        let slot = into.entry(id).or_default();
        *slot = slot.saturating_add(v);
    }
    into
}

async fn read_sums(
    plan: Arc<dyn ExecutionPlan>,
    ctx: Arc<TaskContext>,
    grow: &mut impl FnMut(usize) -> Result<()>,
) -> Result<StackValues> {
    let mut sums = StackValues::default();
    let mut stream = execute_stream(plan, ctx)?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        grow(batch.num_rows() * 24)?;
        let ids = batch.column(0).as_primitive::<UInt64Type>();
        let values: &Int64Array = batch.column(1).as_primitive::<Int64Type>();
        for i in 0..batch.num_rows() {
            if values.is_valid(i) {
                let slot = sums.entry(ids.value(i)).or_default();
                *slot = slot.saturating_add(values.value(i));
            }
        }
    }
    Ok(sums)
}

impl ExecutionPlan for FlameGraphExec {
    fn name(&self) -> &str {
        "FlameGraphExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.sums]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let [sums]: [Arc<dyn ExecutionPlan>; 1] = children
            .try_into()
            .map_err(|_| DataFusionError::Internal("FlameGraphExec takes one child".into()))?;
        Ok(Arc::new(FlameGraphExec::new(
            sums,
            self.reads.clone(),
            self.max_nodes,
            self.projection.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "FlameGraphExec has one partition, not {partition}"
            )));
        }
        let (sums, reads, max_nodes, projection) = (
            self.sums.clone(),
            self.reads.clone(),
            self.max_nodes,
            self.projection.clone(),
        );
        let fut = async move {
            let frame = Self::fold(sums, reads, max_nodes, context, |tree| tree.frame()).await?;
            match projection {
                Some(p) => Ok(frame.project(&p)?),
                None => Ok(frame),
            }
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::once(fut),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_engine::stack::{node_id, ROOT};

    /// Nodes and leaf values of `stacks` (`a;b;c` -> value).
    fn tree(stacks: &[(&str, i64)]) -> (Nodes, StackValues) {
        let mut nodes = Nodes::default();
        let mut values = StackValues::default();
        for (stack, v) in stacks {
            let mut parent = ROOT;
            for f in stack.split(';') {
                let id = node_id(parent, f);
                nodes.insert(id, parent, f);
                parent = id;
            }
            *values.entry(parent).or_default() += v;
        }
        (nodes, values)
    }

    fn rows(b: &RecordBatch) -> Vec<(i64, i64, i64, String)> {
        let level = b.column(0).as_primitive::<Int64Type>();
        let value = b.column(1).as_primitive::<Int64Type>();
        let own = b.column(2).as_primitive::<Int64Type>();
        let label = b.column(3).as_string::<i32>();
        (0..b.num_rows())
            .map(|i| {
                (
                    level.value(i),
                    value.value(i),
                    own.value(i),
                    label.value(i).to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn folds_values_up_depth_first() {
        let (nodes, values) = tree(&[("main;a;x", 3), ("main;a", 2), ("main;b", 5), ("gc", 1)]);
        let got = rows(&build_flame_graph(NodeSources::of(&nodes), &values, 100).unwrap());
        let want = vec![
            (0, 11, 0, "total"),
            (1, 1, 1, "gc"),
            (1, 10, 0, "main"),
            (2, 5, 2, "a"),
            (3, 3, 3, "x"),
            (2, 5, 5, "b"),
        ];
        let want: Vec<_> = want
            .into_iter()
            .map(|(a, b, c, d)| (a, b, c, d.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn truncates_small_nodes_into_other() {
        let (nodes, values) = tree(&[
            ("main;big", 100),
            ("main;s1", 1),
            ("main;s2", 2),
            ("main;mid", 50),
        ]);
        // total, main, big, mid kept: the 4th largest is 50.
        let got = rows(&build_flame_graph(NodeSources::of(&nodes), &values, 4).unwrap());
        let labels: Vec<&str> = got.iter().map(|r| r.3.as_str()).collect();
        assert_eq!(labels, ["total", "main", "big", "mid", "other"]);
        assert_eq!(got[4], (2, 3, 3, "other".to_string()));
        assert_eq!(got[0].1, 153);
    }

    #[test]
    fn sums_near_the_limit_saturate_instead_of_wrapping() {
        let (nodes, values) = tree(&[("main;a", i64::MAX - 1), ("main;b", 5), ("gc", i64::MAX)]);
        let got = rows(&build_flame_graph(NodeSources::of(&nodes), &values, 100).unwrap());
        assert_eq!(got[0], (0, i64::MAX, 0, "total".to_string()));
        let main = got.iter().find(|r| r.3 == "main").unwrap();
        assert_eq!(main.1, i64::MAX);
        assert!(got.iter().all(|r| r.1 >= 0 && r.2 >= 0));
    }

    /// The tree's rows, checked against its frame, and each name number
    /// checked to stand for one label, numbered in the order first seen.
    fn numbered_rows(tree: &FlameTree<'_>) -> (Vec<String>, Vec<String>) {
        let mut rows = Vec::new();
        tree.for_each_row(|r| {
            rows.push((r.depth as i64, r.total, r.own, r.label.to_string(), r.name));
            Ok(())
        })
        .unwrap();
        let frame: Vec<_> = rows.iter().map(|r| (r.0, r.1, r.2, r.3.clone())).collect();
        assert_eq!(frame, self::rows(&tree.frame().unwrap()));
        let mut first_seen: Vec<String> = Vec::new();
        for (.., label, name) in &rows {
            let n = name.expect("tree rows carry numbers") as usize;
            if n == first_seen.len() {
                first_seen.push(label.clone());
            }
            assert_eq!(first_seen.get(n), Some(label), "{label} is number {n}");
        }
        let labels = rows.into_iter().map(|r| r.3).collect();
        (labels, first_seen)
    }

    #[test]
    fn tree_rows_are_the_frame_with_names_numbered_first_seen() {
        // Two dictionaries holding their own copies of the names, as a
        // query's own nodes sit beside its tenant's: one name, one number.
        let (global, mut values) = tree(&[("main;a;x", 3), ("main;b", 5), ("gc;other", 2)]);
        let (local, more) = tree(&[("main;b;a", 4), ("main;s1", 1), ("main;s2", 1)]);
        values.extend(more);
        let sources = NodeSources {
            dictionary: &global,
            own: Some(&local),
        };
        let tree = FlameTree::build(sources, &values, 8).unwrap();
        let (labels, first_seen) = numbered_rows(&tree);
        // s1 and s2 fold into `other`, which the real `gc;other` shares.
        assert_eq!(
            labels,
            ["total", "gc", "other", "main", "a", "x", "b", "a", "other"]
        );
        assert_eq!(first_seen, ["total", "gc", "other", "main", "a", "x", "b"]);
    }

    #[test]
    fn one_dictionary_numbers_its_names_and_the_added_labels_once() {
        // Real frames named like the labels the tree adds share their number.
        let (nodes, values) = tree(&[
            ("total;other", 6),
            ("main;a", 5),
            ("main;b;a", 4),
            ("main;s1", 1),
            ("main;s2", 1),
        ]);
        let tree = FlameTree::build(NodeSources::of(&nodes), &values, 7).unwrap();
        let (labels, first_seen) = numbered_rows(&tree);
        assert_eq!(
            labels,
            ["total", "main", "a", "b", "a", "other", "total", "other"]
        );
        assert_eq!(first_seen, ["total", "main", "a", "b", "other"]);
    }

    #[test]
    fn a_small_query_over_a_large_dictionary_draws_the_same_tree() {
        // Past 16 x 4096 slots and names, the tree's indices are hashed
        // rather than arrays the dictionary's size.
        let stacks = [("main;a;x", 3), ("main;b", 5), ("gc;other", 2)];
        let (small, values) = tree(&stacks);
        let (mut large, _) = tree(&stacks);
        for i in 0..70_000 {
            let name = format!("unused{i}");
            large.insert(node_id(ROOT, &name), ROOT, &name);
        }
        let (want, want_names) =
            numbered_rows(&FlameTree::build(NodeSources::of(&small), &values, 8).unwrap());
        let (got, got_names) =
            numbered_rows(&FlameTree::build(NodeSources::of(&large), &values, 8).unwrap());
        assert_eq!((got, got_names), (want, want_names));
    }

    #[test]
    fn missing_node_is_an_error_not_a_panic() {
        let (nodes, _) = tree(&[("a;b", 1)]);
        let values = StackValues::from_iter([(12345u64, 1i64)]);
        assert!(build_flame_graph(NodeSources::of(&nodes), &values, 10).is_err());
        // A node whose parent was never named.
        let mut orphan = Nodes::default();
        orphan.insert(5, 4, "orphan");
        let values = StackValues::from_iter([(5u64, 1i64)]);
        let err = build_flame_graph(NodeSources::of(&orphan), &values, 10).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
