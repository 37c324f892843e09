//! Encodes a segment's profiles into one block object.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampNanosecondBuilder, UInt64Builder,
};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use ulid::Ulid;

use super::meta::{BlockMeta, DatasetMeta, SectionMeta, FORMAT_VERSION};
use super::schema::Section;
use super::BlockError;
use crate::profile::{labels_to_string, Profile};
use crate::stack;

/// A block ready to upload: its bytes and the metadata to index.
pub struct EncodedBlock {
    pub bytes: Bytes,
    pub meta: BlockMeta,
}

/// `segments/{shard}/anonymous/{block_id}/block.bin` for level 0 (segments
/// mix tenants), `blocks/{shard}/{tenant}/{block_id}/block.bin` above.
pub fn block_path(level: u32, shard: u32, tenant: &str, id: &str) -> String {
    if level == 0 {
        format!("segments/{shard}/anonymous/{id}/block.bin")
    } else {
        format!("blocks/{shard}/{tenant}/{id}/block.bin")
    }
}

/// Encodes profiles (of any tenants and services) as one level-0 block.
pub fn write_block(profiles: &[Profile], shard: u32) -> Result<EncodedBlock, BlockError> {
    if profiles.is_empty() {
        return Err(BlockError::Empty);
    }
    let id = Ulid::new().to_string();
    let mut datasets: BTreeMap<(&str, &str), Vec<&Profile>> = BTreeMap::new();
    for p in profiles {
        datasets
            .entry((p.tenant.as_str(), p.service_name()))
            .or_default()
            .push(p);
    }
    let mut buf = Vec::new();
    let mut metas = Vec::with_capacity(datasets.len());
    for ((tenant, service), mut dataset) in datasets {
        dataset.sort_by_cached_key(|p| {
            (
                p.profile_type.clone(),
                labels_to_string(&p.labels),
                p.time_nanos,
            )
        });
        metas.push(write_dataset(&mut buf, tenant, service, &dataset)?);
    }
    let meta = BlockMeta {
        format_version: FORMAT_VERSION,
        path: block_path(0, shard, "anonymous", &id),
        id,
        shard,
        compaction_level: 0,
        min_time: metas.iter().map(|d| d.min_time).min().unwrap_or_default(),
        max_time: metas.iter().map(|d| d.max_time).max().unwrap_or_default(),
        size: 0,
        datasets: metas,
    };
    append_footer(&mut buf, &meta);
    let meta = BlockMeta {
        size: buf.len() as u64,
        ..meta
    };
    Ok(EncodedBlock {
        bytes: Bytes::from(buf),
        meta,
    })
}

fn append_footer(buf: &mut Vec<u8>, meta: &BlockMeta) {
    buf.extend_from_slice(&meta.encode_framed());
}

fn write_dataset(
    buf: &mut Vec<u8>,
    tenant: &str,
    service: &str,
    profiles: &[&Profile],
) -> Result<DatasetMeta, BlockError> {
    let mut stacks = StackTree::default();
    let mut totals = Totals::new();
    let samples = samples_batch(service, profiles, &mut stacks, &mut totals)?;
    let mut series: Vec<String> = profiles
        .iter()
        .map(|p| labels_to_string(&p.labels))
        .collect();
    series.sort();
    series.dedup();
    let mut profile_types: Vec<String> = profiles.iter().map(|p| p.profile_type.clone()).collect();
    profile_types.sort();
    profile_types.dedup();
    let sections = vec![
        append_section(buf, Section::Profiles, profiles_batch(service, profiles)?)?,
        append_section(buf, Section::Samples, samples)?,
        append_section(buf, Section::Stacks, stacks.into_batch()?)?,
        append_section(buf, Section::Totals, totals_batch(totals)?)?,
    ];
    Ok(DatasetMeta {
        tenant: tenant.to_string(),
        service_name: service.to_string(),
        min_time: profiles
            .iter()
            .map(|p| p.time_nanos)
            .min()
            .unwrap_or_default(),
        max_time: profiles
            .iter()
            .map(|p| p.time_nanos)
            .max()
            .unwrap_or_default(),
        profile_types,
        series,
        profiles: profiles.len() as u64,
        samples: sections[1].rows,
        sections,
    })
}

