//! Raft's calls between replicas: JSON over HTTP(S) on the replicas'
//! `--metastore-listen-addr`, through the cluster's client (its token, its
//! TLS trust) like every other metastore call.

use std::time::Duration;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ember_engine::cluster_call::{has_cluster_token, ClusterClient};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{NodeId, Raft, TypeConfig};

const APPEND: &str = "/ember.metastore.v1.Raft/AppendEntries";
const VOTE: &str = "/ember.metastore.v1.Raft/Vote";
const SNAPSHOT: &str = "/ember.metastore.v1.Raft/InstallSnapshot";
const READ_INDEX: &str = "/ember.metastore.v1.Raft/ReadIndex";
const MEMBERS: &str = "/ember.metastore.v1.Raft/Members";
const CHANGE_MEMBERS: &str = "/ember.metastore.v1.Raft/ChangeMembers";
const JSON: &str = "application/json";

/// A batch of entries or a snapshot chunk (3 MiB by default), with room.
const MAX_RAFT_BYTES: usize = 64 << 20;

/// Makes a [`Peer`] for each replica Raft talks to; they share one HTTP
/// client and its connections.
#[derive(Clone)]
pub struct Network {
    client: ClusterClient,
}

impl Network {
    pub fn new(client: ClusterClient) -> Self {
        Self { client }
    }

    /// The log index a read must wait for, from the leader at `base` once
    /// it has confirmed with a quorum that it still leads.
    pub async fn read_index(&self, base: &str, timeout: Duration) -> Result<u64, String> {
        self.admin(base, READ_INDEX, Bytes::new(), timeout).await
    }

    /// The replicas as the one at `base` knows them.
    pub async fn members(&self, base: &str) -> Result<Members, String> {
        self.admin(base, MEMBERS, Bytes::new(), Duration::from_secs(10))
            .await
    }

    /// Sends `change` to the replica at `base` (the leader); answers the
    /// members after it.
    pub async fn change_members(
        &self,
        base: &str,
        change: &MembersChange,
    ) -> Result<Members, String> {
        let body = serde_json::to_vec(change).map_err(|e| e.to_string())?;
        // Adding a replica waits for it to catch up.
        self.admin(
            base,
            CHANGE_MEMBERS,
            Bytes::from(body),
            Duration::from_secs(120),
        )
        .await
    }

    async fn admin<T: DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<T, String> {
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let (status, bytes) = self
            .client
            .post_as(&url, JSON, None, body, timeout)
            .await
            .map_err(|e| format!("{base}: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{base} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice::<T>(&bytes).map_err(|e| e.to_string())
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            client: self.client.clone(),
            target,
            base: node.addr.trim_end_matches('/').to_string(),
        }
    }
}

/// Another replica, as Raft calls it.
pub struct Peer {
    client: ClusterClient,
    target: NodeId,
    base: String,
}

/// What went wrong on the way to a replica.
#[derive(Debug, thiserror::Error)]
#[error("replica {target} at {base}: {reason}")]
struct PeerError {
    target: NodeId,
    base: String,
    reason: String,
}

impl Peer {
    fn error(&self, reason: impl Into<String>) -> PeerError {
        PeerError {
            target: self.target,
            base: self.base.clone(),
            reason: reason.into(),
        }
    }

