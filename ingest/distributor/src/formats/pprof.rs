//! Reading pprof profiles as agents send them: gzip under a size limit,
//! then profile.proto (the messages are `ember_api::google::v1`).

use flate2::{Decompress, FlushDecompress, Status};
use prost::Message;

use crate::IngestError;

pub use ember_api::google::v1::*;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Gunzips `data` if it is gzip, refusing output beyond `limit` bytes (a
/// gzip bomb is refused before it is inflated).
pub fn maybe_gunzip(data: &[u8], limit: usize, what: &'static str) -> Result<Vec<u8>, IngestError> {
    if !data.starts_with(&GZIP_MAGIC) {
        if data.len() > limit {
            return Err(IngestError::Decompress {
                what,
                reason: format!("{} bytes exceed the limit of {limit} bytes", data.len()),
            });
        }
        return Ok(data.to_vec());
    }
    gunzip(data, limit, what)
}

/// Gunzips `data` (a body sent with `Content-Encoding: gzip`), refusing
/// output beyond `limit` bytes. Reads the first gzip member, as a gzip
/// reader does, and checks its CRC and length.
///
/// Every push inflates a few pprofs (a fifth of the server's CPU under
/// full load), so a member whose trailer gives its size is inflated whole
/// by libdeflate into an output of that size. Anything else (a trailer
/// that lies, a member past the limit or corrupt) takes the streaming
/// path, which says what is wrong.
pub fn gunzip(data: &[u8], limit: usize, what: &'static str) -> Result<Vec<u8>, IngestError> {
    let error = |reason: String| IngestError::Decompress { what, reason };
    let deflate = gzip_header_len(data).map_err(|e| error(e.into()))?;
    if let Some(out) = inflate_whole(data, limit) {
        return Ok(out);
    }
    let mut out = Vec::with_capacity(initial_capacity(data, limit));
    let consumed = INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(false);
        inflate(inflater, &data[deflate..], &mut out, limit)
    });
    let consumed = consumed.map_err(error)?;
    let trailer = data
        .get(deflate + consumed..deflate + consumed + 8)
        .ok_or_else(|| error("the gzip trailer is missing".into()))?;
    let (crc, size) = trailer.split_at(4);
    if u32::from_le_bytes(crc.try_into().unwrap_or_default()) != crc32fast::hash(&out) {
        return Err(error("the gzip checksum does not match".into()));
    }
    if u32::from_le_bytes(size.try_into().unwrap_or_default()) != out.len() as u32 {
        return Err(error("the gzip length does not match".into()));
    }
    Ok(out)
}

thread_local! {
    /// Reset before each use: inflating holds no state between calls.
    static INFLATER: std::cell::RefCell<Decompress> = std::cell::RefCell::new(Decompress::new(false));
    /// libdeflate's decompressor holds no state between calls either.
    static WHOLE_INFLATER: std::cell::RefCell<Option<WholeInflater>> =
        std::cell::RefCell::new(WholeInflater::new());
}

/// libdeflate's decompressor, writing into a `Vec`'s spare capacity: the
/// output of every pprof was zeroed before libdeflate overwrote it, a
/// memset of the whole inflated profile (2.6 % of the write path's
/// instructions).
struct WholeInflater(std::ptr::NonNull<libdeflate_sys::libdeflate_decompressor>);

impl WholeInflater {
    /// `None` if libdeflate cannot allocate its tables: the streaming path
    /// inflates instead.
    fn new() -> Option<Self> {
        // SAFETY: allocates a decompressor that this value owns and frees.
        let p = unsafe { libdeflate_sys::libdeflate_alloc_decompressor() };
        std::ptr::NonNull::new(p).map(WholeInflater)
    }

