//! JFR recordings, as the pyroscope-java agent (async-profiler) sends them
//! to `/ingest?format=jfr`: every event Pyroscope reads becomes a sample of
//! the pprof profile Pyroscope makes of it (same profile type IDs, frame
//! names and values), with the agent's context labels as sample labels.
//! The profiles then go through the same normalisation and limits as any
//! pprof.
//!
//! The recording is untrusted input: every read is bounds-checked, counts
//! are checked against the bytes left before anything is allocated, and
//! nesting (metadata elements, inline structs) is bounded.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::LazyLock;

use bytes::Bytes;
use ember_api::google::v1 as pprof;
use ember_engine::profile::Profile;
use regex::Regex;

use super::legacy::IngestParams;
use super::pprof::{maybe_gunzip, FlatProfile};
use super::{check_times, WireFormat};
use crate::limits::Limits;
use crate::normalise::normalise;
use crate::IngestError;

/// Deepest metadata element tree and inline struct a recording may nest.
const MAX_NESTING: usize = 32;
const CHUNK_HEADER_BYTES: usize = 68;

/// The agent's context labels (pyroscope-java's `LabelsSnapshot`, from
/// `proto/io/pyroscope/labels/pb/jfr_labels.proto`): a context id per
/// sample, each context a set of (key, value) string ids.
mod labels {
    include!(concat!(env!("OUT_DIR"), "/io.pyroscope.labels.pb.rs"));
}
pub use labels::{Context, LabelsSnapshot};

/// What a recording holds, as Pyroscope reads it.
#[derive(Debug)]
pub struct Recording {
    /// The `event` the profiler was started with (`cpu`, `itimer`,
    /// `wall`...): Pyroscope's `jfr_event` label.
    pub event: String,
    /// `__name__` and the profile, one per kind of event found.
    pub profiles: Vec<(&'static str, pprof::Profile)>,
}

/// The kinds of profile a recording's events make, as Pyroscope names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Cpu,
    Wall,
    InNewTlab,
    OutsideTlab,
    AllocSample,
    Lock,
    Park,
    Live,
    Malloc,
}

impl Kind {
    /// `__name__`, sample types and period type.
    fn layout(
        self,
    ) -> (
        &'static str,
        &'static [(&'static str, &'static str)],
        (&'static str, &'static str),
    ) {
        match self {
            Kind::Cpu => (
                "process_cpu",
                &[("cpu", "nanoseconds")],
                ("cpu", "nanoseconds"),
            ),
            Kind::Wall => ("wall", &[("wall", "nanoseconds")], ("wall", "nanoseconds")),
            Kind::InNewTlab => (
                "memory",
                &[
                    ("alloc_in_new_tlab_objects", "count"),
                    ("alloc_in_new_tlab_bytes", "bytes"),
                ],
                ("space", "bytes"),
            ),
            Kind::OutsideTlab => (
                "memory",
                &[
                    ("alloc_outside_tlab_objects", "count"),
                    ("alloc_outside_tlab_bytes", "bytes"),
                ],
                ("space", "bytes"),
            ),
            Kind::AllocSample => (
                "memory",
                &[
                    ("alloc_sample_objects", "count"),
                    ("alloc_sample_bytes", "bytes"),
                ],
                ("space", "bytes"),
            ),
            Kind::Lock => (
                "mutex",
                &[("contentions", "count"), ("delay", "nanoseconds")],
                ("mutex", "count"),
            ),
            Kind::Park => (
                "block",
                &[("contentions", "count"), ("delay", "nanoseconds")],
                ("block", "count"),
            ),
            Kind::Live => ("memory", &[("live", "count")], ("objects", "count")),
            Kind::Malloc => (
                "memory",
                &[("malloc_objects", "count"), ("malloc_bytes", "bytes")],
                ("", ""),
            ),
        }
    }
}

fn decode_error(reason: impl Into<String>) -> IngestError {
    IngestError::Decode {
        what: "JFR recording",
        reason: reason.into(),
    }
}

