//! The distributor: decodes and validates a push, normalises its profiles
//! and routes each to a shard of the segment writer. A request is validated
//! whole before any of it is queued, so a bad request harms no other.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use ember_engine::profile::Profile;
use futures::future::try_join_all;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::legacy::{self, Format, IngestParams};
use crate::limits::{InflightBytes, ProfileLimits};
use crate::normalise::{normalise, validate_labels, Destination};
use crate::push::PushRequest;
use crate::segment::SegmentWriter;
use crate::{pprof, IngestError};

pub use crate::limits::Limits;

/// How a request body is encoded, as its headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyEncoding {
    pub json: bool,
    pub gzip: bool,
}

pub struct Distributor {
    writer: Arc<SegmentWriter>,
    limits: Limits,
    inflight: InflightBytes,
    /// Decoding runs on blocking threads; this many at once, so a burst of
    /// large requests queues instead of inflating all at the same time.
    decoders: Arc<Semaphore>,
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
    pub fn new(writer: Arc<SegmentWriter>, limits: Limits, max_inflight_bytes: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            writer,
            limits,
            inflight: InflightBytes::new(max_inflight_bytes),
            decoders: Arc::new(Semaphore::new(cores)),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn inflight(&self) -> &InflightBytes {
        &self.inflight
    }

    /// Decodes a `push.v1.PushRequest` body into normalised profiles, off
    /// the async executor. The returned permit holds the request's share of
    /// the in-flight budget: keep it until the request is answered.
    pub async fn decode_push(
        self: &Arc<Self>,
        body: Bytes,
        encoding: BodyEncoding,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<(Vec<Profile>, OwnedSemaphorePermit), IngestError> {
        let this = self.clone();
        let tenant = tenant.to_string();
        self.decode_off_executor(body.len(), move || {
            this.profiles_from_push_body(&body, encoding, &tenant, now_nanos)
        })
        .await
    }

    /// Decodes a legacy `/ingest` body (already un-multiparted), off the
    /// async executor, holding its share of the in-flight budget.
    pub async fn decode_ingest(
        self: &Arc<Self>,
        params: IngestParams,
        format: Format,
        body: Bytes,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<(Vec<Profile>, OwnedSemaphorePermit), IngestError> {
        let this = self.clone();
        let tenant = tenant.to_string();
        self.decode_off_executor(body.len(), move || {
            this.profiles_from_ingest(&params, format, &body, &tenant, now_nanos)
        })
        .await
    }

    async fn decode_off_executor(
        &self,
        body_len: usize,
        decode: impl FnOnce() -> Result<Vec<Profile>, IngestError> + Send + 'static,
    ) -> Result<(Vec<Profile>, OwnedSemaphorePermit), IngestError> {
        // Decoded profiles take a few times their compressed size; reserve
        // that up front and the rest once it is known.
        let mut permit = self
            .inflight
            .reserve(body_len.saturating_mul(4).max(64 << 10))?;
        let reserved = permit.num_permits() * 1024;
        let _decoder = self
            .decoders
            .acquire()
            .await
            .map_err(|_| IngestError::ShuttingDown)?;
        let profiles = tokio::task::spawn_blocking(decode)
            .await
            .map_err(|e| IngestError::Storage(format!("decoding task: {e}")))??;
        let size: usize = profiles.iter().map(Profile::size_bytes).sum();
        if size > reserved {
            permit.merge(self.inflight.reserve(size - reserved)?);
        }
        Ok((profiles, permit))
    }

    /// Normalised profiles of a push body: decompressed and decoded under
    /// the request's limits, then checked against the tenant's.
    pub fn profiles_from_push_body(
        &self,
        body: &[u8],
        encoding: BodyEncoding,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<Vec<Profile>, IngestError> {
        let mut budget = Budget {
            left: self.limits.max_decompressed_bytes,
            limit: self.limits.max_decompressed_bytes,
        };
        let inflated;
        let body = if encoding.gzip {
            inflated = pprof::gunzip(body, budget.left, "request body")?;
            budget.take(inflated.len())?;
            inflated.as_slice()
        } else {
            body
        };
        let req = if encoding.json {
            PushRequest::decode_json(body)?
        } else {
            PushRequest::decode_proto(body)?
        };
        self.profiles_from_push(&req, tenant, now_nanos, &mut budget)
    }

    fn profiles_from_push(
        &self,
        req: &PushRequest,
        tenant: &str,
        now_nanos: i64,
        budget: &mut Budget,
    ) -> Result<Vec<Profile>, IngestError> {
        let limits = self.limits.for_tenant(tenant);
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
                let (profile, size) = pprof::decode_sized(&sample.raw_profile, max)?;
                budget.take(size)?;
                out.extend(normalise(&profile, &dest)?);
            }
        }
        check_times(&out, &limits, now_nanos)?;
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
        let limits = self.limits.for_tenant(tenant);
        let body = pprof::maybe_gunzip(body, self.limits.max_decompressed_bytes, "request body")?;
        let profiles = match format {
            Format::Pprof => {
                let dest = params.destination(tenant, now_nanos, false, &limits)?;
                let profile = pprof::decode(&body, limits.max_profile_size_bytes)?;
                let mut profiles = normalise(&profile, &dest)?;
                if let Some(from) = params.from_nanos.filter(|_| profile.time_nanos == 0) {
                    profiles.iter_mut().for_each(|p| p.time_nanos = from);
                }
                profiles
            }
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
}
