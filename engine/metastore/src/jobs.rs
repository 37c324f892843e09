//! Compaction jobs as the metastore keeps them. The jobs and the commands
//! that plan, lease, renew, fail and commit them are messages
//! (`metastore.proto`): everything a command needs (the clock, the
//! thresholds, the lease length) travels in the command, so that every
//! replica of the state machine applies it to the same result.

use crate::messages::Job;

/// A job's state. Stored as an integer in [`Job::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    /// Planned, waiting for a worker.
    Pending = 0,
    /// Leased by a worker until `lease_expires`.
    Running = 1,
    /// Failed too often: set aside, shown, not retried.
    Failed = 2,
}

impl JobStatus {
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => JobStatus::Running,
            2 => JobStatus::Failed,
            _ => JobStatus::Pending,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Failed => "failed",
        }
    }
}

/// A job fails for good after this many failed or abandoned attempts.
pub const MAX_JOB_FAILURES: u32 = 3;

impl Job {
    pub fn status(&self) -> JobStatus {
        JobStatus::from_u32(self.status)
    }

    /// Bytes of the source blocks (whole objects: an upper bound).
    pub fn source_bytes(&self) -> u64 {
        self.sources.iter().map(|s| s.size).sum()
    }

    pub fn source_samples(&self) -> u64 {
        self.sources
            .iter()
            .flat_map(|s| &s.datasets)
            .map(|d| d.samples)
            .sum()
    }
}
