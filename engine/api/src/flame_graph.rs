//! The largest answer the query API writes, encoded by hand.

use crate::querier::v1::FlameGraph;

impl FlameGraph {
    /// `SelectMergeStacktracesResponse { flamegraph: self }` as protobuf
    /// (`SelectMergeSpanProfileResponse` has the same fields), byte for
    /// byte what prost writes. Prost's derive walks each level's values
    /// five times (the lengths of the response, the graph, the level
    /// and its packed field, then the bytes); this walks them twice, on
    /// the largest answer the query API writes.
    pub fn response_bytes(&self) -> Vec<u8> {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        let packed: Vec<usize> = self
            .levels
            .iter()
            .map(|l| l.values.iter().map(|v| encoded_len_varint(*v as u64)).sum())
            .collect();
        // Field numbers here are below 16: a key is one byte.
        let field = |len: usize| 1 + encoded_len_varint(len as u64) + len;
        // proto3 leaves out an empty packed field and a zero integer.
        let level = |p: usize| if p == 0 { 0 } else { field(p) };
        let int = |v: i64| {
            if v == 0 {
                0
            } else {
                1 + encoded_len_varint(v as u64)
            }
        };
        let graph = self.names.iter().map(|n| field(n.len())).sum::<usize>()
            + packed.iter().map(|&p| field(level(p))).sum::<usize>()
            + int(self.total)
            + int(self.max_self);
        let mut out = Vec::with_capacity(field(graph));
        let length_delimited = |tag: u32, len: usize, out: &mut Vec<u8>| {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(len as u64, out);
        };
        length_delimited(1, graph, &mut out);
        for n in &self.names {
            length_delimited(1, n.len(), &mut out);
            out.extend_from_slice(n.as_bytes());
        }
        for (l, &p) in self.levels.iter().zip(&packed) {
            length_delimited(2, level(p), &mut out);
            if p > 0 {
                length_delimited(1, p, &mut out);
                for v in &l.values {
                    encode_varint(*v as u64, &mut out);
                }
            }
        }
        for (tag, v) in [(3, self.total), (4, self.max_self)] {
            if v != 0 {
                encode_key(tag, WireType::Varint, &mut out);
                encode_varint(v as u64, &mut out);
            }
        }
        out
    }
}
