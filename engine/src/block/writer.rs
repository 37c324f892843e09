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
        sources: Vec::new(),
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
mod tests;