/// A bounds-checked cursor over the recording.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn at(b: &'a [u8], pos: usize) -> Self {
        Reader { b, pos }
    }

    fn byte(&mut self) -> Result<u8, IngestError> {
        let v = *self
            .b
            .get(self.pos)
            .ok_or_else(|| decode_error(format!("truncated at byte {}", self.pos)))?;
        self.pos += 1;
        Ok(v)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], IngestError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| decode_error(format!("{n} bytes at {} run past the end", self.pos)))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// JFR's variable-length integer: 7 bits a byte, low bits first; the
    /// ninth byte carries all 8 of its bits.
    fn varint(&mut self) -> Result<u64, IngestError> {
        let mut v = 0u64;
        for shift in (0..56).step_by(7) {
            let c = self.byte()?;
            v |= u64::from(c & 0x7f) << shift;
            if c < 0x80 {
                return Ok(v);
            }
        }
        Ok(v | u64::from(self.byte()?) << 56)
    }

    /// A count of things each at least one byte long: never more than the
    /// bytes left, so nothing is allocated for a lie.
    fn count(&mut self) -> Result<usize, IngestError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.b.len() - self.pos.min(self.b.len()))
            .ok_or_else(|| {
                decode_error(format!("count {n} at {} exceeds the bytes left", self.pos))
            })
    }

    fn i64_be(&mut self) -> Result<i64, IngestError> {
        let b = self.bytes(8)?;
        Ok(i64::from_be_bytes(b.try_into().unwrap_or_default()))
    }

    fn string(&mut self) -> Result<Option<String>, IngestError> {
        match self.byte()? {
            0 => Ok(None),
            1 => Ok(Some(String::new())),
            // A reference to a string constant pool: async-profiler does
            // not write them, and Pyroscope's reader does not read them.
            2 => self.varint().map(|_| None),
            3 => {
                let n = self.count()?;
                Ok(Some(String::from_utf8_lossy(self.bytes(n)?).into_owned()))
            }
            4 => {
                let n = self.count()?;
                let mut s = String::with_capacity(n);
                for _ in 0..n {
                    let c = self.varint()?;
                    s.push(
                        u32::try_from(c)
                            .ok()
                            .and_then(char::from_u32)
                            .unwrap_or('\u{fffd}'),
                    );
                }
                Ok(Some(s))
            }
            5 => {
                let n = self.count()?;
                Ok(Some(
                    self.bytes(n)?.iter().map(|&b| char::from(b)).collect(),
                ))
            }
            e => Err(decode_error(format!(
                "string encoding {e} at {}",
                self.pos - 1
            ))),
        }
    }
}

/// A value as the metadata describes it.
#[derive(Debug, Clone)]
enum Value {
    Int(u64),
    /// A float or double: no event Pyroscope reads needs one.
    Number,
    Str(Option<String>),
    /// A constant pool reference.
    Ref(u64),
    Array(Vec<Value>),
    Object(Vec<Value>),
}

