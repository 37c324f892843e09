//! The wire messages of `querier.v1` and `types.v1`: Pyroscope's packages,
//! names and field numbers for protobuf, and proto3 JSON (field names in
//! lowerCamelCase, Pyroscope's `profile_typeID` as `profileTypeID`, 64-bit
//! integers as strings) for Connect clients that send `application/json`.

use serde::{Deserialize, Deserializer, Serialize};

/// `types.v1` messages.
pub mod types_v1 {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LabelPair {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ProfileType {
        #[prost(string, tag = "1")]
        #[serde(rename = "ID")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub sample_type: String,
        #[prost(string, tag = "5")]
        pub sample_unit: String,
        #[prost(string, tag = "6")]
        pub period_type: String,
        #[prost(string, tag = "7")]
        pub period_unit: String,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Labels {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Series {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
        #[prost(message, repeated, tag = "2")]
        pub points: Vec<Point>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Point {
        #[prost(double, tag = "1")]
        pub value: f64,
        /// Milliseconds since the epoch.
        #[prost(int64, tag = "2")]
        pub timestamp: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct GetProfileStatsResponse {
        #[prost(bool, tag = "1")]
        pub data_ingested: bool,
        /// Milliseconds since the epoch.
        #[prost(int64, tag = "2")]
        pub oldest_profile_time: i64,
        #[prost(int64, tag = "3")]
        pub newest_profile_time: i64,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum TimeSeriesAggregationType {
        Sum = 0,
        Average = 1,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct LabelValuesRequest {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, repeated, tag = "2")]
        pub matchers: Vec<String>,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub end: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LabelValuesResponse {
        #[prost(string, repeated, tag = "1")]
        pub names: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct LabelNamesRequest {
        #[prost(string, repeated, tag = "1")]
        pub matchers: Vec<String>,
        #[prost(int64, tag = "2")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub start: i64,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub end: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LabelNamesResponse {
        #[prost(string, repeated, tag = "1")]
        pub names: Vec<String>,
    }
}

/// `querier.v1` messages.
pub mod querier_v1 {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct ProfileTypesRequest {
        #[prost(int64, tag = "1")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub start: i64,
        #[prost(int64, tag = "2")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub end: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ProfileTypesResponse {
        #[prost(message, repeated, tag = "1")]
        pub profile_types: Vec<types_v1::ProfileType>,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct SeriesRequest {
        #[prost(string, repeated, tag = "1")]
        pub matchers: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub label_names: Vec<String>,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub end: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SeriesResponse {
        #[prost(message, repeated, tag = "2")]
        pub labels_set: Vec<types_v1::Labels>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum ProfileFormat {
        Unspecified = 0,
        Flamegraph = 1,
        Tree = 2,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct SelectMergeStacktracesRequest {
        #[prost(string, tag = "1")]
        #[serde(rename = "profileTypeID")]
        pub profile_type_id: String,
        #[prost(string, tag = "2")]
        pub label_selector: String,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub end: i64,
        #[prost(int64, optional, tag = "5")]
        #[serde(deserialize_with = "ember_engine::protojson::opt_int64::deserialize")]
        pub max_nodes: Option<i64>,
        #[prost(enumeration = "ProfileFormat", tag = "6")]
        #[serde(deserialize_with = "profile_format")]
        pub format: i32,
        /// `types.v1.StackTraceSelector`, kept as bytes: only its presence
        /// matters until stack trace selectors are served.
        #[prost(bytes = "vec", optional, tag = "7")]
        #[serde(deserialize_with = "ember_engine::protojson::present")]
        pub stack_trace_selector: Option<Vec<u8>>,
        #[prost(string, repeated, tag = "8")]
        pub profile_id_selector: Vec<String>,
        /// Trace IDs: Ember stores span IDs only, so a request with trace
        /// IDs is refused rather than answered unfiltered.
        #[prost(string, repeated, tag = "10")]
        pub trace_id_selector: Vec<String>,
        /// Span IDs (16 hex digits), as `SelectMergeSpanProfile` takes them.
        #[prost(string, repeated, tag = "11")]
        pub span_selector: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SelectMergeStacktracesResponse {
        #[prost(message, optional, tag = "1")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub flamegraph: Option<FlameGraph>,
        #[prost(bytes = "vec", tag = "2")]
        #[serde(serialize_with = "ember_engine::protojson::bytes::serialize")]
        pub tree: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct FlameGraph {
        #[prost(string, repeated, tag = "1")]
        pub names: Vec<String>,
        #[prost(message, repeated, tag = "2")]
        pub levels: Vec<Level>,
        #[prost(int64, tag = "3")]
        pub total: i64,
        #[prost(int64, tag = "4")]
        pub max_self: i64,
    }

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

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Level {
        #[prost(int64, repeated, tag = "1")]
        pub values: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct SelectMergeSpanProfileRequest {
        #[prost(string, tag = "1")]
        #[serde(rename = "profileTypeID")]
        pub profile_type_id: String,
        #[prost(string, tag = "2")]
        pub label_selector: String,
        #[prost(string, repeated, tag = "3")]
        pub span_selector: Vec<String>,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub start: i64,
        #[prost(int64, tag = "5")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub end: i64,
        #[prost(int64, optional, tag = "6")]
        #[serde(deserialize_with = "ember_engine::protojson::opt_int64::deserialize")]
        pub max_nodes: Option<i64>,
        #[prost(enumeration = "ProfileFormat", tag = "7")]
        #[serde(deserialize_with = "profile_format")]
        pub format: i32,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SelectMergeSpanProfileResponse {
        #[prost(message, optional, tag = "1")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub flamegraph: Option<FlameGraph>,
        #[prost(bytes = "vec", tag = "2")]
        #[serde(serialize_with = "ember_engine::protojson::bytes::serialize")]
        pub tree: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct DiffRequest {
        #[prost(message, optional, tag = "1")]
        pub left: Option<SelectMergeStacktracesRequest>,
        #[prost(message, optional, tag = "2")]
        pub right: Option<SelectMergeStacktracesRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct DiffResponse {
        #[prost(message, optional, tag = "1")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub flamegraph: Option<FlameGraphDiff>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct FlameGraphDiff {
        #[prost(string, repeated, tag = "1")]
        pub names: Vec<String>,
        #[prost(message, repeated, tag = "2")]
        pub levels: Vec<Level>,
        #[prost(int64, tag = "3")]
        pub total: i64,
        #[prost(int64, tag = "4")]
        pub max_self: i64,
        #[prost(int64, tag = "5")]
        pub left_ticks: i64,
        #[prost(int64, tag = "6")]
        pub right_ticks: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct SelectMergeProfileRequest {
        #[prost(string, tag = "1")]
        #[serde(rename = "profileTypeID")]
        pub profile_type_id: String,
        #[prost(string, tag = "2")]
        pub label_selector: String,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub end: i64,
        #[prost(int64, optional, tag = "5")]
        #[serde(deserialize_with = "ember_engine::protojson::opt_int64::deserialize")]
        pub max_nodes: Option<i64>,
        /// `types.v1.StackTraceSelector`, kept as bytes (see above).
        #[prost(bytes = "vec", optional, tag = "6")]
        #[serde(deserialize_with = "ember_engine::protojson::present")]
        pub stack_trace_selector: Option<Vec<u8>>,
        #[prost(string, repeated, tag = "7")]
        pub profile_id_selector: Vec<String>,
        #[prost(string, repeated, tag = "8")]
        pub trace_id_selector: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct SelectSeriesRequest {
        #[prost(string, tag = "1")]
        #[serde(rename = "profileTypeID")]
        pub profile_type_id: String,
        #[prost(string, tag = "2")]
        pub label_selector: String,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "ember_engine::protojson::int64::deserialize")]
        pub end: i64,
        #[prost(string, repeated, tag = "5")]
        pub group_by: Vec<String>,
        /// Seconds.
        #[prost(double, tag = "6")]
        pub step: f64,
        #[prost(
            enumeration = "types_v1::TimeSeriesAggregationType",
            optional,
            tag = "7"
        )]
        #[serde(deserialize_with = "aggregation")]
        pub aggregation: Option<i32>,
        #[prost(bytes = "vec", optional, tag = "8")]
        #[serde(deserialize_with = "ember_engine::protojson::present")]
        pub stack_trace_selector: Option<Vec<u8>>,
        #[prost(int64, optional, tag = "9")]
        #[serde(deserialize_with = "ember_engine::protojson::opt_int64::deserialize")]
        pub limit: Option<i64>,
        /// `types.v1.ExemplarType`: exemplars are not returned yet.
        #[prost(int32, tag = "10")]
        #[serde(deserialize_with = "exemplar_type")]
        pub exemplar_type: i32,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SelectSeriesResponse {
        #[prost(message, repeated, tag = "1")]
        pub series: Vec<types_v1::Series>,
    }
}

fn profile_format<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    ember_engine::protojson::enum_number(
        d,
        &[
            "PROFILE_FORMAT_UNSPECIFIED",
            "PROFILE_FORMAT_FLAMEGRAPH",
            "PROFILE_FORMAT_TREE",
        ],
    )
}

fn aggregation<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    ember_engine::protojson::enum_number(
        d,
        &[
            "TIME_SERIES_AGGREGATION_TYPE_SUM",
            "TIME_SERIES_AGGREGATION_TYPE_AVERAGE",
        ],
    )
    .map(Some)
}

fn exemplar_type<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    ember_engine::protojson::enum_number(
        d,
        &[
            "EXEMPLAR_TYPE_UNSPECIFIED",
            "EXEMPLAR_TYPE_NONE",
            "EXEMPLAR_TYPE_INDIVIDUAL",
            "EXEMPLAR_TYPE_SPAN",
        ],
    )
}
