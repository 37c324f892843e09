//! The distributor: decodes and validates a push, normalises its profiles
//! and routes each to a shard of the segment writer. A request is validated
//! whole before any of it is queued, so a bad request harms no other.

use std::collections::BTreeMap;
use std::sync::Arc;

use ember_engine::profile::Profile;
use futures::future::try_join_all;

use crate::legacy::{self, Format, IngestParams};
use crate::normalise::{normalise, validate_labels, Destination};
use crate::push::PushRequest;
use crate::segment::SegmentWriter;
use crate::{pprof, IngestError};

/// The tenant of requests without `X-Scope-OrgID`, as in Pyroscope.
pub const DEFAULT_TENANT: &str = "anonymous";

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted, compressed.
    pub max_request_bytes: usize,
    /// Largest body or profile after decompression.
    pub max_decompressed_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 16 << 20,
            max_decompressed_bytes: 64 << 20,
        }
    }
}

pub struct Distributor {
    writer: Arc<SegmentWriter>,
    limits: Limits,
}

/// Checks a tenant id as Pyroscope does: short, printable, no path tricks.
pub fn validate_tenant(tenant: Option<&str>) -> Result<String, IngestError> {
    let Some(t) = tenant.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(DEFAULT_TENANT.to_string());
    };
    let ok = t.len() <= 150
        && t != "."
        && t != ".."
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "!-_.*'()".contains(c));
    if ok {
        Ok(t.to_string())
    } else {
        Err(IngestError::Invalid(format!("invalid tenant id {t:?}")))
    }
}

/// Jump consistent hash (Lamping & Veach): moves few keys when shards change.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b.wrapping_add(1) as f64)
            * ((1u64 << 31) as f64 / ((key >> 33).wrapping_add(1) as f64))) as i64;
    }
    b.max(0) as u32
}

pub fn shard_for(tenant: &str, service: &str, shards: u32) -> u32 {
    let key = ember_engine::stack::node_id(ember_engine::stack::node_id(0, tenant), service);
    jump_hash(key, shards.max(1))
}

impl Distributor {
    pub fn new(writer: Arc<SegmentWriter>, limits: Limits) -> Self {
        Self { writer, limits }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Normalised profiles of a `push.v1.PushRequest`.
    pub fn profiles_from_push(
        &self,
        req: &PushRequest,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<Vec<Profile>, IngestError> {
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
            };
            for sample in &series.samples {
                let profile =
                    pprof::decode(&sample.raw_profile, self.limits.max_decompressed_bytes)?;
                out.extend(normalise(&profile, &dest)?);
            }
        }
        Ok(out)
    }

    /// Normalised profiles of a legacy `/ingest` body (already un-multiparted).
    pub fn profiles_from_ingest(
        &self,
        params: &IngestParams,
        format: Format,
        body: &[u8],
        tenant: &str,
        now_nanos: i64,
    ) -> Result<Vec<Profile>, IngestError> {
        let body = pprof::maybe_gunzip(body, self.limits.max_decompressed_bytes, "request body")?;
        match format {
            Format::Pprof => {
                let dest = params.destination(tenant, now_nanos, false)?;
                let profile = pprof::decode(&body, self.limits.max_decompressed_bytes)?;
                let mut profiles = normalise(&profile, &dest)?;
                if let Some(from) = params.from_nanos.filter(|_| profile.time_nanos == 0) {
                    profiles.iter_mut().for_each(|p| p.time_nanos = from);
                }
                Ok(profiles)
            }
            Format::Folded | Format::Lines => {
                let dest = params.destination(tenant, now_nanos, true)?;
                Ok(legacy::parse_folded(&body, format, params, &dest)?
                    .into_iter()
                    .collect())
            }
        }
    }

    /// Queues the profiles on their shards and returns once every one is
    /// durable in object storage and indexed by the metastore.
    pub async fn push(&self, profiles: Vec<Profile>) -> Result<(), IngestError> {
        let shards = self.writer.shards();
        let mut by_shard: BTreeMap<u32, Vec<Profile>> = BTreeMap::new();
        for p in profiles {
            by_shard
                .entry(shard_for(&p.tenant, p.service_name(), shards))
                .or_default()
                .push(p);
        }
        try_join_all(
            by_shard
                .into_iter()
                .map(|(shard, profiles)| self.writer.append(shard, profiles)),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_hash_is_stable_and_in_range() {
        for key in 0..1000u64 {
            assert!(jump_hash(key, 7) < 7);
        }
        assert_eq!(jump_hash(42, 1), 0);
        // Growing from 10 to 11 buckets moves about 1/11 of the keys.
        let moved = (0..10_000u64)
            .filter(|k| {
                jump_hash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), 10)
                    != jump_hash(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), 11)
            })
            .count();
        assert!((500..1500).contains(&moved), "{moved}");
    }

    #[test]
    fn tenants_are_checked() {
        assert_eq!(validate_tenant(None).unwrap(), "anonymous");
        assert_eq!(validate_tenant(Some("team-a")).unwrap(), "team-a");
        assert!(validate_tenant(Some("../etc")).is_err());
        assert!(validate_tenant(Some("a/b")).is_err());
    }
}
