//! Encodes a segment's profiles into one block object.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int32Array, Int64Builder, RecordBatch, StringBuilder, TimestampNanosecondBuilder,
    UInt64Builder,
};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use ulid::Ulid;

use super::meta::{BlockMeta, DatasetMeta, SectionMeta, FORMAT_VERSION};
use super::schema::{keyed_samples_schema, Section};
use super::BlockError;
use crate::profile::{labels_to_string, Functions, Profile, Stack, Stacks};
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

/// Encodes profiles (of any tenants and services) as one level-0 block,
/// with the node ids `nodes` holds and adding those it computes.
pub fn write_block(
    profiles: &[Profile],
    shard: u32,
    nodes: &mut StackNodes,
) -> Result<EncodedBlock, BlockError> {
    if profiles.is_empty() {
        return Err(BlockError::Empty);
    }
    let id = Ulid::new().to_string();
    let mut datasets: BTreeMap<(&str, &str), Vec<Series>> = BTreeMap::new();
    for p in profiles {
        datasets
            .entry((p.tenant.as_str(), p.service_name()))
            .or_default()
            .push(Series {
                labels: labels_to_string(&p.labels),
                profile: p,
            });
    }
    // Level-0 blocks take about 34 bytes a sample: sized once, the buffer is
    // not copied and faulted in again at each doubling as sections land.
    let samples: usize = profiles.iter().map(|p| p.samples.len()).sum();
    let mut buf = Vec::with_capacity(samples.saturating_mul(40) + (64 << 10));
    let mut metas = Vec::with_capacity(datasets.len());
    for ((tenant, service), mut dataset) in datasets {
        dataset.sort_unstable_by(|a, b| {
            (&a.profile.profile_type, &a.labels, a.profile.time_nanos).cmp(&(
                &b.profile.profile_type,
                &b.labels,
                b.profile.time_nanos,
            ))
        });
        let stacks = nodes.tree(tenant, service);
        metas.push(write_dataset(
            &mut buf,
            stacks,
            (tenant, service),
            &dataset,
        )?);
    }
    nodes.evict_if_full();
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

/// A profile and its series' labels printed once (`labels_to_string`),
/// for the sort and the sections that store them.
struct Series<'a> {
    labels: String,
    profile: &'a Profile,
}

fn append_footer(buf: &mut Vec<u8>, meta: &BlockMeta) {
    buf.extend_from_slice(&meta.encode_framed());
}

