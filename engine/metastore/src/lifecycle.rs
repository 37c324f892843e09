//! The block lifecycle beside the metastore: planning jobs, retention, and
//! deleting what commits and retention retired. These read the index and
//! apply commands locally, so they run in the metastore's process;
//! compaction workers (`sql/src/compaction`) may run anywhere.

use ember_engine::profile::now_nanos;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::raft::Replicated;
use crate::{
    command::Kind, Applied, ApplyRetention, InProcess, LevelRule, Metastore, MetastoreClient,
    MetastoreError, PlanCompaction, RemoveTombstones, TenantRetention,
};

/// When the planner, retention and the deleter act.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    pub levels: Vec<LevelRule>,
    /// Jobs waiting or running beyond which nothing more is planned.
    pub max_jobs: u32,
    /// Retired objects are deleted this long after their commit.
    pub delete_delay: Duration,
    /// How often the planner and the deleter look again.
    pub poll: Duration,
    /// What each tenant keeps (checked once a minute).
    pub retention: Retention,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            levels: default_levels(),
            max_jobs: 1024,
            delete_delay: Duration::from_secs(15 * 60),
            poll: Duration::from_secs(1),
            retention: Retention::default(),
        }
    }
}

/// How long tenants' profiles are kept; zero keeps everything.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub default: Duration,
    pub tenants: HashMap<String, Duration>,
}

/// The thresholds v2 ships with: L0 -> L1 at 20 blocks or 36 s, L1 -> L2
/// at 10 blocks or 12 min, L2 -> L3 at 10 blocks or 3 h.
pub fn default_levels() -> Vec<LevelRule> {
    let rule = |max_blocks, secs: i64| LevelRule {
        max_blocks,
        max_age_nanos: secs * 1_000_000_000,
    };
    vec![rule(20, 36), rule(10, 12 * 60), rule(10, 3 * 3600)]
}

#[derive(Debug, Error)]
pub enum LifecycleError {
    #[error("listing {prefix}: {source}")]
    List {
        prefix: String,
        source: object_store::Error,
    },
    #[error(transparent)]
    Metastore(#[from] MetastoreError),
}

/// Returns after `poll`, or as soon as `wake` says the metastore changed:
/// polling alone added half a poll to every job's start, at each step.
pub async fn idle(wake: &mut Option<watch::Receiver<u64>>, poll: Duration) {
    let Some(rx) = wake else {
        return tokio::time::sleep(poll).await;
    };
    tokio::select! {
        changed = rx.changed() => {
            if changed.is_err() {
                // The metastore is gone: poll from now on.
                *wake = None;
                tokio::time::sleep(poll).await;
            }
        }
        _ = tokio::time::sleep(poll) => {}
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// How old an unknown object under `blocks/` must be before the sweeper
/// deletes it: far beyond a lease (a worker that cannot commit within its
/// lease loses the job), so that no output waiting for its commit is taken.
const ORPHAN_MIN_AGE: Duration = Duration::from_secs(3600);
const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(600);

type LabelSet = Vec<(String, String)>;

/// The index's side of compaction: jobs by state and level, blocks by
/// level, what waits for deletion and what was deleted.
#[derive(Clone, Default)]
pub struct LifecycleMetrics {
    pub objects_deleted: Counter,
    pub orphans_deleted: Counter,
    /// Jobs not committed, by `status` and `level`.
    pub jobs: Family<LabelSet, Gauge>,
    /// Blocks indexed, by `level`.
    pub blocks: Family<LabelSet, Gauge>,
    /// Retired objects waiting for their delete delay.
    pub tombstones: Gauge,
}

impl LifecycleMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ember_compaction_objects_deleted",
            "Retired block objects deleted",
            self.objects_deleted.clone(),
        );
        registry.register(
            "ember_compaction_orphans_deleted",
            "Compaction outputs uploaded but never committed, deleted",
            self.orphans_deleted.clone(),
        );
        registry.register(
            "ember_compaction_jobs",
            "Compaction jobs not yet committed, by status and level",
            self.jobs.clone(),
        );
        registry.register(
            "ember_blocks",
            "Blocks in the index, by compaction level",
            self.blocks.clone(),
        );
        registry.register(
            "ember_tombstones",
            "Retired block objects waiting for their delete delay",
            self.tombstones.clone(),
        );
    }

