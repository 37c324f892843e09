//! The distributor: decodes and validates a push in any of the wire
//! formats Ember takes (`formats`, one file each), normalises its profiles
//! and routes each to a shard of the segment writer. A request is
//! validated whole before any of it is queued, so a bad request harms no
//! other.

pub mod error;
pub mod formats;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod normalise;
pub mod pool;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ember_engine::profile::Profile;
use ember_segment_writer::SegmentWriterClient;
use futures::future::try_join_all;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::error::IngestError;
pub use crate::formats::{BodyEncoding, WireFormat};
pub use crate::limits::Limits;
use crate::limits::{InflightBytes, IngestionRates};
use crate::pool::Pool;

pub struct Distributor {
    /// Where profiles go once decoded: the segment writer, in this process
    /// or behind a network.
    writer: Arc<dyn SegmentWriterClient>,
    limits: Limits,
    inflight: InflightBytes,
    rates: IngestionRates,
    /// Decoding runs on threads of its own; this many at once, so a burst
    /// of large requests queues instead of inflating all at the same time.
    decoders: Arc<Semaphore>,
    /// Where decoding runs (see [`Pool`]).
    decode_threads: Pool,
    /// Longest a request waits for a decoder before it is refused (429):
    /// past it the server is taking requests faster than it can decode
    /// them, and a longer queue would only delay every acknowledgement.
    max_queue_wait: Duration,
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
    pub fn new(
        writer: Arc<dyn SegmentWriterClient>,
        limits: Limits,
        max_inflight_bytes: usize,
        max_queue_wait: Duration,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            writer,
            limits,
            inflight: InflightBytes::new(max_inflight_bytes),
            rates: IngestionRates::default(),
            decoders: Arc::new(Semaphore::new(cores)),
            decode_threads: Pool::start("ember-decode", cores),
            max_queue_wait,
        }
    }

    /// Shares each tenant's ingestion rate among `n` healthy distributors
    /// (this one included), as the cluster's registrations count them.
    pub fn share_rates_among(&self, n: usize) {
        self.rates.share_among(n);
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn inflight(&self) -> &InflightBytes {
        &self.inflight
    }

    /// Decodes a request body into normalised profiles, off the async
    /// executor. The returned permit holds the request's share of the
    /// in-flight budget: keep it until the request is answered.
    pub async fn decode(
        self: &Arc<Self>,
        body: impl WireFormat,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<(Vec<Profile>, OwnedSemaphorePermit), IngestError> {
        // Before any decoding: a tenant past its rate costs the others
        // nothing.
        self.rates.take(
            tenant,
            &self.limits.for_tenant(tenant),
            body.received_bytes(),
            std::time::Instant::now(),
        )?;
        let this = self.clone();
        let tenant = tenant.to_string();
        self.decode_off_executor(body.received_bytes(), move || {
            body.profiles(&this.limits, &tenant, now_nanos)
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
        let _decoder = tokio::time::timeout(self.max_queue_wait, self.decoders.acquire())
            .await
            .map_err(|_| {
                IngestError::Overloaded(format!(
                    "every decoder stayed busy for {} ms: the server is at capacity; retry after the Retry-After delay",
                    self.max_queue_wait.as_millis()
                ))
            })?
            .map_err(|_| IngestError::ShuttingDown)?;
        let profiles = self
            .decode_threads
            .run(decode)
            .await
            .map_err(|e| IngestError::Storage(format!("decoding: {e}")))??;
        let size: usize = profiles.iter().map(Profile::size_bytes).sum();
        if size > reserved {
            permit.merge(self.inflight.reserve(size - reserved)?);
        }
        Ok((profiles, permit))
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
mod tests;