impl Value {
    fn int(&self) -> Option<u64> {
        match self {
            Value::Int(v) | Value::Ref(v) => Some(*v),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Field {
    name: String,
    class: u64,
    constant_pool: bool,
    array: bool,
}

#[derive(Debug)]
enum Shape {
    Varint,
    Byte,
    Float,
    Double,
    String,
    Struct,
}

#[derive(Debug)]
struct Class {
    name: String,
    shape: Shape,
    fields: Vec<Field>,
}

impl Class {
    fn field(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

/// One metadata element: its name, attributes and children.
struct Element {
    name: String,
    attributes: HashMap<String, String>,
    children: Vec<Element>,
}

fn element(r: &mut Reader, strings: &[String], depth: usize) -> Result<Element, IngestError> {
    if depth > MAX_NESTING {
        return Err(decode_error("metadata nested too deep"));
    }
    let string = |i: u64| -> Result<String, IngestError> {
        usize::try_from(i)
            .ok()
            .and_then(|i| strings.get(i))
            .cloned()
            .ok_or_else(|| decode_error(format!("metadata string {i} out of range")))
    };
    let name = string(r.varint()?)?;
    let n = r.count()?;
    let mut attributes = HashMap::with_capacity(n);
    for _ in 0..n {
        let (k, v) = (r.varint()?, r.varint()?);
        attributes.insert(string(k)?, string(v)?);
    }
    let n = r.count()?;
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        children.push(element(r, strings, depth + 1)?);
    }
    Ok(Element {
        name,
        attributes,
        children,
    })
}

/// A chunk's classes by id.
fn metadata(b: &[u8], pos: usize) -> Result<HashMap<u64, Class>, IngestError> {
    let mut r = Reader::at(b, pos);
    let _size = r.varint()?;
    if r.varint()? != 0 {
        return Err(decode_error(
            "the metadata offset does not point at metadata",
        ));
    }
    for _ in 0..3 {
        r.varint()?; // start time, duration, metadata id
    }
    let n = r.count()?;
    let mut strings = Vec::with_capacity(n);
    for _ in 0..n {
        strings.push(r.string()?.unwrap_or_default());
    }
    let root = element(&mut r, &strings, 0)?;
    let mut classes = HashMap::new();
    for class in root
        .children
        .iter()
        .filter(|e| e.name == "metadata")
        .flat_map(|m| &m.children)
        .filter(|e| e.name == "class")
    {
        let number = |e: &Element, key: &str| -> Result<u64, IngestError> {
            e.attributes
                .get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| decode_error(format!("metadata {} without a numeric {key}", e.name)))
        };
        let name = class.attributes.get("name").cloned().unwrap_or_default();
        let fields = class
            .children
            .iter()
            .filter(|e| e.name == "field")
            .map(|f| {
                Ok(Field {
                    name: f.attributes.get("name").cloned().unwrap_or_default(),
                    class: number(f, "class")?,
                    constant_pool: f
                        .attributes
                        .get("constantPool")
                        .is_some_and(|v| v == "true"),
                    array: f.attributes.get("dimension").is_some_and(|v| v == "1"),
                })
            })
            .collect::<Result<Vec<_>, IngestError>>()?;
        let shape = match name.as_str() {
            "int" | "long" | "short" | "char" => Shape::Varint,
            "boolean" | "byte" => Shape::Byte,
            "float" => Shape::Float,
            "double" => Shape::Double,
            "java.lang.String" => Shape::String,
            _ => Shape::Struct,
        };
        classes.insert(
            number(class, "id")?,
            Class {
                name,
                shape,
                fields,
            },
        );
    }
    Ok(classes)
}

fn read_value(
    r: &mut Reader,
    classes: &HashMap<u64, Class>,
    class: u64,
    constant_pool: bool,
    array: bool,
    depth: usize,
) -> Result<Value, IngestError> {
    if depth > MAX_NESTING {
        return Err(decode_error("values nested too deep"));
    }
    if array {
        let n = r.count()?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(read_value(
                r,
                classes,
                class,
                constant_pool,
                false,
                depth + 1,
            )?);
        }
        return Ok(Value::Array(items));
    }
    if constant_pool {
        return r.varint().map(Value::Ref);
    }
    let c = classes
        .get(&class)
        .ok_or_else(|| decode_error(format!("a value of unknown class {class}")))?;
    Ok(match c.shape {
        Shape::Varint => Value::Int(r.varint()?),
        Shape::Byte => Value::Int(u64::from(r.byte()?)),
        Shape::Float => r.bytes(4).map(|_| Value::Number)?,
        Shape::Double => r.bytes(8).map(|_| Value::Number)?,
        Shape::String => Value::Str(r.string()?),
        Shape::Struct => {
            let mut fields = Vec::with_capacity(c.fields.len());
            for f in &c.fields {
                fields.push(read_value(
                    r,
                    classes,
                    f.class,
                    f.constant_pool,
                    f.array,
                    depth + 1,
                )?);
            }
            Value::Object(fields)
        }
    })
}

/// The constant pools a chunk's samples refer to.
#[derive(Default)]
struct Pools {
    stack_traces: HashMap<u64, Value>,
    methods: HashMap<u64, Value>,
    classes: HashMap<u64, Value>,
    symbols: HashMap<u64, String>,
    thread_states: HashMap<u64, String>,
}

/// A chunk: its classes, the pools that matter, and where its events are.
struct Chunk<'a> {
    b: &'a [u8],
    start: usize,
    end: usize,
    classes: HashMap<u64, Class>,
    by_name: HashMap<String, u64>,
    pools: Pools,
}

impl<'a> Chunk<'a> {
    fn read(b: &'a [u8], start: usize) -> Result<Self, IngestError> {
        let mut r = Reader::at(b, start);
        if r.bytes(4)? != b"FLR\0" {
            return Err(decode_error(format!(
                "no JFR chunk at byte {start} (magic FLR\\0)"
            )));
        }
        let major = u16::from_be_bytes([r.byte()?, r.byte()?]);
        let _minor = u16::from_be_bytes([r.byte()?, r.byte()?]);
        if major != 2 {
            return Err(decode_error(format!(
                "JFR version {major}: version 2 is read"
            )));
        }
        let offset = |v: i64, what: &str| {
            usize::try_from(v)
                .ok()
                .filter(|v| *v >= CHUNK_HEADER_BYTES)
                .ok_or_else(|| decode_error(format!("chunk {what} {v}")))
        };
        let size = offset(r.i64_be()?, "size")?;
        let end = start
            .checked_add(size)
            .filter(|e| *e <= b.len())
            .ok_or_else(|| {
                decode_error(format!(
                    "a chunk of {size} bytes at {start} runs past the end"
                ))
            })?;
        let constant_pools = start + offset(r.i64_be()?, "constant pool offset")?;
        let metadata_at = start + offset(r.i64_be()?, "metadata offset")?;
        if constant_pools >= end || metadata_at >= end {
            return Err(decode_error("chunk offsets point outside the chunk"));
        }
        let b = &b[..end];
        let classes = metadata(b, metadata_at)?;
        let by_name = classes
            .iter()
            .map(|(id, c)| (c.name.clone(), *id))
            .collect();
        let mut chunk = Chunk {
            b,
            start,
            end,
            classes,
            by_name,
            pools: Pools::default(),
        };
        chunk.read_pools(constant_pools)?;
        Ok(chunk)
    }

