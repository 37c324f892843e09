//! How readers (query frontends and backends) reach the index: this
//! process's metastore, its copy of a replicated one once it has caught up,
//! or another process's over the network. A query asks the same two
//! questions of each, so a query role runs the same code wherever the index
//! lives.

use std::sync::Arc;

use async_trait::async_trait;
use ember_engine::block::BlockMeta;

use crate::messages::{DatasetEntry, DatasetQuery, NameList};
use ember_engine::profile::now_nanos;

use crate::{BlockQuery, DatasetRef, Instance, Job, Metastore, MetastoreError, ReadBarrier};

/// The index's answers to readers, wherever the index is.
#[async_trait]
pub trait MetastoreIndex: Send + Sync {
    /// Datasets that can hold rows matching the query, each once.
    async fn datasets(&self, q: &BlockQuery) -> Result<Vec<DatasetRef>, MetastoreError>;

    /// Every (tenant's part of a) block indexed, for `system.blocks`.
    async fn tenant_blocks(&self, tenant: &str) -> Result<Vec<BlockMeta>, MetastoreError>;

    /// The tenant's compaction jobs not committed yet, failed ones
    /// included, for `system.compaction_jobs`.
    async fn tenant_jobs(&self, tenant: &str) -> Result<Vec<Job>, MetastoreError>;

    /// The cluster's processes whose registration has not lapsed.
    async fn live_instances(&self) -> Result<Vec<Instance>, MetastoreError>;

    /// Whether a worker leasing at `now` (up to `max_level`) would get a
    /// job. A copy behind the leader may say no for a while: workers ask
    /// again when the index changes or their poll comes round.
    async fn job_waiting(&self, now: i64, max_level: Option<u32>) -> Result<bool, MetastoreError>;
}

#[async_trait]
impl MetastoreIndex for Metastore {
    async fn datasets(&self, q: &BlockQuery) -> Result<Vec<DatasetRef>, MetastoreError> {
        Ok(self.query(q))
    }

    async fn tenant_blocks(&self, tenant: &str) -> Result<Vec<BlockMeta>, MetastoreError> {
        Ok(self.blocks(tenant))
    }

    async fn tenant_jobs(&self, tenant: &str) -> Result<Vec<Job>, MetastoreError> {
        Ok(self.tenant_jobs(tenant))
    }

    async fn live_instances(&self) -> Result<Vec<Instance>, MetastoreError> {
        Ok(Metastore::live_instances(self, now_nanos()))
    }

    async fn job_waiting(&self, now: i64, max_level: Option<u32>) -> Result<bool, MetastoreError> {
        Ok(Metastore::job_waiting(self, now, max_level))
    }
}

/// This process's copy of a replicated index: each read first waits until
/// the copy holds every write acknowledged before the read began, so reads
/// are linearizable on any replica.
pub struct ReplicaIndex {
    metastore: Arc<Metastore>,
    barrier: Arc<dyn ReadBarrier>,
}

impl ReplicaIndex {
    pub fn new(metastore: Arc<Metastore>, barrier: Arc<dyn ReadBarrier>) -> Self {
        Self { metastore, barrier }
    }
}

#[async_trait]
impl MetastoreIndex for ReplicaIndex {
    async fn datasets(&self, q: &BlockQuery) -> Result<Vec<DatasetRef>, MetastoreError> {
        self.barrier.caught_up().await?;
        Ok(self.metastore.query(q))
    }

    async fn tenant_blocks(&self, tenant: &str) -> Result<Vec<BlockMeta>, MetastoreError> {
        self.barrier.caught_up().await?;
        Ok(self.metastore.blocks(tenant))
    }

    async fn tenant_jobs(&self, tenant: &str) -> Result<Vec<Job>, MetastoreError> {
        self.barrier.caught_up().await?;
        Ok(self.metastore.tenant_jobs(tenant))
    }

    /// Leases last seconds: a replica's copy, however far behind, is as
    /// good as the leader's.
    async fn live_instances(&self) -> Result<Vec<Instance>, MetastoreError> {
        Ok(self.metastore.live_instances(now_nanos()))
    }

    /// No wait for the leader: a stale no costs a worker one poll.
    async fn job_waiting(&self, now: i64, max_level: Option<u32>) -> Result<bool, MetastoreError> {
        Ok(self.metastore.job_waiting(now, max_level))
    }
}

impl From<&BlockQuery> for DatasetQuery {
    fn from(q: &BlockQuery) -> Self {
        let list = |names: &Option<Vec<String>>| {
            names.as_ref().map(|names| NameList {
                names: names.clone(),
            })
        };
        Self {
            tenant: q.tenant.clone(),
            start: q.start,
            end: q.end,
            service_names: list(&q.service_names),
            profile_types: list(&q.profile_types),
            skip_level0: q.skip_level0,
        }
    }
}

impl From<DatasetQuery> for BlockQuery {
    fn from(q: DatasetQuery) -> Self {
        Self {
            tenant: q.tenant,
            start: q.start,
            end: q.end,
            service_names: q.service_names.map(|l| l.names),
            profile_types: q.profile_types.map(|l| l.names),
            skip_level0: q.skip_level0,
        }
    }
}

impl From<&DatasetRef> for DatasetEntry {
    fn from(d: &DatasetRef) -> Self {
        Self {
            block_id: d.block_id.to_string(),
            path: d.path.to_string(),
            dataset: Some(d.dataset.as_ref().clone()),
        }
    }
}

impl TryFrom<DatasetEntry> for DatasetRef {
    type Error = MetastoreError;

    fn try_from(e: DatasetEntry) -> Result<Self, MetastoreError> {
        let dataset = e.dataset.ok_or_else(|| {
            MetastoreError::Unavailable(format!(
                "the metastore answered a dataset of block {} without its metadata",
                e.block_id
            ))
        })?;
        Ok(Self {
            block_id: e.block_id.into(),
            path: e.path.into(),
            dataset: Arc::new(dataset),
        })
    }
}
