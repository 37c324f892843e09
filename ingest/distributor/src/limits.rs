//! What one push may cost, named as Pyroscope names its limits
//! (`validation.*`), with per-tenant overrides. Every number here bounds
//! memory or time that a client's input would otherwise decide.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::IngestError;

/// The frame that replaces the frames cut from a stack deeper than
/// `max_profile_stacktrace_depth`.
pub const TRUNCATED_FRAME: &str = "[truncated]";

/// Per-profile limits; a tenant may have its own.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileLimits {
    /// Largest profile after decompression (Pyroscope: 4 MiB; Ember takes
    /// the large heap profiles Go services write).
    pub max_profile_size_bytes: usize,
    /// Most samples in one profile (Pyroscope: 16000; a Go heap profile of
    /// a large service has 40 k).
    pub max_profile_stacktrace_samples: usize,
    /// Most labels on one sample.
    pub max_profile_stacktrace_sample_labels: usize,
    /// Deeper stacks are truncated, not refused: the root-most frames are
    /// kept and the rest become one [`TRUNCATED_FRAME`].
    pub max_profile_stacktrace_depth: usize,
    /// Longer symbol names (functions, frames) are truncated.
    pub max_profile_symbol_value_length: usize,
    /// Profiles older than this before the receive time are refused; 0 off.
    pub reject_older_than_seconds: u64,
    /// Profiles newer than this after the receive time are refused; 0 off.
    pub reject_newer_than_seconds: u64,
    /// Blocks whose 6 h partitions all ended longer ago than this are
    /// deleted by compaction (Pyroscope's
    /// `compactor_blocks_retention_period`); 0 keeps everything.
    pub compactor_blocks_retention_period_seconds: u64,
    /// Request bytes a second the tenant may push, in MB (Pyroscope's
    /// `ingestion_rate_mb`, counted here on the bytes received, before
    /// decompression, so that a refusal costs no decoding); 0 is no limit.
    pub ingestion_rate_mb: f64,
    /// Bytes the tenant may push at once above its rate, in MB
    /// (`ingestion_burst_size_mb`); at least one second of the rate.
    pub ingestion_burst_size_mb: f64,
}

impl Default for ProfileLimits {
    fn default() -> Self {
        Self {
            max_profile_size_bytes: 16 << 20,
            max_profile_stacktrace_samples: 100_000,
            max_profile_stacktrace_sample_labels: 100,
            max_profile_stacktrace_depth: 1000,
            max_profile_symbol_value_length: 65535,
            reject_older_than_seconds: 3600,
            reject_newer_than_seconds: 600,
            compactor_blocks_retention_period_seconds: 0,
            ingestion_rate_mb: 0.0,
            ingestion_burst_size_mb: 0.0,
        }
    }
}

