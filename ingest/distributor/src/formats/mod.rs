//! The wire formats Ember takes, one file each, behind one trait: a
//! request's body as it came in becomes normalised profiles under the
//! request's and the tenant's limits. Every push path and every fuzz
//! target goes through [`WireFormat::profiles`].

pub mod jfr;
pub mod legacy;
pub mod otlp;
pub mod pprof;
pub mod push;

use ember_engine::profile::Profile;

use crate::limits::{Limits, ProfileLimits};
use crate::IngestError;

/// A request body in one of the formats Ember takes.
pub trait WireFormat: Send + 'static {
    /// Bytes as received, what the in-flight budget is first reserved for.
    fn received_bytes(&self) -> usize;

    /// Normalised profiles of the body: decompressed and decoded under the
    /// request's limits, then checked against `tenant`'s. `now_nanos` is
    /// the time of arrival, the one the tenant's window is measured from.
    fn profiles(
        self,
        limits: &Limits,
        tenant: &str,
        now_nanos: i64,
    ) -> Result<Vec<Profile>, IngestError>;
}

/// How a request body is encoded, as its headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyEncoding {
    pub json: bool,
    pub gzip: bool,
}

/// Counts decompressed bytes against the request's limit.
pub(crate) struct Budget {
    pub(crate) left: usize,
    limit: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Self { left: limit, limit }
    }

    pub(crate) fn take(&mut self, bytes: usize) -> Result<(), IngestError> {
        self.left = self.left.checked_sub(bytes).ok_or(IngestError::TooLarge {
            size: self.limit - self.left + bytes,
            limit: self.limit,
        })?;
        Ok(())
    }
}

/// Refuses the request if any profile lies outside the tenant's window.
pub(crate) fn check_times(
    profiles: &[Profile],
    limits: &ProfileLimits,
    now_nanos: i64,
) -> Result<(), IngestError> {
    profiles
        .iter()
        .try_for_each(|p| limits.check_time(p.time_nanos, now_nanos))
}