    fn class_id(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// Follows the checkpoint chain from the header's offset.
    fn read_pools(&mut self, mut pos: usize) -> Result<(), IngestError> {
        let id = |name: &str| self.class_id(name).unwrap_or(u64::MAX);
        let (stack, method, class, symbol, state) = (
            id("jdk.types.StackTrace"),
            id("jdk.types.Method"),
            id("java.lang.Class"),
            id("jdk.types.Symbol"),
            id("jdk.types.ThreadState"),
        );
        // Each checkpoint is visited once: a chain that loops is an error.
        let mut visited = std::collections::HashSet::new();
        loop {
            if !visited.insert(pos) {
                return Err(decode_error("the constant pool chain loops"));
            }
            let mut r = Reader::at(self.b, pos);
            let _size = r.varint()?;
            if r.varint()? != 1 {
                return Err(decode_error(format!("no checkpoint at byte {pos}")));
            }
            r.varint()?; // start time
            r.varint()?; // duration
            let delta = r.varint()? as i64;
            r.varint()?; // flags
            let pools = r.count()?;
            for _ in 0..pools {
                let type_id = r.varint()?;
                let entries = r.count()?;
                for _ in 0..entries {
                    let key = r.varint()?;
                    let value = read_value(&mut r, &self.classes, type_id, false, false, 0)?;
                    let p = &mut self.pools;
                    if type_id == stack {
                        p.stack_traces.insert(key, value);
                    } else if type_id == method {
                        p.methods.insert(key, value);
                    } else if type_id == class {
                        p.classes.insert(key, value);
                    } else if type_id == symbol || type_id == state {
                        let text = match value {
                            Value::Object(mut f) if !f.is_empty() => match f.swap_remove(0) {
                                Value::Str(s) => s.unwrap_or_default(),
                                _ => String::new(),
                            },
                            _ => String::new(),
                        };
                        if type_id == symbol {
                            p.symbols.insert(key, text);
                        } else {
                            p.thread_states.insert(key, text);
                        }
                    }
                }
            }
            if delta == 0 {
                return Ok(());
            }
            pos = pos
                .checked_add_signed(delta as isize)
                .filter(|p| *p >= self.start && *p < self.end)
                .ok_or_else(|| decode_error("a checkpoint points outside its chunk"))?;
        }
    }
}

/// Pyroscope's rewriting of generated class and library names, so that a
/// lambda or a temporary library is one frame across restarts.
static GENERATED_NAMES: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        (r"^(jdk/internal/reflect/GeneratedMethodAccessor)(\d+)$", "${1}_"),
        (r"^(.+\$\$Lambda)(\$?\d*[./](0x)?[\da-f]+|\d+)$", "${1}_"),
        (
            r"^(\.?/tmp/)?(libzstd-jni-\d+\.\d+\.\d+-)(\d+)(\.so)( \(deleted\))?$",
            "libzstd-jni-_.so",
        ),
        (
            r"^(\.?/tmp/)?(lib)?(amazonCorrettoCryptoProvider)(NativeLibraries\.)?([0-9a-f]{16})(/libcrypto|/libamazonCorrettoCryptoProvider)?(\.so)( \(deleted\))?$",
            "libamazonCorrettoCryptoProvider_.so",
        ),
        (
            r"^(\.?/tmp/)?(libasyncProfiler)-(linux-arm64|linux-musl-x64|linux-x64|macos)-(17b9a1d8156277a98ccc871afa9a8f69215f92)(\.so)( \(deleted\))?$",
            "libasyncProfiler-_.so",
        ),
        (r"^(.+\$\$EnhancerBySpringCGLIB\$\$)(.*)$", "${1}_"),
    ]
    .into_iter()
    .filter_map(|(re, with)| Regex::new(re).ok().map(|re| (re, with)))
    .collect()
});

fn merged_name(symbol: &str) -> String {
    let mut s = symbol.to_string();
    for (re, with) in GENERATED_NAMES.iter() {
        if let std::borrow::Cow::Owned(replaced) = re.replace(&s, *with) {
            s = replaced;
        }
    }
    s
}

/// A stack as (frame name id, line), leaf first.
type Frames = Rc<[(u32, i64)]>;

