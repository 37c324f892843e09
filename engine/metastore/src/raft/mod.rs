//! The metastore replicated by Raft (openraft): every replica applies the
//! same [`Proposal`]s in the same order to its own redb state machine, so
//! the index survives the death of any minority of metastore processes.
//!
//! - `log_store.rs`: the Raft log, vote and commit point in `raft.redb`.
//! - `state_machine.rs`: entries applied to the [`Metastore`], each with its
//!   log position in the same transaction; snapshots are the metastore's.
//! - `network.rs`: Raft's calls between replicas over HTTP, under the
//!   cluster token, on `--metastore-listen-addr`.
//!
//! Stateless roles reach it through [`Replicated`], a [`MetastoreClient`]
//! that proposes on the leader: in process when this replica leads, over
//! the network to the leader otherwise.

mod log_store;
mod metrics;
mod network;
mod state_machine;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use prost::Message;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::messages::{outcome, proposal, AddBlocks, AppliedReply, Outcome, Proposal};
use crate::rpc::RemoteMetastore;
use crate::{
    Applied, Command, Metastore, MetastoreClient, MetastoreError, MetastoreIndex, ReplicaIndex,
};
use ember_engine::cluster_call::ClusterClient;
use ember_engine::BlockMeta;

pub use log_store::LogStore;
pub use metrics::ReplicationMetrics;
use network::raft_router;
pub use network::{Members, MembersChange, Network};
pub use state_machine::StateMachine;

/// A replica's number in the cluster.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The metastore's Raft: entries carry protobuf proposals, nodes their
    /// `--metastore-listen-addr` URL.
    pub TypeConfig:
        D = Payload,
        R = Payload,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// A protobuf message ([`Proposal`] in a log entry, [`Outcome`] as its
/// answer) as Raft carries it; base64 in JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload(#[serde(with = "base64_bytes")] pub Vec<u8>);

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Error)]
pub enum ReplicationError {
    #[error("raft log {path}: {source}")]
    Log { path: String, source: redb::Error },
    #[error("raft: {0}")]
    Raft(String),
    #[error("--metastore-raft-peers: {0}")]
    Peers(String),
}

/// Who the replicas are and how they talk.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    /// Every replica's id and `http(s)://host:port` of its
    /// `--metastore-listen-addr`, this one's included.
    pub peers: BTreeMap<NodeId, String>,
    /// Calls to the other replicas (the cluster token they expect, the
    /// certificates they are trusted by).
    pub client: ClusterClient,
}

impl ClusterConfig {
    /// Peers from `1=http://10.0.0.1:4041,2=http://10.0.0.2:4041,...`.
    pub fn parse_peers(text: &str) -> Result<BTreeMap<NodeId, String>, ReplicationError> {
        let mut peers = BTreeMap::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, url) = item
                .split_once('=')
                .ok_or_else(|| ReplicationError::Peers(format!("{item:?} is not ID=URL")))?;
            let id: NodeId = id
                .trim()
                .parse()
                .map_err(|e| ReplicationError::Peers(format!("id {id:?}: {e}")))?;
            let url = url.trim().trim_end_matches('/').to_string();
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(ReplicationError::Peers(format!(
                    "{url:?}: give http(s)://host:port of the replica's --metastore-listen-addr"
                )));
            }
            if peers.insert(id, url).is_some() {
                return Err(ReplicationError::Peers(format!("id {id} named twice")));
            }
        }
        if peers.is_empty() {
            return Err(ReplicationError::Peers("no replicas named".into()));
        }
        Ok(peers)
    }
}

/// Longest a proposal waits for a quorum: a leader cut off from the others
/// cannot commit, and its callers must hear so rather than wait forever.
/// (The proposal may still commit once the leader is back, like a retry's
/// twin: blocks are registered once, and a lease nobody heard of expires.)
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a proposal waits for an election to end: its timeout's upper
/// bound, twice (a split vote runs a second one).
const ELECTION_WAIT: Duration = Duration::from_secs(4);

/// Timings for replicas on one network: a leader's death is noticed within
/// about two seconds, and a heartbeat has room for an fsync on a busy disk.
fn raft_config() -> Result<Arc<Config>, ReplicationError> {
    let config = Config {
        cluster_name: "ember-metastore".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        purge_batch_size: 256,
        ..Config::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| ReplicationError::Raft(e.to_string()))
}