fn write_dataset(
    buf: &mut Vec<u8>,
    mut stacks: StackTree,
    (tenant, service): (&str, &str),
    dataset: &[Series],
) -> Result<DatasetMeta, BlockError> {
    let profiles: Vec<&Profile> = dataset.iter().map(|s| s.profile).collect();
    // Copied once each after dedup, not once per profile.
    let distinct = |mut names: Vec<&str>| -> Vec<String> {
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(str::to_string).collect()
    };
    let series = distinct(dataset.iter().map(|s| s.labels.as_str()).collect());
    let profile_types = distinct(profiles.iter().map(|p| p.profile_type.as_str()).collect());
    let mut totals = Totals::new();
    let keys = ProfileKeys::of(dataset, &profile_types, &series)?;
    let samples = samples_batch(dataset, &keys, &mut stacks, &mut totals)?;
    let sections = vec![
        append_section(buf, Section::Profiles, profiles_batch(service, dataset)?)?,
        SectionMeta {
            keyed: true,
            ..append_section(buf, Section::Samples, samples)?
        },
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
        ArrowWriter::try_new(&mut *buf, batch.schema(), Some(props)).map_err(encode)?;
    writer.write(&batch).map_err(encode)?;
    writer.close().map_err(encode)?;
    Ok(SectionMeta {
        kind: section.name().to_string(),
        offset,
        size: buf.len() as u64 - offset,
        rows,
        keyed: false,
    })
}

fn arrow_err(section: &'static str) -> impl Fn(arrow::error::ArrowError) -> BlockError {
    move |source| BlockError::Arrow { section, source }
}

fn profiles_batch(service: &str, dataset: &[Series]) -> Result<RecordBatch, BlockError> {
    let n = dataset.len();
    let mut time = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut service_name = StringBuilder::new();
    let mut profile_type = StringBuilder::new();
    let mut labels = StringBuilder::new();
    let mut duration = Int64Builder::with_capacity(n);
    let mut period = Int64Builder::with_capacity(n);
    let mut samples = UInt64Builder::with_capacity(n);
    let mut total = Int64Builder::with_capacity(n);
    for Series {
        labels: series,
        profile: p,
    } in dataset
    {
        time.append_value(p.time_nanos);
        service_name.append_value(service);
        profile_type.append_value(&p.profile_type);
        labels.append_value(series);
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

/// Each profile's keys into the dataset's sorted profile types and series,
/// by the profile's place in the dataset.
struct ProfileKeys {
    profile_types: Vec<i32>,
    series: Vec<i32>,
}

impl ProfileKeys {
    fn of(
        dataset: &[Series],
        profile_types: &[String],
        series: &[String],
    ) -> Result<Self, BlockError> {
        let key = |list: &[String], value: &str| -> Result<i32, BlockError> {
            let at = list
                .binary_search_by(|v| v.as_str().cmp(value))
                .map_err(|_| samples_err(format!("{value} missing from the dataset's list")))?;
            i32::try_from(at)
                .map_err(|_| samples_err(format!("{} values in a dataset's list", list.len())))
        };
        let mut keys = ProfileKeys {
            profile_types: Vec::with_capacity(dataset.len()),
            series: Vec::with_capacity(dataset.len()),
        };
        for s in dataset {
            keys.profile_types
                .push(key(profile_types, &s.profile.profile_type)?);
            keys.series.push(key(series, &s.labels)?);
        }
        Ok(keys)
    }
}

fn samples_err(reason: String) -> BlockError {
    BlockError::Arrow {
        section: "samples",
        source: arrow::error::ArrowError::InvalidArgumentError(reason),
    }
}

/// The dataset's samples as [`keyed_samples_schema`] rows.
fn samples_batch<'a>(
    dataset: &[Series<'a>],
    keys: &ProfileKeys,
    stacks: &mut StackTree,
    totals: &mut Totals<'a>,
) -> Result<RecordBatch, BlockError> {
    let n: usize = dataset.iter().map(|s| s.profile.samples.len()).sum();
    let mut time = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut profile_type = Vec::with_capacity(n);
    let mut series = Vec::with_capacity(n);
    let mut stack_id = UInt64Builder::with_capacity(n);
    let mut value = Int64Builder::with_capacity(n);
    let mut span_id = UInt64Builder::with_capacity(n);
    for (at, Series { profile: p, .. }) in dataset.iter().enumerate() {
        // A profile's rows stay in the order of its stacks' frames: no
        // reader needs them by stack id, which was a sort per profile.
        let type_totals = totals.entry(p.profile_type.as_str()).or_default();
        let (type_key, series_key) = (keys.profile_types[at], keys.series[at]);
        for (id, v, span) in stacks.rows(p) {
            let total = type_totals.entry(id).or_default();
            *total = total.saturating_add(v);
            time.append_value(p.time_nanos);
            profile_type.push(type_key);
            series.push(series_key);
            stack_id.append_value(id);
            value.append_value(v);
            span_id.append_option(span);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(time.finish()),
        Arc::new(Int32Array::from(profile_type)),
        Arc::new(Int32Array::from(series)),
        Arc::new(stack_id.finish()),
        Arc::new(value.finish()),
        Arc::new(span_id.finish()),
    ];
    RecordBatch::try_new(keyed_samples_schema(), columns).map_err(arrow_err("samples"))
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

/// Stack node ids a segment writer has computed, kept across the blocks it
/// writes: a node id is an FNV hash of its parent's id and its name, and
/// the agents of a service send the same frames every 10-15 s, so each
/// frame is hashed once while it stays cached instead of once per profile.
/// Kept per dataset (tenant, service): ids depend only on the path, but one
/// tenant's names never sit in another's map. Bounded: past `limit_bytes`
/// the whole cache is dropped after the block that filled it.
pub struct StackNodes {
    datasets: HashMap<(String, String), DatasetNodes>,
    /// The nodes of the dataset being written, kept between writes so it
    /// is not grown from nothing each time.
    written: Vec<(u64, u64, u32)>,
    /// Numbers each dataset write, so a cached node knows whether the
    /// block being written holds it yet.
    writes: u32,
    bytes: usize,
    limit_bytes: usize,
}

/// The default bound of a [`StackNodes`], about 300 k nodes.
pub const STACK_NODES_BYTES: usize = 16 << 20;

impl Default for StackNodes {
    fn default() -> Self {
        StackNodes::with_limit(STACK_NODES_BYTES)
    }
}

impl StackNodes {
    pub fn with_limit(limit_bytes: usize) -> Self {
        StackNodes {
            datasets: HashMap::new(),
            written: Vec::new(),
            writes: 0,
            bytes: 0,
            limit_bytes,
        }
    }

    /// Approximate bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn tree(&mut self, tenant: &str, service: &str) -> StackTree<'_> {
        // Starting over when the counter wraps keeps "written by this
        // write" exact.
        self.writes = match self.writes.checked_add(1) {
            Some(w) => w,
            None => {
                self.datasets.clear();
                self.bytes = 0;
                1
            }
        };
        let key = (tenant.to_string(), service.to_string());
        self.written.clear();
        StackTree {
            nodes: WriteNodes {
                dataset: self.datasets.entry(key).or_default(),
                bytes: &mut self.bytes,
                write: self.writes,
                written: &mut self.written,
            },
            tables: Default::default(),
        }
    }

    fn evict_if_full(&mut self) {
        if self.bytes > self.limit_bytes {
            self.datasets.clear();
            self.written = Vec::new();
            self.bytes = 0;
        }
    }
}

/// One dataset's cached names and nodes.
#[derive(Default)]
struct DatasetNodes {
    /// name number -> name
    names: Vec<Arc<str>>,
    numbers: foldhash::HashMap<Arc<str>, u32>,
    /// (parent id, name number) -> node
    nodes: foldhash::HashMap<(u64, u32), CachedNode>,
}

struct CachedNode {
    id: u64,
    /// The last dataset write whose stacks section holds this node.
    written: u32,
}

impl DatasetNodes {
    fn number(&mut self, name: &str, bytes: &mut usize) -> u32 {
        if let Some(&n) = self.numbers.get(name) {
            return n;
        }
        let n = self.names.len() as u32;
        let name: Arc<str> = name.into();
        *bytes += name.len() + 48;
        self.names.push(name.clone());
        self.numbers.insert(name, n);
        n
    }
}

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

/// What the stacks of one function table (the profiles of one pprof) share.
#[derive(Default)]
struct TableMemo {
    /// function index -> the dataset's name number, or `u32::MAX` if not
    /// looked up yet.
    numbers: Vec<u32>,
    last: LastStack,
    /// The frames buffer whose ranked stacks `leaves` is for.
    ranked_in: usize,
    /// A stack's rank -> its leaf id, or 0 if not walked yet. A pprof of
    /// several sample types makes a profile of each, with the same stacks:
    /// the first walks them, the others read their ids here.
    leaves: Vec<u64>,
}

/// The nodes of every stack of one dataset write.
struct StackTree<'c> {
    nodes: WriteNodes<'c>,
    /// Per function table, by its address (the profiles outlive the tree).
    tables: foldhash::HashMap<usize, TableMemo>,
}

/// The dataset's cached nodes, and those this write holds.
struct WriteNodes<'c> {
    dataset: &'c mut DatasetNodes,
    bytes: &'c mut usize,
    write: u32,
    /// (id, parent id, name number) of each node this write holds.
    written: &'c mut Vec<(u64, u64, u32)>,
}

impl<'c> StackTree<'c> {
    /// Each sample of `p` as (leaf id, value, span), adding the nodes of
    /// every stack as the rows are read.
    fn rows<'s>(
        &'s mut self,
        p: &'s Profile,
    ) -> impl Iterator<Item = (u64, i64, Option<u64>)> + use<'s, 'c> {
        let table = Arc::as_ptr(&p.functions) as usize;
        let memo = self.tables.entry(table).or_default();
        if memo.numbers.len() < p.functions.len() {
            memo.numbers.resize(p.functions.len(), u32::MAX);
        }
        let nodes = &mut self.nodes;
        let stacks = Ranked {
            stacks: &p.stacks,
            buffer: Arc::as_ptr(&p.stacks) as usize,
        };
        p.samples.iter().map(move |s| {
            let id = memo.leaf_id(nodes, &p.functions, stacks, s.stack);
            (id, s.value, s.span_id)
        })
    }

    fn into_batch(self) -> Result<RecordBatch, BlockError> {
        let nodes = self.nodes.written;
        nodes.sort_unstable_by_key(|n| n.0);
        // Two paths whose ids collide are one node, as the readers see it.
        nodes.dedup_by_key(|n| n.0);
        let mut id = UInt64Builder::with_capacity(nodes.len());
        let mut parent = UInt64Builder::with_capacity(nodes.len());
        let mut name = StringBuilder::new();
        for &(i, p, n) in nodes.iter() {
            id.append_value(i);
            parent.append_value(p);
            name.append_value(&self.nodes.dataset.names[n as usize]);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(parent.finish()),
            Arc::new(name.finish()),
        ];
        RecordBatch::try_new(Section::Stacks.schema(), columns).map_err(arrow_err("stacks"))
    }
}

/// A profile's stacks, and the buffer their ranks are ranks in.
#[derive(Clone, Copy)]
struct Ranked<'p> {
    stacks: &'p Stacks,
    buffer: usize,
}

