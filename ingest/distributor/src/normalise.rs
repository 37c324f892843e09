//! Turns a decoded pprof profile into Ember's normalised profiles, as the
//! Pyroscope distributor does: one profile per sample type and per set of
//! sample labels, missing timestamps set to the receive time, zero values
//! dropped, samples sharing a stack summed, inlined frames split.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use ember_engine::profile::{
    compare_frames, normalise_labels, Functions, Labels, Profile, Sample, Stack, Stacks,
    METRIC_NAME, SERVICE_NAME,
};

use crate::formats::pprof::{FlatFunction, FlatLabel, FlatProfile, LocationIds};
use crate::limits::{utf8, ProfileLimits, TRUNCATED_FRAME};
use crate::IngestError;

/// Labels on pprof samples that identify a trace span, kept per sample
/// instead of splitting series.
const SPAN_LABELS: [&str; 2] = ["span_id", "profile_id"];

pub const MAX_LABEL_NAMES: usize = 30;
pub const MAX_LABEL_NAME_LEN: usize = 1024;
pub const MAX_LABEL_VALUE_LEN: usize = 2048;
pub const DEFAULT_SERVICE: &str = "unknown_service";

/// Where a profile is going and what the request said of it.
#[derive(Debug, Clone)]
pub struct Destination {
    pub tenant: String,
    /// Series labels from the request (`__name__`, `service_name`, tags).
    pub labels: Labels,
    pub received_at_nanos: i64,
    /// The tenant's limits.
    pub limits: ProfileLimits,
}

/// Checks series labels and defaults `service_name`, as Pyroscope does.
pub fn validate_labels(labels: Labels) -> Result<Labels, IngestError> {
    let mut labels = normalise_labels(labels);
    for (name, value) in &labels {
        if !valid_label_name(name) {
            return Err(IngestError::Invalid(format!("invalid label name {name:?}")));
        }
        if value.len() > MAX_LABEL_VALUE_LEN {
            return Err(IngestError::Invalid(format!(
                "value of label {name} is {} bytes, over the limit of {MAX_LABEL_VALUE_LEN}",
                value.len()
            )));
        }
    }
    if !labels
        .iter()
        .any(|(k, v)| k == SERVICE_NAME && !v.is_empty())
    {
        labels.retain(|(k, _)| k != SERVICE_NAME);
        labels.push((SERVICE_NAME.into(), DEFAULT_SERVICE.into()));
        labels = normalise_labels(labels);
    }
    if labels.len() > MAX_LABEL_NAMES {
        return Err(IngestError::Invalid(format!(
            "{} labels, over the limit of {MAX_LABEL_NAMES}",
            labels.len()
        )));
    }
    Ok(labels)
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && name.len() <= MAX_LABEL_NAME_LEN
}

/// pprof ids must be non-zero; some profilers (.NET's) leave them unset and
/// refer to entries by position, 1-based, which is what an id of 0 means here.
fn id_or_position(id: u64, index: usize) -> u64 {
    if id == 0 {
        index as u64 + 1
    } else {
        id
    }
}

/// A string of the profile as text: agents' strings are bytes, and invalid
/// UTF-8 is repaired rather than failing the whole profile.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    // The lossy reader walks every byte; names are almost always valid.
    match utf8(bytes) {
        Some(valid) => Cow::Borrowed(valid),
        None => String::from_utf8_lossy(bytes),
    }
}

/// Values by pprof id (where each location's frames are, each function's
/// position): a table indexed by id when the ids are small (profilers
/// number entries 1..n), else a hash map. Every frame of every sample is
/// one lookup in the locations' table.
enum ById<T> {
    Dense(Vec<Option<T>>),
    Sparse(foldhash::HashMap<u64, T>),
}

impl<T: Copy> ById<T> {
    fn for_ids(ids: impl ExactSizeIterator<Item = u64> + Clone) -> Self {
        let n = ids.len();
        match ids.clone().max() {
            Some(max) if max <= 2 * n as u64 + 1024 => ById::Dense(vec![None; max as usize + 1]),
            _ => ById::Sparse(foldhash::HashMap::with_capacity_and_hasher(
                n,
                Default::default(),
            )),
        }
    }