/// Starts this replica: its log in `<dir>/raft.redb`, its state in
/// `metastore`. The lowest-numbered replica proposes the first membership
/// (every replica in `peers`) if the cluster has none yet.
pub async fn start(
    dir: &Path,
    metastore: Arc<Metastore>,
    cluster: &ClusterConfig,
) -> Result<Replicated, ReplicationError> {
    if !cluster.peers.contains_key(&cluster.node_id) {
        return Err(ReplicationError::Peers(format!(
            "this replica's id {} is not among the peers",
            cluster.node_id
        )));
    }
    let log = LogStore::open(&dir.join("raft.redb"))?;
    let state = StateMachine::new(metastore.clone(), dir.join("raft-snapshot"));
    let raft = Raft::new(
        cluster.node_id,
        raft_config()?,
        Network::new(cluster.client.clone()),
        log,
        state,
    )
    .await
    .map_err(|e| ReplicationError::Raft(e.to_string()))?;
    let first = cluster.peers.keys().next().copied();
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| ReplicationError::Raft(e.to_string()))?;
    if first == Some(cluster.node_id) && !initialized {
        let members: BTreeMap<NodeId, BasicNode> = cluster
            .peers
            .iter()
            .map(|(id, url)| (*id, BasicNode::new(url)))
            .collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(replicas = cluster.peers.len(), "metastore cluster formed"),
            // Another replica's log reached this one first.
            Err(RaftError::APIError(e)) => tracing::info!("metastore cluster exists: {e}"),
            Err(e) => return Err(ReplicationError::Raft(e.to_string())),
        }
    }
    Ok(Replicated {
        raft,
        metastore,
        network: Network::new(cluster.client.clone()),
        client: cluster.client.clone(),
        forward: true,
    })
}

/// The replicated metastore's commands, proposed on the leader.
#[derive(Clone)]
pub struct Replicated {
    raft: Raft,
    /// This replica's copy of the state, for reads.
    metastore: Arc<Metastore>,
    /// For asking the leader what a read must wait for.
    network: Network,
    client: ClusterClient,
    /// Whether a follower sends the proposal on to the leader (the leader's
    /// RPC server answers itself, so that a proposal is forwarded once).
    forward: bool,
}

impl Replicated {
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The same replica, answering only as the leader.
    fn without_forwarding(&self) -> Self {
        Self {
            forward: false,
            ..self.clone()
        }
    }

    /// The routes of this replica's `--metastore-listen-addr`: the
    /// metastore's commands (for roles in other processes and commands
    /// other replicas forward), its index's answers, and Raft's calls.
    pub fn router(&self) -> axum::Router {
        let metastore = crate::rpc::metastore_router(
            Arc::new(self.clone()),
            Arc::new(self.without_forwarding()),
            self.index(),
            self.client.token(),
        );
        metastore.merge(raft_router(self.raft.clone(), self.client.token()))
    }

    /// This replica's copy of the index, read linearizably.
    pub fn index(&self) -> Arc<dyn MetastoreIndex> {
        Arc::new(ReplicaIndex::new(
            self.metastore.clone(),
            Arc::new(self.clone()),
        ))
    }