impl TableMemo {
    fn leaf_id(
        &mut self,
        nodes: &mut WriteNodes,
        functions: &Functions,
        stacks: Ranked,
        stack: Stack,
    ) -> u64 {
        let frames = stacks.stacks.get(stack);
        let Some(rank) = stack.rank() else {
            return self.walk(nodes, functions, frames);
        };
        if self.ranked_in != stacks.buffer {
            self.ranked_in = stacks.buffer;
            self.leaves.clear();
        }
        let rank = rank as usize;
        if let Some(&id) = self.leaves.get(rank).filter(|id| **id != 0) {
            // Only `normalise` ranks stacks; a caller that gave one rank to
            // two stacks of a buffer would store the wrong leaf silently.
            debug_assert_eq!(
                id,
                leaf_of(functions, frames),
                "rank {rank} names two stacks"
            );
            return id;
        }
        let id = self.walk(nodes, functions, frames);
        if self.leaves.len() <= rank {
            self.leaves.resize(rank + 1, 0);
        }
        self.leaves[rank] = id;
        id
    }

    /// Adds every node of a root-first stack and returns the leaf's id.
    fn walk(&mut self, nodes: &mut WriteNodes, functions: &Functions, stack: &[u32]) -> u64 {
        let shared = crate::profile::shared_prefix(&self.last.frames, stack);
        self.last.frames.truncate(shared);
        self.last.ids.truncate(shared);
        let mut parent = self.last.ids.last().copied().unwrap_or(stack::ROOT);
        for &f in &stack[shared..] {
            let name = match self.numbers.get(f as usize) {
                Some(&n) if n != u32::MAX => n,
                known => {
                    let text = functions.get(f as usize).unwrap_or("");
                    let n = nodes.dataset.number(text, nodes.bytes);
                    if known.is_some() {
                        self.numbers[f as usize] = n;
                    }
                    n
                }
            };
            let id = nodes.child(parent, name);
            self.last.frames.push(f);
            self.last.ids.push(id);
            parent = id;
        }
        parent
    }
}