    /// The table of `ids` and their values; of a repeated id, the last.
    fn of(ids: impl ExactSizeIterator<Item = (u64, T)> + Clone) -> Self {
        let mut table = ById::for_ids(ids.clone().map(|(id, _)| id));
        for (id, value) in ids {
            table.insert(id, value);
        }
        table
    }

    fn insert(&mut self, id: u64, value: T) {
        match self {
            // for_ids sized the table for every id.
            ById::Dense(table) => table[id as usize] = Some(value),
            ById::Sparse(map) => {
                map.insert(id, value);
            }
        }
    }

    #[inline(always)]
    fn get(&self, id: u64) -> Option<T> {
        match self {
            ById::Dense(table) => usize::try_from(id)
                .ok()
                .and_then(|i| table.get(i).copied().flatten()),
            ById::Sparse(map) => map.get(&id).copied(),
        }
    }
}

/// Room for the names interning copies: every function's name (or system
/// name where it has none) up to the symbol limit, but never more than the
/// string table holds, as functions sharing one long name would otherwise
/// claim it each time.
fn name_bytes(p: &FlatProfile, limits: &ProfileLimits) -> usize {
    let len = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| p.strings.get(i))
            .map_or(0, |s| s.len())
    };
    let names: usize = p
        .functions
        .iter()
        .map(|f| match len(f.name) {
            0 => len(f.system_name),
            n => n,
        })
        .map(|n| n.min(limits.max_profile_symbol_value_length))
        .fold(0usize, usize::saturating_add);
    let table: usize = p.strings.iter().map(|s| s.len()).sum();
    names.min(table) + TRUNCATED_FRAME.len()
}

/// Interns function names and the frames of each location.
struct Symbols<'a> {
    names: Functions,
    /// Keyed by the profile's own bytes where they are valid UTF-8, so a
    /// name is copied once, into `names`.
    index: foldhash::HashMap<Cow<'a, str>, u32>,
    /// location id -> where its function indices are in `frames`.
    locations: ById<(u32, u32)>,
    /// location id -> its one function index, for the locations of one
    /// frame (nearly all) when ids are small; [`NOT_ONE_FRAME`] for the
    /// others. A quarter the size of `locations`, and read without a range.
    one_frame: Vec<u32>,
    /// Function indices of every location, root first (inlined frames
    /// split: the location's function last).
    frames: Vec<u32>,
    /// Index of [`TRUNCATED_FRAME`], interned up front.
    truncated: u32,
    /// Frames a stack keeps before the truncation frame.
    max_depth: usize,
}