    /// Whether this replica leads the cluster now.
    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.current_leader == Some(m.id)
    }

    /// Waits until this replica has applied every entry the leader had
    /// committed when asked (the leader confirms with a quorum that it still
    /// leads): a read after it sees every write acknowledged before it.
    pub async fn caught_up(&self, timeout: Duration) -> Result<(), MetastoreError> {
        let unavailable = |e: String| MetastoreError::Unavailable(format!("metastore read: {e}"));
        let read_index = match self.raft.ensure_linearizable().await {
            // The leader has applied up to its read index already.
            Ok(_) => return Ok(()),
            Err(e) => match e.forward_to_leader::<BasicNode>() {
                Some(f) => {
                    let leader = f
                        .leader_node
                        .clone()
                        .or_else(|| self.node(f.leader_id?))
                        .ok_or_else(|| unavailable("no leader known".into()))?;
                    self.network
                        .read_index(&leader.addr, timeout)
                        .await
                        .map_err(unavailable)?
                }
                None => return Err(unavailable(e.to_string())),
            },
        };
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(read_index), "caught up")
            .await
            .map(|_| ())
            .map_err(|e| unavailable(e.to_string()))
    }

    async fn propose(&self, proposal: Proposal) -> Result<Applied, MetastoreError> {
        let payload = Payload(proposal.encode_to_vec());
        let mut waited_for_election = false;
        let leader = loop {
            let written =
                tokio::time::timeout(PROPOSAL_TIMEOUT, self.raft.client_write(payload.clone()))
                    .await
                    .map_err(|_| {
                        MetastoreError::Unavailable(format!(
                        "metastore: no quorum committed the proposal within {PROPOSAL_TIMEOUT:?}"
                    ))
                    })?;
            match written {
                Ok(written) => return outcome_of(&written.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    let known = f.leader_node.or_else(|| self.node(f.leader_id?));
                    if known.is_some() || waited_for_election {
                        break known;
                    }
                }
                Err(e) => return Err(MetastoreError::Unavailable(format!("metastore: {e}"))),
            }
            // An election is under way: it ends within its timeout.
            waited_for_election = true;
            let _ = self
                .raft
                .wait(Some(ELECTION_WAIT))
                .metrics(|m| m.current_leader.is_some(), "a leader")
                .await;
        };
        let Some(leader) = leader.filter(|_| self.forward) else {
            return Err(MetastoreError::Unavailable(
                "metastore: this replica does not lead and knows no leader".into(),
            ));
        };
        let remote = RemoteMetastore::leader(&leader.addr, self.client.clone())
            .map_err(|e| MetastoreError::Unavailable(e.to_string()))?;
        match proposal.kind {
            Some(proposal::Kind::Command(command)) => remote.apply(command).await,
            Some(proposal::Kind::AddBlocks(b)) => {
                remote.add_blocks(b.blocks).await.map(|()| Applied::Done)
            }
            None => Err(MetastoreError::InvalidCommand("empty proposal".into())),
        }
    }

    /// The address of replica `id`, from the membership this one knows.
    fn node(&self, id: NodeId) -> Option<BasicNode> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().get_node(&id).cloned()
    }
}

/// The answer a replica's state machine gave to a proposal.
fn outcome_of(payload: &Payload) -> Result<Applied, MetastoreError> {
    let outcome = Outcome::decode(payload.0.as_slice())
        .map_err(|e| MetastoreError::Unavailable(format!("undecodable outcome: {e}")))?;
    match outcome.kind {
        Some(outcome::Kind::Applied(reply)) => reply.into_applied(),
        Some(outcome::Kind::Refused(reply)) => Err(reply.into()),
        None => Ok(Applied::Done),
    }
}

/// The outcome of applying a proposal, as a payload.
fn outcome_payload(result: &Result<Applied, MetastoreError>) -> Payload {
    let kind = match result {
        Ok(applied) => outcome::Kind::Applied(AppliedReply::from(applied.clone())),
        Err(e) => outcome::Kind::Refused(e.into()),
    };
    Payload(Outcome { kind: Some(kind) }.encode_to_vec())
}

#[async_trait]
impl crate::ReadBarrier for Replicated {
    async fn caught_up(&self) -> Result<(), MetastoreError> {
        Replicated::caught_up(self, READ_WAIT).await
    }
}

/// Longest a read waits to see what the leader had committed.
const READ_WAIT: Duration = Duration::from_secs(5);

#[async_trait]
impl MetastoreClient for Replicated {
    async fn apply(&self, command: Command) -> Result<Applied, MetastoreError> {
        self.propose(Proposal {
            kind: Some(proposal::Kind::Command(command)),
        })
        .await
    }

    async fn add_blocks(&self, blocks: Vec<BlockMeta>) -> Result<(), MetastoreError> {
        self.propose(Proposal {
            kind: Some(proposal::Kind::AddBlocks(AddBlocks { blocks })),
        })
        .await
        .map(|_| ())
    }
}

/// Runs a redb call (which may fsync) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("storage task: {e}"))?
}

#[cfg(test)]
mod tests;