    /// Inflates one whole gzip member into `out`'s spare capacity and
    /// returns its size, or `None` if it is corrupt or does not fit.
    fn gzip_into(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let spare = out.spare_capacity_mut();
        let mut n = 0usize;
        // SAFETY: libdeflate reads `data.len()` bytes of `data`, writes at
        // most `spare.len()` bytes into `spare` and stores how many in `n`.
        let result = unsafe {
            libdeflate_sys::libdeflate_gzip_decompress(
                self.0.as_ptr(),
                data.as_ptr().cast(),
                data.len(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                &mut n,
            )
        };
        if result != libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS || n > spare.len() {
            return None;
        }
        // SAFETY: libdeflate succeeded, so it wrote the first `n` bytes of
        // the spare capacity.
        unsafe { out.set_len(out.len() + n) };
        Some(n)
    }
}

impl Drop for WholeInflater {
    fn drop(&mut self) {
        // SAFETY: allocated by `new`, freed once, here.
        unsafe { libdeflate_sys::libdeflate_free_decompressor(self.0.as_ptr()) }
    }
}

/// A gzip member inflated in one call into the size its trailer gives,
/// with its CRC and length checked, if it is within the limit and inflates
/// to exactly that size; `None` otherwise, for the streaming path to
/// inflate or to refuse with its reason.
fn inflate_whole(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    let size = initial_capacity(data, limit);
    if size > limit {
        return None;
    }
    let mut out = Vec::with_capacity(size);
    let inflated = WHOLE_INFLATER.with_borrow_mut(|d| d.as_mut()?.gzip_into(data, &mut out));
    (inflated == Some(size)).then_some(out)
}

/// The output's first allocation: the size the gzip trailer gives (modulo
/// 2^32), within the limit and within what the input could plausibly
/// inflate to, so a forged trailer cannot make a small body reserve much.
fn initial_capacity(data: &[u8], limit: usize) -> usize {
    let claimed = data
        .len()
        .checked_sub(4)
        .and_then(|at| data.get(at..))
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_le_bytes(b) as usize);
    claimed
        .min(limit.saturating_add(1))
        .min(data.len().saturating_mul(32))
}