impl<'a> Symbols<'a> {
    fn intern(&mut self, name: Cow<'a, str>) -> u32 {
        // Most names are new to the profile: hashed once, not for a
        // lookup and again for the insert.
        match self.index.entry(name) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                let i = self.names.push(e.key());
                *e.insert(i)
            }
        }
    }

    fn intern_function(
        &mut self,
        p: &FlatProfile<'a>,
        f: &FlatFunction,
        limits: &ProfileLimits,
    ) -> Result<u32, IngestError> {
        let mut name = p.string(f.name, "function.name")?;
        if name.is_empty() {
            name = p.string(f.system_name, "function.system_name")?;
        }
        Ok(self.intern(limits.symbol(name)))
    }

    fn build(p: &FlatProfile<'a>, limits: &ProfileLimits) -> Result<Self, IngestError> {
        // Only functions that locations name are interned: a profile can
        // send millions of empty functions in a few megabytes.
        let lines: usize = p.locations.iter().map(|l| p.line_functions(l).len()).sum();
        let names = p.functions.len().min(lines) + 1;
        let mut s = Symbols {
            names: Functions::with_capacity(names, name_bytes(p, limits)),
            // Growing would hash every name again at each doubling.
            index: foldhash::HashMap::with_capacity_and_hasher(names, Default::default()),
            locations: ById::for_ids(
                p.locations
                    .iter()
                    .enumerate()
                    .map(|(i, l)| id_or_position(l.id, i)),
            ),
            frames: Vec::with_capacity(p.locations.len()),
            one_frame: Vec::new(),
            truncated: 0,
            max_depth: limits.kept_depth(),
        };
        s.truncated = s.intern(TRUNCATED_FRAME.into());
        // function id -> position; names are interned when a location
        // first uses them, so functions no sample reaches cost nothing.
        let functions = ById::of(
            p.functions
                .iter()
                .enumerate()
                .map(|(i, f)| (id_or_position(f.id, i), i)),
        );
        if let ById::Dense(table) = &s.locations {
            s.one_frame = vec![NOT_ONE_FRAME; table.len()];
        }
        let mut interned = vec![u32::MAX; p.functions.len()];
        for (i, loc) in p.locations.iter().enumerate() {
            let start = s.frames.len() as u32;
            for function_id in p.line_functions(loc) {
                let at = functions.get(*function_id).ok_or_else(|| {
                    IngestError::Invalid(format!(
                        "location {} refers to unknown function {function_id}",
                        loc.id
                    ))
                })?;
                if interned[at] == u32::MAX {
                    interned[at] = s.intern_function(p, &p.functions[at], limits)?;
                }
                s.frames.push(interned[at]);
            }
            if s.frames.len() as u32 == start {
                // No symbols: the address is all there is, as in pprof's own output.
                let index = s.intern(format!("0x{:x}", loc.address).into());
                s.frames.push(index);
            }
            // Stacks are built root first: each location's frames are
            // kept in that order, copied as they are for every stack.
            s.frames[start as usize..].reverse();
            let id = id_or_position(loc.id, i);
            s.locations.insert(id, (start, s.frames.len() as u32));
            if let Some(one) = usize::try_from(id)
                .ok()
                .and_then(|i| s.one_frame.get_mut(i))
            {
                // Of a repeated id, the last counts, as in `locations`.
                *one = match &s.frames[start as usize..] {
                    [frame] => *frame,
                    _ => NOT_ONE_FRAME,
                };
            }
        }
        Ok(s)
    }

    /// A location's frames, root first. Looked up for every id of every
    /// new stack: inlined, with the error built out of line, so the lookup
    /// does not return a whole `Result` through memory.
    #[inline(always)]
    fn frames_of(&self, location_id: u64) -> Result<&[u32], IngestError> {
        match self.locations.get(location_id) {
            Some((start, end)) => Ok(&self.frames[start as usize..end as usize]),
            None => Err(unknown_location(location_id)),
        }
    }

    /// Appends the root-first stack of the location list to `out`, as
    /// [`Symbols::append_stack`] does; `ids` holds the decoded list if it
    /// takes that path.
    fn append_stack_of(
        &self,
        locations: LocationIds,
        out: &mut Vec<u32>,
        ids: &mut Vec<u64>,
    ) -> Result<(), IngestError> {
        if self.append_small_stack(locations, out) {
            return Ok(());
        }
        locations.decode_into(ids);
        self.append_stack(ids, out)
    }

    /// Nearly every stack is within the depth limit and of locations with
    /// small ids, most of them of one frame: those are mapped as their ids
    /// are read, without an array of decoded ids. Returns false, with `out`
    /// as it was, for any other stack.
    #[inline]
    fn append_small_stack(&self, locations: LocationIds, out: &mut Vec<u32>) -> bool {
        let start = out.len();
        // Room for as many frames as the ids take bytes, up to the depth
        // kept whole: a stack of more is not taken here.
        out.resize(start + locations.most().min(self.max_depth + 1), 0);
        let slots = &mut out[start..];
        let mut n = 0;
        let all = locations.all(|id| {
            let frame = usize::try_from(id)
                .ok()
                .and_then(|i| self.one_frame.get(i).copied());
            match frame {
                Some(frame) if frame != NOT_ONE_FRAME && n < slots.len() => {
                    slots[n] = frame;
                    n += 1;
                    true
                }
                Some(_) => match self.copy_inlined_frames(id, &mut slots[n..]) {
                    Some(copied) => {
                        n += copied;
                        true
                    }
                    None => false,
                },
                None => false,
            }
        });
        if !all {
            out.truncate(start);
            return false;
        }
        out.truncate(start + n);
        // Leaf first as sent; root first as stored.
        out[start..].reverse();
        true
    }

    /// Copies the frames of a location of several (inlined) into the
    /// start of `to`, leaf first as a sample's ids are, and returns how
    /// many; `None` if they do not fit or the location is unknown. Out of
    /// line: the loop over a stack's ids stays small enough to inline.
    #[inline(never)]
    fn copy_inlined_frames(&self, id: u64, to: &mut [u32]) -> Option<usize> {
        let frames = self.frames_of(id).ok()?;
        let to = to.get_mut(..frames.len())?;
        for (slot, frame) in to.iter_mut().zip(frames.iter().rev()) {
            *slot = *frame;
        }
        Some(frames.len())
    }

    /// Appends the root-first stack of a sample to `out`. A stack deeper
    /// than the limit keeps its root-most frames and ends in the truncation
    /// frame, so a flame graph still shows where the deep stack came from;
    /// building stops at the limit, so a hostile stack costs no more than a
    /// legal one.
    fn append_stack(&self, location_ids: &[u64], out: &mut Vec<u32>) -> Result<(), IngestError> {
        let start = out.len();
        // A stack at the limit is kept whole; a deeper one keeps one frame
        // less than the limit, then the truncation frame.
        let whole = self.max_depth + 1;
        for (i, id) in location_ids.iter().enumerate().rev() {
            let frames = self.frames_of(*id)?;
            if out.len() - start + frames.len() <= whole {
                // Most locations are one frame: pushed, not copied.
                match frames {
                    [frame] => out.push(*frame),
                    _ => out.extend_from_slice(frames),
                }
                continue;
            }
            out.truncate(start + self.max_depth);
            let room = start + self.max_depth - out.len();
            out.extend_from_slice(&frames[..room.min(frames.len())]);
            out.push(self.truncated);
            // The frames past the limit are not kept, but their locations
            // must exist, as for any stack.
            for id in &location_ids[..i] {
                self.frames_of(*id)?;
            }
            return Ok(());
        }
        Ok(())
    }
}

