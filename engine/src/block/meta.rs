//! Block metadata: the footer of every block object and the entries of the
//! metastore's index. Protobuf so that the footer stays readable by any tool
//! and its fields can grow compatibly.

use prost::Message;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, PartialEq, Message)]
pub struct BlockMeta {
    #[prost(uint32, tag = "1")]
    pub format_version: u32,
    /// A ULID.
    #[prost(string, tag = "2")]
    pub id: String,
    /// Object key of the block in the object store.
    #[prost(string, tag = "3")]
    pub path: String,
    #[prost(uint32, tag = "4")]
    pub shard: u32,
    #[prost(uint32, tag = "5")]
    pub compaction_level: u32,
    /// Nanoseconds since the epoch, inclusive.
    #[prost(int64, tag = "6")]
    pub min_time: i64,
    #[prost(int64, tag = "7")]
    pub max_time: i64,
    #[prost(uint64, tag = "8")]
    pub size: u64,
    #[prost(message, repeated, tag = "9")]
    pub datasets: Vec<DatasetMeta>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DatasetMeta {
    #[prost(string, tag = "1")]
    pub tenant: String,
    #[prost(string, tag = "2")]
    pub service_name: String,
    #[prost(int64, tag = "3")]
    pub min_time: i64,
    #[prost(int64, tag = "4")]
    pub max_time: i64,
    #[prost(string, repeated, tag = "5")]
    pub profile_types: Vec<String>,
    /// Canonical label sets (`{a="1", b="2"}`) of the dataset's series.
    #[prost(string, repeated, tag = "6")]
    pub series: Vec<String>,
    #[prost(message, repeated, tag = "7")]
    pub sections: Vec<SectionMeta>,
    #[prost(uint64, tag = "8")]
    pub profiles: u64,
    #[prost(uint64, tag = "9")]
    pub samples: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct SectionMeta {
    /// One of [`super::Section`]'s names.
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    #[prost(uint64, tag = "3")]
    pub size: u64,
    #[prost(uint64, tag = "4")]
    pub rows: u64,
}

impl BlockMeta {
    pub fn encode_to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn decode_from(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }
}

impl DatasetMeta {
    pub fn section(&self, kind: super::Section) -> Option<&SectionMeta> {
        self.sections.iter().find(|s| s.kind == kind.name())
    }

    pub fn overlaps(&self, start: i64, end: i64) -> bool {
        self.min_time <= end && self.max_time >= start
    }
}