/// Inflates a raw deflate stream into `out`, at most `limit` bytes, and
/// returns how many input bytes the stream took.
fn inflate(
    inflater: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<usize, String> {
    loop {
        let before = (inflater.total_in(), inflater.total_out());
        let at = inflater.total_in() as usize;
        let status = inflater
            .decompress_vec(&input[at..], out, FlushDecompress::None)
            .map_err(|e| e.to_string())?;
        if out.len() > limit {
            return Err(format!(
                "decompressed size exceeds the limit of {limit} bytes"
            ));
        }
        match status {
            Status::StreamEnd => return Ok(inflater.total_in() as usize),
            _ if out.len() == out.capacity() => {
                // Past the limit by one byte is enough to refuse.
                let room = out
                    .len()
                    .max(64 << 10)
                    .min(limit.saturating_add(1) - out.len());
                out.reserve_exact(room);
            }
            _ if (inflater.total_in(), inflater.total_out()) == before => {
                return Err("the gzip stream ends early".into());
            }
            _ => {}
        }
    }
}

/// Where a gzip member's deflate stream starts (RFC 1952, section 2.3).
fn gzip_header_len(data: &[u8]) -> Result<usize, &'static str> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    let header = data.get(..10).ok_or("the gzip header is cut short")?;
    if header[..2] != GZIP_MAGIC || header[2] != 8 {
        return Err("not a gzip stream of deflate data");
    }
    let flags = header[3];
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let len = data.get(at..at + 2).ok_or("the gzip header is cut short")?;
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for field in [FNAME, FCOMMENT] {
        if flags & field != 0 {
            let rest = data.get(at..).ok_or("the gzip header is cut short")?;
            let end = rest
                .iter()
                .position(|&b| b == 0)
                .ok_or("the gzip header is cut short")?;
            at += end + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    if at > data.len() {
        return Err("the gzip header is cut short");
    }
    Ok(at)
}

/// Decodes a pprof profile, gzipped or not, into prost's owned messages:
/// for building and re-encoding profiles. The push paths read profiles with
/// [`FlatProfile::decode`] instead.
pub fn decode(data: &[u8], limit: usize) -> Result<Profile, IngestError> {
    let raw = maybe_gunzip(data, limit, "pprof profile")?;
    Profile::decode(raw.as_slice()).map_err(|e| IngestError::Decode {
        what: "pprof profile",
        reason: e.to_string(),
    })
}

/// A sample of a [`FlatProfile`]: its location ids, and where its values
/// and labels are in the profile's flat arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatSample<'a> {
    locations: Locations<'a>,
    values: (u32, u32),
    labels: (u32, u32),
}

/// Where a sample's location ids are. Every profiler sends them as one
/// packed field of short varints, which is most of a profile's bytes:
/// those are checked and kept as sent, then decoded only for the stacks
/// that are new to the profile, instead of being widened to 8 bytes each
/// into an array as large again as the profile. Any other form (one value
/// per key, several packed runs, 10-byte varints) is decoded as it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locations<'a> {
    Packed(&'a [u8]),
    /// Their place in the profile's array of decoded ids.
    Decoded(u32, u32),
}

/// A sample's location ids, as [`FlatProfile::location_ids`] gives them.
/// Two samples with equal ids in the same form are equal here, so a
/// profile's distinct location lists are found without decoding them;
/// the same ids in two forms (rare) are two keys for one stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocationIds<'a> {
    /// Varints of at most 9 bytes each, checked when read.
    Packed(&'a [u8]),
    Decoded(&'a [u64]),
}

impl LocationIds<'_> {
    /// At most how many ids there are, without reading them: a packed id
    /// takes a byte at least.
    pub fn most(&self) -> usize {
        match self {
            LocationIds::Packed(bytes) => bytes.len(),
            LocationIds::Decoded(ids) => ids.len(),
        }
    }

    /// The ids, in `out` (cleared first).
    pub fn decode_into(&self, out: &mut Vec<u64>) {
        out.clear();
        match self {
            LocationIds::Packed(bytes) => {
                out.reserve(bytes.len());
                // `short_varints` checked them when the sample was read:
                // the reader cannot fail on them.
                let read = packed(bytes, out, |v| v);
                debug_assert!(read.is_ok(), "{read:?}");
            }
            LocationIds::Decoded(ids) => out.extend_from_slice(ids),
        }
    }

    /// Calls `f` with each id in order while it returns true; whether it
    /// got through them all. Reads packed ids in place, for the caller
    /// that maps each to something else and would only copy a decoded array.
    #[inline(always)]
    pub fn all(&self, mut f: impl FnMut(u64) -> bool) -> bool {
        match self {
            LocationIds::Packed(bytes) => {
                let mut at = 0;
                while at < bytes.len() {
                    match next_packed(bytes, &mut at) {
                        Ok(id) if f(id) => {}
                        _ => return false,
                    }
                }
                true
            }
            LocationIds::Decoded(ids) => ids.iter().all(|id| f(*id)),
        }
    }

    pub fn to_vec(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.decode_into(&mut out);
        out
    }
}

/// Whether `data` is a run of whole varints of at most 9 bytes each (63
/// bits, more than any location id needs), which read the same however
/// they are decoded; anything else takes the full reader and its errors.
fn short_varints(data: &[u8]) -> bool {
    // Eight bytes at a time, by their top bits: a run of 9 continuation
    // bytes cannot fit in one word, so only the runs that cross words are
    // counted, from the continuation bytes that end each word and those
    // that start the next.
    const TOP: u64 = 0x8080_8080_8080_8080;
    let mut run = 0u32;
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let top = u64::from_le_bytes(bytes) & TOP;
        if top == TOP {
            run += 8;
        } else {
            run += (!top & TOP).trailing_zeros() / 8;
            if run < 9 {
                run = (top | !TOP).leading_ones() / 8;
            }
        }
        if run >= 9 {
            return false;
        }
    }
    for &b in words.remainder() {
        run = if b >= 0x80 { run + 1 } else { 0 };
        if run >= 9 {
            return false;
        }
    }
    run == 0
}