/// In [`Symbols::one_frame`], a location of more frames (inlined) or none.
const NOT_ONE_FRAME: u32 = u32::MAX;

#[cold]
fn unknown_location(id: u64) -> IngestError {
    IngestError::Invalid(format!("sample refers to unknown location {id}"))
}

fn profile_type_name(dest: &Labels, period_type: &str, sample_type: &str) -> String {
    if let Some((_, v)) = dest.iter().find(|(k, _)| k == METRIC_NAME) {
        return v.clone();
    }
    if period_type == "cpu" || sample_type == "cpu" {
        "process_cpu".into()
    } else if period_type == "space"
        || sample_type.contains("alloc")
        || sample_type.contains("inuse")
    {
        "memory".into()
    } else {
        "unknown".into()
    }
}

fn span_id(value: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(value).ok()?, 16).ok()
}

/// One series' samples of one sample type as (stack index in
/// [`DistinctStacks`], span, value), summed by stack and span once sorted.
type SeriesSamples = Vec<(u32, Option<u64>, i64)>;

/// A sample's labels as the profile's own bytes, sorted by name with the
/// last of a repeated name kept: one series per distinct set, before any
/// string is copied.
type RawLabels<'a> = Vec<(&'a [u8], &'a [u8])>;

/// The stacks of a profile's samples, each built once per distinct
/// location list whatever the number of sample types and label sets that
/// use it, side by side in one buffer.
struct DistinctStacks<'p> {
    /// Keyed by the ids as sent (mostly packed bytes, a quarter of their
    /// decoded size), so a repeated list is neither decoded nor hashed
    /// wide.
    by_locations: foldhash::HashMap<LocationIds<'p>, u32>,
    frames: Vec<u32>,
    /// Where each stack ends in `frames`.
    ends: Vec<usize>,
    /// The location ids of the stack being built.
    ids: Vec<u64>,
}

/// The distinct stacks of a profile in sorted order, side by side in one
/// buffer, and each location list's stack in that order: sorting samples
/// by rank brings those to merge together without hashing whole stacks.
struct RankedStacks {
    stacks: Arc<Stacks>,
    by_rank: Vec<Stack>,
    rank: Vec<u32>,
}