impl ProfileLimits {
    /// Refuses limits no setting means (a rate that is negative, NaN or
    /// infinite).
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("ingestion_rate_mb", self.ingestion_rate_mb),
            ("ingestion_burst_size_mb", self.ingestion_burst_size_mb),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "{name} must be a finite number of MB, 0 or more, not {v}"
                ));
            }
        }
        Ok(())
    }

    /// Refuses a profile time outside `[now - older, now + newer]`.
    pub fn check_time(&self, time_nanos: i64, now_nanos: i64) -> Result<(), IngestError> {
        let secs = |s: u64| {
            i64::try_from(s)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000_000)
        };
        let age = now_nanos.saturating_sub(time_nanos);
        if self.reject_older_than_seconds > 0 && age > secs(self.reject_older_than_seconds) {
            return Err(IngestError::Invalid(format!(
                "profile time {time_nanos} ns is {} s before now, older than reject_older_than ({} s)",
                age / 1_000_000_000,
                self.reject_older_than_seconds
            )));
        }
        if self.reject_newer_than_seconds > 0 && -age > secs(self.reject_newer_than_seconds) {
            return Err(IngestError::Invalid(format!(
                "profile time {time_nanos} ns is {} s after now, newer than reject_newer_than ({} s)",
                -age / 1_000_000_000,
                self.reject_newer_than_seconds
            )));
        }
        Ok(())
    }

    pub fn check_samples(&self, samples: usize) -> Result<(), IngestError> {
        if samples > self.max_profile_stacktrace_samples {
            return Err(IngestError::Invalid(format!(
                "profile has {samples} samples, over max_profile_stacktrace_samples ({})",
                self.max_profile_stacktrace_samples
            )));
        }
        Ok(())
    }

    pub fn check_sample_labels(&self, labels: usize) -> Result<(), IngestError> {
        if labels > self.max_profile_stacktrace_sample_labels {
            return Err(IngestError::Invalid(format!(
                "a sample has {labels} labels, over max_profile_stacktrace_sample_labels ({})",
                self.max_profile_stacktrace_sample_labels
            )));
        }
        Ok(())
    }

    /// A symbol name as text within the limit: the bytes as they are when
    /// they are valid UTF-8 within it, as almost every name is; else
    /// repaired, then cut at a character boundary.
    #[inline]
    pub fn symbol<'a>(&self, bytes: &'a [u8]) -> Cow<'a, str> {
        let max = self.max_profile_symbol_value_length.max(1);
        match utf8(bytes) {
            Some(valid) if valid.len() <= max => Cow::Borrowed(valid),
            Some(valid) => cut(Cow::Borrowed(valid), max),
            None => cut(String::from_utf8_lossy(bytes), max),
        }
    }

    /// Frames a stack deeper than the limit keeps before the
    /// [`TRUNCATED_FRAME`] (a stack at the limit is kept whole).
    pub fn kept_depth(&self) -> usize {
        self.max_profile_stacktrace_depth.max(2) - 1
    }
}

/// `bytes` as text, if they are valid UTF-8. A profile's strings are
/// nearly all ASCII, which `is_ascii` checks a word at a time without the
/// UTF-8 decoder's setup for each (short) string: 2 % of the write path's
/// instructions went to `from_utf8`.
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        return Some(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).ok()
}

/// `name` cut to at most `max` bytes, at a character boundary.
#[cold]
fn cut(name: Cow<'_, str>, max: usize) -> Cow<'_, str> {
    if name.len() <= max {
        return name;
    }
    let mut end = max;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    match name {
        Cow::Borrowed(s) => Cow::Borrowed(&s[..end]),
        Cow::Owned(mut s) => {
            s.truncate(end);
            Cow::Owned(s)
        }
    }
}

/// Limits of a whole request, the defaults per profile, and the tenants
/// that have their own.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted, compressed.
    pub max_request_bytes: usize,
    /// Largest request after decompression: the body and every profile in
    /// it together.
    pub max_decompressed_bytes: usize,
    pub defaults: ProfileLimits,
    pub tenants: HashMap<String, ProfileLimits>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 16 << 20,
            max_decompressed_bytes: 64 << 20,
            defaults: ProfileLimits::default(),
            tenants: HashMap::new(),
        }
    }
}

impl Limits {
    pub fn for_tenant(&self, tenant: &str) -> ProfileLimits {
        self.tenants.get(tenant).copied().unwrap_or(self.defaults)
    }

    /// Reads per-tenant overrides from JSON:
    /// `{"tenants": {"acme": {"reject_older_than_seconds": 86400}}}`. A
    /// tenant's entry changes only the limits it names.
    pub fn with_overrides_json(mut self, json: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            tenants: HashMap<String, serde_json::Map<String, serde_json::Value>>,
        }
        let file: File = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let defaults =
            serde_json::to_value(DefaultsView(self.defaults)).map_err(|e| e.to_string())?;
        for (tenant, changes) in file.tenants {
            ember_engine::TenantId::parse(Some(&tenant)).map_err(|e| e.to_string())?;
            let mut merged = defaults.clone();
            if let Some(m) = merged.as_object_mut() {
                m.extend(changes);
            }
            let limits: ProfileLimits =
                serde_json::from_value(merged).map_err(|e| format!("tenant {tenant}: {e}"))?;
            limits
                .check()
                .map_err(|e| format!("tenant {tenant}: {e}"))?;
            self.tenants.insert(tenant, limits);
        }
        Ok(self)
    }
}

