//! The workload exported once to plain Parquet, in the shapes a user of a
//! general engine would choose: a file per service (their partitioning),
//! rows in time order, either denormalised (the stack as a list of frame
//! names) or normalised (a stack id, with the stacks in their own file).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{
    ArrayRef, Int64Builder, ListBuilder, RecordBatch, StringBuilder, TimestampNanosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use ember_engine::profile::labels_to_string;
use ember_engine::stack;
use ember_engine::Profile;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

const BATCH_ROWS: usize = 64 * 1024;

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

fn frames_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

fn samples_schema(stack: DataType, stack_name: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("time", time_type(), false),
        Field::new("service_name", DataType::Utf8, false),
        Field::new("profile_type", DataType::Utf8, false),
        Field::new("labels", DataType::Utf8, false),
        Field::new(stack_name, stack, false),
        Field::new("value", DataType::Int64, false),
    ]))
}

fn stacks_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("stack_id", DataType::Int64, false),
        Field::new("frames", frames_type(), false),
    ]))
}

fn writer(path: &Path, schema: SchemaRef) -> anyhow::Result<ArrowWriter<File>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .build();
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok(ArrowWriter::try_new(file, schema, Some(props))?)
}

/// Rows of one shape being gathered for one service's file.
struct Rows {
    time: TimestampNanosecondBuilder,
    service: StringBuilder,
    profile_type: StringBuilder,
    labels: StringBuilder,
    stack_id: Int64Builder,
    frames: ListBuilder<StringBuilder>,
    value: Int64Builder,
    len: usize,
}

impl Rows {
    fn new() -> Self {
        Self {
            time: TimestampNanosecondBuilder::new().with_timezone("UTC"),
            service: StringBuilder::new(),
            profile_type: StringBuilder::new(),
            labels: StringBuilder::new(),
            stack_id: Int64Builder::new(),
            frames: ListBuilder::new(StringBuilder::new()),
            value: Int64Builder::new(),
            len: 0,
        }
    }
}

struct ServiceFiles {
    normalised: ArrowWriter<File>,
    denormalised: ArrowWriter<File>,
    rows: Rows,
}

fn normalised_schema() -> SchemaRef {
    samples_schema(DataType::Int64, "stack_id")
}

fn denormalised_schema() -> SchemaRef {
    samples_schema(frames_type(), "stack")
}

impl ServiceFiles {
    fn flush(&mut self) -> anyhow::Result<()> {
        if self.rows.len == 0 {
            return Ok(());
        }
        let r = &mut self.rows;
        let common: [ArrayRef; 4] = [
            Arc::new(r.time.finish()),
            Arc::new(r.service.finish()),
            Arc::new(r.profile_type.finish()),
            Arc::new(r.labels.finish()),
        ];
        let value: ArrayRef = Arc::new(r.value.finish());
        let mut norm = common.to_vec();
        norm.push(Arc::new(r.stack_id.finish()));
        norm.push(value.clone());
        let mut denorm = common.to_vec();
        denorm.push(Arc::new(r.frames.finish()));
        denorm.push(value);
        self.normalised
            .write(&RecordBatch::try_new(normalised_schema(), norm)?)?;
        self.denormalised
            .write(&RecordBatch::try_new(denormalised_schema(), denorm)?)?;
        r.len = 0;
        Ok(())
    }
}

/// Where the export went, for the peers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportPaths {
    pub normalised_dir: PathBuf,
    pub denormalised_dir: PathBuf,
    pub stacks: PathBuf,
}

impl ExportPaths {
    pub fn normalised(&self, service: Option<&str>) -> String {
        file_or_glob(&self.normalised_dir, service)
    }

    pub fn denormalised(&self, service: Option<&str>) -> String {
        file_or_glob(&self.denormalised_dir, service)
    }
}

fn file_or_glob(dir: &Path, service: Option<&str>) -> String {
    dir.join(format!("{}.parquet", service.unwrap_or("*")))
        .display()
        .to_string()
}

/// Streams normalised profiles to Parquet as the workload is generated.
pub struct Exporter {
    paths: ExportPaths,
    services: BTreeMap<String, ServiceFiles>,
    stacks: Vec<(i64, Vec<String>)>,
    seen: HashSet<u64>,
}

impl Exporter {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let paths = ExportPaths {
            normalised_dir: dir.join("normalised"),
            denormalised_dir: dir.join("denormalised"),
            stacks: dir.join("stacks.parquet"),
        };
        std::fs::create_dir_all(&paths.normalised_dir)?;
        std::fs::create_dir_all(&paths.denormalised_dir)?;
        Ok(Self {
            paths,
            services: BTreeMap::new(),
            stacks: Vec::new(),
            seen: HashSet::new(),
        })
    }

    pub fn add(&mut self, p: &Profile) -> anyhow::Result<()> {
        let service = p.service_name().to_string();
        if !self.services.contains_key(&service) {
            let files = ServiceFiles {
                normalised: writer(
                    &self.paths.normalised_dir.join(format!("{service}.parquet")),
                    normalised_schema(),
                )?,
                denormalised: writer(
                    &self
                        .paths
                        .denormalised_dir
                        .join(format!("{service}.parquet")),
                    denormalised_schema(),
                )?,
                rows: Rows::new(),
            };
            self.services.insert(service.clone(), files);
        }
        let labels = labels_to_string(&p.labels);
        let Some(files) = self.services.get_mut(&service) else {
            return Ok(());
        };
        for s in &p.samples {
            let frames: Vec<&str> = p
                .stack(s)
                .iter()
                .map(|f| p.functions.get(*f as usize).unwrap_or(""))
                .collect();
            let id = frames
                .iter()
                .fold(stack::ROOT, |parent, f| stack::node_id(parent, f));
            if self.seen.insert(id) {
                self.stacks
                    .push((id as i64, frames.iter().map(|f| f.to_string()).collect()));
            }
            let r = &mut files.rows;
            r.time.append_value(p.time_nanos);
            r.service.append_value(&service);
            r.profile_type.append_value(&p.profile_type);
            r.labels.append_value(&labels);
            r.stack_id.append_value(id as i64);
            r.frames.append_value(frames.iter().map(|f| Some(*f)));
            r.value.append_value(s.value);
            r.len += 1;
        }
        if files.rows.len >= BATCH_ROWS {
            files.flush()?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> anyhow::Result<ExportPaths> {
        for files in self.services.values_mut() {
            files.flush()?;
        }
        for (_, files) in std::mem::take(&mut self.services) {
            files.normalised.close()?;
            files.denormalised.close()?;
        }
        let mut w = writer(&self.paths.stacks, stacks_schema())?;
        for chunk in self.stacks.chunks(BATCH_ROWS) {
            let mut id = Int64Builder::new();
            let mut frames = ListBuilder::new(StringBuilder::new());
            for (i, f) in chunk {
                id.append_value(*i);
                frames.append_value(f.iter().map(|s| Some(s.as_str())));
            }
            let columns: Vec<ArrayRef> = vec![Arc::new(id.finish()), Arc::new(frames.finish())];
            w.write(&RecordBatch::try_new(stacks_schema(), columns)?)?;
        }
        w.close()?;
        Ok(self.paths)
    }
}
