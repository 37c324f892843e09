//! Faults that tests switch on, to prove that no fault makes Ember
//! acknowledge a profile it has not stored: errors and delays on object
//! store requests ([`StoreFaults`]) and metastore commands
//! ([`FaultyMetastore`]), and crash points in a flush (a
//! [`FlushHook`]). Each wraps the real part at wiring time; none is in
//! the process unless `ember serve --faults` (or `EMBER_FAULTS`) names some.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ember_engine::block::BlockMeta;
use ember_engine::store_layer::{Request, StoreLayer};
use ember_metastore::{Applied, Command, MetastoreClient, MetastoreError};
use ember_segment_writer::FlushHook;
pub use ember_segment_writer::FlushStep;
use object_store::Result;

/// The name `crash_at=` gives each step.
fn flush_step(s: &str) -> Option<FlushStep> {
    match s {
        "before_upload" => Some(FlushStep::BeforeUpload),
        "after_upload" => Some(FlushStep::AfterUpload),
        "after_index" => Some(FlushStep::AfterIndex),
        _ => None,
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
                        flush_step(value)
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

    pub fn touches_metastore(&self) -> bool {
        self.metastore_error_rate > 0.0 || self.metastore_delay_rate > 0.0
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
}

/// Stops the process at once, as SIGKILL would, at the chosen step.
impl FlushHook for Faults {
    fn reached(&self, step: FlushStep) {
        if self.crash_at == Some(step) {
            eprintln!("fault injection: crashing at {step:?}");
            std::process::abort();
        }
    }
}

/// A metastore client that fails or delays commands as [`Faults`] says.
/// A delayed command is still applied after the delay, as a metastore
/// across the network may apply one its caller gave up on.
pub struct FaultyMetastore {
    inner: Arc<dyn MetastoreClient>,
    faults: Arc<Faults>,
}

impl FaultyMetastore {
    pub fn new(inner: Arc<dyn MetastoreClient>, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }

    async fn before(&self) -> std::result::Result<(), MetastoreError> {
        if self.faults.roll(self.faults.metastore_error_rate) {
            return Err(MetastoreError::Unavailable(
                "injected metastore fault".into(),
            ));
        }
        if self.faults.roll(self.faults.metastore_delay_rate) {
            tokio::time::sleep(self.faults.metastore_delay).await;
        }
        Ok(())
    }
}

#[async_trait]
impl MetastoreClient for FaultyMetastore {
    async fn apply(&self, command: Command) -> std::result::Result<Applied, MetastoreError> {
        self.before().await?;
        self.inner.apply(command).await
    }

    async fn add_blocks(&self, blocks: Vec<BlockMeta>) -> std::result::Result<(), MetastoreError> {
        self.before().await?;
        self.inner.add_blocks(blocks).await
    }
}

/// Fails or delays object-store requests as [`Faults`] says (wrap the
/// store in `Layered::new(store, StoreFaults(faults))`).
pub struct StoreFaults(pub Arc<Faults>);

#[async_trait]
impl StoreLayer for StoreFaults {
    fn name(&self) -> &'static str {
        "Faults"
    }

    async fn admit(&self, request: &Request<'_>) -> Result<()> {
        let faults = &self.0;
        let (location, delay, rate) = match *request {
            Request::Put { location, .. } | Request::PutMultipart { location } => {
                (location, faults.put_delay, faults.put_error_rate)
            }
            Request::Get { location, .. } | Request::GetRanges { location, .. } => {
                (location, faults.get_delay, faults.get_error_rate)
            }
            _ => return Ok(()),
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if faults.roll(rate) {
            return Err(object_store::Error::Generic {
                store: "FaultStore",
                source: format!("injected fault on {location}").into(),
            });
        }
        Ok(())
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
        assert!(!f.touches_metastore());
        assert!(!Faults::parse("").unwrap().touches_store());
        assert!(Faults::parse("metastore_error_rate=0.1")
            .unwrap()
            .touches_metastore());
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
