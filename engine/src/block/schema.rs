//! Arrow schemas of the dataset sections. They are also the schemas of the
//! SQL tables, so a section is served without any conversion.

use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Profiles,
    Samples,
    Stacks,
    Totals,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Profiles => "profiles",
            Section::Samples => "samples",
            Section::Stacks => "stacks",
            Section::Totals => "totals",
        }
    }

    /// The columns every section of this kind is sorted by, in every
    /// block: the writer and compaction keep this order, so merging
    /// sections is a streaming merge, never a sort.
    pub fn sort_order(self) -> &'static [&'static str] {
        match self {
            Section::Profiles | Section::Samples => &["profile_type", "labels", "time"],
            Section::Stacks => &["stack_id"],
            Section::Totals => &["profile_type", "stack_id"],
        }
    }

    pub fn schema(self) -> SchemaRef {
        match self {
            Section::Profiles => profiles_schema(),
            Section::Samples => samples_schema(),
            Section::Stacks => stacks_schema(),
            Section::Totals => totals_schema(),
        }
    }
}

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// One row per (profile, stack), sorted by profile type, series, time and stack.
pub fn samples_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("time", time_type(), false),
            Field::new("service_name", DataType::Utf8, false),
            Field::new("profile_type", DataType::Utf8, false),
            Field::new("labels", DataType::Utf8, false),
            Field::new("stack_id", DataType::UInt64, false),
            Field::new("value", DataType::Int64, false),
            Field::new("span_id", DataType::UInt64, true),
        ]))
    })
    .clone()
}

/// One row per ingested profile.
pub fn profiles_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("time", time_type(), false),
            Field::new("service_name", DataType::Utf8, false),
            Field::new("profile_type", DataType::Utf8, false),
            Field::new("labels", DataType::Utf8, false),
            Field::new("duration_nanos", DataType::Int64, false),
            Field::new("period", DataType::Int64, false),
            Field::new("samples", DataType::UInt64, false),
            Field::new("total", DataType::Int64, false),
        ]))
    })
    .clone()
}

/// The stack tree of a dataset: every node of every stack, once.
pub fn stacks_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("stack_id", DataType::UInt64, false),
            Field::new("parent_id", DataType::UInt64, false),
            Field::new("name", DataType::Utf8, false),
        ]))
    })
    .clone()
}

/// The dataset's samples summed per profile type and stack over all its
/// series and its whole time range: what a flame graph of a whole dataset
/// reads instead of every sample. Sorted by profile type and stack.
pub fn totals_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("profile_type", DataType::Utf8, false),
            Field::new("stack_id", DataType::UInt64, false),
            Field::new("value", DataType::Int64, false),
        ]))
    })
    .clone()
}
