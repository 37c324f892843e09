//! The normalised profile: what the distributor produces from any wire format
//! and what the segment writer stores.

use std::sync::Arc;

/// Label pairs sorted by name, unique by name.
pub type Labels = Vec<(String, String)>;

pub const SERVICE_NAME: &str = "service_name";
pub const METRIC_NAME: &str = "__name__";
pub const PROFILE_TYPE: &str = "__profile_type__";

/// One profile of one series and one profile type.
#[derive(Debug, Clone)]
pub struct Profile {
    pub tenant: String,
    /// The series' labels, `service_name` included, `__profile_type__` excluded.
    pub labels: Labels,
    /// Pyroscope's ID form `name:sample_type:sample_unit:period_type:period_unit`.
    pub profile_type: String,
    pub time_nanos: i64,
    pub duration_nanos: i64,
    pub period: i64,
    /// Function names that the samples' stacks point into, shared by the
    /// profiles (sample types, label sets) decoded from one pprof.
    pub functions: Arc<Functions>,
    /// The samples' stacks, shared as `functions` is.
    pub stacks: Arc<Stacks>,
    pub samples: Vec<Sample>,
}

/// A profile's function names in one buffer: one allocation per pprof
/// instead of one per name (a push of a few thousand frames otherwise
/// allocates, and the segment writer's thread frees, a string each).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Functions {
    text: String,
    /// Where each name ends in `text`.
    ends: Vec<usize>,
}

impl Functions {
    /// Room for `names` names of `bytes` bytes in all.
    pub fn with_capacity(names: usize, bytes: usize) -> Self {
        Functions {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(names),
        }
    }

    /// Appends a name and returns its index.
    pub fn push(&mut self, name: &str) -> u32 {
        self.text.push_str(name);
        self.ends.push(self.text.len());
        (self.ends.len() - 1) as u32
    }

