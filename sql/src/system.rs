//! `system.blocks` and `system.compaction_jobs`: the metastore's state as
//! tables, so that an operator can watch compaction over Flight SQL. A
//! session sees only its own tenant's blocks and jobs, like everything else.

use std::fmt;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, RecordBatch, StringBuilder, TimestampNanosecondBuilder, UInt32Builder, UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use ember_metastore::MetastoreIndex;

use crate::storage::index_error;

pub const SCHEMA: &str = "system";

#[derive(Debug, Clone, Copy)]
pub enum SystemTable {
    Blocks,
    CompactionJobs,
}

impl SystemTable {
    pub const ALL: [SystemTable; 2] = [SystemTable::Blocks, SystemTable::CompactionJobs];

    pub fn name(self) -> &'static str {
        match self {
            SystemTable::Blocks => "blocks",
            SystemTable::CompactionJobs => "compaction_jobs",
        }
    }

    pub fn schema(self) -> SchemaRef {
        static BLOCKS: OnceLock<SchemaRef> = OnceLock::new();
        static JOBS: OnceLock<SchemaRef> = OnceLock::new();
        let time = || DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
        match self {
            SystemTable::Blocks => BLOCKS.get_or_init(|| {
                Arc::new(Schema::new(vec![
                    Field::new("block_id", DataType::Utf8, false),
                    Field::new("path", DataType::Utf8, false),
                    Field::new("level", DataType::UInt32, false),
                    Field::new("shard", DataType::UInt32, false),
                    Field::new("min_time", time(), false),
                    Field::new("max_time", time(), false),
                    Field::new("size", DataType::UInt64, false),
                    Field::new("datasets", DataType::UInt64, false),
                    Field::new("profiles", DataType::UInt64, false),
                    Field::new("samples", DataType::UInt64, false),
                ]))
            }),
            SystemTable::CompactionJobs => JOBS.get_or_init(|| {
                Arc::new(Schema::new(vec![
                    Field::new("job_id", DataType::Utf8, false),
                    Field::new("status", DataType::Utf8, false),
                    Field::new("level", DataType::UInt32, false),
                    Field::new("shard", DataType::UInt32, false),
                    Field::new("sources", DataType::UInt64, false),
                    Field::new("source_bytes", DataType::UInt64, false),
                    Field::new("failures", DataType::UInt32, false),
                    Field::new("last_error", DataType::Utf8, false),
                    Field::new("worker", DataType::Utf8, false),
                    Field::new("created", time(), false),
                ]))
            }),
        }
        .clone()
    }
}

pub struct SystemTableProvider {
    table: SystemTable,
    index: Arc<dyn MetastoreIndex>,
    tenant: String,
}

impl fmt::Debug for SystemTableProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "system.{}({})", self.table.name(), self.tenant)
    }
}

impl SystemTableProvider {
    pub fn new(table: SystemTable, index: Arc<dyn MetastoreIndex>, tenant: String) -> Self {
        Self {
            table,
            index,
            tenant,
        }
    }

    async fn blocks(&self) -> Result<RecordBatch> {
        let blocks = self
            .index
            .tenant_blocks(&self.tenant)
            .await
            .map_err(index_error)?;
        let n = blocks.len();
        let mut id = StringBuilder::new();
        let mut path = StringBuilder::new();
        let mut level = UInt32Builder::with_capacity(n);
        let mut shard = UInt32Builder::with_capacity(n);
        let mut min = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut max = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut size = UInt64Builder::with_capacity(n);
        let mut datasets = UInt64Builder::with_capacity(n);
        let mut profiles = UInt64Builder::with_capacity(n);
        let mut samples = UInt64Builder::with_capacity(n);
        for b in &blocks {
            id.append_value(&b.id);
            path.append_value(&b.path);
            level.append_value(b.compaction_level);
            shard.append_value(b.shard);
            min.append_value(b.min_time);
            max.append_value(b.max_time);
            size.append_value(b.size);
            datasets.append_value(b.datasets.len() as u64);
            profiles.append_value(b.datasets.iter().map(|d| d.profiles).sum());
            samples.append_value(b.datasets.iter().map(|d| d.samples).sum());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(path.finish()),
            Arc::new(level.finish()),
            Arc::new(shard.finish()),
            Arc::new(min.finish()),
            Arc::new(max.finish()),
            Arc::new(size.finish()),
            Arc::new(datasets.finish()),
            Arc::new(profiles.finish()),
            Arc::new(samples.finish()),
        ];
        Ok(RecordBatch::try_new(self.table.schema(), columns)?)
    }

    async fn jobs(&self) -> Result<RecordBatch> {
        let jobs = self
            .index
            .tenant_jobs(&self.tenant)
            .await
            .map_err(index_error)?;
        let n = jobs.len();
        let mut id = StringBuilder::new();
        let mut status = StringBuilder::new();
        let mut level = UInt32Builder::with_capacity(n);
        let mut shard = UInt32Builder::with_capacity(n);
        let mut sources = UInt64Builder::with_capacity(n);
        let mut bytes = UInt64Builder::with_capacity(n);
        let mut failures = UInt32Builder::with_capacity(n);
        let mut error = StringBuilder::new();
        let mut worker = StringBuilder::new();
        let mut created = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
        for j in &jobs {
            id.append_value(&j.id);
            status.append_value(j.status().name());
            level.append_value(j.level);
            shard.append_value(j.shard);
            sources.append_value(j.sources.len() as u64);
            bytes.append_value(j.source_bytes());
            failures.append_value(j.failures);
            error.append_value(&j.last_error);
            worker.append_value(&j.worker);
            created.append_value(j.created);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(status.finish()),
            Arc::new(level.finish()),
            Arc::new(shard.finish()),
            Arc::new(sources.finish()),
            Arc::new(bytes.finish()),
            Arc::new(failures.finish()),
            Arc::new(error.finish()),
            Arc::new(worker.finish()),
            Arc::new(created.finish()),
        ];
        Ok(RecordBatch::try_new(self.table.schema(), columns)?)
    }
}

#[async_trait]
impl TableProvider for SystemTableProvider {
    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = match self.table {
            SystemTable::Blocks => self.blocks().await?,
            SystemTable::CompactionJobs => self.jobs().await?,
        };
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.table.schema(),
            projection.cloned(),
        )?)
    }
}