/// A sample label's string-table indices; numeric labels keep `str` at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlatLabel {
    pub key: i64,
    pub str: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlatLocation {
    pub id: u64,
    pub address: u64,
    /// The function ids of its lines, innermost first, in
    /// [`FlatProfile::line_functions`].
    lines: (u32, u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlatFunction {
    pub id: u64,
    pub name: i64,
    pub system_name: i64,
}

/// What Ember reads of a pprof profile, with its strings borrowed from the
/// decoded bytes and its samples' location ids, values and labels in three
/// flat arrays. prost's messages allocate a `Vec` per sample field and a
/// copy per string, which was a third of the server's CPU under full load;
/// this reads the same fields with a handful of allocations per profile.
/// Mappings, file names and line numbers are skipped: Ember stores stacks
/// of function names.
#[derive(Debug, Clone, Default)]
pub struct FlatProfile<'a> {
    pub strings: Vec<&'a [u8]>,
    pub sample_types: Vec<ValueType>,
    pub period_type: Option<ValueType>,
    pub period: i64,
    pub time_nanos: i64,
    pub duration_nanos: i64,
    pub samples: Vec<FlatSample<'a>>,
    pub locations: Vec<FlatLocation>,
    pub functions: Vec<FlatFunction>,
    sample_locations: Vec<u64>,
    sample_values: Vec<i64>,
    sample_labels: Vec<FlatLabel>,
    line_functions: Vec<u64>,
}

impl<'a> FlatProfile<'a> {
    /// Reads an encoded (not gzipped) profile.proto message.
    pub fn decode(data: &'a [u8]) -> Result<Self, IngestError> {
        if u32::try_from(data.len()).is_err() {
            return Err(wire_error(format!(
                "{} bytes are more than a profile can hold",
                data.len()
            )));
        }
        let mut p = FlatProfile::with_spare_arrays();
        let mut r = Wire::new(data);
        while let Some((field, wire)) = r.key()? {
            match field {
                1 => p
                    .sample_types
                    .push(value_type(r.message(wire)?, ValueType::default())?),
                2 => p.read_sample(r.message(wire)?)?,
                4 => p.read_location(r.message(wire)?)?,
                5 => p.functions.push(function(r.message(wire)?)?),
                6 => p.strings.push(r.message(wire)?),
                9 => p.time_nanos = r.scalar(wire)? as i64,
                10 => p.duration_nanos = r.scalar(wire)? as i64,
                // A message field seen twice merges, as protobuf says.
                11 => {
                    let merged =
                        value_type(r.message(wire)?, p.period_type.take().unwrap_or_default())?;
                    p.period_type = Some(merged);
                }
                12 => p.period = r.scalar(wire)? as i64,
                3 => mapping(r.message(wire)?)?,
                7 | 8 | 14 | 15 => r.scalar(wire).map(drop)?,
                13 => r.numbers(wire)?,
                _ => r.skip(wire)?,
            }
        }
        Ok(p)
    }

    /// An empty profile with the arrays of the last one dropped on this
    /// thread: a decoding thread reads profiles of much the same shape one
    /// after another, and its arrays then neither grow by doubling nor
    /// need a first pass over the profile to be sized (which cost as much
    /// as a tenth of the decoding), and stay in the cache.
    fn with_spare_arrays() -> Self {
        let spare = SPARE_ARRAYS.with(|s| s.take());
        FlatProfile {
            strings: emptied(spare.strings),
            sample_types: Vec::new(),
            period_type: None,
            period: 0,
            time_nanos: 0,
            duration_nanos: 0,
            samples: emptied(spare.samples),
            locations: spare.locations,
            functions: spare.functions,
            sample_locations: spare.sample_locations,
            sample_values: spare.sample_values,
            sample_labels: spare.sample_labels,
            line_functions: spare.line_functions,
        }
    }

    /// The same view of a profile already decoded into prost's messages
    /// (what the OTLP and JFR paths build).
    pub fn of(p: &'a Profile) -> Self {
        let mut flat = FlatProfile::with_spare_arrays();
        flat.strings
            .extend(p.string_table.iter().map(String::as_bytes));
        flat.sample_types = p.sample_type.clone();
        flat.period_type = p.period_type;
        flat.period = p.period;
        flat.time_nanos = p.time_nanos;
        flat.duration_nanos = p.duration_nanos;
        flat.functions
            .extend(p.function.iter().map(|f| FlatFunction {
                id: f.id,
                name: f.name,
                system_name: f.system_name,
            }));
        for s in &p.sample {
            let (start, end) = span(&mut flat.sample_locations, s.location_id.iter().copied());
            let locations = Locations::Decoded(start, end);
            let values = span(&mut flat.sample_values, s.value.iter().copied());
            let labels = span(
                &mut flat.sample_labels,
                s.label.iter().map(|l| FlatLabel {
                    key: l.key,
                    str: l.str,
                }),
            );
            flat.samples.push(FlatSample {
                locations,
                values,
                labels,
            });
        }
        for l in &p.location {
            let lines = span(
                &mut flat.line_functions,
                l.line.iter().map(|x| x.function_id),
            );
            flat.locations.push(FlatLocation {
                id: l.id,
                address: l.address,
                lines,
            });
        }
        flat
    }

    pub fn location_ids(&self, s: &FlatSample<'a>) -> LocationIds<'_> {
        match s.locations {
            Locations::Packed(bytes) => LocationIds::Packed(bytes),
            Locations::Decoded(start, end) => {
                LocationIds::Decoded(&self.sample_locations[range((start, end))])
            }
        }
    }

    pub fn values(&self, s: &FlatSample) -> &[i64] {
        &self.sample_values[range(s.values)]
    }

    pub fn labels(&self, s: &FlatSample) -> &[FlatLabel] {
        &self.sample_labels[range(s.labels)]
    }

    /// The function ids of a location's lines, innermost first.
    pub fn line_functions(&self, l: &FlatLocation) -> &[u64] {
        &self.line_functions[range(l.lines)]
    }

    /// The string at `index`, or an error naming the field that pointed
    /// outside the string table.
    pub fn string(&self, index: i64, field: &str) -> Result<&'a [u8], IngestError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.strings.get(i).copied())
            .ok_or_else(|| {
                IngestError::Invalid(format!(
                    "{field} points at string {index} of a table of {}",
                    self.strings.len()
                ))
            })
    }

    fn read_sample(&mut self, data: &'a [u8]) -> Result<(), IngestError> {
        let start = (
            self.sample_locations.len(),
            self.sample_values.len(),
            self.sample_labels.len(),
        );
        let mut packed_ids: Option<&'a [u8]> = None;
        let mut decoded = false;
        let mut r = Wire::new(data);
        while let Some((field, wire)) = r.key()? {
            match field {
                1 if wire == WIRE_LEN && !decoded && packed_ids.is_none() => {
                    let run = r.message(wire)?;
                    if short_varints(run) {
                        packed_ids = Some(run);
                    } else {
                        packed(run, &mut self.sample_locations, |v| v)?;
                        decoded = true;
                    }
                }
                1 => {
                    // A second run (or one value per key) follows the first.
                    if let Some(run) = packed_ids.take() {
                        packed(run, &mut self.sample_locations, |v| v)?;
                    }
                    r.repeated(wire, &mut self.sample_locations, |v| v)?;
                    decoded = true;
                }
                2 => r.repeated(wire, &mut self.sample_values, |v| v as i64)?,
                3 => self.sample_labels.push(label(r.message(wire)?)?),
                _ => r.skip(wire)?,
            }
        }
        let locations = match packed_ids {
            Some(run) => Locations::Packed(run),
            None => Locations::Decoded(start.0 as u32, self.sample_locations.len() as u32),
        };
        self.samples.push(FlatSample {
            locations,
            values: (start.1 as u32, self.sample_values.len() as u32),
            labels: (start.2 as u32, self.sample_labels.len() as u32),
        });
        Ok(())
    }

    fn read_location(&mut self, data: &'a [u8]) -> Result<(), IngestError> {
        let start = self.line_functions.len();
        let mut location = FlatLocation::default();
        let mut r = Wire::new(data);
        while let Some((field, wire)) = r.key()? {
            match field {
                1 => location.id = r.scalar(wire)?,
                3 => location.address = r.scalar(wire)?,
                4 => {
                    let function_id = line_function(r.message(wire)?)?;
                    self.line_functions.push(function_id);
                }
                2 | 5 => r.scalar(wire).map(drop)?,
                _ => r.skip(wire)?,
            }
        }
        location.lines = (start as u32, self.line_functions.len() as u32);
        self.locations.push(location);
        Ok(())
    }
}

/// A profile's arrays emptied for the next profile decoded on this
/// thread, unless they hold more than this.
const SPARE_BYTES: usize = 8 << 20;

/// The arrays of a dropped [`FlatProfile`], empty, kept for the next.
#[derive(Default)]
struct SpareArrays {
    strings: Vec<&'static [u8]>,
    samples: Vec<FlatSample<'static>>,
    locations: Vec<FlatLocation>,
    functions: Vec<FlatFunction>,
    sample_locations: Vec<u64>,
    sample_values: Vec<i64>,
    sample_labels: Vec<FlatLabel>,
    line_functions: Vec<u64>,
}

impl SpareArrays {
    fn bytes(&self) -> usize {
        fn bytes<T>(v: &Vec<T>) -> usize {
            v.capacity() * std::mem::size_of::<T>()
        }
        bytes(&self.strings)
            + bytes(&self.samples)
            + bytes(&self.locations)
            + bytes(&self.functions)
            + bytes(&self.sample_locations)
            + bytes(&self.sample_values)
            + bytes(&self.sample_labels)
            + bytes(&self.line_functions)
    }
}

thread_local! {
    static SPARE_ARRAYS: std::cell::Cell<SpareArrays> = std::cell::Cell::default();
}

/// An empty vector with `v`'s allocation, for items of another lifetime:
/// collecting a vector's own iterator into one of a type of the same
/// layout reuses its allocation.
fn emptied<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

impl Drop for FlatProfile<'_> {
    fn drop(&mut self) {
        let spare = SpareArrays {
            strings: emptied(std::mem::take(&mut self.strings)),
            samples: emptied(std::mem::take(&mut self.samples)),
            locations: emptied(std::mem::take(&mut self.locations)),
            functions: emptied(std::mem::take(&mut self.functions)),
            sample_locations: emptied(std::mem::take(&mut self.sample_locations)),
            sample_values: emptied(std::mem::take(&mut self.sample_values)),
            sample_labels: emptied(std::mem::take(&mut self.sample_labels)),
            line_functions: emptied(std::mem::take(&mut self.line_functions)),
        };
        if spare.bytes() <= SPARE_BYTES {
            // `try_with`: a profile dropped as its thread exits frees its arrays.
            let _ = SPARE_ARRAYS.try_with(|s| s.set(spare));
        }
    }
}