/// Samples of one kind: (stack, context id, span id, span name id) -> values.
type KindSamples = HashMap<(Frames, i64, u64, i64), [i64; 2]>;

/// What the events add up to across the recording's chunks.
#[derive(Default)]
struct Collector {
    names: Vec<String>,
    name_ids: HashMap<String, u32>,
    samples: HashMap<Kind, KindSamples>,
    event: String,
}

impl Collector {
    fn name_id(&mut self, name: String) -> u32 {
        if let Some(&id) = self.name_ids.get(&name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.clone());
        self.name_ids.insert(name, id);
        id
    }
}

/// The fields an event of interest is read for, by position.
struct EventFields {
    kind: EventKind,
    stack: Option<usize>,
    state: Option<usize>,
    context: Option<usize>,
    span: Option<usize>,
    span_name: Option<usize>,
    /// The event's measured value (bytes, duration, samples...).
    value: Option<usize>,
    setting_name: Option<usize>,
    setting_value: Option<usize>,
}

#[derive(Clone, Copy, PartialEq)]
enum EventKind {
    Execution,
    WallClock,
    InNewTlab,
    OutsideTlab,
    AllocSample,
    MonitorEnter,
    ThreadPark,
    LiveObject,
    Malloc,
    ActiveSetting,
}

impl EventFields {
    fn of(class: &Class) -> Option<Self> {
        let (kind, value) = match class.name.as_str() {
            "jdk.ExecutionSample" => (EventKind::Execution, None),
            "profiler.WallClockSample" => (EventKind::WallClock, Some("samples")),
            "jdk.ObjectAllocationInNewTLAB" => (EventKind::InNewTlab, Some("tlabSize")),
            "jdk.ObjectAllocationOutsideTLAB" => (EventKind::OutsideTlab, Some("allocationSize")),
            "jdk.ObjectAllocationSample" => (EventKind::AllocSample, Some("weight")),
            "jdk.JavaMonitorEnter" => (EventKind::MonitorEnter, Some("duration")),
            "jdk.ThreadPark" => (EventKind::ThreadPark, Some("duration")),
            "profiler.LiveObject" => (EventKind::LiveObject, None),
            "profiler.Malloc" => (EventKind::Malloc, Some("size")),
            "jdk.ActiveSetting" => (EventKind::ActiveSetting, None),
            _ => return None,
        };
        // Only these events carry the agent's context.
        let with_context = matches!(
            kind,
            EventKind::Execution
                | EventKind::WallClock
                | EventKind::InNewTlab
                | EventKind::OutsideTlab
                | EventKind::MonitorEnter
        );
        let context = |name| class.field(name).filter(|_| with_context);
        Some(EventFields {
            kind,
            stack: class.field("stackTrace"),
            state: class.field("state"),
            context: context("contextId"),
            span: context("spanId"),
            span_name: context("spanName"),
            value: value.and_then(|v| class.field(v)),
            setting_name: class.field("name"),
            setting_value: class.field("value"),
        })
    }
}

/// Reads a recording (possibly several chunks) into Pyroscope's profiles.
/// CPU and wall samples are worth `period_nanos` each.
pub fn read(data: &[u8], period_nanos: i64) -> Result<Recording, IngestError> {
    if data.is_empty() {
        return Err(decode_error("the recording is empty"));
    }
    let mut c = Collector::default();
    let mut start = 0;
    while start < data.len() {
        let chunk = Chunk::read(data, start)?;
        collect_chunk(&chunk, &mut c, period_nanos)?;
        start = chunk.end;
    }
    let mut kinds: Vec<Kind> = c.samples.keys().copied().collect();
    kinds.sort();
    let profiles = kinds
        .into_iter()
        .map(|k| {
            let (name, _, _) = k.layout();
            (name, profile_of(&c, k))
        })
        .collect();
    Ok(Recording {
        event: c.event,
        profiles,
    })
}

fn collect_chunk(chunk: &Chunk, c: &mut Collector, period: i64) -> Result<(), IngestError> {
    let events: HashMap<u64, EventFields> = chunk
        .classes
        .iter()
        .filter_map(|(id, class)| EventFields::of(class).map(|f| (*id, f)))
        .collect();
    let mut stacks: HashMap<u64, Option<Frames>> = HashMap::new();
    let mut r = Reader::at(chunk.b, chunk.start + CHUNK_HEADER_BYTES);
    while r.pos < chunk.end {
        let record = r.pos;
        let size = usize::try_from(r.varint()?)
            .ok()
            .filter(|s| *s > 0 && record + *s <= chunk.end)
            .ok_or_else(|| {
                decode_error(format!("an event at byte {record} runs past its chunk"))
            })?;
        let type_id = r.varint()?;
        if let Some(fields) = events.get(&type_id) {
            let class = &chunk.classes[&type_id];
            let mut values = Vec::with_capacity(class.fields.len());
            for f in &class.fields {
                values.push(read_value(
                    &mut r,
                    &chunk.classes,
                    f.class,
                    f.constant_pool,
                    f.array,
                    0,
                )?);
            }
            if r.pos > record + size {
                return Err(decode_error(format!(
                    "an event at byte {record} is longer than its size"
                )));
            }
            add_event(chunk, c, fields, &values, &mut stacks, period);
        }
        r.pos = record + size;
    }
    Ok(())
}

