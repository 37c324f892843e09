//! Tables over dataset sections: `samples`, `profiles`, `stacks`. A scan asks
//! the metastore which datasets can match its filters, then reads only their
//! sections, in place inside the block objects, with DataFusion's Parquet
//! reader (row-group pruning on the same filters).

use std::fmt;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, DataFusionError};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{
    FileGroup, FileScanConfigBuilder, ParquetFileReaderFactory, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::Result;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::physical_expr::expressions::col as physical_col;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use ember_engine::block::{DatasetStrings, Section, SectionMeta, SectionReader};
use ember_metastore::BlockQuery;
use ember_metastore::{DatasetRef, MetastoreIndex};
use object_store::ObjectStore;

use crate::keyed_samples::{self, KeyedSamplesExec};
use crate::pruning::{scan_bounds, ScanBounds};
use crate::settings::Settings;
use crate::storage::index_error;

pub const TABLES: [Section; 3] = [Section::Samples, Section::Profiles, Section::Stacks];

/// The object store URL under which block objects are registered. Only
/// this scheme exists in a session's runtime, so SQL reaches no other files.
pub fn store_url() -> ObjectStoreUrl {
    static URL: OnceLock<ObjectStoreUrl> = OnceLock::new();
    URL.get_or_init(|| ObjectStoreUrl::parse("ember://blocks").expect("static URL parses"))
        .clone()
}

/// Which datasets a table reads.
#[derive(Clone)]
pub enum DatasetSource {
    /// Whatever the metastore finds for this tenant and the scan's filters.
    Tenant {
        tenant: String,
        index: Arc<dyn MetastoreIndex>,
    },
    /// Datasets already chosen (by a profile function).
    Fixed(Arc<Vec<DatasetRef>>),
}

impl fmt::Debug for DatasetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSource::Tenant { tenant, .. } => write!(f, "Tenant({tenant})"),
            DatasetSource::Fixed(d) => write!(f, "Fixed({} datasets)", d.len()),
        }
    }
}

pub struct SectionTable {
    section: Section,
    store: Arc<dyn ObjectStore>,
    source: DatasetSource,
    sorted: bool,
}

impl fmt::Debug for SectionTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SectionTable({}, {:?})",
            self.section.name(),
            self.source
        )
    }
}

impl SectionTable {
    pub fn new(section: Section, store: Arc<dyn ObjectStore>, source: DatasetSource) -> Self {
        Self {
            section,
            store,
            source,
            sorted: false,
        }
    }

    /// A scan that keeps each section in a partition of its own, declared
    /// sorted by [`Section::sort_order`]: a sort above it becomes a
    /// streaming merge of the sections (compaction).
    pub fn sorted(mut self) -> Self {
        self.sorted = true;
        self
    }

    async fn datasets(&self, bounds: &ScanBounds, settings: &Settings) -> Result<Vec<DatasetRef>> {
        match &self.source {
            DatasetSource::Fixed(d) => Ok(d.as_ref().clone()),
            DatasetSource::Tenant { tenant, index } => {
                let mut q = BlockQuery {
                    tenant: tenant.clone(),
                    start: bounds.start,
                    end: bounds.end,
                    service_names: bounds.services.clone(),
                    profile_types: bounds.profile_types.clone(),
                    skip_level0: settings.skip_level0,
                };
                // The stack tree has no time or type of its own.
                if self.section == Section::Stacks {
                    q.start = i64::MIN;
                    q.end = i64::MAX;
                    q.profile_types = None;
                }
                index.datasets(&q).await.map_err(index_error)
            }
        }
    }
}

/// Where a section sits inside its block object.
#[derive(Debug, Clone)]
struct SectionLocation {
    path: String,
    section: SectionMeta,
}

#[derive(Debug)]
struct SectionReaderFactory {
    store: Arc<dyn ObjectStore>,
}

impl ParquetFileReaderFactory for SectionReaderFactory {
    fn create_reader(
        &self,
        _partition_index: usize,
        file: PartitionedFile,
        _metadata_size_hint: Option<usize>,
        _metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Box<dyn AsyncFileReader + Send>> {
        let loc = file
            .extension::<SectionLocation>()
            .ok_or_else(|| DataFusionError::Internal("section file without its location".into()))?;
        Ok(Box::new(SectionReader::new(
            self.store.clone(),
            &loc.path,
            &loc.section,
        )))
    }
}

/// How a scan lays out its sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Spread over the session's partitions, no order promised.
    Spread,
    /// One partition per section, each sorted by the section's order.
    SortedPerSection,
}

