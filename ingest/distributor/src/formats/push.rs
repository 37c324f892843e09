//! `push.v1.PusherService/Push` requests, protobuf or Connect's proto3 JSON
//! (the messages are `ember_api::push::v1`).

use bytes::Bytes;
use prost::Message;

use ember_engine::profile::Profile;

use super::pprof::{self, FlatProfile};
use super::{check_times, BodyEncoding, Budget, WireFormat};
use crate::limits::Limits;
use crate::normalise::{normalise, validate_labels, Destination};
use crate::IngestError;

pub use ember_api::push::v1::{PushRequest, PushResponse, RawProfileSeries, RawSample};
pub use ember_api::types::v1::LabelPair;

fn decode_proto(body: Bytes) -> Result<PushRequest, IngestError> {
    PushRequest::decode(body).map_err(|e| IngestError::Decode {
        what: "push.v1.PushRequest",
        reason: e.to_string(),
    })
}

fn decode_json(body: &[u8]) -> Result<PushRequest, IngestError> {
    ember_api::json::from_json(body).map_err(|reason| IngestError::Decode {
        what: "push.v1.PushRequest JSON",
        reason,
    })
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
            decode_json(&body)?
        } else {
            decode_proto(body)?
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
                ..Default::default()
            }],
        };
        let proto = decode_proto(req.encode_to_vec().into()).unwrap();
        assert_eq!(proto, req);
        let json = br#"{"series":[{"labels":[{"name":"service_name","value":"api"}],"samples":[{"rawProfile":"AQID","ID":"x"}]}]}"#;
        assert_eq!(decode_json(json).unwrap(), req);
        assert!(decode_json(br#"{"series":[{"samples":[{"rawProfile":"***"}]}]}"#).is_err());
        assert!(decode_proto(Bytes::from_static(&[0xff, 0xff, 0xff])).is_err());
    }
}