fn add_event(
    chunk: &Chunk,
    c: &mut Collector,
    f: &EventFields,
    values: &[Value],
    stacks: &mut HashMap<u64, Option<Frames>>,
    period: i64,
) {
    let get = |i: Option<usize>| i.and_then(|i| values.get(i));
    let int = |i: Option<usize>| get(i).and_then(Value::int).unwrap_or(0);
    if f.kind == EventKind::ActiveSetting {
        let text = |i| match get(i) {
            Some(Value::Str(Some(s))) => s.clone(),
            _ => String::new(),
        };
        if text(f.setting_name) == "event" {
            c.event = text(f.setting_value);
        }
        return;
    }
    let state = get(f.state)
        .and_then(Value::int)
        .and_then(|s| chunk.pools.thread_states.get(&s));
    let measured = int(f.value) as i64;
    let wall = c.event == "wall";
    let kinds: Vec<(Kind, [i64; 2])> = match f.kind {
        EventKind::Execution => {
            let mut k = Vec::new();
            if state.is_some_and(|s| s != "STATE_SLEEPING") {
                k.push((Kind::Cpu, [period, 0]));
            }
            if wall {
                k.push((Kind::Wall, [period, 0]));
            }
            k
        }
        EventKind::WallClock => {
            let v = measured.saturating_mul(period);
            let mut k = vec![(Kind::Wall, [v, 0])];
            if wall && state.is_some_and(|s| s == "STATE_RUNNABLE") {
                k.push((Kind::Cpu, [v, 0]));
            }
            k
        }
        EventKind::InNewTlab => vec![(Kind::InNewTlab, [1, measured])],
        EventKind::OutsideTlab => vec![(Kind::OutsideTlab, [1, measured])],
        EventKind::AllocSample => vec![(Kind::AllocSample, [1, measured])],
        EventKind::MonitorEnter => vec![(Kind::Lock, [1, measured])],
        EventKind::ThreadPark => vec![(Kind::Park, [1, measured])],
        EventKind::LiveObject => vec![(Kind::Live, [1, 0])],
        EventKind::Malloc => vec![(Kind::Malloc, [1, measured])],
        EventKind::ActiveSetting => Vec::new(),
    };
    if kinds.is_empty() {
        return;
    }
    let Some(stack_id) = get(f.stack).and_then(Value::int) else {
        return;
    };
    let frames = match stacks.get(&stack_id) {
        Some(frames) => frames.clone(),
        None => {
            let frames = resolve_stack(chunk, c, stack_id);
            stacks.insert(stack_id, frames.clone());
            frames
        }
    };
    // Pyroscope drops an event whose stack is not in the pools.
    let Some(frames) = frames else {
        return;
    };
    let key = (
        frames,
        int(f.context) as i64,
        int(f.span),
        int(f.span_name) as i64,
    );
    for (kind, v) in kinds {
        let slot = c
            .samples
            .entry(kind)
            .or_default()
            .entry(key.clone())
            .or_insert([0, 0]);
        slot[0] = slot[0].saturating_add(v[0]);
        slot[1] = slot[1].saturating_add(v[1]);
    }
}

