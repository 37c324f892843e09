//! Reading keyed samples sections (level 0; see
//! `ember_engine::block::keyed_samples_schema`) as the `samples` table's
//! rows: a Parquet scan of the keys, each file tagged with its dataset, under
//! an exec that turns each batch's keys into its dataset's strings.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::expressions::col as physical_col;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalSortExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PhysicalExpr, PlanProperties,
    SendableRecordBatchStream,
};
use ember_engine::block::{
    keyed_samples_schema, keyed_source, samples_schema, DatasetStrings, Section,
};
use futures::StreamExt;

/// The partition column that tags each row with its dataset's place in
/// [`KeyedSamplesExec::strings`].
const DATASET: &str = "dataset";

/// The keyed scan's table: the keyed section's columns, then [`DATASET`].
pub fn table_schema() -> TableSchema {
    TableSchema::builder(keyed_samples_schema())
        .with_table_partition_cols(vec![Arc::new(Field::new(DATASET, DataType::UInt32, false))])
        .build()
}

/// The columns of a keyed section sorted as [`Section::sort_order`] sorts
/// the samples.
pub const SORT_ORDER: [&str; 3] = ["profile_type_key", "series_key", "time"];

/// Tags the files of keyed sections with their dataset's place.
pub fn tag(file: PartitionedFile, dataset: usize) -> PartitionedFile {
    file.with_partition_values(vec![ScalarValue::UInt32(Some(dataset as u32))])
}

/// The filters a keyed scan can prune by: those over columns it shares with
/// the samples table. A filter on a string column means nothing to keys
/// that differ per dataset; it is applied above the scan, as every filter
/// of a section scan is.
pub fn pruning_filters(filters: &[Expr]) -> Vec<Expr> {
    filters
        .iter()
        .filter(|f| {
            f.column_refs()
                .iter()
                .all(|c| keyed_source(c.name()) == Some(c.name()))
        })
        .cloned()
        .collect()
}

/// The indices of the keyed table's columns that the samples columns
/// `projection` (all of them if `None`) are read from, [`DATASET`] last.
pub fn source_projection(projection: Option<&Vec<usize>>) -> Result<Vec<usize>> {
    let keyed = keyed_samples_schema();
    let mut indices = Vec::new();
    for name in output_columns(projection)? {
        if let Some(source) = keyed_source(&name) {
            let i = keyed.index_of(source)?;
            if !indices.contains(&i) {
                indices.push(i);
            }
        }
    }
    indices.push(keyed.fields().len());
    Ok(indices)
}

fn output_columns(projection: Option<&Vec<usize>>) -> Result<Vec<String>> {
    let samples = samples_schema();
    let names = match projection {
        Some(p) => p
            .iter()
            .map(|&i| {
                samples
                    .fields()
                    .get(i)
                    .map(|f| f.name().clone())
                    .ok_or_else(|| DataFusionError::Internal(format!("samples has no column {i}")))
            })
            .collect::<Result<_>>()?,
        None => samples.fields().iter().map(|f| f.name().clone()).collect(),
    };
    Ok(names)
}

/// The `samples` rows of keyed sections: `input` scans the keys (in
/// [`source_projection`]'s columns), this turns each batch's keys into the
/// strings of the batch's dataset.
pub struct KeyedSamplesExec {
    input: Arc<dyn ExecutionPlan>,
    strings: Arc<Vec<DatasetStrings>>,
    columns: Vec<String>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl KeyedSamplesExec {
    /// `sorted`: each of `input`'s partitions is one section, sorted by
    /// [`SORT_ORDER`], so this one's are sorted by the samples' order.
    pub fn new(
        input: Arc<dyn ExecutionPlan>,
        strings: Arc<Vec<DatasetStrings>>,
        projection: Option<&Vec<usize>>,
        sorted: bool,
    ) -> Result<Self> {
        let columns = output_columns(projection)?;
        let samples = samples_schema();
        let fields: Vec<Field> = columns
            .iter()
            .map(|c| Ok(samples.field_with_name(c)?.clone()))
            .collect::<Result<_>>()?;
        let schema = Arc::new(Schema::new(fields));
        Ok(Self::with_columns(input, strings, columns, schema, sorted))
    }

    fn with_columns(
        input: Arc<dyn ExecutionPlan>,
        strings: Arc<Vec<DatasetStrings>>,
        columns: Vec<String>,
        schema: SchemaRef,
        sorted: bool,
    ) -> Self {
        let mut equivalence = EquivalenceProperties::new(schema.clone());
        if sorted {
            // The longest prefix of the order that the output keeps.
            let order: Vec<PhysicalSortExpr> = Section::Samples
                .sort_order()
                .iter()
                .map_while(|c| physical_col(c, &schema).ok())
                .map(PhysicalSortExpr::new_default)
                .collect();
            if !order.is_empty() {
                equivalence = EquivalenceProperties::new_with_orderings(schema.clone(), [order]);
            }
        }
        let properties = Arc::new(PlanProperties::new(
            equivalence,
            Partitioning::UnknownPartitioning(input.properties().partitioning.partition_count()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            input,
            strings,
            columns,
            schema,
            properties,
        }
    }

    fn sorted(&self) -> bool {
        self.properties.output_ordering().is_some()
    }
}

/// A keyed batch's rows as the samples columns `columns`.
fn samples_of(
    batch: &RecordBatch,
    strings: &[DatasetStrings],
    columns: &[String],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let strings = batch_dataset(batch)
        .and_then(|d| strings.get(d))
        .ok_or_else(|| DataFusionError::Internal("keyed samples without their dataset".into()))?;
    let arrays = columns
        .iter()
        .map(|c| strings.column(c, batch))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        arrays,
        &options,
    )?)
}

/// The dataset every row of `batch` is of; `None` for rows of several
/// (the scan reads a file's rows into batches of their own).
fn batch_dataset(batch: &RecordBatch) -> Option<usize> {
    let tags = batch
        .column_by_name(DATASET)?
        .as_primitive_opt::<UInt32Type>()?;
    if tags.null_count() > 0 {
        return None;
    }
    let first = *tags.values().first().unwrap_or(&0);
    tags.values()
        .iter()
        .all(|&t| t == first)
        .then_some(first as usize)
}

impl fmt::Debug for KeyedSamplesExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyedSamplesExec({} datasets)", self.strings.len())
    }
}

impl DisplayAs for KeyedSamplesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "KeyedSamplesExec: datasets={}, columns=[{}]",
            self.strings.len(),
            self.columns.join(", ")
        )
    }
}

impl ExecutionPlan for KeyedSamplesExec {
    fn name(&self) -> &str {
        "KeyedSamplesExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
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
        let [input]: [Arc<dyn ExecutionPlan>; 1] = children
            .try_into()
            .map_err(|_| DataFusionError::Internal("KeyedSamplesExec takes one child".into()))?;
        Ok(Arc::new(KeyedSamplesExec::with_columns(
            input,
            self.strings.clone(),
            self.columns.clone(),
            self.schema.clone(),
            self.sorted(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (strings, columns, schema) = (
            self.strings.clone(),
            self.columns.clone(),
            self.schema.clone(),
        );
        let rows = input.map(move |batch| samples_of(&batch?, &strings, &columns, &schema));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            rows,
        )))
    }
}