fn append_section(
    buf: &mut Vec<u8>,
    section: Section,
    batch: RecordBatch,
) -> Result<SectionMeta, BlockError> {
    let offset = buf.len() as u64;
    let rows = batch.num_rows() as u64;
    let props = section.writer_properties(0);
    let encode = |source| BlockError::Encode {
        section: section.name(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(&mut *buf, section.schema(), Some(props)).map_err(encode)?;
    writer.write(&batch).map_err(encode)?;
    writer.close().map_err(encode)?;
    Ok(SectionMeta {
        kind: section.name().to_string(),
        offset,
        size: buf.len() as u64 - offset,
        rows,
    })
}

fn arrow_err(section: &'static str) -> impl Fn(arrow::error::ArrowError) -> BlockError {
    move |source| BlockError::Arrow { section, source }
}

fn profiles_batch(service: &str, profiles: &[&Profile]) -> Result<RecordBatch, BlockError> {
    let n = profiles.len();
    let mut time = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut service_name = StringBuilder::new();
    let mut profile_type = StringBuilder::new();
    let mut labels = StringBuilder::new();
    let mut duration = Int64Builder::with_capacity(n);
    let mut period = Int64Builder::with_capacity(n);
    let mut samples = UInt64Builder::with_capacity(n);
    let mut total = Int64Builder::with_capacity(n);
    for p in profiles {
        time.append_value(p.time_nanos);
        service_name.append_value(service);
        profile_type.append_value(&p.profile_type);
        labels.append_value(labels_to_string(&p.labels));
        duration.append_value(p.duration_nanos);
        period.append_value(p.period);
        samples.append_value(p.samples.len() as u64);
        total.append_value(p.total());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(time.finish()),
        Arc::new(service_name.finish()),
        Arc::new(profile_type.finish()),
        Arc::new(labels.finish()),
        Arc::new(duration.finish()),
        Arc::new(period.finish()),
        Arc::new(samples.finish()),
        Arc::new(total.finish()),
    ];
    RecordBatch::try_new(Section::Profiles.schema(), columns).map_err(arrow_err("profiles"))
}

/// profile type -> stack id -> summed value.
type Totals<'a> = HashMap<&'a str, foldhash::HashMap<u64, i64>>;

fn samples_batch<'a>(
    service: &str,
    profiles: &[&'a Profile],
    stacks: &mut StackTree<'a>,
    totals: &mut Totals<'a>,
) -> Result<RecordBatch, BlockError> {
    let n: usize = profiles.iter().map(|p| p.samples.len()).sum();
    let mut time = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut service_name = StringBuilder::new();
    let mut profile_type = StringBuilder::new();
    let mut labels = StringBuilder::new();
    let mut stack_id = UInt64Builder::with_capacity(n);
    let mut value = Int64Builder::with_capacity(n);
    let mut span_id = UInt64Builder::with_capacity(n);
    for p in profiles {
        let series = labels_to_string(&p.labels);
        let mut rows: Vec<(u64, i64, Option<u64>)> = p
            .samples
            .iter()
            .map(|s| (stacks.insert(&p.functions, &s.stack), s.value, s.span_id))
            .collect();
        rows.sort_unstable();
        let type_totals = totals.entry(p.profile_type.as_str()).or_default();
        for &(id, v, _) in &rows {
            let total = type_totals.entry(id).or_default();
            *total = total.saturating_add(v);
        }
        for (id, v, span) in rows {
            time.append_value(p.time_nanos);
            service_name.append_value(service);
            profile_type.append_value(&p.profile_type);
            labels.append_value(&series);
            stack_id.append_value(id);
            value.append_value(v);
            span_id.append_option(span);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(time.finish()),
        Arc::new(service_name.finish()),
        Arc::new(profile_type.finish()),
        Arc::new(labels.finish()),
        Arc::new(stack_id.finish()),
        Arc::new(value.finish()),
        Arc::new(span_id.finish()),
    ];
    RecordBatch::try_new(Section::Samples.schema(), columns).map_err(arrow_err("samples"))
}

fn totals_batch(totals: Totals) -> Result<RecordBatch, BlockError> {
    let mut rows: Vec<(&str, u64, i64)> = totals
        .iter()
        .flat_map(|(t, stacks)| stacks.iter().map(move |(id, v)| (*t, *id, *v)))
        .collect();
    rows.sort_unstable();
    let mut profile_type = StringBuilder::new();
    let mut stack_id = UInt64Builder::with_capacity(rows.len());
    let mut value = Int64Builder::with_capacity(rows.len());
    for (t, id, v) in rows {
        profile_type.append_value(t);
        stack_id.append_value(id);
        value.append_value(v);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(profile_type.finish()),
        Arc::new(stack_id.finish()),
        Arc::new(value.finish()),
    ];
    RecordBatch::try_new(Section::Totals.schema(), columns).map_err(arrow_err("totals"))
}

/// (parent id, function index) -> node id, for the profiles that share one
/// function table (the sample types and label sets of one pprof): they
/// share their stacks, so a frame is named and hashed once per pprof.
type NodeMemo = foldhash::HashMap<(u64, u32), u64>;

/// The last stack inserted for one function table, root first, with the
/// node id of each of its prefixes. A profile's stacks come sorted, and a
/// sorted stack's longest prefix shared with any earlier one is the one it
/// shares with the stack just before it: only the frames after that prefix
/// cost a lookup.
#[derive(Default)]
struct LastStack {
    frames: Vec<u32>,
    ids: Vec<u64>,
}

/// What a function table's stacks have in common.
#[derive(Default)]
struct TableMemo {
    nodes: NodeMemo,
    last: LastStack,
}

/// The nodes of every stack of a dataset, keyed by their global id, named
/// by the profiles' own strings.
#[derive(Default)]
struct StackTree<'a> {
    nodes: foldhash::HashMap<u64, (u64, &'a str)>,
    /// Per function table, by its address (the profiles outlive the tree).
    memos: foldhash::HashMap<usize, TableMemo>,
}

impl<'a> StackTree<'a> {
    /// Adds every node of a root-first stack and returns the leaf's id.
    fn insert(&mut self, functions: &'a Arc<[String]>, stack: &[u32]) -> u64 {
        let table = Arc::as_ptr(functions) as *const String as usize;
        let memo = self.memos.entry(table).or_default();
        let shared = memo
            .last
            .frames
            .iter()
            .zip(stack)
            .take_while(|(a, b)| a == b)
            .count();
        memo.last.frames.truncate(shared);
        memo.last.ids.truncate(shared);
        let mut parent = memo.last.ids.last().copied().unwrap_or(stack::ROOT);
        for &f in &stack[shared..] {
            let id = match memo.nodes.get(&(parent, f)) {
                Some(&id) => id,
                None => {
                    let name = functions.get(f as usize).map_or("", String::as_str);
                    let id = stack::node_id(parent, name);
                    self.nodes.entry(id).or_insert((parent, name));
                    memo.nodes.insert((parent, f), id);
                    id
                }
            };
            memo.last.frames.push(f);
            memo.last.ids.push(id);
            parent = id;
        }
        parent
    }

    fn into_batch(self) -> Result<RecordBatch, BlockError> {
        let mut nodes: Vec<(u64, u64, &str)> = self
            .nodes
            .into_iter()
            .map(|(id, (p, n))| (id, p, n))
            .collect();
        nodes.sort_unstable_by_key(|n| n.0);
        let mut id = UInt64Builder::with_capacity(nodes.len());
        let mut parent = UInt64Builder::with_capacity(nodes.len());
        let mut name = StringBuilder::new();
        for (i, p, n) in nodes {
            id.append_value(i);
            parent.append_value(p);
            name.append_value(n);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(parent.finish()),
            Arc::new(name.finish()),
        ];
        RecordBatch::try_new(Section::Stacks.schema(), columns).map_err(arrow_err("stacks"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::schema::row_group_rows;
    use parquet::file::metadata::ParquetMetaDataReader;

    #[test]
    fn large_sections_are_cut_into_bounded_row_groups() {
        let n = 2 * row_group_rows(0) + 1000;
        let profile = Profile {
            tenant: "t".into(),
            labels: vec![("service_name".into(), "api".into())],
            profile_type: "cpu:cpu:nanoseconds:cpu:nanoseconds".into(),
            time_nanos: 1,
            duration_nanos: 0,
            period: 0,
            functions: (0..n).map(|i| format!("f{i}")).collect(),
            samples: (0..n as u32)
                .map(|i| crate::profile::Sample {
                    stack: vec![i],
                    value: 1,
                    span_id: None,
                })
                .collect(),
        };
        let block = write_block(&[profile], 0).unwrap();
        let dataset = &block.meta.datasets[0];
        for section in [Section::Samples, Section::Stacks] {
            let meta = dataset.section(section).unwrap();
            let bytes = block
                .bytes
                .slice(meta.offset as usize..(meta.offset + meta.size) as usize);
            let footer = ParquetMetaDataReader::new()
                .parse_and_finish(&bytes)
                .unwrap();
            let rows: Vec<i64> = footer.row_groups().iter().map(|g| g.num_rows()).collect();
            assert_eq!(rows.iter().sum::<i64>(), meta.rows as i64, "{section:?}");
            assert_eq!(rows.len(), 3, "{section:?}: {rows:?}");
            assert!(rows.iter().all(|&r| r <= row_group_rows(0) as i64));
            // Level 0 is LZ4 throughout: compaction opens every column chunk.
            for group in footer.row_groups() {
                for column in group.columns() {
                    assert_eq!(column.compression(), parquet::basic::Compression::LZ4_RAW);
                }
            }
        }
    }

    fn section_batches(block: &EncodedBlock, section: Section) -> Vec<RecordBatch> {
        let meta = block.meta.datasets[0].section(section).unwrap();
        let bytes = block
            .bytes
            .slice(meta.offset as usize..(meta.offset + meta.size) as usize);
        parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 1024)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Stacks given in any order, by profiles that share a function table
    /// or not, get the nodes that their paths' names make.
    #[test]
    fn stack_nodes_are_the_paths_of_every_stack_whatever_their_order() {
        use arrow::array::AsArray;
        use arrow::datatypes::UInt64Type;
        let shared: Arc<[String]> = ["main", "a", "b", "c", "d"].map(String::from).into();
        // The same indices mean other names in another table.
        let other: Arc<[String]> = ["main", "d", "c", "b", "a"].map(String::from).into();
        let profile = |ty: &str, functions: &Arc<[String]>, stacks: &[&[u32]]| Profile {
            tenant: "t".into(),
            labels: vec![("service_name".into(), "api".into())],
            profile_type: ty.into(),
            time_nanos: 1,
            duration_nanos: 0,
            period: 0,
            functions: functions.clone(),
            samples: stacks
                .iter()
                .map(|st| crate::profile::Sample {
                    stack: st.to_vec(),
                    value: 1,
                    span_id: None,
                })
                .collect(),
        };
        let stacks: &[&[u32]] = &[
            &[0, 1, 2],
            &[0, 1, 3],
            &[0, 4],
            &[0, 1],
            &[0, 1, 2, 3],
            &[0, 2],
        ];
        let unsorted: &[&[u32]] = &[&[0, 4, 1], &[0, 1, 2], &[0, 4], &[0, 1, 2, 3]];
        let profiles = vec![
            profile("a:a:a:a:a", &shared, stacks),
            profile("b:b:b:b:b", &shared, unsorted),
            profile("c:c:c:c:c", &other, stacks),
        ];
        let mut want = std::collections::BTreeMap::new();
        for p in &profiles {
            for s in &p.samples {
                let mut parent = stack::ROOT;
                for &f in &s.stack {
                    let name = p.functions[f as usize].clone();
                    let id = stack::node_id(parent, &name);
                    want.insert(id, (parent, name));
                    parent = id;
                }
            }
        }
        let block = write_block(&profiles, 0).unwrap();
        let mut got = std::collections::BTreeMap::new();
        for b in section_batches(&block, Section::Stacks) {
            let ids = b.column(0).as_primitive::<UInt64Type>();
            let parents = b.column(1).as_primitive::<UInt64Type>();
            let names = b.column(2).as_string::<i32>();
            for i in 0..b.num_rows() {
                got.insert(ids.value(i), (parents.value(i), names.value(i).to_string()));
            }
        }
        assert_eq!(got, want);
        // Every sample points at its own leaf.
        let leaves: std::collections::BTreeSet<u64> = section_batches(&block, Section::Samples)
            .iter()
            .flat_map(|b| {
                let col = b
                    .column_by_name("stack_id")
                    .unwrap()
                    .as_primitive::<UInt64Type>();
                col.values().to_vec()
            })
            .collect();
        let leaf = |f: &[String], st: &[u32]| {
            st.iter()
                .fold(stack::ROOT, |p, &i| stack::node_id(p, &f[i as usize]))
        };
        let mut want_leaves = std::collections::BTreeSet::new();
        for p in &profiles {
            for s in &p.samples {
                want_leaves.insert(leaf(&p.functions, &s.stack));
            }
        }
        assert_eq!(leaves, want_leaves);
    }
}