    /// Sets the gauges from the metastore's state.
    fn observe(&self, metastore: &Metastore) {
        self.jobs.clear();
        for ((status, level), n) in metastore.job_counts() {
            self.jobs
                .get_or_create(&vec![
                    ("status".to_string(), status.name().to_string()),
                    ("level".to_string(), level.to_string()),
                ])
                .set(n as i64);
        }
        self.tombstones.set(metastore.tombstone_count() as i64);
        self.blocks.clear();
        for (level, n) in metastore.blocks_by_level() {
            self.blocks
                .get_or_create(&vec![("level".to_string(), level.to_string())])
                .set(n as i64);
        }
    }
}

pub struct Lifecycle {
    store: Arc<dyn ObjectStore>,
    metastore: Arc<Metastore>,
    commands: Arc<dyn MetastoreClient>,
    /// The replicated metastore this process is a replica of, if any: only
    /// its leader plans, expires and deletes, since a follower's copy of
    /// the index may lag (and an orphan sweep over a stale copy would
    /// delete committed blocks).
    replicated: Option<Replicated>,
    config: LifecycleConfig,
    pub metrics: LifecycleMetrics,
}

impl Lifecycle {
    /// The lifecycle of this process's metastore.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        metastore: Arc<Metastore>,
        config: LifecycleConfig,
    ) -> Self {
        Self {
            store,
            commands: Arc::new(InProcess(metastore.clone())),
            metastore,
            replicated: None,
            config,
            metrics: LifecycleMetrics::default(),
        }
    }

    /// The lifecycle of a replicated metastore, `metastore` being this
    /// replica's store: it acts only while this replica leads.
    pub fn replicated(
        store: Arc<dyn ObjectStore>,
        metastore: Arc<Metastore>,
        replicated: Replicated,
        config: LifecycleConfig,
    ) -> Self {
        Self {
            commands: Arc::new(replicated.clone()),
            replicated: Some(replicated),
            ..Self::new(store, metastore, config)
        }
    }

    async fn apply(&self, kind: Kind) -> Result<Applied, MetastoreError> {
        self.commands.apply(kind.into()).await
    }

    /// Whether this process may act on the index now: it has the only
    /// metastore, or it leads the replicas and a quorum still says so (its
    /// copy then holds every committed entry).
    async fn leads(&self) -> bool {
        match &self.replicated {
            None => true,
            Some(r) => r.is_leader() && r.raft().ensure_linearizable().await.is_ok(),
        }
    }

    /// Plans jobs for every queue that is ready; returns how many.
    pub async fn plan_once(&self) -> Result<usize, MetastoreError> {
        let cmd = PlanCompaction {
            now: now_nanos(),
            levels: self.config.levels.clone(),
            max_jobs: self.config.max_jobs,
        };
        // The planner runs where the index is current (the only metastore,
        // or the leader's copy): a look first keeps the replicated log
        // free of plans of nothing, one for each block a flush adds.
        if !self.metastore.would_plan(&cmd) {
            return Ok(0);
        }
        match self.apply(Kind::PlanCompaction(cmd)).await? {
            Applied::Planned(n) => Ok(n),
            _ => Ok(0),
        }
    }

    /// Drops what is past its tenant's retention; returns how many
    /// tenants' block parts went.
    pub async fn apply_retention(&self) -> Result<usize, MetastoreError> {
        let r = &self.config.retention;
        if r.default.is_zero() && r.tenants.is_empty() {
            return Ok(0);
        }
        let now = now_nanos();
        let cmd = ApplyRetention {
            now,
            default_nanos: nanos(r.default),
            tenants: r
                .tenants
                .iter()
                .map(|(tenant, d)| TenantRetention {
                    tenant: tenant.clone(),
                    retention_nanos: nanos(*d),
                })
                .collect(),
            delete_after: now.saturating_add(nanos(self.config.delete_delay)),
        };
        match self.apply(Kind::ApplyRetention(cmd)).await? {
            Applied::Expired(n) => Ok(n),
            _ => Ok(0),
        }
    }

    pub async fn plan_forever(self: Arc<Self>) {
        let mut wake = Some(self.metastore.activity());
        let mut last_retention: Option<std::time::Instant> = None;
        loop {
            if !self.leads().await {
                self.metrics.observe(&self.metastore);
                idle(&mut wake, self.config.poll).await;
                continue;
            }
            if last_retention.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                last_retention = Some(std::time::Instant::now());
                match self.apply_retention().await {
                    Ok(0) => {}
                    Ok(n) => info!(parts = n, "blocks past their retention dropped"),
                    Err(e) => warn!(error = %e, "retention failed"),
                }
            }
            match self.plan_once().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(jobs = n, "compaction planned"),
                Err(e) => warn!(error = %e, "compaction planning failed"),
            }
            self.metrics.observe(&self.metastore);
            idle(&mut wake, self.config.poll).await;
        }
    }

    /// Deletes objects whose tombstones are due, then forgets the tombstones.
    pub async fn delete_due(&self) -> Result<usize, LifecycleError> {
        let due = self.metastore.due_tombstones(now_nanos());
        if due.is_empty() {
            return Ok(0);
        }
        let mut deleted = Vec::with_capacity(due.len());
        for t in due {
            match self.store.delete(&ObjectPath::from(t.path.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted.push(t.path),
                Err(e) => warn!(path = t.path, error = %e, "deleting a retired block failed"),
            }
        }
        let n = deleted.len();
        self.metrics.objects_deleted.inc_by(n as u64);
        self.apply(Kind::RemoveTombstones(RemoveTombstones { paths: deleted }))
            .await?;
        Ok(n)
    }

    /// Deletes outputs that a worker uploaded but never committed (it died
    /// between upload and commit, or lost its lease) once they are
    /// `min_age` old. A committed block is in the index, or tombstoned
    /// until its object is gone; level-0 segments (`segments/`) are never
    /// touched, a segment writer's dlq retry may still register them.
    pub async fn sweep_orphans(&self, min_age: Duration) -> Result<usize, LifecycleError> {
        let cutoff = now_nanos().saturating_sub(min_age.as_nanos().min(i64::MAX as u128) as i64);
        let mut listing = self.store.list(Some(&ObjectPath::from("blocks")));
        let mut orphans = Vec::new();
        while let Some(object) = listing.next().await {
            let object = object.map_err(|source| LifecycleError::List {
                prefix: "blocks/".into(),
                source,
            })?;
            let Some(id) = block_id_of(object.location.as_ref()) else {
                continue;
            };
            let modified = object
                .last_modified
                .timestamp_nanos_opt()
                .unwrap_or(i64::MAX);
            if modified <= cutoff && !self.metastore.knows_block(id) {
                orphans.push(object.location);
            }
        }
        let mut deleted = 0;
        for path in orphans {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    warn!(%path, "deleted a compaction output that was never committed");
                    deleted += 1;
                }
                Err(e) => warn!(%path, error = %e, "deleting an orphan output failed"),
            }
        }
        self.metrics.orphans_deleted.inc_by(deleted as u64);
        Ok(deleted)
    }

    pub async fn delete_forever(self: Arc<Self>) {
        let mut last_sweep: Option<std::time::Instant> = None;
        loop {
            if !self.leads().await {
                tokio::time::sleep(self.config.poll.max(Duration::from_secs(1))).await;
                continue;
            }
            if let Err(e) = self.delete_due().await {
                warn!(error = %e, "deleting retired blocks failed");
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= ORPHAN_SWEEP_INTERVAL) {
                last_sweep = Some(std::time::Instant::now());
                if let Err(e) = self.sweep_orphans(ORPHAN_MIN_AGE).await {
                    warn!(error = %e, "sweeping orphan outputs failed");
                }
            }
            tokio::time::sleep(self.config.poll.max(Duration::from_secs(1))).await;
        }
    }
}

/// `{id}` of `blocks/{shard}/{tenant}/{id}/block.bin`.
fn block_id_of(path: &str) -> Option<&str> {
    match path.split('/').collect::<Vec<_>>()[..] {
        ["blocks", _, _, id, "block.bin"] => Some(id),
        _ => None,
    }
}