impl<'p> DistinctStacks<'p> {
    /// Sized for every sample having its own stack, as most do, of a
    /// frame per location up to the depth a stack keeps (bounded by the
    /// ids' bytes: cheaper than counting them, for an id or two of room
    /// more than a byte each).
    fn for_samples_of(p: &FlatProfile, symbols: &Symbols) -> Self {
        let samples = p.samples.len();
        let kept = symbols.max_depth + 1;
        let locations = p
            .samples
            .iter()
            .map(|s| p.location_ids(s).most().min(kept))
            .fold(0usize, usize::saturating_add);
        DistinctStacks {
            by_locations: foldhash::HashMap::with_capacity_and_hasher(samples, Default::default()),
            frames: Vec::with_capacity(locations),
            ends: Vec::with_capacity(samples),
            ids: Vec::new(),
        }
    }

    fn index(&mut self, symbols: &Symbols, locations: LocationIds<'p>) -> Result<u32, IngestError> {
        // Hashed once: a new list is inserted where the lookup missed.
        let new = match self.by_locations.entry(locations) {
            Entry::Occupied(e) => return Ok(*e.get()),
            Entry::Vacant(e) => e,
        };
        symbols.append_stack_of(*new.key(), &mut self.frames, &mut self.ids)?;
        self.ends.push(self.frames.len());
        Ok(*new.insert(self.ends.len() as u32 - 1))
    }

    fn stack(&self, i: u32) -> &[u32] {
        let start = match i {
            0 => 0,
            i => self.ends[i as usize - 1],
        };
        &self.frames[start..self.ends[i as usize]]
    }

    /// Different location lists can make the same stack (inlining, or a
    /// profiler that repeats locations): they share one rank and one copy.
    fn into_ranked(self) -> RankedStacks {
        let n = self.ends.len();
        let mut order: Vec<(&[u32], u32)> = (0..n as u32).map(|i| (self.stack(i), i)).collect();
        order.sort_unstable_by(|a, b| compare_frames(a.0, b.0));
        let mut rank = vec![0u32; n];
        let mut sorted: Vec<u32> = Vec::with_capacity(self.frames.len());
        let mut ends: Vec<usize> = Vec::with_capacity(n);
        let mut last: Option<&[u32]> = None;
        for (stack, i) in order {
            if last != Some(stack) {
                sorted.extend_from_slice(stack);
                ends.push(sorted.len());
                last = Some(stack);
            }
            rank[i as usize] = ends.len() as u32 - 1;
        }
        let mut start = 0;
        let by_rank = ends
            .into_iter()
            .enumerate()
            .map(|(rank, end)| {
                let stack = Stack::ranked(start..end, rank as u32);
                start = end;
                stack
            })
            .collect();
        RankedStacks {
            stacks: Arc::new(Stacks::from_frames(sorted)),
            by_rank,
            rank,
        }
    }
}

