//! Faults that tests switch on, to prove that no fault makes Ember
//! acknowledge a profile it has not stored: errors and delays on object
//! store requests and metastore commands, and crash points in a flush.
//! Off unless `ember serve --faults` (or `EMBER_FAULTS`) names some.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// A step of a segment flush where a crash point can stop the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushStep {
    /// The block is encoded; nothing is written yet.
    BeforeUpload,
    /// The block is in object storage, not in the index.
    AfterUpload,
    /// The block is indexed; no request is acknowledged yet.
    AfterIndex,
}

impl FlushStep {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "before_upload" => Some(Self::BeforeUpload),
            "after_upload" => Some(Self::AfterUpload),
            "after_index" => Some(Self::AfterIndex),
            _ => None,
        }
    }
}

/// What to inject. Rates are probabilities per request or command.
#[derive(Debug, Default)]
pub struct Faults {
    pub put_error_rate: f64,
    pub get_error_rate: f64,
    pub put_delay: Duration,
    pub get_delay: Duration,
    pub metastore_error_rate: f64,
    /// Commands that are applied only after this long (past the writer's
    /// metadata timeout, so that the dlq copy and the late apply race).
    pub metastore_delay_rate: f64,
    pub metastore_delay: Duration,
    pub crash_at: Option<FlushStep>,
    rng: AtomicU64,
}

impl Faults {
    /// `put_error_rate=0.3,metastore_delay_rate=0.2,metastore_delay_ms=2500,crash_at=after_upload,seed=7`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut f = Faults {
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            ..Default::default()
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("fault {part:?}: expected key=value"))?;
            let rate = || -> Result<f64, String> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("fault {key}: {value:?} is not a rate in 0..1"))
            };
            let millis = || -> Result<Duration, String> {
                value
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("fault {key}: {value:?} is not milliseconds"))
            };
            match key {
                "put_error_rate" => f.put_error_rate = rate()?,
                "get_error_rate" => f.get_error_rate = rate()?,
                "put_delay_ms" => f.put_delay = millis()?,
                "get_delay_ms" => f.get_delay = millis()?,
                "metastore_error_rate" => f.metastore_error_rate = rate()?,
                "metastore_delay_rate" => f.metastore_delay_rate = rate()?,
                "metastore_delay_ms" => f.metastore_delay = millis()?,
                "crash_at" => {
                    f.crash_at = Some(
                        FlushStep::parse(value)
                            .ok_or_else(|| format!("fault crash_at: unknown step {value:?}"))?,
                    )
                }
                "seed" => {
                    let seed: u64 = value
                        .parse()
                        .map_err(|_| format!("fault seed: {value:?}"))?;
                    f.rng = AtomicU64::new(seed.max(1));
                }
                _ => return Err(format!("unknown fault {key:?}")),
            }
        }
        Ok(f)
    }

    pub fn touches_store(&self) -> bool {
        self.put_error_rate > 0.0
            || self.get_error_rate > 0.0
            || !self.put_delay.is_zero()
            || !self.get_delay.is_zero()
    }

    /// True with probability `rate` (xorshift; deterministic per seed).
    pub fn roll(&self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        let mut x = self.rng.load(Ordering::Relaxed);
        loop {
            let mut next = x;
            next ^= next << 13;
            next ^= next >> 7;
            next ^= next << 17;
            match self
                .rng
                .compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return ((next >> 11) as f64 / (1u64 << 53) as f64) < rate,
                Err(current) => x = current,
            }
        }
    }

    /// Stops the process at once, as SIGKILL would, at the chosen step.
    pub fn crash_point(&self, step: FlushStep) {
        if self.crash_at == Some(step) {
            eprintln!("fault injection: crashing at {step:?}");
            std::process::abort();
        }
    }
}

/// An object store that fails or delays requests as [`Faults`] says.
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<Faults>,
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }

    async fn before(&self, put: bool, location: &Path) -> Result<()> {
        let (delay, rate) = if put {
            (self.faults.put_delay, self.faults.put_error_rate)
        } else {
            (self.faults.get_delay, self.faults.get_error_rate)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.faults.roll(rate) {
            return Err(object_store::Error::Generic {
                store: "FaultStore",
                source: format!("injected fault on {location}").into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faults({})", self.inner)
    }
}

impl fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faults({:?})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.before(true, location).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.before(true, location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.before(false, location).await?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.before(false, location).await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs_and_refuses_unknown_ones() {
        let f = Faults::parse("put_error_rate=0.5, crash_at=after_upload,metastore_delay_ms=10")
            .unwrap();
        assert_eq!(f.put_error_rate, 0.5);
        assert_eq!(f.crash_at, Some(FlushStep::AfterUpload));
        assert_eq!(f.metastore_delay, Duration::from_millis(10));
        assert!(f.touches_store());
        assert!(!Faults::parse("").unwrap().touches_store());
        for bad in ["nope=1", "put_error_rate=2", "crash_at=never", "x"] {
            assert!(Faults::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rolls_hit_about_their_rate() {
        let f = Faults::parse("seed=42").unwrap();
        let hits = (0..10_000).filter(|_| f.roll(0.3)).count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| f.roll(0.0)));
        assert!((0..1000).all(|_| f.roll(1.0)));
    }
}