/// The same profile: equal fields, and samples with the same location ids,
/// values and labels whatever form their ids were sent in.
impl PartialEq for FlatProfile<'_> {
    fn eq(&self, other: &Self) -> bool {
        let sample = |p: &Self, s: &FlatSample| {
            (
                p.location_ids(s).to_vec(),
                p.values(s).to_vec(),
                p.labels(s).to_vec(),
            )
        };
        let lines = |p: &Self| -> Vec<(u64, u64, Vec<u64>)> {
            p.locations
                .iter()
                .map(|l| (l.id, l.address, p.line_functions(l).to_vec()))
                .collect()
        };
        self.strings == other.strings
            && self.sample_types == other.sample_types
            && self.period_type == other.period_type
            && (self.period, self.time_nanos, self.duration_nanos)
                == (other.period, other.time_nanos, other.duration_nanos)
            && self.functions == other.functions
            && lines(self) == lines(other)
            && self.samples.len() == other.samples.len()
            && self
                .samples
                .iter()
                .zip(&other.samples)
                .all(|(a, b)| sample(self, a) == sample(other, b))
    }
}

fn range((start, end): (u32, u32)) -> std::ops::Range<usize> {
    start as usize..end as usize
}

/// Appends `items` and returns where they are.
fn span<T>(to: &mut Vec<T>, items: impl Iterator<Item = T>) -> (u32, u32) {
    let start = to.len() as u32;
    to.extend(items);
    (start, to.len() as u32)
}

