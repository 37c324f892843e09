//! The replica's Raft state on `/metrics`, updated as it changes.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Raft;

#[derive(Clone, Default)]
pub struct ReplicationMetrics {
    leader: Gauge,
    term: Gauge,
    applied: Gauge,
    replica: Gauge,
}

impl ReplicationMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ember_metastore_raft_leader",
            "1 while this replica leads the metastore's replicas",
            self.leader.clone(),
        );
        registry.register(
            "ember_metastore_raft_term",
            "The Raft term this replica is in",
            self.term.clone(),
        );
        registry.register(
            "ember_metastore_raft_applied_index",
            "The last Raft log index this replica applied",
            self.applied.clone(),
        );
        registry.register(
            "ember_metastore_raft_replica",
            "This replica's id",
            self.replica.clone(),
        );
    }

    /// Follows `raft` until it shuts down.
    pub async fn follow(self, raft: Raft) {
        let mut metrics = raft.metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                self.replica.set(m.id as i64);
                self.leader.set(i64::from(m.current_leader == Some(m.id)));
                self.term.set(m.current_term as i64);
                self.applied
                    .set(m.last_applied.map_or(0, |l| l.index) as i64);
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }
}
