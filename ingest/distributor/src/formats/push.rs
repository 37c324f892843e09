//! `push.v1.PusherService/Push` request and response, with the exact
//! package, names and field numbers of Pyroscope's public API
//! (`api/push/v1/push.proto`, `api/types/v1/types.proto`), and their proto3
//! JSON mapping for Connect's `application/json`.

use base64::Engine;
use bytes::Bytes;
use prost::Message;
use serde::Deserialize;

use ember_engine::profile::Profile;

use super::pprof::{self, FlatProfile};
use super::{check_times, BodyEncoding, Budget, WireFormat};
use crate::limits::Limits;
use crate::normalise::{normalise, validate_labels, Destination};
use crate::IngestError;

/// `types.v1.LabelPair`
#[derive(Clone, PartialEq, Message, Deserialize)]
pub struct LabelPair {
    #[prost(string, tag = "1")]
    #[serde(default)]
    pub name: String,
    #[prost(string, tag = "2")]
    #[serde(default)]
    pub value: String,
}

/// `push.v1.PushRequest`
#[derive(Clone, PartialEq, Message)]
pub struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    pub series: Vec<RawProfileSeries>,
}

/// `push.v1.RawProfileSeries`
#[derive(Clone, PartialEq, Message)]
pub struct RawProfileSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<RawSample>,
}

/// `push.v1.RawSample`. The profile is a slice of the request body, not a
/// copy of it: decoding the request copied every profile twice.
#[derive(Clone, PartialEq, Message)]
pub struct RawSample {
    #[prost(bytes = "bytes", tag = "1")]
    pub raw_profile: Bytes,
    #[prost(string, tag = "2")]
    pub id: String,
}

/// `push.v1.PushResponse`
#[derive(Clone, PartialEq, Message)]
pub struct PushResponse {}

#[derive(Deserialize)]
struct JsonRequest {
    #[serde(default)]
    series: Vec<JsonSeries>,
}

#[derive(Deserialize)]
struct JsonSeries {
    #[serde(default)]
    labels: Vec<LabelPair>,
    #[serde(default)]
    samples: Vec<JsonSample>,
}

#[derive(Deserialize)]
struct JsonSample {
    #[serde(default, alias = "raw_profile", rename = "rawProfile")]
    raw_profile: String,
    #[serde(default, alias = "id", rename = "ID")]
    id: String,
}

impl PushRequest {
    pub fn decode_proto(body: Bytes) -> Result<Self, IngestError> {
        Self::decode(body).map_err(|e| IngestError::Decode {
            what: "push.v1.PushRequest",
            reason: e.to_string(),
        })
    }

    pub fn decode_json(body: &[u8]) -> Result<Self, IngestError> {
        let err = |reason: String| IngestError::Decode {
            what: "push.v1.PushRequest JSON",
            reason,
        };
        let req: JsonRequest = serde_json::from_slice(body).map_err(|e| err(e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut series = Vec::with_capacity(req.series.len());
        for s in req.series {
            let mut samples = Vec::with_capacity(s.samples.len());
            for sample in s.samples {
                // proto3 JSON allows both the standard and the URL-safe alphabet.
                let raw = b64
                    .decode(sample.raw_profile.as_bytes())
                    .or_else(|_| {
                        base64::engine::general_purpose::URL_SAFE
                            .decode(sample.raw_profile.as_bytes())
                    })
                    .map_err(|e| err(format!("rawProfile is not base64: {e}")))?;
                samples.push(RawSample {
                    raw_profile: raw.into(),
                    id: sample.id,
                });
            }
            series.push(RawProfileSeries {
                labels: s.labels,
                samples,
            });
        }
        Ok(PushRequest { series })
    }
}

/// A `push.v1.PushRequest` body, protobuf or Connect's JSON, gzipped or not.
pub struct PushBody {
    pub body: Bytes,
    pub encoding: BodyEncoding,
}

impl WireFormat for PushBody {
    fn received_bytes(&self) -> usize {
        self.body.len()
    }

    fn profiles(
        self,
        limits: &Limits,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<Vec<Profile>, IngestError> {
        let mut budget = Budget::new(limits.max_decompressed_bytes);
        let body = if self.encoding.gzip {
            let inflated = pprof::gunzip(&self.body, budget.left, "request body")?;
            budget.take(inflated.len())?;
            Bytes::from(inflated)
        } else {
            self.body
        };
        let req = if self.encoding.json {
            PushRequest::decode_json(&body)?
        } else {
            PushRequest::decode_proto(body)?
        };
        request_profiles(limits, &req, tenant, now_nanos, &mut budget)
    }
}

fn request_profiles(
    limits_all: &Limits,
    req: &PushRequest,
    tenant: &str,
    now_nanos: i64,
    budget: &mut Budget,
) -> Result<Vec<Profile>, IngestError> {
    let limits = limits_all.for_tenant(tenant);
    let mut out = Vec::new();
    for series in &req.series {
        let labels = series
            .labels
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect();
        let dest = Destination {
            tenant: tenant.to_string(),
            labels: validate_labels(labels)?,
            received_at_nanos: now_nanos,
            limits,
        };
        for sample in &series.samples {
            let max = limits.max_profile_size_bytes.min(budget.left);
            let raw = pprof::maybe_gunzip(&sample.raw_profile, max, "pprof profile")?;
            budget.take(raw.len())?;
            out.extend(normalise(&FlatProfile::decode(&raw)?, &dest)?);
        }
    }
    check_times(&out, &limits, now_nanos)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_and_json_decode_to_the_same_request() {
        let req = PushRequest {
            series: vec![RawProfileSeries {
                labels: vec![LabelPair {
                    name: "service_name".into(),
                    value: "api".into(),
                }],
                samples: vec![RawSample {
                    raw_profile: vec![1, 2, 3].into(),
                    id: "x".into(),
                }],
            }],
        };
        let proto = PushRequest::decode_proto(req.encode_to_vec().into()).unwrap();
        assert_eq!(proto, req);
        let json = br#"{"series":[{"labels":[{"name":"service_name","value":"api"}],"samples":[{"rawProfile":"AQID","ID":"x"}]}]}"#;
        assert_eq!(PushRequest::decode_json(json).unwrap(), req);
        assert!(
            PushRequest::decode_json(br#"{"series":[{"samples":[{"rawProfile":"***"}]}]}"#)
                .is_err()
        );
        assert!(PushRequest::decode_proto(Bytes::from_static(&[0xff, 0xff, 0xff])).is_err());
    }
}