/// A stack trace's frames, `class.method` (JVM names with `/`), leaf
/// first; a frame whose method or class is missing is left out.
fn resolve_stack(chunk: &Chunk, c: &mut Collector, id: u64) -> Option<Frames> {
    let class_field = |class: &str, field: &str| {
        chunk
            .class_id(class)
            .and_then(|id| chunk.classes.get(&id))
            .and_then(|c| c.field(field))
    };
    let frames_at = class_field("jdk.types.StackTrace", "frames")?;
    let method_at = class_field("jdk.types.StackFrame", "method");
    let line_at = class_field("jdk.types.StackFrame", "lineNumber");
    let type_at = class_field("jdk.types.Method", "type");
    let method_name_at = class_field("jdk.types.Method", "name");
    let class_name_at = class_field("java.lang.Class", "name");
    let Some(Value::Object(trace)) = chunk.pools.stack_traces.get(&id) else {
        return None;
    };
    let Some(Value::Array(frames)) = trace.get(frames_at) else {
        return Some(Rc::from(Vec::new()));
    };
    let field = |v: &Value, i: Option<usize>| match v {
        Value::Object(f) => i.and_then(|i| f.get(i)).and_then(Value::int),
        _ => None,
    };
    let symbol = |id: Option<u64>| {
        id.and_then(|id| chunk.pools.symbols.get(&id))
            .map(|s| merged_name(s))
            .unwrap_or_default()
    };
    let mut out = Vec::with_capacity(frames.len());
    for frame in frames {
        let Some(method) = field(frame, method_at).and_then(|m| chunk.pools.methods.get(&m)) else {
            continue;
        };
        let Some(class) = field(method, type_at).and_then(|t| chunk.pools.classes.get(&t)) else {
            continue;
        };
        let name = format!(
            "{}.{}",
            symbol(field(class, class_name_at)),
            symbol(field(method, method_name_at))
        );
        // Line numbers are JFR ints: the low 32 bits, signed.
        let line = field(frame, line_at).unwrap_or(0) as u32 as i32;
        out.push((c.name_id(name), i64::from(line)));
    }
    Some(Rc::from(out))
}

/// The pprof profile of one kind, its samples labelled with their context
/// ids (turned into labels by [`label_samples`]).
fn profile_of(c: &Collector, kind: Kind) -> pprof::Profile {
    let (_, sample_types, period_type) = kind.layout();
    let mut p = pprof::Profile::default();
    let mut strings: HashMap<String, i64> = HashMap::new();
    let mut intern = |p: &mut pprof::Profile, s: &str| -> i64 {
        if let Some(&i) = strings.get(s) {
            return i;
        }
        let i = p.string_table.len() as i64;
        p.string_table.push(s.to_string());
        strings.insert(s.to_string(), i);
        i
    };
    intern(&mut p, "");
    p.sample_type = sample_types
        .iter()
        .map(|(t, u)| pprof::ValueType {
            r#type: intern(&mut p, t),
            unit: intern(&mut p, u),
        })
        .collect();
    p.period_type = Some(pprof::ValueType {
        r#type: intern(&mut p, period_type.0),
        unit: intern(&mut p, period_type.1),
    });
    let mut functions: HashMap<u32, u64> = HashMap::new();
    let mut locations: HashMap<(u32, i64), u64> = HashMap::new();
    let Some(samples) = c.samples.get(&kind) else {
        return p;
    };
    let mut keyed: Vec<_> = samples.iter().collect();
    // The same recording makes the same profile.
    keyed.sort_by(|a, b| {
        (&a.0 .0[..], a.0 .1, a.0 .2, a.0 .3).cmp(&(&b.0 .0[..], b.0 .1, b.0 .2, b.0 .3))
    });
    for ((frames, context, span, span_name), values) in keyed {
        let mut location_id = Vec::with_capacity(frames.len());
        for &(name, line) in frames.iter() {
            let function = match functions.get(&name) {
                Some(&id) => id,
                None => {
                    let id = p.function.len() as u64 + 1;
                    let name_index = intern(&mut p, &c.names[name as usize]);
                    p.function.push(pprof::Function {
                        id,
                        name: name_index,
                        ..Default::default()
                    });
                    functions.insert(name, id);
                    id
                }
            };
            let location = *locations.entry((name, line)).or_insert_with(|| {
                let id = p.location.len() as u64 + 1;
                p.location.push(pprof::Location {
                    id,
                    line: vec![pprof::Line {
                        function_id: function,
                        line,
                        column: 0,
                    }],
                    ..Default::default()
                });
                id
            });
            location_id.push(location);
        }
        // Context ids travel as numeric labels until the snapshot names them.
        let label = [
            ("context_id", *context),
            ("span_id", *span as i64),
            ("span_name", *span_name),
        ]
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .map(|(k, v)| pprof::Label {
            key: intern(&mut p, k),
            num: v,
            ..Default::default()
        })
        .collect();
        p.sample.push(pprof::Sample {
            location_id,
            value: values[..sample_types.len()].to_vec(),
            label,
        });
    }
    p
}

