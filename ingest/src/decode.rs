//! Request bodies to normalised profiles, under the request's and the
//! tenant's limits: what every push path and every fuzz target runs.

use bytes::Bytes;
use ember_engine::profile::Profile;

use crate::legacy::{self, Format, IngestParams};
use crate::limits::{Limits, ProfileLimits};
use crate::normalise::{normalise, validate_labels, Destination};
use crate::pprof::{self, FlatProfile};
use crate::push::PushRequest;
use crate::IngestError;

/// How a request body is encoded, as its headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyEncoding {
    pub json: bool,
    pub gzip: bool,
}

/// Counts decompressed bytes against the request's limit.
struct Budget {
    left: usize,
    limit: usize,
}

impl Budget {
    fn take(&mut self, bytes: usize) -> Result<(), IngestError> {
        self.left = self.left.checked_sub(bytes).ok_or(IngestError::TooLarge {
            size: self.limit - self.left + bytes,
            limit: self.limit,
        })?;
        Ok(())
    }
}

/// Normalised profiles of a push body: decompressed and decoded under
/// the request's limits, then checked against the tenant's.
pub fn push_body(
    limits: &Limits,
    body: Bytes,
    encoding: BodyEncoding,
    tenant: &str,
    now_nanos: i64,
) -> Result<Vec<Profile>, IngestError> {
    let mut budget = Budget {
        left: limits.max_decompressed_bytes,
        limit: limits.max_decompressed_bytes,
    };
    let body = if encoding.gzip {
        let inflated = pprof::gunzip(&body, budget.left, "request body")?;
        budget.take(inflated.len())?;
        Bytes::from(inflated)
    } else {
        body
    };
    let req = if encoding.json {
        PushRequest::decode_json(&body)?
    } else {
        PushRequest::decode_proto(body)?
    };
    push_request(limits, &req, tenant, now_nanos, &mut budget)
}

fn push_request(
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

/// Normalised profiles of a JFR recording and its optional context labels
/// (`LabelsSnapshot`), each gzipped or not.
pub fn jfr_body(
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
    let recording = pprof::maybe_gunzip(recording, max, "JFR recording")?;
    if recording.len() > max {
        return Err(IngestError::TooLarge {
            size: recording.len(),
            limit: max,
        });
    }
    let snapshot = match labels {
        Some(b) => {
            let b = pprof::maybe_gunzip(b, max, "JFR labels")?;
            <crate::jfr::LabelsSnapshot as prost::Message>::decode(&b[..]).map_err(|e| {
                IngestError::Decode {
                    what: "JFR labels",
                    reason: e.to_string(),
                }
            })?
        }
        None => Default::default(),
    };
    // Pyroscope's period: a CPU or wall sample is worth 1/sampleRate s.
    let period = 1_000_000_000 / i64::from(params.sample_rate.unwrap_or(100));
    let read = crate::jfr::read(&recording, period)?;
    let time_nanos = params.from_nanos.unwrap_or(now_nanos);
    let duration_nanos = match (params.from_nanos, params.until_nanos) {
        (Some(from), Some(until)) if until > from => until - from,
        _ => 0,
    };
    let mut out = Vec::new();
    for (metric, mut profile) in read.profiles {
        crate::jfr::label_samples(&mut profile, &snapshot);
        profile.time_nanos = time_nanos;
        profile.duration_nanos = duration_nanos;
        let dest = params.jfr_destination(tenant, now_nanos, metric, &read.event, &limits)?;
        out.extend(normalise(&FlatProfile::of(&profile), &dest)?);
    }
    check_times(&out, &limits, now_nanos)?;
    Ok(out)
}

/// Normalised profiles of an OTLP profiles export body.
pub fn otlp_body(
    limits: &Limits,
    body: &[u8],
    encoding: BodyEncoding,
    tenant: &str,
    now_nanos: i64,
) -> Result<Vec<Profile>, IngestError> {
    let inflated;
    let body = if encoding.gzip {
        inflated = pprof::gunzip(body, limits.max_decompressed_bytes, "request body")?;
        inflated.as_slice()
    } else {
        body
    };
    let profiles = crate::otlp::export_body(limits, body, encoding.json, tenant, now_nanos)?;
    check_times(&profiles, &limits.for_tenant(tenant), now_nanos)?;
    Ok(profiles)
}

/// Normalised profiles of a legacy `/ingest` body (already un-multiparted).
pub fn ingest_body(
    limits_all: &Limits,
    params: &IngestParams,
    format: Format,
    body: &[u8],
    tenant: &str,
    now_nanos: i64,
) -> Result<Vec<Profile>, IngestError> {
    let limits = limits_all.for_tenant(tenant);
    let body = pprof::maybe_gunzip(body, limits_all.max_decompressed_bytes, "request body")?;
    let profiles = match format {
        Format::Pprof => {
            let dest = params.destination(tenant, now_nanos, false, &limits)?;
            let raw = pprof::maybe_gunzip(&body, limits.max_profile_size_bytes, "pprof profile")?;
            let profile = FlatProfile::decode(&raw)?;
            let mut profiles = normalise(&profile, &dest)?;
            if let Some(from) = params.from_nanos.filter(|_| profile.time_nanos == 0) {
                profiles.iter_mut().for_each(|p| p.time_nanos = from);
            }
            profiles
        }
        Format::Jfr => jfr_body(limits_all, params, &body, None, tenant, now_nanos)?,
        Format::Folded | Format::Lines => {
            let dest = params.destination(tenant, now_nanos, true, &limits)?;
            legacy::parse_folded(&body, format, params, &dest)?
                .into_iter()
                .collect()
        }
    };
    check_times(&profiles, &limits, now_nanos)?;
    Ok(profiles)
}

/// Refuses the request if any profile lies outside the tenant's window.
fn check_times(
    profiles: &[Profile],
    limits: &ProfileLimits,
    now_nanos: i64,
) -> Result<(), IngestError> {
    profiles
        .iter()
        .try_for_each(|p| limits.check_time(p.time_nanos, now_nanos))
}
