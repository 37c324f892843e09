//! The normalised profile: what the distributor produces from any wire format
//! and what the segment writer stores.

use std::sync::Arc;

/// Label pairs sorted by name, unique by name.
pub type Labels = Vec<(String, String)>;

pub const SERVICE_NAME: &str = "service_name";
pub const METRIC_NAME: &str = "__name__";
pub const PROFILE_TYPE: &str = "__profile_type__";

/// One profile of one series and one profile type.
#[derive(Debug, Clone, PartialEq)]
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

/// A root-first stack of function indices, in a buffer it may share: the
/// stacks of one pprof sit side by side in one allocation, which every
/// profile made from that pprof (one per sample type and label set) points
/// into, so a stack costs no allocation of its own and the block writer
/// reads a profile's stacks in memory order. The buffer lives as long as
/// any of those profiles; they go to one shard (one service) and are
/// dropped together when it flushes.
#[derive(Clone)]
pub struct Stack {
    frames: Arc<[u32]>,
    start: u32,
    end: u32,
    /// Its place among the distinct stacks of `frames`, or [`UNRANKED`].
    rank: u32,
}

const UNRANKED: u32 = u32::MAX;

impl Stack {
    /// The stack at `range` of `frames`, the `rank`-th distinct stack in
    /// it (an empty, unranked stack in a release build if the range is not
    /// within it). Profiles made from one pprof share `frames` and ranks,
    /// so the block writer computes a stack's node ids once for all of
    /// them.
    pub fn ranked(frames: &Arc<[u32]>, range: std::ops::Range<usize>, rank: u32) -> Self {
        let bounds = (u32::try_from(range.start), u32::try_from(range.end));
        let within = range.start <= range.end && range.end <= frames.len();
        debug_assert!(within, "{range:?} of {}", frames.len());
        let (start, end, rank) = match bounds {
            (Ok(start), Ok(end)) if within => (start, end, rank),
            _ => (0, 0, UNRANKED),
        };
        Stack {
            frames: frames.clone(),
            start,
            end,
            rank,
        }
    }

    /// The buffer this stack is in and its rank there, if it has one.
    pub fn rank(&self) -> Option<(*const u32, u32)> {
        (self.rank != UNRANKED).then(|| (self.frames.as_ptr(), self.rank))
    }
}

impl std::ops::Deref for Stack {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        &self.frames[self.start as usize..self.end as usize]
    }
}

impl From<Vec<u32>> for Stack {
    fn from(frames: Vec<u32>) -> Self {
        let frames: Arc<[u32]> = frames.into();
        let end = u32::try_from(frames.len()).unwrap_or(0);
        Stack {
            frames,
            start: 0,
            end,
            rank: UNRANKED,
        }
    }
}

impl PartialEq for Stack {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Stack {}

impl PartialOrd for Stack {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Stack {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// One stack and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub stack: Stack,
    pub value: i64,
    pub span_id: Option<u64>,
}

impl Profile {
    pub fn service_name(&self) -> &str {
        label_value(&self.labels, SERVICE_NAME).unwrap_or("unknown_service")
    }

    /// The sum of the sample values, saturating (values are client input).
    pub fn total(&self) -> i64 {
        self.samples
            .iter()
            .fold(0i64, |sum, s| sum.saturating_add(s.value))
    }

    /// Approximate in-memory size, used to bound open segments.
    pub fn size_bytes(&self) -> usize {
        let labels: usize = self.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        let functions = self.functions.size_bytes();
        let samples: usize = self.samples.iter().map(|s| s.stack.len() * 4 + 40).sum();
        labels + functions + samples + 128
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn stacks_in_a_shared_buffer_compare_by_their_frames() {
        let frames: Arc<[u32]> = vec![1, 2, 3, 1, 2, 1, 2, 3].into();
        let a = Stack::ranked(&frames, 0..3, 1);
        let b = Stack::ranked(&frames, 3..5, 0);
        let c = Stack::ranked(&frames, 5..8, 1);
        assert_eq!(&*a, &[1, 2, 3]);
        assert_eq!(a, c);
        assert_eq!(a, Stack::from(vec![1, 2, 3]));
        assert!(b < a, "a prefix sorts first");
        assert_eq!(format!("{b:?}"), "[1, 2]");
        assert_eq!(a.rank(), Some((frames.as_ptr(), 1)));
        assert_eq!(Stack::from(vec![1, 2, 3]).rank(), None);
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