fn value_type(data: &[u8], mut v: ValueType) -> Result<ValueType, IngestError> {
    let mut r = Wire::new(data);
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => v.r#type = r.scalar(wire)? as i64,
            2 => v.unit = r.scalar(wire)? as i64,
            _ => r.skip(wire)?,
        }
    }
    Ok(v)
}

fn label(data: &[u8]) -> Result<FlatLabel, IngestError> {
    let mut l = FlatLabel::default();
    let mut r = Wire::new(data);
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => l.key = r.scalar(wire)? as i64,
            2 => l.str = r.scalar(wire)? as i64,
            3 | 4 => r.scalar(wire).map(drop)?,
            _ => r.skip(wire)?,
        }
    }
    Ok(l)
}

fn line_function(data: &[u8]) -> Result<u64, IngestError> {
    let mut function_id = 0;
    let mut r = Wire::new(data);
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => function_id = r.scalar(wire)?,
            2 | 3 => r.scalar(wire).map(drop)?,
            _ => r.skip(wire)?,
        }
    }
    Ok(function_id)
}

fn function(data: &[u8]) -> Result<FlatFunction, IngestError> {
    let mut f = FlatFunction::default();
    let mut r = Wire::new(data);
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => f.id = r.scalar(wire)?,
            2 => f.name = r.scalar(wire)? as i64,
            3 => f.system_name = r.scalar(wire)? as i64,
            4 | 5 => r.scalar(wire).map(drop)?,
            _ => r.skip(wire)?,
        }
    }
    Ok(f)
}

