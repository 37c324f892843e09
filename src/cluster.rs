//! This process as a member of a cluster: it registers its roles and
//! address with the metastore and renews the lease, and it follows the
//! other members' registrations (a distributor shares each tenant's
//! ingestion rate among those alive and sends shards to the segment
//! writers alive).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ember_distributor::Distributor;
use ember_metastore::{Instance, MetastoreIndex};
use ember_segment_writer::remote::RemoteSegmentWriters;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// How often this process reads the members again.
const FOLLOW_EVERY: Duration = Duration::from_secs(5);

type RoleLabels = Vec<(String, String)>;

/// This process as the metastore registers it: unique to this start.
pub fn this_instance(roles: Vec<String>, address: &str) -> Instance {
    let started = ember_engine::profile::now_nanos();
    Instance {
        id: format!("{address}/{started}/{}", std::process::id()),
        roles,
        address: address.to_string(),
        lease_expires: 0,
    }
}

/// Members alive, by role, as this process last read them.
#[derive(Clone, Default)]
pub struct MemberMetrics {
    instances: Family<RoleLabels, Gauge>,
}

impl MemberMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ember_cluster_instances",
            "Processes of the cluster with a live registration, by role",
            self.instances.clone(),
        );
    }
}

/// Reads the live members every few seconds: sets the gauges and, in a
/// distributor, its share of each tenant's rate and the segment writers it
/// sends to. A failed read keeps the last known figures.
pub async fn follow_members(
    index: Arc<dyn MetastoreIndex>,
    distributor: Option<Arc<Distributor>>,
    writers: Option<Arc<RemoteSegmentWriters>>,
    metrics: MemberMetrics,
) {
    loop {
        match index.live_instances().await {
            Ok(instances) => {
                let by_role = count_by_role(&instances);
                metrics.instances.clear();
                for (role, n) in &by_role {
                    metrics
                        .instances
                        .get_or_create(&vec![("role".to_string(), role.clone())])
                        .set(*n as i64);
                }
                if let Some(d) = &distributor {
                    // This one counts even before its registration lands.
                    let alive = by_role.get("distributor").copied().unwrap_or(0);
                    d.share_rates_among(alive.max(1));
                }
                if let Some(w) = &writers {
                    w.set_writers(segment_writer_urls(&instances));
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the cluster's members"),
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// Where each live segment writer takes appends, in instance-id order (the
/// same order in every distributor, so they agree on each shard's owner).
fn segment_writer_urls(instances: &[Instance]) -> Vec<String> {
    let mut writers: Vec<&Instance> = instances
        .iter()
        .filter(|i| i.roles.iter().any(|r| r == "segment-writer"))
        .collect();
    writers.sort_by(|a, b| a.id.cmp(&b.id));
    writers.iter().map(|i| url_of(&i.address)).collect()
}

/// A registered address as a URL: a process serving TLS registers it with
/// `https://`, one serving plain HTTP as `host:port`.
fn url_of(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

fn count_by_role(instances: &[Instance]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in instances {
        for role in &i.roles {
            *out.entry(role.clone()).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_count_once_per_role_they_run() {
        let a = this_instance(
            vec!["distributor".into(), "segment-writer".into()],
            "a:4040",
        );
        let b = this_instance(vec!["distributor".into()], "b:4040");
        assert_ne!(a.id, b.id);
        let counts = count_by_role(&[a, b]);
        assert_eq!(counts["distributor"], 2);
        assert_eq!(counts["segment-writer"], 1);
        assert!(!counts.contains_key("metastore"));
    }
}