/// [`ProfileLimits`] as JSON, to merge a tenant's changes over.
struct DefaultsView(ProfileLimits);

impl serde::Serialize for DefaultsView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let l = &self.0;
        let mut m = s.serialize_map(Some(10))?;
        m.serialize_entry("max_profile_size_bytes", &l.max_profile_size_bytes)?;
        m.serialize_entry(
            "max_profile_stacktrace_samples",
            &l.max_profile_stacktrace_samples,
        )?;
        m.serialize_entry(
            "max_profile_stacktrace_sample_labels",
            &l.max_profile_stacktrace_sample_labels,
        )?;
        m.serialize_entry(
            "max_profile_stacktrace_depth",
            &l.max_profile_stacktrace_depth,
        )?;
        m.serialize_entry(
            "max_profile_symbol_value_length",
            &l.max_profile_symbol_value_length,
        )?;
        m.serialize_entry("reject_older_than_seconds", &l.reject_older_than_seconds)?;
        m.serialize_entry("reject_newer_than_seconds", &l.reject_newer_than_seconds)?;
        m.serialize_entry(
            "compactor_blocks_retention_period_seconds",
            &l.compactor_blocks_retention_period_seconds,
        )?;
        m.serialize_entry("ingestion_rate_mb", &l.ingestion_rate_mb)?;
        m.serialize_entry("ingestion_burst_size_mb", &l.ingestion_burst_size_mb)?;
        m.end()
    }
}

/// Each tenant's ingestion rate, as token buckets of request bytes: a
/// tenant past its rate is refused (429) before its request is decoded, so
/// it cannot take the decoders from the others.
#[derive(Debug, Default)]
pub struct IngestionRates {
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Distributors the tenant's rate is shared by (0 counts as 1): each
    /// takes an equal part, as Pyroscope's global strategy does, so the
    /// cluster admits the tenant's rate whatever the number of them.
    distributors: AtomicUsize,
}

#[derive(Debug)]
struct Bucket {
    bytes: f64,
    at: Instant,
    /// When the bucket is full again: from then on it may be forgotten.
    full_at: Instant,
}

/// Buckets kept before full ones are forgotten: without credentials any
/// tenant id names a bucket, and memory must not grow with them.
const MAX_BUCKETS: usize = 4096;

impl IngestionRates {
    /// Shares each tenant's rate among `n` healthy distributors.
    pub fn share_among(&self, n: usize) {
        self.distributors.store(n, Ordering::Relaxed);
    }

    /// Takes `bytes` from `tenant`'s bucket, or says when to retry. A
    /// request larger than the burst passes when the bucket is full, and
    /// leaves it in debt for as long as the excess takes at the rate.
    pub fn take(
        &self,
        tenant: &str,
        limits: &ProfileLimits,
        bytes: usize,
        now: Instant,
    ) -> Result<(), IngestError> {
        if limits.ingestion_rate_mb <= 0.0 {
            return Ok(());
        }
        let distributors = self.distributors.load(Ordering::Relaxed).max(1);
        let rate = limits.ingestion_rate_mb * 1e6 / distributors as f64;
        let burst = (limits.ingestion_burst_size_mb * 1e6).max(rate);
        let mut buckets = self.buckets.lock().expect("rate buckets");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(tenant) {
            buckets.retain(|_, b| b.full_at > now);
        }
        let bucket = buckets.entry(tenant.to_string()).or_insert(Bucket {
            bytes: burst,
            at: now,
            full_at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.bytes = (bucket.bytes + elapsed * rate).min(burst);
        bucket.at = now;
        let needed = (bytes as f64).min(burst);
        if bucket.bytes < needed {
            let wait = (needed - bucket.bytes) / rate;
            return Err(IngestError::RateLimited(format!(
                "tenant {tenant} pushed past its ingestion rate (ingestion_rate_mb {}, \
                 ingestion_burst_size_mb {}, shared by {distributors} distributors): \
                 retry in {wait:.1} s",
                limits.ingestion_rate_mb, limits.ingestion_burst_size_mb
            )));
        }
        bucket.bytes -= bytes as f64;
        bucket.full_at = now + std::time::Duration::from_secs_f64((burst - bucket.bytes) / rate);
        Ok(())
    }
}

/// Bytes of requests being decoded or waiting for their flush, across the
/// process. A request that would pass the budget is refused with 429 and
/// Retry-After, so memory stays bounded whatever clients send.
#[derive(Debug, Clone)]
pub struct InflightBytes {
    permits: Arc<Semaphore>,
    max_bytes: usize,
}

/// Permits count KiB, so that a u32 of them covers terabytes.
const PERMIT_BYTES: usize = 1024;

impl InflightBytes {
    pub fn new(max_bytes: usize) -> Self {
        let permits = (max_bytes / PERMIT_BYTES).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(permits)),
            max_bytes,
        }
    }