/// A mapping is not kept, but its fields are checked as a protobuf reader
/// checks them: every known one is a varint.
fn mapping(data: &[u8]) -> Result<(), IngestError> {
    let mut r = Wire::new(data);
    while let Some((field, wire)) = r.key()? {
        match field {
            1..=10 => r.scalar(wire).map(drop)?,
            _ => r.skip(wire)?,
        }
    }
    Ok(())
}

#[cold]
fn past_the_end(n: usize) -> IngestError {
    wire_error(format!(
        "a field of {n} bytes runs past the end of its message"
    ))
}

#[cold]
fn unsupported_wire_type(wire: u8) -> IngestError {
    wire_error(format!("unsupported wire type {wire}"))
}

#[cold]
fn wrong_wire_type(wire: u8, belongs: &str) -> IngestError {
    wire_error(format!("wire type {wire} where {belongs} belongs"))
}

fn wire_error(reason: String) -> IngestError {
    IngestError::Decode {
        what: "pprof profile",
        reason,
    }
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// The protobuf wire format, read in place.
struct Wire<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Wire<'a> {
    fn new(data: &'a [u8]) -> Self {
        Wire { data, at: 0 }
    }

    /// The next field number and wire type, or `None` at the end.
    #[inline(always)]
    fn key(&mut self) -> Result<Option<(u64, u8)>, IngestError> {
        if self.at == self.data.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 {
            return Err(wire_error("field number 0".into()));
        }
        Ok(Some((field, (key & 7) as u8)))
    }

    /// Most varints of a profile (ids, indices, small values) are one
    /// byte, and most others two (string indices and lengths past 127,
    /// samples' and locations' lengths).
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, IngestError> {
        let Some(&first) = self.data.get(self.at) else {
            return self.long_varint();
        };
        if first < 0x80 {
            self.at += 1;
            return Ok(u64::from(first));
        }
        match self.data.get(self.at + 1) {
            Some(&second) if second < 0x80 => {
                self.at += 2;
                Ok(u64::from(first & 0x7f) | u64::from(second) << 7)
            }
            _ => self.long_varint(),
        }
    }

    /// Takes the position by value, so that it stays in a register
    /// wherever a reader is inlined.
    #[inline(always)]
    fn long_varint(&mut self) -> Result<u64, IngestError> {
        let (value, at) = long_varint(self.data, self.at)?;
        self.at = at;
        Ok(value)
    }

    /// Inlined, with its error out of line: every string and submessage
    /// of a profile is taken here.
    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], IngestError> {
        match self.at.checked_add(n).filter(|end| *end <= self.data.len()) {
            Some(end) => {
                let bytes = &self.data[self.at..end];
                self.at = end;
                Ok(bytes)
            }
            None => Err(past_the_end(n)),
        }
    }

    /// A varint field's value.
    #[inline(always)]
    fn scalar(&mut self, wire: u8) -> Result<u64, IngestError> {
        match wire {
            WIRE_VARINT => self.varint(),
            _ => Err(wrong_wire_type(wire, "a varint")),
        }
    }

    /// A length-delimited field: an embedded message, string or bytes.
    #[inline(always)]
    fn message(&mut self, wire: u8) -> Result<&'a [u8], IngestError> {
        match wire {
            WIRE_LEN => {
                let n = self.varint()?;
                self.take(usize::try_from(n).unwrap_or(usize::MAX))
            }
            _ => Err(wrong_wire_type(wire, "a length-delimited field")),
        }
    }

    // The readers below are inlined like those above: one taking `self`
    // out of line would keep every inlined reader's position in memory.

    /// A repeated varint field, packed or one value per key.
    #[inline]
    fn repeated<T>(
        &mut self,
        wire: u8,
        to: &mut Vec<T>,
        of: fn(u64) -> T,
    ) -> Result<(), IngestError> {
        if wire == WIRE_VARINT {
            to.push(of(self.varint()?));
            return Ok(());
        }
        packed(self.message(wire)?, to, of)
    }

    /// A repeated varint field that is checked but not kept.
    #[inline]
    fn numbers(&mut self, wire: u8) -> Result<(), IngestError> {
        if wire == WIRE_VARINT {
            return self.varint().map(drop);
        }
        let mut packed = Wire::new(self.message(wire)?);
        while packed.at < packed.data.len() {
            packed.varint()?;
        }
        Ok(())
    }

    #[inline]
    fn skip(&mut self, wire: u8) -> Result<(), IngestError> {
        match wire {
            WIRE_VARINT => self.varint().map(drop),
            WIRE_FIXED64 => self.take(8).map(drop),
            WIRE_LEN => self.message(wire).map(drop),
            WIRE_FIXED32 => self.take(4).map(drop),
            _ => Err(unsupported_wire_type(wire)),
        }
    }
}