/// Replaces each sample's numeric context, span and span name by the
/// string labels they stand for, as Pyroscope does: the context's labels
/// from the snapshot, `profile_id` (the span, 16 hex digits) and
/// `span_name`.
pub fn label_samples(p: &mut pprof::Profile, snapshot: &LabelsSnapshot) {
    let mut strings: HashMap<String, i64> = p
        .string_table
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as i64))
        .collect();
    let mut intern = |table: &mut Vec<String>, s: &str| -> i64 {
        if let Some(&i) = strings.get(s) {
            return i;
        }
        let i = table.len() as i64;
        table.push(s.to_string());
        strings.insert(s.to_string(), i);
        i
    };
    let key_of = |p: &pprof::Profile, l: &pprof::Label| {
        p.string_table
            .get(l.key as usize)
            .map(String::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut samples = std::mem::take(&mut p.sample);
    for s in &mut samples {
        let numeric = std::mem::take(&mut s.label);
        for l in numeric {
            let value = l.num;
            match &key_of(p, &l)[..] {
                "context_id" => {
                    let Some(context) = snapshot.contexts.get(&value) else {
                        continue;
                    };
                    let mut pairs: Vec<(&String, &String)> = context
                        .labels
                        .iter()
                        .filter_map(|(k, v)| {
                            Some((snapshot.strings.get(k)?, snapshot.strings.get(v)?))
                        })
                        .filter(|(k, _)| !k.is_empty())
                        .collect();
                    pairs.sort();
                    for (k, v) in pairs {
                        s.label.push(pprof::Label {
                            key: intern(&mut p.string_table, k),
                            str: intern(&mut p.string_table, v),
                            ..Default::default()
                        });
                    }
                }
                "span_id" => s.label.push(pprof::Label {
                    key: intern(&mut p.string_table, "profile_id"),
                    str: intern(&mut p.string_table, &format!("{:016x}", value as u64)),
                    ..Default::default()
                }),
                "span_name" => {
                    if let Some(name) = snapshot.strings.get(&value).filter(|n| !n.is_empty()) {
                        s.label.push(pprof::Label {
                            key: intern(&mut p.string_table, "span_name"),
                            str: intern(&mut p.string_table, name),
                            ..Default::default()
                        });
                    }
                }
                _ => {}
            }
        }
    }
    p.sample = samples;
}

/// A JFR recording and its optional context labels (`LabelsSnapshot`),
/// each gzipped or not, with the `/ingest` parameters that name them.
pub struct JfrBody {
    pub params: IngestParams,
    pub recording: Bytes,
    pub labels: Option<Bytes>,
}

impl WireFormat for JfrBody {
    fn received_bytes(&self) -> usize {
        self.recording.len() + self.labels.as_ref().map_or(0, Bytes::len)
    }

    fn profiles(
        self,
        limits: &Limits,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<Vec<Profile>, IngestError> {
        let labels = self.labels.as_deref();
        jfr_profiles(
            limits,
            &self.params,
            &self.recording,
            labels,
            tenant,
            now_nanos,
        )
    }
}

/// Normalised profiles of a JFR recording and its optional context labels.
pub(crate) fn jfr_profiles(
    limits_all: &Limits,
    params: &IngestParams,
    recording: &[u8],
    labels: Option<&[u8]>,
    tenant: &str,
    now_nanos: i64,
) -> Result<Vec<Profile>, IngestError> {
    let limits = limits_all.for_tenant(tenant);
    let max = match limits.max_profile_size_bytes {
        0 => limits_all.max_decompressed_bytes,
        n => n.min(limits_all.max_decompressed_bytes),
    };
    let recording = maybe_gunzip(recording, max, "JFR recording")?;
    if recording.len() > max {
        return Err(IngestError::TooLarge {
            size: recording.len(),
            limit: max,
        });
    }
    let snapshot = match labels {
        Some(b) => {
            let b = maybe_gunzip(b, max, "JFR labels")?;
            <LabelsSnapshot as prost::Message>::decode(&b[..]).map_err(|e| IngestError::Decode {
                what: "JFR labels",
                reason: e.to_string(),
            })?
        }
        None => Default::default(),
    };
    // Pyroscope's period: a CPU or wall sample is worth 1/sampleRate s.
    let period = 1_000_000_000 / i64::from(params.sample_rate.unwrap_or(100));
    let read = read(&recording, period)?;
    let time_nanos = params.from_nanos.unwrap_or(now_nanos);
    let duration_nanos = match (params.from_nanos, params.until_nanos) {
        (Some(from), Some(until)) if until > from => until - from,
        _ => 0,
    };
    let mut out = Vec::new();
    for (metric, mut profile) in read.profiles {
        label_samples(&mut profile, &snapshot);
        profile.time_nanos = time_nanos;
        profile.duration_nanos = duration_nanos;
        let dest = params.jfr_destination(tenant, now_nanos, metric, &read.event, &limits)?;
        out.extend(normalise(&FlatProfile::of(&profile), &dest)?);
    }
    check_times(&out, &limits, now_nanos)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
