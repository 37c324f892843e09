//! Arrow schemas of the dataset sections. They are also the schemas of the
//! SQL tables, so a section is served without any conversion.

use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

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

    /// How a section of this kind is encoded in a block of `level`.
    ///
    /// parquet-rs opens a codec per column chunk, and a zstd codec allocates
    /// and zeroes a compression and a decompression context each time: 11 %
    /// of an uncached hour's flame graph, and most of the fresh memory a
    /// cold one touches. So what is read often or lives briefly is LZ4:
    /// every section of level 0 (compacted within a minute, read by
    /// compaction column chunk by column chunk), and at every level the
    /// stacks and totals sections, which every flame graph reads. Samples
    /// and profiles of compacted blocks, the bulk of what is stored, keep
    /// zstd's ratio.
    pub fn writer_properties(self, level: u32) -> WriterProperties {
        let compression = match (self, level) {
            (_, 0) | (Section::Stacks | Section::Totals, _) => Compression::LZ4_RAW,
            (Section::Profiles | Section::Samples, _) => Compression::ZSTD(ZstdLevel::default()),
        };
        let mut props = WriterProperties::builder()
            .set_compression(compression)
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(row_group_rows(level)));
        if level == 0 {
            for column in self.plain_at_level_0() {
                props = props.set_column_dictionary_enabled(ColumnPath::from(*column), false);
            }
            for column in self.unsummarised_at_level_0() {
                props = props.set_column_statistics_enabled(
                    ColumnPath::from(*column),
                    EnabledStatistics::None,
                );
            }
        }
        props.build()
    }

    /// Columns a level-0 block stores without a dictionary. A dictionary
    /// hashes every value as it is written, which is a tenth of a write's
    /// Parquet time for these; it pays in compacted blocks, which are kept,
    /// but a level-0 block lives about a minute, is read once by compaction,
    /// and LZ4 still folds the runs of a series' time and values.
    fn plain_at_level_0(self) -> &'static [&'static str] {
        match self {
            Section::Samples => &[
                "time",
                "profile_type_key",
                "series_key",
                "stack_id",
                "value",
                "span_id",
            ],
            Section::Stacks => &["stack_id", "parent_id"],
            Section::Totals => &["stack_id", "value"],
            Section::Profiles => &[],
        }
    }

    /// Columns whose min and max a level-0 block does not store, as every
    /// value is compared as it is written: a dataset is one service, stack
    /// ids and values are not filtered on, and a label selector's
    /// `labels IN (...)` is of series the dataset lists, whose min and max
    /// over a level-0 dataset (a page or two: one flush of one service)
    /// would prune almost nothing. That cost an eighth of a level-0
    /// write. The keys of [`keyed_samples_schema`] mean nothing outside
    /// their dataset, so no shared predicate prunes by them. `time` and
    /// `span_id` (span flame graphs skip a dataset without spans by its
    /// null count) keep theirs.
    fn unsummarised_at_level_0(self) -> &'static [&'static str] {
        match self {
            Section::Samples => &["profile_type_key", "series_key", "stack_id", "value"],
            Section::Stacks | Section::Totals | Section::Profiles => &[],
        }
    }

    /// The section's schema with the string `columns` as dictionaries keyed
    /// by `Int32`: a hint for `read_section_as` for columns that repeat a
    /// few distinct strings over many rows.
    pub fn schema_with_dictionaries(self, columns: &[&str]) -> SchemaRef {
        let schema = self.schema();
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Utf8 if columns.contains(&f.name().as_str()) => {
                    f.as_ref().clone().with_data_type(DataType::Dictionary(
                        Box::new(DataType::Int32),
                        Box::new(DataType::Utf8),
                    ))
                }
                _ => f.as_ref().clone(),
            })
            .collect();
        Arc::new(Schema::new(fields))
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

/// Rows per row group of a section. A Parquet reader holds a whole row
/// group's column chunks while it decodes them, and a compaction job reads
/// its sources side by side: with the default (a million rows) a job over
/// million-stack segments went past its memory budget. Compacted sections
/// are read whole by queries, so theirs are bigger.
pub fn row_group_rows(level: u32) -> usize {
    if level == 0 {
        32 * 1024
    } else {
        256 * 1024
    }
}

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// One row per (profile, stack), sorted by profile type, series and time.
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

/// Samples as a level-0 block stores them: a row names its profile type
/// and series by its place (key) in the dataset's sorted `profile_types`
/// and `series`, and its service is the dataset's, so the keys sort as the
/// strings do and the section keeps [`Section::sort_order`]. Parquet's
/// writer hashes every value of a string column into the column's
/// dictionary, and these three columns repeat their profile's strings on
/// every row: a quarter of a level-0 write. Compacted blocks, which are
/// kept and read by queries, store the strings ([`samples_schema`]);
/// `DatasetStrings` turns keys back into them.
pub fn keyed_samples_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("time", time_type(), false),
            Field::new("profile_type_key", DataType::Int32, false),
            Field::new("series_key", DataType::Int32, false),
            Field::new("stack_id", DataType::UInt64, false),
            Field::new("value", DataType::Int64, false),
            Field::new("span_id", DataType::UInt64, true),
        ]))
    })
    .clone()
}

/// The column of [`keyed_samples_schema`] a samples column is read from,
/// and `None` for `service_name`, which is the dataset's.
pub fn keyed_source(samples_column: &str) -> Option<&str> {
    match samples_column {
        "service_name" => None,
        "profile_type" => Some("profile_type_key"),
        "labels" => Some("series_key"),
        other => Some(other),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacted_blocks_keep_zstd_only_for_the_bulk_sections() {
        let codec = |s: Section, level| {
            s.writer_properties(level)
                .compression(&parquet::schema::types::ColumnPath::from("time"))
        };
        for s in [
            Section::Profiles,
            Section::Samples,
            Section::Stacks,
            Section::Totals,
        ] {
            assert_eq!(codec(s, 0), Compression::LZ4_RAW, "{s:?}");
        }
        for level in [1, 2, 3] {
            assert!(matches!(
                codec(Section::Samples, level),
                Compression::ZSTD(_)
            ));
            assert!(matches!(
                codec(Section::Profiles, level),
                Compression::ZSTD(_)
            ));
            assert_eq!(codec(Section::Stacks, level), Compression::LZ4_RAW);
            assert_eq!(codec(Section::Totals, level), Compression::LZ4_RAW);
        }
    }
}
