//! Block metadata: the footer of every block object and the entries of the
//! metastore's index. Protobuf so that the footer stays readable by any tool
//! and its fields can grow compatibly.

use prost::Message;

/// 2: level-0 samples sections are keyed ([`SectionMeta::keyed`]).
pub const FORMAT_VERSION: u32 = 2;

// `BlockMeta`, `DatasetMeta` and `SectionMeta`, from
// `engine/proto/ember/block/v1/block.proto`.
include!(concat!(env!("OUT_DIR"), "/ember.block.v1.rs"));

impl BlockMeta {
    pub fn encode_to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn decode_from(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }

    /// The metadata as a block ends: the message, then its length and its
    /// CRC32, both big-endian u32. A torn copy fails the check.
    pub fn encode_framed(&self) -> Vec<u8> {
        let mut out = self.encode_to_vec();
        let crc = crc32fast::hash(&out);
        let len = out.len() as u32;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Reads [`Self::encode_framed`]'s output, checking length and CRC.
    pub fn decode_framed(bytes: &[u8]) -> Result<Self, String> {
        let n = bytes.len();
        if n < 8 {
            return Err(format!("{n} bytes is too short for framed block metadata"));
        }
        let len = u32::from_be_bytes([bytes[n - 8], bytes[n - 7], bytes[n - 6], bytes[n - 5]]);
        let crc = u32::from_be_bytes([bytes[n - 4], bytes[n - 3], bytes[n - 2], bytes[n - 1]]);
        if len as usize != n - 8 {
            return Err(format!(
                "framed length {len} does not match {} bytes",
                n - 8
            ));
        }
        let message = &bytes[..n - 8];
        if crc32fast::hash(message) != crc {
            return Err("CRC mismatch".into());
        }
        Self::decode(message).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_metadata_round_trips_and_torn_copies_fail() {
        let meta = BlockMeta {
            id: "01ABC".into(),
            path: "segments/0/anonymous/01ABC/block.bin".into(),
            ..Default::default()
        };
        let framed = meta.encode_framed();
        assert_eq!(BlockMeta::decode_framed(&framed).unwrap(), meta);
        for cut in [0, 1, 7, framed.len() / 2, framed.len() - 1] {
            assert!(BlockMeta::decode_framed(&framed[..cut]).is_err(), "{cut}");
        }
        let mut flipped = framed.clone();
        flipped[2] ^= 1;
        assert!(BlockMeta::decode_framed(&flipped).is_err());
    }
}