/// A stack's leaf id from its names alone, as [`TableMemo::walk`] computes it.
fn leaf_of(functions: &Functions, stack: &[u32]) -> u64 {
    stack.iter().fold(stack::ROOT, |parent, &f| {
        stack::node_id(parent, functions.get(f as usize).unwrap_or(""))
    })
}

impl WriteNodes<'_> {
    /// The id of the node `name` under `parent`, which this write now holds.
    fn child(&mut self, parent: u64, name: u32) -> u64 {
        match self.dataset.nodes.entry((parent, name)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let node = e.into_mut();
                if node.written != self.write {
                    node.written = self.write;
                    self.written.push((node.id, parent, name));
                }
                node.id
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let id = stack::node_id(parent, &self.dataset.names[name as usize]);
                e.insert(CachedNode {
                    id,
                    written: self.write,
                });
                *self.bytes += 40;
                self.written.push((id, parent, name));
                id
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::schema::row_group_rows;
    use parquet::file::metadata::ParquetMetaDataReader;

    /// One tenant's single profile of service `api`, a sample per stack.
    fn api_profile(time_nanos: i64, functions: Functions, stacks: Vec<Vec<u32>>) -> Profile {
        let (stacks, samples) = Stacks::with_samples(stacks.into_iter().map(|st| (st, 3, None)));
        Profile {
            tenant: "t".into(),
            labels: vec![("service_name".into(), "api".into())],
            profile_type: "cpu:cpu:nanoseconds:cpu:nanoseconds".into(),
            time_nanos,
            duration_nanos: 0,
            period: 0,
            functions: Arc::new(functions),
            stacks,
            samples,
        }
    }

    /// The Parquet footer of the first dataset's `section`.
    fn section_footer(
        block: &EncodedBlock,
        section: Section,
    ) -> parquet::file::metadata::ParquetMetaData {
        let meta = block.meta.datasets[0].section(section).unwrap();
        let bytes = block
            .bytes
            .slice(meta.offset as usize..(meta.offset + meta.size) as usize);
        ParquetMetaDataReader::new()
            .parse_and_finish(&bytes)
            .unwrap()
    }

    #[test]
    fn large_sections_are_cut_into_bounded_row_groups() {
        let n = 2 * row_group_rows(0) + 1000;
        let profile = api_profile(
            1,
            (0..n).map(|i| format!("f{i}")).collect(),
            (0..n as u32).map(|i| vec![i]).collect(),
        );
        let block = write_block(&[profile], 0, &mut StackNodes::default()).unwrap();
        for section in [Section::Samples, Section::Stacks] {
            let rows_written = block.meta.datasets[0].section(section).unwrap().rows;
            let footer = section_footer(&block, section);
            let rows: Vec<i64> = footer.row_groups().iter().map(|g| g.num_rows()).collect();
            assert_eq!(rows.iter().sum::<i64>(), rows_written as i64, "{section:?}");
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

    /// Level 0 skips the dictionaries and statistics that would cost more
    /// to write than they save in a block that lives a minute; what
    /// queries prune by keeps its own.
    #[test]
    fn level_0_samples_keep_the_statistics_worth_their_cost() {
        let functions = ["main", "a"].into_iter().collect();
        let profile = api_profile(7, functions, vec![vec![0], vec![0, 1]]);
        let block = write_block(&[profile], 0, &mut StackNodes::default()).unwrap();
        let footer = section_footer(&block, Section::Samples);
        let group = &footer.row_groups()[0];
        let column = |name: &str| {
            group
                .columns()
                .iter()
                .find(|c| c.column_path().string() == name)
                .unwrap_or_else(|| panic!("no column {name}"))
        };
        for name in [
            "time",
            "profile_type_key",
            "series_key",
            "stack_id",
            "value",
            "span_id",
        ] {
            assert!(column(name).dictionary_page_offset().is_none(), "{name}");
        }
        for name in ["profile_type_key", "series_key", "stack_id", "value"] {
            assert!(column(name).statistics().is_none(), "{name}");
        }
        let spans = column("span_id").statistics().expect("span_id");
        assert_eq!(spans.null_count_opt(), Some(2));
        assert!(column("time").statistics().is_some());
    }

    /// Every sample row names its own profile's service, type and series,
    /// read back as the plain strings the section's schema declares.
    #[test]
    fn sample_rows_carry_their_profiles_strings() {
        use arrow::array::AsArray;
        let functions: Arc<Functions> = Arc::new(["main", "a", "b"].into_iter().collect());
        let profile = |ty: &str, pod: &str, time_nanos: i64, samples: usize| {
            let (stacks, samples) =
                Stacks::with_samples((0..samples).map(|i| ([0, i as u32 % 3], 1, None)));
            Profile {
                tenant: "t".into(),
                labels: vec![
                    ("pod".into(), pod.into()),
                    ("service_name".into(), "api".into()),
                ],
                profile_type: ty.into(),
                time_nanos,
                duration_nanos: 0,
                period: 0,
                functions: functions.clone(),
                stacks,
                samples,
            }
        };
        let profiles = vec![
            profile("b:b:b:b:b", "p1", 2, 3),
            profile("a:a:a:a:a", "p2", 1, 2),
            profile("a:a:a:a:a", "p1", 5, 1),
            profile("a:a:a:a:a", "p1", 4, 4),
        ];
        let mut want: Vec<(String, String, String)> = Vec::new();
        let mut sorted: Vec<&Profile> = profiles.iter().collect();
        sorted.sort_by_key(|p| (&p.profile_type, labels_to_string(&p.labels), p.time_nanos));
        for p in sorted {
            let row = (
                "api".to_string(),
                p.profile_type.clone(),
                labels_to_string(&p.labels),
            );
            want.extend(std::iter::repeat_n(row, p.samples.len()));
        }
        let block = write_block(&profiles, 0, &mut StackNodes::default()).unwrap();
        let mut got = Vec::new();
        for b in section_batches(&block, Section::Samples) {
            assert_eq!(b.schema(), Section::Samples.schema());
            let column = |name: &str| b.column_by_name(name).unwrap().as_string::<i32>().clone();
            let (service, ty, labels) = (
                column("service_name"),
                column("profile_type"),
                column("labels"),
            );
            for i in 0..b.num_rows() {
                got.push((
                    service.value(i).to_string(),
                    ty.value(i).to_string(),
                    labels.value(i).to_string(),
                ));
            }
        }
        assert_eq!(got, want);
    }

    fn section_batches(block: &EncodedBlock, section: Section) -> Vec<RecordBatch> {
        dataset_batches(block, 0, section)
    }

    /// The rows of a dataset's section, samples with their strings.
    fn dataset_batches(block: &EncodedBlock, dataset: usize, section: Section) -> Vec<RecordBatch> {
        let dataset = &block.meta.datasets[dataset];
        let meta = dataset.section(section).unwrap();
        let bytes = block
            .bytes
            .slice(meta.offset as usize..(meta.offset + meta.size) as usize);
        let batches = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 1024)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(meta.keyed, section == Section::Samples);
        if !meta.keyed {
            return batches;
        }
        let strings = crate::block::DatasetStrings::of(dataset);
        batches
            .iter()
            .map(|b| {
                assert_eq!(b.schema(), keyed_samples_schema());
                strings.samples(b).unwrap()
            })
            .collect()
    }

    /// Stacks given in any order, by profiles that share a function table
    /// or not, get the nodes that their paths' names make.
    #[test]
    fn stack_nodes_are_the_paths_of_every_stack_whatever_their_order() {
        use arrow::array::AsArray;
        use arrow::datatypes::UInt64Type;
        let shared: Arc<Functions> = Arc::new(["main", "a", "b", "c", "d"].into_iter().collect());
        // The same indices mean other names in another table.
        let other: Arc<Functions> = Arc::new(["main", "d", "c", "b", "a"].into_iter().collect());
        let profile = |ty: &str, functions: &Arc<Functions>, stacks: &[&[u32]]| {
            let (stacks, samples) = Stacks::with_samples(stacks.iter().map(|st| (st, 1, None)));
            Profile {
                tenant: "t".into(),
                labels: vec![("service_name".into(), "api".into())],
                profile_type: ty.into(),
                time_nanos: 1,
                duration_nanos: 0,
                period: 0,
                functions: functions.clone(),
                stacks,
                samples,
            }
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
                for &f in p.stack(s) {
                    let name = p.functions.get(f as usize).unwrap().to_string();
                    let id = stack::node_id(parent, &name);
                    want.insert(id, (parent, name));
                    parent = id;
                }
            }
        }
        let block = write_block(&profiles, 0, &mut StackNodes::default()).unwrap();
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
        let leaf = |f: &Functions, st: &[u32]| {
            st.iter().fold(stack::ROOT, |p, &i| {
                stack::node_id(p, f.get(i as usize).unwrap())
            })
        };
        let mut want_leaves = std::collections::BTreeSet::new();
        for p in &profiles {
            for s in &p.samples {
                want_leaves.insert(leaf(&p.functions, p.stack(s)));
            }
        }
        assert_eq!(leaves, want_leaves);
    }

    /// Distinct stacks side by side in one buffer, ranked in the order
    /// given, as `normalise` makes a pprof's.
    fn ranked_stacks(stacks: &[&[u32]]) -> (Arc<Stacks>, Vec<Stack>) {
        let frames = Arc::new(Stacks::from_frames(stacks.concat()));
        let mut start = 0;
        let ranked = stacks
            .iter()
            .enumerate()
            .map(|(rank, st)| {
                let stack = Stack::ranked(start..start + st.len(), rank as u32);
                start += st.len();
                stack
            })
            .collect();
        (frames, ranked)
    }

    /// Profiles of one pprof share its ranked stacks, and a stack walked
    /// for one is not walked for the next: the block must be what the same
    /// stacks unranked make, whichever profile walks a stack first, and a
    /// second buffer under the same function table (its ranks mean other
    /// stacks) must not read the first one's ids.
    #[test]
    fn ranked_stacks_make_the_block_their_frames_make() {
        let functions: Arc<Functions> = Arc::new(["main", "a", "b", "c"].into_iter().collect());
        let (in_first, first) = ranked_stacks(&[&[0, 1], &[0, 1, 2], &[0, 3]]);
        let (in_second, second) = ranked_stacks(&[&[0, 3, 1], &[0, 2]]);
        let profile = |ty: &str, pod: &str, (buffer, stacks): (&Arc<Stacks>, Vec<Stack>)| Profile {
            tenant: "t".into(),
            labels: vec![
                ("pod".into(), pod.into()),
                ("service_name".into(), "api".into()),
            ],
            profile_type: ty.into(),
            time_nanos: 1,
            duration_nanos: 0,
            period: 0,
            functions: functions.clone(),
            stacks: buffer.clone(),
            samples: stacks
                .into_iter()
                .enumerate()
                .map(|(i, stack)| crate::profile::Sample {
                    stack,
                    value: i as i64 + 1,
                    span_id: None,
                })
                .collect(),
        };
        let ranked = vec![
            profile("a:a:a:a:a", "p1", (&in_first, vec![first[2], first[0]])),
            profile("b:b:b:b:b", "p1", (&in_first, first.clone())),
            profile("b:b:b:b:b", "p2", (&in_second, second.clone())),
            profile("c:c:c:c:c", "p1", (&in_first, vec![first[1], first[2]])),
        ];
        let unranked: Vec<Profile> = ranked
            .iter()
            .map(|p| {
                let (stacks, samples) = Stacks::with_samples(
                    p.samples.iter().map(|s| (p.stack(s), s.value, s.span_id)),
                );
                Profile {
                    stacks,
                    samples,
                    ..p.clone()
                }
            })
            .collect();
        assert!(unranked[1].samples[0].stack.rank().is_none());
        let want = dataset_rows(
            &write_block(&unranked, 0, &mut StackNodes::default()).unwrap(),
            0,
        );
        let mut nodes = StackNodes::default();
        for write in ["cold", "warm"] {
            let got = dataset_rows(&write_block(&ranked, 0, &mut nodes).unwrap(), 0);
            assert_eq!(got, want, "{write}");
        }
    }

    /// A dataset's stack nodes as (id, parent, name), and its samples as
    /// (series, stack id, value) in the order written.
    type Rows = (
        std::collections::BTreeSet<(u64, u64, String)>,
        Vec<(String, u64, i64)>,
    );

    fn dataset_rows(block: &EncodedBlock, dataset: usize) -> Rows {
        use arrow::array::AsArray;
        use arrow::datatypes::{Int64Type, UInt64Type};
        let mut nodes = std::collections::BTreeSet::new();
        for b in dataset_batches(block, dataset, Section::Stacks) {
            let ids = b.column(0).as_primitive::<UInt64Type>();
            let parents = b.column(1).as_primitive::<UInt64Type>();
            let names = b.column(2).as_string::<i32>();
            for i in 0..b.num_rows() {
                nodes.insert((ids.value(i), parents.value(i), names.value(i).to_string()));
            }
        }
        let mut samples = Vec::new();
        for b in dataset_batches(block, dataset, Section::Samples) {
            let series = b.column_by_name("labels").unwrap().as_string::<i32>();
            let ids = b
                .column_by_name("stack_id")
                .unwrap()
                .as_primitive::<UInt64Type>();
            let values = b
                .column_by_name("value")
                .unwrap()
                .as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                samples.push((series.value(i).to_string(), ids.value(i), values.value(i)));
            }
        }
        (nodes, samples)
    }

    /// Profiles of two tenants sharing a service name: each tenant's
    /// functions are its own, and one profile per pprof (function table).
    fn tenants_profiles(round: u32) -> Vec<Profile> {
        let mut out = Vec::new();
        for (tenant, names) in [
            ("acme", ["main", "serve", "parse", "acme_secret"]),
            ("globex", ["main", "serve", "render", "globex_secret"]),
        ] {
            for pod in 0..3u32 {
                let functions: Arc<Functions> = Arc::new(names.into_iter().collect());
                // Ranked in one buffer per pprof, as `normalise` makes them,
                // so the memo of leaves by rank is what gets tested.
                let last = [0, (round + pod) % 4];
                let (buffer, stacks) = ranked_stacks(&[&[0, 1], &[0, 1, 2], &[0, 1, 2, 3], &last]);
                out.push(Profile {
                    tenant: tenant.into(),
                    labels: vec![
                        ("pod".into(), format!("p{pod}")),
                        ("service_name".into(), "api".into()),
                    ],
                    profile_type: "cpu:cpu:nanoseconds:cpu:nanoseconds".into(),
                    time_nanos: i64::from(round),
                    duration_nanos: 0,
                    period: 0,
                    functions,
                    stacks: buffer,
                    samples: stacks
                        .into_iter()
                        .enumerate()
                        .map(|(i, stack)| crate::profile::Sample {
                            stack,
                            value: i as i64 + 1,
                            span_id: None,
                        })
                        .collect(),
                });
            }
        }
        out
    }

    /// Blocks written with node ids cached from earlier blocks hold what
    /// blocks written from nothing hold, dataset by dataset, also when the
    /// cache is dropped after every block; and a tenant's stacks section
    /// never holds a node of another tenant that shares its service name.
    #[test]
    fn cached_node_ids_write_the_blocks_a_fresh_writer_writes_and_stay_per_tenant() {
        let mut warm = StackNodes::default();
        let mut tiny = StackNodes::with_limit(1);
        for round in 0..4 {
            let profiles = tenants_profiles(round);
            let fresh = write_block(&profiles, 0, &mut StackNodes::default()).unwrap();
            let warm_block = write_block(&profiles, 0, &mut warm).unwrap();
            let tiny_block = write_block(&profiles, 0, &mut tiny).unwrap();
            assert_eq!(tiny.bytes(), 0, "a cache past its limit is dropped");
            assert_eq!(fresh.meta.datasets.len(), 2);
            for d in 0..2 {
                let want = dataset_rows(&fresh, d);
                assert_eq!(
                    dataset_rows(&warm_block, d),
                    want,
                    "round {round} dataset {d}"
                );
                assert_eq!(
                    dataset_rows(&tiny_block, d),
                    want,
                    "round {round} dataset {d}"
                );
                let tenant = &fresh.meta.datasets[d].tenant;
                let other = if tenant == "acme" {
                    "globex_secret"
                } else {
                    "acme_secret"
                };
                assert!(want.0.iter().all(|(_, _, name)| name != other), "{tenant}");
                assert!(want
                    .0
                    .iter()
                    .any(|(_, _, name)| name.starts_with(tenant.as_str())));
            }
        }
        assert!(warm.bytes() > 0);
    }
}
