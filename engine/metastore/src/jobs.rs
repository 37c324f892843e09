//! Compaction jobs as the metastore keeps them, and the commands that plan,
//! lease, renew, fail and commit them. Everything a command needs (the
//! clock, the thresholds, the lease length) travels in the command, so that
//! every replica of the state machine applies it to the same result.

use prost::Message;

use ember_engine::block::BlockMeta;

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

/// Merges `sources` (one tenant's part of each block, all of one shard, one
/// level and one 6 h partition) into one block of the next level.
#[derive(Clone, PartialEq, Message)]
pub struct Job {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub tenant: String,
    #[prost(uint32, tag = "3")]
    pub shard: u32,
    /// Level of the sources; the output is one level up.
    #[prost(uint32, tag = "4")]
    pub level: u32,
    #[prost(int64, tag = "5")]
    pub partition: i64,
    /// Each source block as indexed for this tenant (its datasets only).
    #[prost(message, repeated, tag = "6")]
    pub sources: Vec<BlockMeta>,
    #[prost(uint32, tag = "7")]
    pub status: u32,
    /// The fencing token of the current lease: the applied index of the
    /// command that granted it. A worker whose token is stale is refused.
    #[prost(uint64, tag = "8")]
    pub lease_token: u64,
    #[prost(string, tag = "9")]
    pub worker: String,
    #[prost(int64, tag = "10")]
    pub lease_expires: i64,
    #[prost(uint32, tag = "11")]
    pub failures: u32,
    #[prost(string, tag = "12")]
    pub last_error: String,
    /// When the job was planned (nanoseconds since the epoch).
    #[prost(int64, tag = "13")]
    pub created: i64,
}

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

/// When a queue of one level is cut into a job.
#[derive(Clone, PartialEq, Message)]
pub struct LevelRule {
    /// A job takes this many blocks as soon as the queue holds them.
    #[prost(uint32, tag = "1")]
    pub max_blocks: u32,
    /// A smaller batch goes once its oldest block is this old.
    #[prost(int64, tag = "2")]
    pub max_age_nanos: i64,
}

/// Cuts every queue that is ready into jobs.
#[derive(Clone, PartialEq, Message)]
pub struct PlanCompaction {
    #[prost(int64, tag = "1")]
    pub now: i64,
    /// Rule `i` compacts level `i` into level `i + 1`; levels beyond the
    /// last rule are not compacted.
    #[prost(message, repeated, tag = "2")]
    pub levels: Vec<LevelRule>,
    /// Jobs not yet done (pending or running) beyond which nothing is planned.
    #[prost(uint32, tag = "3")]
    pub max_jobs: u32,
}

/// Gives the smallest waiting job (or one whose lease expired) to a worker.
#[derive(Clone, PartialEq, Message)]
pub struct LeaseJob {
    #[prost(string, tag = "1")]
    pub worker: String,
    #[prost(int64, tag = "2")]
    pub now: i64,
    #[prost(int64, tag = "3")]
    pub lease_nanos: i64,
    /// Only jobs of this level or below: a worker kept for level 0, so a
    /// batch's first compaction never queues behind merges of older data.
    #[prost(uint32, optional, tag = "4")]
    pub max_level: Option<u32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RenewLease {
    #[prost(string, tag = "1")]
    pub job_id: String,
    #[prost(uint64, tag = "2")]
    pub token: u64,
    #[prost(int64, tag = "3")]
    pub now: i64,
    #[prost(int64, tag = "4")]
    pub lease_nanos: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct FailJob {
    #[prost(string, tag = "1")]
    pub job_id: String,
    #[prost(uint64, tag = "2")]
    pub token: u64,
    #[prost(string, tag = "3")]
    pub error: String,
}

/// Replaces the job's sources by its output in one step, and tombstones
/// every source block no tenant's entry refers to any more.
#[derive(Clone, PartialEq, Message)]
pub struct CommitJob {
    #[prost(string, tag = "1")]
    pub job_id: String,
    #[prost(uint64, tag = "2")]
    pub token: u64,
    /// None when the sources held nothing to keep.
    #[prost(message, optional, tag = "3")]
    pub output: Option<BlockMeta>,
    /// When the retired objects may be deleted: late enough that queries
    /// which found them before the commit have finished.
    #[prost(int64, tag = "4")]
    pub delete_after: i64,
}

/// Forgets tombstones whose objects are deleted.
#[derive(Clone, PartialEq, Message)]
pub struct RemoveTombstones {
    #[prost(string, repeated, tag = "1")]
    pub paths: Vec<String>,
}

/// An object retired by a commit, to be deleted after `delete_after`.
#[derive(Clone, PartialEq, Message)]
pub struct Tombstone {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(string, tag = "2")]
    pub block_id: String,
    #[prost(int64, tag = "3")]
    pub delete_after: i64,
}

/// Drops what a tenant keeps no longer: every part of a block whose
/// partitions all ended more than the tenant's retention before `now`
/// (whole partitions, never part of one), through tombstones as a commit.
#[derive(Clone, PartialEq, Message)]
pub struct ApplyRetention {
    #[prost(int64, tag = "1")]
    pub now: i64,
    /// Retention of tenants without their own; 0 keeps everything.
    #[prost(int64, tag = "2")]
    pub default_nanos: i64,
    #[prost(message, repeated, tag = "3")]
    pub tenants: Vec<TenantRetention>,
    #[prost(int64, tag = "4")]
    pub delete_after: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct TenantRetention {
    #[prost(string, tag = "1")]
    pub tenant: String,
    /// 0 keeps everything.
    #[prost(int64, tag = "2")]
    pub retention_nanos: i64,
}