/// The profile type IDs of a profile's sample types, in order.
fn profile_types(p: &FlatProfile, dest: &Destination) -> Result<Vec<String>, IngestError> {
    let period_type = p.period_type.unwrap_or_default();
    let period = (
        text(p.string(period_type.r#type, "period_type.type")?),
        text(p.string(period_type.unit, "period_type.unit")?),
    );
    p.sample_types
        .iter()
        .map(|t| {
            let ty = text(p.string(t.r#type, "sample_type.type")?);
            let unit = text(p.string(t.unit, "sample_type.unit")?);
            let name = profile_type_name(&dest.labels, &period.0, &ty);
            Ok(format!("{name}:{ty}:{unit}:{}:{}", period.0, period.1))
        })
        .collect()
}

pub fn normalise(p: &FlatProfile, dest: &Destination) -> Result<Vec<Profile>, IngestError> {
    if p.sample_types.is_empty() {
        return Err(IngestError::Invalid("profile has no sample types".into()));
    }
    let limits = &dest.limits;
    limits.check_samples(p.samples.len())?;
    let symbols = Symbols::build(p, limits)?;
    let types = profile_types(p, dest)?;
    // sample label set -> its samples per sample type, in `per_series`
    let mut series: foldhash::HashMap<RawLabels, usize> = Default::default();
    let mut per_series: Vec<Vec<SeriesSamples>> = Vec::new();
    // The labels of the sample before and where they led: profilers write
    // a label set's samples together, so most samples repeat the labels of
    // the one before and skip sorting and hashing them.
    let mut last: Option<(&[FlatLabel], usize, Option<u64>)> = None;
    let mut raw = RawLabels::new();
    let mut stacks = DistinctStacks::for_samples_of(p, &symbols);
    for s in &p.samples {
        let values = p.values(s);
        if values.len() != types.len() {
            return Err(IngestError::Invalid(format!(
                "sample has {} values for {} sample types",
                values.len(),
                types.len()
            )));
        }
        // Negative values come from real agents (a delta profile across a
        // restart, old Go unwinding bugs): like Pyroscope, drop them rather
        // than refuse the push, so flame graph totals never go negative.
        if values.iter().all(|v| *v <= 0) {
            continue;
        }
        let sample_labels = p.labels(s);
        let (at, span) = match last {
            Some((labels, at, span)) if labels == sample_labels => (at, span),
            _ => {
                let span = raw_labels(p, sample_labels, limits, &mut raw)?;
                let next = per_series.len();
                let at = match series.get(raw.as_slice()) {
                    Some(&at) => at,
                    None => {
                        series.insert(raw.clone(), next);
                        next
                    }
                };
                if at == next {
                    // Most profiles are one series: its rows are sized for
                    // every sample at once instead of doubling. Later label
                    // sets, which split the samples between them, grow as
                    // they go.
                    let room = if next == 0 { p.samples.len() } else { 0 };
                    per_series.push(
                        (0..types.len())
                            .map(|_| SeriesSamples::with_capacity(room))
                            .collect(),
                    );
                }
                last = Some((sample_labels, at, span));
                (at, span)
            }
        };
        let stack = stacks.index(&symbols, p.location_ids(s))?;
        let per_type = &mut per_series[at];
        for (i, v) in values.iter().enumerate().filter(|(_, v)| **v > 0) {
            per_type[i].push((stack, span, *v));
        }
    }
    let series = series
        .into_iter()
        .map(|(labels, at)| (labels, std::mem::take(&mut per_series[at])));
    let time_nanos = if p.time_nanos > 0 {
        p.time_nanos
    } else {
        dest.received_at_nanos
    };
    let stacks = stacks.into_ranked();
    let functions = Arc::new(symbols.names);
    let mut out = Vec::new();
    for (labels, per_type) in by_series_labels(series, &dest.labels)? {
        let kept: Vec<(usize, Vec<Sample>)> = per_type
            .into_iter()
            .map(|rows| summed_by_stack(rows, &stacks))
            .enumerate()
            .filter(|(_, samples)| !samples.is_empty())
            .collect();
        // The last profile of a series takes its labels, the others a copy:
        // a dozen allocations a profile, freed on the writer's thread.
        let labels = std::iter::repeat_n(labels, kept.len());
        for (labels, (i, samples)) in labels.zip(kept) {
            out.push(Profile {
                tenant: dest.tenant.clone(),
                labels,
                profile_type: types[i].clone(),
                time_nanos,
                duration_nanos: p.duration_nanos,
                period: p.period,
                functions: functions.clone(),
                stacks: stacks.stacks.clone(),
                samples,
            });
        }
    }
    out.sort_by(|a, b| (&a.profile_type, &a.labels).cmp(&(&b.profile_type, &b.labels)));
    Ok(out)
}

/// A series' samples of one type sorted by stack, as the block writer walks
/// them, those of one stack and span summed into one.
fn summed_by_stack(mut rows: SeriesSamples, stacks: &RankedStacks) -> Vec<Sample> {
    let ranks = stacks.by_rank.len();
    if rows.len().saturating_mul(4) >= ranks && rows.iter().all(|r| r.1.is_none()) {
        return summed_by_rank(&rows, stacks);
    }
    for row in rows.iter_mut() {
        row.0 = stacks.rank[row.0 as usize];
    }
    rows.sort_unstable_by_key(|&(rank, span, _)| (rank, span));
    let mut samples: Vec<Sample> = Vec::with_capacity(rows.len());
    let mut last: Option<(u32, Option<u64>)> = None;
    for (rank, span_id, value) in rows {
        let key = (rank, span_id);
        match samples.last_mut() {
            Some(s) if last == Some(key) => s.value = s.value.saturating_add(value),
            _ => samples.push(Sample {
                stack: stacks.by_rank[rank as usize],
                value,
                span_id,
            }),
        }
        last = Some(key);
    }
    samples
}

/// What [`summed_by_stack`] returns for rows without spans that cover a
/// good part of the profile's stacks: summed in a table by rank and read
/// out in rank order, a counting sort instead of a comparison sort.
fn summed_by_rank(rows: &SeriesSamples, stacks: &RankedStacks) -> Vec<Sample> {
    // Values are positive, so a stack without samples is the one left at 0.
    let mut sums = vec![0i64; stacks.by_rank.len()];
    for &(stack, _, value) in rows {
        let rank = stacks.rank[stack as usize] as usize;
        sums[rank] = sums[rank].saturating_add(value);
    }
    let mut samples = Vec::with_capacity(rows.len().min(sums.len()));
    for (&value, &stack) in sums.iter().zip(&stacks.by_rank) {
        if value > 0 {
            samples.push(Sample {
                stack,
                value,
                span_id: None,
            });
        }
    }
    samples
}

/// A sample's labels as the profile's bytes (span labels apart), sorted
/// by name with the last of a repeated name kept, and its span.
/// Written into `labels`, which the caller reuses: profilers interleave
/// the samples of their label sets, and a set is looked up far more often
/// than it is new.
fn raw_labels<'a>(
    p: &FlatProfile<'a>,
    sample_labels: &[FlatLabel],
    limits: &ProfileLimits,
    labels: &mut RawLabels<'a>,
) -> Result<Option<u64>, IngestError> {
    limits.check_sample_labels(sample_labels.len())?;
    labels.clear();
    let mut span = None;
    for l in sample_labels.iter().filter(|l| l.str != 0) {
        let key = p.string(l.key, "label.key")?;
        let value = p.string(l.str, "label.str")?;
        if SPAN_LABELS.iter().any(|s| s.as_bytes() == key) {
            span = span_id(value);
        } else {
            labels.push((key, value));
        }
    }
    labels.reverse();
    labels.sort_by(|a, b| a.0.cmp(b.0));
    labels.dedup_by(|a, b| a.0 == b.0);
    Ok(span)
}

/// The samples of each series by its full labels. Label sets whose bytes
/// differ can be one series once repaired as text or joined with the
/// request's labels; their samples are summed.
fn by_series_labels<'a>(
    series: impl Iterator<Item = (RawLabels<'a>, Vec<SeriesSamples>)>,
    request: &Labels,
) -> Result<HashMap<Labels, Vec<SeriesSamples>>, IngestError> {
    let mut out: HashMap<Labels, Vec<SeriesSamples>> = HashMap::new();
    for (raw, per_type) in series {
        let sample = raw
            .into_iter()
            .map(|(k, v)| (text(k).into_owned(), text(v).into_owned()))
            .collect();
        let labels = series_labels(request, normalise_labels(sample))?;
        match out.entry(labels) {
            Entry::Vacant(e) => {
                e.insert(per_type);
            }
            Entry::Occupied(mut e) => {
                for (into, from) in e.get_mut().iter_mut().zip(per_type) {
                    into.extend(from);
                }
            }
        }
    }
    Ok(out)
}

/// Request labels plus sample labels; a sample label never replaces the
/// service or the profile name that the request set.
fn series_labels(request: &Labels, sample: Labels) -> Result<Labels, IngestError> {
    let mut labels = request.clone();
    for (k, v) in sample {
        if k == SERVICE_NAME || k == METRIC_NAME {
            continue;
        }
        labels.retain(|(name, _)| *name != k);
        labels.push((k, v));
    }
    validate_labels(labels)
}

#[cfg(test)]
mod tests;