    /// Posts `request` and decodes the replica's `Result`.
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = serde_json::to_vec(request)
            .map_err(|e| RPCError::Network(NetworkError::new(&self.error(e.to_string()))))?;
        let url = format!("{}{path}", self.base);
        let (status, bytes) = self
            .client
            .post_as(&url, JSON, None, Bytes::from(body), option.hard_ttl())
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&self.error(e))))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(RPCError::Network(NetworkError::new(
                &self.error(format!("answered {status}: {text}")),
            )));
        }
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&bytes)
            .map_err(|e| RPCError::Network(NetworkError::new(&self.error(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(VOTE, &rpc, &option).await
    }
}

#[derive(Clone)]
struct ServerState {
    raft: Raft,
    token: std::sync::Arc<str>,
}

/// Raft's routes of `--metastore-listen-addr`.
pub fn raft_router(raft: Raft, token: &str) -> Router {
    Router::new()
        .route(APPEND, post(append))
        .route(VOTE, post(vote))
        .route(SNAPSHOT, post(snapshot))
        .route(READ_INDEX, post(read_index))
        .route(MEMBERS, post(members))
        .route(CHANGE_MEMBERS, post(change_members))
        .with_state(ServerState {
            raft,
            token: token.into(),
        })
}

async fn append(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    match request(&state, &headers, body).await {
        Ok(rpc) => json(&state.raft.append_entries(rpc).await),
        Err(refused) => refused,
    }
}

async fn vote(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    match request(&state, &headers, body).await {
        Ok(rpc) => json(&state.raft.vote(rpc).await),
        Err(refused) => refused,
    }
}

async fn snapshot(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    match request(&state, &headers, body).await {
        Ok(rpc) => json(&state.raft.install_snapshot(rpc).await),
        Err(refused) => refused,
    }
}

async fn read_index(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    match state.raft.ensure_linearizable().await {
        Ok(log_id) => json(&log_id.map_or(0, |l| l.index)),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn members(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    json(&Members::of(&state.raft))
}

/// Adds replicas (each first as a learner that catches up, then a voter)
/// and removes others, on the leader.
async fn change_members(
    State(state): State<ServerState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let change: MembersChange = match request(&state, &headers, body).await {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    match apply_change(&state.raft, change).await {
        Ok(()) => json(&Members::of(&state.raft)),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    }
}

async fn apply_change(raft: &Raft, change: MembersChange) -> Result<(), String> {
    let current = Members::of(raft);
    if current.leader != Some(current.id) {
        return Err(format!(
            "replica {} does not lead; send the change to the leader ({:?})",
            current.id, current.leader
        ));
    }
    let mut voters: std::collections::BTreeSet<NodeId> = current.voters.keys().copied().collect();
    for (id, url) in &change.add {
        raft.add_learner(*id, BasicNode::new(url), true)
            .await
            .map_err(|e| format!("adding replica {id} at {url}: {e}"))?;
        voters.insert(*id);
    }
    for id in &change.remove {
        voters.remove(id);
    }
    if voters.is_empty() {
        return Err("a change may not remove every replica".into());
    }
    raft.change_membership(voters, false)
        .await
        .map(|_| ())
        .map_err(|e| format!("changing the voters: {e}"))
}

/// The replicas as one of them knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Members {
    /// The replica that answered.
    pub id: NodeId,
    pub leader: Option<NodeId>,
    /// Voting replicas and their addresses.
    pub voters: std::collections::BTreeMap<NodeId, String>,
    /// Replicas still catching up before they vote.
    pub learners: std::collections::BTreeMap<NodeId, String>,
}

impl Members {
    fn of(raft: &Raft) -> Self {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voter_ids: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut voters = std::collections::BTreeMap::new();
        let mut learners = std::collections::BTreeMap::new();
        for (id, node) in membership.nodes() {
            let side = if voter_ids.contains(id) {
                &mut voters
            } else {
                &mut learners
            };
            side.insert(*id, node.addr.clone());
        }
        Self {
            id: m.id,
            leader: m.current_leader,
            voters,
            learners,
        }
    }
}

/// Replicas to add (id to `http://host:port`) and to remove.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct MembersChange {
    pub add: std::collections::BTreeMap<NodeId, String>,
    pub remove: Vec<NodeId>,
}

/// The refusal of a call without the cluster token, if it has none.
fn unauthorized(state: &ServerState, headers: &HeaderMap) -> Option<Response> {
    if has_cluster_token(headers, &state.token) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            "a valid cluster token is required",
        )
            .into_response(),
    )
}

/// The request's body, once its token is the cluster's.
async fn request<T: DeserializeOwned>(
    state: &ServerState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, Response> {
    if let Some(refused) = unauthorized(state, headers) {
        return Err(refused);
    }
    let bytes = to_bytes(body, MAX_RAFT_BYTES).await.map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("reading the request (at most {MAX_RAFT_BYTES} bytes): {e}"),
        )
            .into_response()
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("decoding: {e}")).into_response())
}

fn json<T: Serialize>(result: &T) -> Response {
    match serde_json::to_vec(result) {
        Ok(bytes) => (StatusCode::OK, [(header::CONTENT_TYPE, JSON)], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