    /// Reserves `bytes` more for a request, or refuses it as overloaded.
    pub fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, IngestError> {
        let n = u32::try_from(bytes.div_ceil(PERMIT_BYTES).max(1)).unwrap_or(u32::MAX);
        self.permits.clone().try_acquire_many_owned(n).map_err(|_| {
            IngestError::Overloaded(format!(
                "{bytes} more bytes would pass the {} bytes of requests in flight: the server is at capacity; retry after the Retry-After delay",
                self.max_bytes
            ))
        })
    }

    /// Bytes reserved now.
    pub fn used_bytes(&self) -> usize {
        let total = (self.max_bytes / PERMIT_BYTES).clamp(1, Semaphore::MAX_PERMITS);
        (total - self.permits.available_permits()) * PERMIT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn time_window_refuses_old_and_future_profiles() {
        let l = ProfileLimits::default();
        let now = 1_800_000_000 * S;
        assert!(l.check_time(now, now).is_ok());
        assert!(l.check_time(now - 3599 * S, now).is_ok());
        let old = l.check_time(0, now).unwrap_err().to_string();
        assert!(
            old.contains("older than reject_older_than (3600 s)"),
            "{old}"
        );
        let future = l
            .check_time(4_102_444_800 * S, now)
            .unwrap_err()
            .to_string();
        assert!(
            future.contains("newer than reject_newer_than (600 s)"),
            "{future}"
        );
        assert!(l.check_time(i64::MIN, now).is_err());
        assert!(l.check_time(i64::MAX, now).is_err());
        let off = ProfileLimits {
            reject_older_than_seconds: 0,
            reject_newer_than_seconds: 0,
            ..l
        };
        assert!(off.check_time(0, now).is_ok());
        assert!(off.check_time(i64::MAX, now).is_ok());
    }

    #[test]
    fn symbols_are_cut_at_char_boundaries() {
        let l = ProfileLimits {
            max_profile_symbol_value_length: 4,
            ..Default::default()
        };
        assert_eq!(l.symbol(b"abcdef"), "abcd");
        assert_eq!(l.symbol("abé".as_bytes()), "abé");
        assert_eq!(l.symbol("abcé".as_bytes()), "abc");
        assert!(matches!(l.symbol(b"abc"), Cow::Borrowed("abc")));
        // Repaired first: the replacement character takes three bytes.
        assert_eq!(l.symbol(b"ab\xffc"), "ab");
        assert_eq!(l.symbol(b"\xff"), "\u{fffd}");
    }

    #[test]
    fn tenant_overrides_change_only_what_they_name() {
        let limits = Limits::default()
            .with_overrides_json(
                r#"{"tenants": {"acme.prod": {"reject_older_than_seconds": 86400}}}"#,
            )
            .unwrap();
        let acme = limits.for_tenant("acme.prod");
        assert_eq!(acme.reject_older_than_seconds, 86400);
        assert_eq!(acme.max_profile_stacktrace_depth, 1000);
        assert_eq!(limits.for_tenant("other"), ProfileLimits::default());
        assert!(Limits::default()
            .with_overrides_json(r#"{"tenants": {"a": {"no_such_limit": 1}}}"#)
            .is_err());
        assert!(Limits::default()
            .with_overrides_json(r#"{"tenants": {"../x": {}}}"#)
            .is_err());
    }

    #[test]
    fn each_of_n_distributors_admits_its_share_of_a_tenant_s_rate() {
        let rates = IngestionRates::default();
        let limited = ProfileLimits {
            ingestion_rate_mb: 3.0,
            ingestion_burst_size_mb: 1.0,
            ..ProfileLimits::default()
        };
        rates.share_among(3);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        // A third of 3 MB/s is 1 MB/s: the burst, then a megabyte a second.
        rates.take("t", &limited, 1_000_000, at(0)).unwrap();
        let err = rates.take("t", &limited, 500_000, at(100)).unwrap_err();
        assert!(
            err.to_string().contains("shared by 3 distributors"),
            "{err}"
        );
        assert!(err.to_string().contains("retry in 0.4 s"), "{err}");
        rates.take("t", &limited, 500_000, at(500)).unwrap();
        // Alone again, the distributor takes the whole rate.
        rates.share_among(1);
        rates.take("t", &limited, 1_000_000, at(1_000)).unwrap();
        let err = rates.take("t", &limited, 900_000, at(1_100)).unwrap_err();
        assert!(
            err.to_string().contains("shared by 1 distributors"),
            "{err}"
        );
        rates.take("t", &limited, 900_000, at(1_300)).unwrap();
    }

    #[test]
    fn a_tenant_past_its_rate_is_refused_until_its_bucket_refills() {
        let rates = IngestionRates::default();
        let limited = ProfileLimits {
            ingestion_rate_mb: 1.0,
            ingestion_burst_size_mb: 2.0,
            ..ProfileLimits::default()
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        // The burst first, then the rate.
        rates.take("noisy", &limited, 1_500_000, at(0)).unwrap();
        rates.take("noisy", &limited, 500_000, at(0)).unwrap();
        let err = rates.take("noisy", &limited, 600_000, at(0)).unwrap_err();
        assert!(matches!(err, IngestError::RateLimited(_)), "{err}");
        assert!(err.to_string().contains("ingestion_rate_mb 1"), "{err}");
        assert!(err.to_string().contains("retry in 0.6 s"), "{err}");
        rates.take("noisy", &limited, 600_000, at(600)).unwrap();
        // Another tenant, and a tenant without a rate, are not slowed.
        rates.take("quiet", &limited, 2_000_000, at(600)).unwrap();
        let free = ProfileLimits::default();
        for _ in 0..100 {
            rates.take("free", &free, 16 << 20, at(600)).unwrap();
        }
        // A request past the burst passes on a full bucket, then waits.
        rates.take("big", &limited, 5_000_000, at(0)).unwrap();
        assert!(rates.take("big", &limited, 1, at(2_000)).is_err());
        rates.take("big", &limited, 1, at(3_100)).unwrap();
        // Any number of tenant ids costs a bounded number of buckets.
        for i in 0..3 * MAX_BUCKETS {
            rates
                .take(&format!("t{i}"), &limited, 1, at(10_000 + i as u64))
                .unwrap();
        }
        assert!(rates.buckets.lock().unwrap().len() <= MAX_BUCKETS);
        assert!(ProfileLimits {
            ingestion_rate_mb: -1.0,
            ..limited
        }
        .check()
        .is_err());
        assert!(ProfileLimits {
            ingestion_burst_size_mb: f64::NAN,
            ..limited
        }
        .check()
        .is_err());
        assert!(limited.check().is_ok());
    }

    #[test]
    fn inflight_budget_refuses_then_recovers() {
        let b = InflightBytes::new(10 * 1024);
        let first = b.reserve(8 * 1024).unwrap();
        let err = b.reserve(4 * 1024).unwrap_err();
        assert!(matches!(err, IngestError::Overloaded(_)));
        assert_eq!(b.used_bytes(), 8 * 1024);
        drop(first);
        assert!(b.reserve(10 * 1024).is_ok());
    }
}