/// The varint at `at` in `data` and the position past it, for varints of
/// any length. Out of line and taking the position by value: a reader
/// whose position were borrowed here would keep it in memory.
#[inline(never)]
fn long_varint(data: &[u8], mut at: usize) -> Result<(u64, usize), IngestError> {
    // Sample values (nanoseconds, bytes) and addresses take 3 to 9
    // bytes: read from one 8-byte word where the varint ends inside it.
    if let Some(word) = data.get(at..at + 8) {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        let ends = !word & 0x8080_8080_8080_8080;
        if ends != 0 {
            let len = ends.trailing_zeros() as usize / 8 + 1;
            // The varint's bytes without their top bits, then the
            // 7-bit groups packed together: pairs, quads, the eight.
            let w = word & (u64::MAX >> (64 - 8 * len)) & 0x7f7f_7f7f_7f7f_7f7f;
            let w = (w & 0x007f_007f_007f_007f) | ((w & 0x7f00_7f00_7f00_7f00) >> 1);
            let w = (w & 0x0000_3fff_0000_3fff) | ((w & 0x3fff_0000_3fff_0000) >> 2);
            let w = (w & 0x0000_0000_0fff_ffff) | ((w & 0x0fff_ffff_0000_0000) >> 4);
            return Ok((w, at + len));
        }
    }
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let Some(&byte) = data.get(at) else {
            return Err(wire_error("the message ends inside a varint".into()));
        };
        at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            // A tenth byte holds only the 64th bit, as protobuf reads it.
            if shift == 63 && byte > 1 {
                return Err(wire_error("a varint past 64 bits".into()));
            }
            return Ok((value, at));
        }
    }
    Err(wire_error("a varint longer than 10 bytes".into()))
}

/// The varints of a packed field, appended to `to`. Location ids and
/// values are most of a profile's bytes, and most take one or two bytes:
/// those are read here, longer ones by [`long_varint`].
fn packed<T>(data: &[u8], to: &mut Vec<T>, of: fn(u64) -> T) -> Result<(), IngestError> {
    let mut at = 0;
    while at < data.len() {
        to.push(of(next_packed(data, &mut at)?));
    }
    Ok(())
}

/// The varint at `at` (inside `data`) of a packed field, moving `at` past
/// it: one and two bytes read here, longer ones by [`long_varint`].
#[inline(always)]
fn next_packed(data: &[u8], at: &mut usize) -> Result<u64, IngestError> {
    let Some(&first) = data.get(*at) else {
        return Err(wire_error("the message ends inside a varint".into()));
    };
    if first < 0x80 {
        *at += 1;
        return Ok(u64::from(first));
    }
    match data.get(*at + 1) {
        Some(&second) if second < 0x80 => {
            *at += 2;
            Ok(u64::from(first & 0x7f) | u64::from(second) << 7)
        }
        _ => {
            let (value, end) = long_varint(data, *at)?;
            *at = end;
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests;