/// A scan over the given section of each dataset, as the section's table
/// rows: keyed samples sections (level 0) and the others in one union.
#[allow(clippy::too_many_arguments)]
pub fn section_scan(
    state: &dyn Session,
    store: Arc<dyn ObjectStore>,
    section: Section,
    datasets: &[DatasetRef],
    projection: Option<&Vec<usize>>,
    filters: &[Expr],
    limit: Option<usize>,
    layout: Layout,
) -> Result<Arc<dyn ExecutionPlan>> {
    let schema = section.schema();
    // Only a samples section is ever keyed.
    let (keyed, plain): (Vec<_>, Vec<_>) = datasets
        .iter()
        .filter_map(|d| Some((d, d.dataset.section(section)?)))
        .partition(|(_, meta)| meta.keyed && section == Section::Samples);
    let mut scans = Vec::new();
    if !plain.is_empty() {
        let files = plain
            .iter()
            .map(|(d, meta)| section_file(d, meta))
            .collect();
        let files = SectionFiles {
            schema: schema.clone().into(),
            sort_order: section.sort_order(),
            files,
        };
        scans.push(parquet_scan(
            state,
            store.clone(),
            files,
            projection,
            filters,
            limit,
            layout,
        )?);
    }
    if !keyed.is_empty() {
        let files = keyed
            .iter()
            .enumerate()
            .map(|(i, (d, meta))| keyed_samples::tag(section_file(d, meta), i))
            .collect();
        let files = SectionFiles {
            schema: keyed_samples::table_schema(),
            sort_order: &keyed_samples::SORT_ORDER,
            files,
        };
        let keys = parquet_scan(
            state,
            store,
            files,
            Some(&keyed_samples::source_projection(projection)?),
            &keyed_samples::pruning_filters(filters),
            limit,
            layout,
        )?;
        let strings = keyed
            .iter()
            .map(|(d, _)| DatasetStrings::of(&d.dataset))
            .collect();
        scans.push(Arc::new(KeyedSamplesExec::new(
            keys,
            Arc::new(strings),
            projection,
            layout == Layout::SortedPerSection,
        )?));
    }
    match scans.len() {
        0 => {
            let projected = match projection {
                Some(p) => Arc::new(schema.project(p)?),
                None => schema,
            };
            Ok(Arc::new(EmptyExec::new(projected)))
        }
        1 => Ok(scans.remove(0)),
        _ => UnionExec::try_new(scans),
    }
}

/// The dataset's section `meta` as a file of a scan.
fn section_file(d: &DatasetRef, meta: &SectionMeta) -> PartitionedFile {
    PartitionedFile::new(format!("{}#{}", d.path, meta.offset), meta.size).with_extension(
        SectionLocation {
            path: d.path.to_string(),
            section: meta.clone(),
        },
    )
}

/// Sections of one Parquet schema, and the columns each is sorted by.
struct SectionFiles {
    schema: TableSchema,
    sort_order: &'static [&'static str],
    files: Vec<PartitionedFile>,
}

/// A Parquet scan of `files`, pruned by `filters`.
fn parquet_scan(
    state: &dyn Session,
    store: Arc<dyn ObjectStore>,
    SectionFiles {
        schema,
        sort_order,
        files,
    }: SectionFiles,
    projection: Option<&Vec<usize>>,
    filters: &[Expr],
    limit: Option<usize>,
    layout: Layout,
) -> Result<Arc<dyn ExecutionPlan>> {
    let file_schema = schema.file_schema().clone();
    let mut source = ParquetSource::new(schema)
        .with_table_parquet_options(state.table_options().parquet.clone())
        .with_parquet_file_reader_factory(Arc::new(SectionReaderFactory { store }));
    if let Some(predicate) = conjunction(filters.to_vec()) {
        let df_schema = DFSchema::try_from(file_schema.as_ref().clone())?;
        source = source.with_predicate(state.create_physical_expr(predicate, &df_schema)?);
    }
    let mut config = FileScanConfigBuilder::new(store_url(), Arc::new(source));
    let groups: Vec<Vec<PartitionedFile>> = match layout {
        Layout::Spread => {
            // Spread sections over partitions so that a scan uses every core.
            let partitions = state.config().target_partitions().max(1);
            let mut groups = vec![Vec::new(); partitions.min(files.len())];
            for (i, f) in files.into_iter().enumerate() {
                let n = groups.len();
                groups[i % n].push(f);
            }
            groups
        }
        Layout::SortedPerSection => {
            let order = sort_order
                .iter()
                .map(|c| {
                    Ok(PhysicalSortExpr::new_default(physical_col(
                        c,
                        &file_schema,
                    )?))
                })
                .collect::<Result<Vec<_>>>()?;
            config = config.with_output_ordering(LexOrdering::new(order).into_iter().collect());
            files.into_iter().map(|f| vec![f]).collect()
        }
    };
    let config = config
        .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
        .with_limit(limit)
        .with_projection_indices(projection.cloned())?
        .build();
    Ok(DataSourceExec::from_data_source(config))
}

#[async_trait]
impl TableProvider for SectionTable {
    fn schema(&self) -> SchemaRef {
        self.section.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Used for pruning only; DataFusion still applies every filter.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let datasets = self
            .datasets(&scan_bounds(filters), &Settings::of(state))
            .await?;
        tracing::debug!(
            table = self.section.name(),
            datasets = datasets.len(),
            "scan pruned by metastore"
        );
        let layout = if self.sorted {
            Layout::SortedPerSection
        } else {
            Layout::Spread
        };
        section_scan(
            state,
            self.store.clone(),
            self.section,
            &datasets,
            projection,
            filters,
            limit,
            layout,
        )
    }
}