    pub fn get(&self, index: usize) -> Option<&str> {
        let end = *self.ends.get(index)?;
        let start = match index {
            0 => 0,
            i => self.ends[i - 1],
        };
        self.text.get(start..end)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// Bytes held, with the room reserved for more.
    pub fn size_bytes(&self) -> usize {
        self.text.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Functions {
    fn from_iter<I: IntoIterator<Item = S>>(names: I) -> Self {
        let mut functions = Functions::default();
        for name in names {
            functions.push(name.as_ref());
        }
        functions
    }
}

/// The root-first stacks of function indices that a profile's samples
/// point into, side by side in one buffer. The stacks of one pprof sit in
/// one buffer, which every profile made from that pprof (one per sample
/// type and label set) shares, so a stack costs no allocation and no
/// reference count of its own, and the block writer reads a profile's
/// stacks in memory order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stacks {
    frames: Vec<u32>,
}

impl Stacks {
    /// Stacks already side by side in `frames`, as [`Stack::ranked`]
    /// ranges into it.
    pub fn from_frames(frames: Vec<u32>) -> Self {
        Stacks { frames }
    }

    /// Appends a stack and returns it, unranked (an empty stack if the
    /// buffer would pass 4 G frames).
    pub fn push(&mut self, frames: &[u32]) -> Stack {
        let start = self.frames.len();
        self.frames.extend_from_slice(frames);
        match (u32::try_from(start), u32::try_from(self.frames.len())) {
            (Ok(start), Ok(end)) => Stack {
                start,
                end,
                rank: UNRANKED,
            },
            _ => {
                self.frames.truncate(start);
                Stack::default()
            }
        }
    }

    /// Samples of the given (stack, value, span), unranked, and the buffer
    /// of their stacks.
    pub fn with_samples<S: AsRef<[u32]>>(
        samples: impl IntoIterator<Item = (S, i64, Option<u64>)>,
    ) -> (Arc<Stacks>, Vec<Sample>) {
        let mut stacks = Stacks::default();
        let samples = samples
            .into_iter()
            .map(|(stack, value, span_id)| Sample {
                stack: stacks.push(stack.as_ref()),
                value,
                span_id,
            })
            .collect();
        (Arc::new(stacks), samples)
    }

    /// A stack's frames; empty for a stack of another buffer that does not
    /// fit in this one.
    pub fn get(&self, stack: Stack) -> &[u32] {
        let frames = self.frames.get(stack.start as usize..stack.end as usize);
        debug_assert!(frames.is_some(), "{stack:?} of {}", self.frames.len());
        frames.unwrap_or_default()
    }

    /// Every stack's frames, side by side.
    pub fn frames(&self) -> &[u32] {
        &self.frames
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.frames.capacity() * std::mem::size_of::<u32>()
    }
}

/// How many leading frames two stacks share. Stacks of one program share
/// most of their frames from the root, so this compares eight at a time
/// (one vector compare) before the frame that differs.
#[inline]
pub fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    let n = a.len().min(b.len());
    let mut at = 0;
    while at + 8 <= n && a[at..at + 8] == b[at..at + 8] {
        at += 8;
    }
    at + a[at..n]
        .iter()
        .zip(&b[at..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// The order of two stacks as slices of frames, lexicographic.
#[inline]
pub fn compare_frames(a: &[u32], b: &[u32]) -> std::cmp::Ordering {
    let at = shared_prefix(a, b);
    match (a.get(at), b.get(at)) {
        (Some(x), Some(y)) => x.cmp(y),
        _ => a.len().cmp(&b.len()),
    }
}

/// Where a sample's stack is in its profile's [`Stacks`], and its rank
/// among the distinct stacks there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stack {
    start: u32,
    end: u32,
    /// Its place among the distinct stacks of its buffer, or [`UNRANKED`].
    rank: u32,
}

const UNRANKED: u32 = u32::MAX;

impl Stack {
    /// The stack at `range` of its buffer, the `rank`-th distinct stack
    /// there (an empty, unranked stack if the range passes 4 G frames).
    /// Profiles made from one pprof share the buffer and the ranks, so the
    /// block writer computes a stack's node ids once for all of them.
    pub fn ranked(range: std::ops::Range<usize>, rank: u32) -> Self {
        match (u32::try_from(range.start), u32::try_from(range.end)) {
            (Ok(start), Ok(end)) if start <= end => Stack { start, end, rank },
            _ => Stack::default(),
        }
    }

    /// Where it is in its buffer's frames.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    /// Its rank in its buffer, if it has one.
    pub fn rank(&self) -> Option<u32> {
        (self.rank != UNRANKED).then_some(self.rank)
    }

    /// Its depth in frames.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// One stack and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub stack: Stack,
    pub value: i64,
    pub span_id: Option<u64>,
}

/// Profiles are equal when their samples have the same frames, wherever
/// those sit in their buffers.
impl PartialEq for Profile {
    fn eq(&self, other: &Self) -> bool {
        fn samples(p: &Profile) -> impl Iterator<Item = (&[u32], i64, Option<u64>)> {
            p.samples.iter().map(|s| (p.stack(s), s.value, s.span_id))
        }
        (
            &self.tenant,
            &self.labels,
            &self.profile_type,
            self.time_nanos,
            self.duration_nanos,
            self.period,
            &self.functions,
        ) == (
            &other.tenant,
            &other.labels,
            &other.profile_type,
            other.time_nanos,
            other.duration_nanos,
            other.period,
            &other.functions,
        ) && samples(self).eq(samples(other))
    }
}

impl Profile {
    /// A sample's frames, root first.
    pub fn stack(&self, sample: &Sample) -> &[u32] {
        self.stacks.get(sample.stack)
    }

    pub fn service_name(&self) -> &str {
        label_value(&self.labels, SERVICE_NAME).unwrap_or("unknown_service")
    }

    /// The sum of the sample values, saturating (values are client input).
    pub fn total(&self) -> i64 {
        self.samples
            .iter()
            .fold(0i64, |sum, s| sum.saturating_add(s.value))
    }

    /// Approximate in-memory size, used to bound open segments: the
    /// buffers it shares with the other profiles of its pprof are counted
    /// in each of them.
    pub fn size_bytes(&self) -> usize {
        let labels: usize = self.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        let samples = self.samples.capacity() * std::mem::size_of::<Sample>();
        labels + self.functions.size_bytes() + self.stacks.size_bytes() + samples + 128
    }
}

pub fn label_value<'a>(labels: &'a Labels, name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The canonical text of a label set, as Pyroscope prints series:
/// `{a="1", b="2"}` with names sorted.
pub fn labels_to_string(labels: &Labels) -> String {
    // Printed for every profile a segment writes: sized once, and values
    // copied a run at a time between the characters that need escaping.
    let room: usize = labels.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
    let mut out = String::with_capacity(room + 2);
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(k);
        out.push_str("=\"");
        let mut rest = v.as_str();
        while let Some(at) = rest.find(['"', '\\', '\n']) {
            out.push_str(&rest[..at]);
            out.push_str(match rest.as_bytes()[at] {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                _ => "\\n",
            });
            rest = &rest[at + 1..];
        }
        out.push_str(rest);
        out.push('"');
    }
    out.push('}');
    out
}

/// Sorts by name and keeps the last value of a repeated name.
pub fn normalise_labels(mut labels: Labels) -> Labels {
    labels.reverse();
    labels.sort_by(|a, b| a.0.cmp(&b.0));
    labels.dedup_by(|a, b| a.0 == b.0);
    labels
}

/// Nanoseconds since the Unix epoch now: the unit and clock of every
/// profile's time.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_compare_as_slices_whatever_their_shared_prefix() {
        // Prefixes shorter than, equal to and longer than the eight frames
        // compared at once, differing frames on both sides of it, and
        // stacks that are prefixes of one another.
        let base: Vec<u32> = (0..20).collect();
        let mut stacks = vec![vec![], base.clone()];
        for cut in [0, 3, 7, 8, 9, 16, 17, 19] {
            stacks.push(base[..cut].to_vec());
            for delta in [-1i64, 1] {
                let mut s = base.clone();
                s[cut] = (s[cut] as i64 + delta).max(0) as u32 + 100 * (delta > 0) as u32;
                stacks.push(s.clone());
                s.truncate(cut + 1);
                stacks.push(s);
            }
        }
        for a in &stacks {
            for b in &stacks {
                assert_eq!(compare_frames(a, b), a.cmp(b), "{a:?} vs {b:?}");
                let shared = a.iter().zip(b).take_while(|(x, y)| x == y).count();
                assert_eq!(shared_prefix(a, b), shared, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn functions_hold_each_name_at_its_index() {
        let names = ["main", "", "é/ü::x", "main"];
        let mut f: Functions = names.iter().collect();
        assert_eq!(f.len(), 4);
        assert_eq!(f.iter().collect::<Vec<_>>(), names);
        assert_eq!(f.get(1), Some(""));
        assert_eq!(f.get(2), Some("é/ü::x"));
        assert_eq!(f.get(4), None);
        assert_eq!(f.push("leaf"), 4);
        assert_eq!(f.get(4), Some("leaf"));
        assert!(Functions::default().is_empty());
    }

    #[test]
    fn stacks_are_ranges_of_their_buffer() {
        let mut stacks = Stacks::from_frames(vec![1, 2, 3, 1, 2]);
        let a = Stack::ranked(0..3, 1);
        let b = Stack::ranked(3..5, 0);
        let c = stacks.push(&[7, 8]);
        assert_eq!(stacks.get(a), &[1, 2, 3]);
        assert_eq!(stacks.get(b), &[1, 2]);
        assert_eq!(stacks.get(c), &[7, 8]);
        assert_eq!((a.rank(), b.rank(), c.rank()), (Some(1), Some(0), None));
        assert_eq!((a.len(), c.len()), (3, 2));
        let backwards = std::ops::Range { start: 3, end: 2 };
        assert!(Stack::ranked(backwards, 0).is_empty());
        assert!(Stack::ranked(0..1 << 33, 0).is_empty());
    }

    #[test]
    fn profiles_with_the_same_frames_in_other_places_are_equal() {
        let profile = |frames: Vec<u32>, at: [std::ops::Range<usize>; 2]| Profile {
            tenant: "t".into(),
            labels: vec![],
            profile_type: "cpu".into(),
            time_nanos: 1,
            duration_nanos: 0,
            period: 0,
            functions: Arc::new(["a", "b"].into_iter().collect()),
            stacks: Arc::new(Stacks::from_frames(frames)),
            samples: at
                .into_iter()
                .map(|range| Sample {
                    stack: Stack::ranked(range, 0),
                    value: 5,
                    span_id: None,
                })
                .collect(),
        };
        let a = profile(vec![0, 1, 0], [0..2, 2..3]);
        let b = profile(vec![9, 0, 0, 1], [2..4, 1..2]);
        assert_eq!(a, b);
        assert_ne!(a, profile(vec![0, 1, 0], [0..2, 1..3]));
    }

    #[test]
    fn labels_print_sorted_and_escaped() {
        let l = normalise_labels(vec![
            ("b".into(), "x\"y".into()),
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
        ]);
        assert_eq!(labels_to_string(&l), r#"{a="1", b="2"}"#);
        let l = vec![("a".to_string(), "q\"".to_string())];
        assert_eq!(labels_to_string(&l), r#"{a="q\""}"#);
        let l = vec![("a".into(), "\"x\\y\nz\"é".into())];
        assert_eq!(labels_to_string(&l), r#"{a="\"x\\y\nz\"é"}"#);
    }
}
