//! The metastore over the network, for roles that run in a process of
//! their own (`ember serve --roles compaction-worker`, `query-frontend`...):
//! its commands and the index's answers to readers.
//!
//! The metastore's process serves them on `--metastore-listen-addr`, apart
//! from the public ports: a command changes the index and a read sees every
//! tenant's, so only holders of the cluster token (`--cluster-token`) may
//! send one. Bodies are the protobuf messages the state machine applies
//! ([`Command`], [`AddBlocks`]) or the index's questions ([`DatasetQuery`],
//! [`TenantBlocksRequest`]); answers are [`AppliedReply`] or the index's
//! answers, or an [`ErrorReply`] that keeps a lost lease apart from a
//! metastore that is down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::{to_bytes, Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ember_engine::cluster_call::{has_cluster_token, ClusterClient, PROTO};
use ember_engine::BlockMeta;
use prost::Message;
use thiserror::Error;

use crate::messages::{
    DatasetQuery, DatasetsReply, InstancesReply, InstancesRequest, JobWaitingReply,
    JobWaitingRequest, TenantBlocksReply, TenantBlocksRequest, TenantJobsReply,
};
use crate::{
    AddBlocks, Applied, AppliedReply, BlockQuery, Command, DatasetRef, ErrorReply, Instance, Job,
    MetastoreClient, MetastoreError, MetastoreIndex,
};

const APPLY: &str = "/ember.metastore.v1.MetastoreService/Apply";
const ADD_BLOCKS: &str = "/ember.metastore.v1.MetastoreService/AddBlocks";
const QUERY_DATASETS: &str = "/ember.metastore.v1.MetastoreService/QueryDatasets";
const TENANT_BLOCKS: &str = "/ember.metastore.v1.MetastoreService/TenantBlocks";
const TENANT_JOBS: &str = "/ember.metastore.v1.MetastoreService/TenantJobs";
const JOB_WAITING: &str = "/ember.metastore.v1.MetastoreService/JobWaiting";
const INSTANCES: &str = "/ember.metastore.v1.MetastoreService/Instances";
/// Marks a command a replica sent on to the leader: the receiver applies it
/// or refuses, and never sends it on again.
const FORWARDED: &str = "ember-forwarded";

/// A commit names its output and sources; a flush its blocks. Far more than
/// either, far less than would strain the metastore.
const MAX_COMMAND_BYTES: usize = 64 << 20;

#[derive(Clone)]
struct ServerState {
    metastore: Arc<dyn MetastoreClient>,
    /// For commands another replica forwarded: the same metastore,
    /// answering only as the leader.
    leader_only: Arc<dyn MetastoreClient>,
    index: Arc<dyn MetastoreIndex>,
    token: Arc<str>,
}

impl ServerState {
    fn client(&self, headers: &HeaderMap) -> &dyn MetastoreClient {
        if headers.contains_key(FORWARDED) {
            self.leader_only.as_ref()
        } else {
            self.metastore.as_ref()
        }
    }
}

/// The routes of `--metastore-listen-addr`: commands applied by this
/// process's metastore, and its index's answers.
pub fn router(
    metastore: Arc<dyn MetastoreClient>,
    index: Arc<dyn MetastoreIndex>,
    token: &str,
) -> Router {
    metastore_router(metastore.clone(), metastore, index, token)
}

/// The routes of a metastore replica: `metastore` proposes to the leader
/// wherever it is, `leader_only` only as the leader; `index` answers reads.
pub(crate) fn metastore_router(
    metastore: Arc<dyn MetastoreClient>,
    leader_only: Arc<dyn MetastoreClient>,
    index: Arc<dyn MetastoreIndex>,
    token: &str,
) -> Router {
    Router::new()
        .route(APPLY, post(apply))
        .route(ADD_BLOCKS, post(add_blocks))
        .route(QUERY_DATASETS, post(query_datasets))
        .route(TENANT_BLOCKS, post(tenant_blocks))
        .route(TENANT_JOBS, post(tenant_jobs))
        .route(INSTANCES, post(instances))
        .route(JOB_WAITING, post(job_waiting))
        .with_state(ServerState {
            metastore,
            leader_only,
            index,
            token: token.into(),
        })
}

async fn apply(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    let command: Command = match decoded(&state, &headers, body).await {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    match state.client(&headers).apply(command).await {
        Ok(applied) => proto_response(StatusCode::OK, AppliedReply::from(applied)),
        Err(e) => error_response(&e),
    }
}

async fn add_blocks(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    let blocks: AddBlocks = match decoded(&state, &headers, body).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    match state.client(&headers).add_blocks(blocks.blocks).await {
        Ok(()) => proto_response(StatusCode::OK, AppliedReply::from(Applied::Done)),
        Err(e) => error_response(&e),
    }
}

async fn query_datasets(
    State(state): State<ServerState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let query: DatasetQuery = match decoded(&state, &headers, body).await {
        Ok(q) => q,
        Err(refused) => return refused,
    };
    match state.index.datasets(&BlockQuery::from(query)).await {
        Ok(datasets) => proto_response(
            StatusCode::OK,
            DatasetsReply {
                datasets: datasets.iter().map(Into::into).collect(),
            },
        ),
        Err(e) => error_response(&e),
    }
}

async fn tenant_blocks(
    State(state): State<ServerState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request: TenantBlocksRequest = match decoded(&state, &headers, body).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    match state.index.tenant_blocks(&request.tenant).await {
        Ok(blocks) => proto_response(StatusCode::OK, TenantBlocksReply { blocks }),
        Err(e) => error_response(&e),
    }
}

async fn tenant_jobs(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    let request: TenantBlocksRequest = match decoded(&state, &headers, body).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    match state.index.tenant_jobs(&request.tenant).await {
        Ok(jobs) => proto_response(StatusCode::OK, TenantJobsReply { jobs }),
        Err(e) => error_response(&e),
    }
}

async fn instances(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    if let Err(refused) = decoded::<InstancesRequest>(&state, &headers, body).await {
        return refused;
    }
    match state.index.live_instances().await {
        Ok(instances) => proto_response(StatusCode::OK, InstancesReply { instances }),
        Err(e) => error_response(&e),
    }
}

async fn job_waiting(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    let request: JobWaitingRequest = match decoded(&state, &headers, body).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    match state
        .index
        .job_waiting(request.now, request.max_level)
        .await
    {
        Ok(waiting) => proto_response(StatusCode::OK, JobWaitingReply { waiting }),
        Err(e) => error_response(&e),
    }
}

/// The request's message, once its token is the cluster's.
async fn decoded<M: Message + Default>(
    state: &ServerState,
    headers: &HeaderMap,
    body: Body,
) -> Result<M, Response> {
    if !has_cluster_token(headers, &state.token) {
        return Err(plain(
            StatusCode::UNAUTHORIZED,
            "a valid cluster token is required",
        ));
    }
    let bytes = to_bytes(body, MAX_COMMAND_BYTES).await.map_err(|e| {
        plain(
            StatusCode::BAD_REQUEST,
            &format!("reading the command (at most {MAX_COMMAND_BYTES} bytes): {e}"),
        )
    })?;
    M::decode(bytes).map_err(|e| plain(StatusCode::BAD_REQUEST, &format!("decoding: {e}")))
}

fn plain(status: StatusCode, message: &str) -> Response {
    let reply = ErrorReply {
        kind: 2,
        job: String::new(),
        message: message.to_string(),
    };
    proto_response(status, reply)
}

fn error_response(e: &MetastoreError) -> Response {
    let status = match e {
        MetastoreError::Lease { .. } => StatusCode::CONFLICT,
        MetastoreError::InvalidCommand(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    proto_response(status, ErrorReply::from(e))
}

fn proto_response(status: StatusCode, message: impl Message) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, PROTO)],
        message.encode_to_vec(),
    )
        .into_response()
}

/// A metastore address that names no metastore.
#[derive(Debug, Error)]
#[error("metastore address {url:?}: {reason}")]
pub struct MetastoreUrlError {
    url: String,
    reason: String,
}

/// The metastore of other processes: one, or the replicas of a replicated
/// one (any replica takes a command or a read and forwards what only the
/// leader may do).
pub struct RemoteMetastore {
    client: ClusterClient,
    bases: Vec<String>,
    /// The replica that answered last: asked first next time.
    answering: AtomicUsize,
    timeout: Duration,
    forwarded: bool,
}

impl RemoteMetastore {
    /// The metastore at `url` (`http(s)://host:port`, its
    /// `--metastore-listen-addr`), called through `client`.
    pub fn new(url: &str, client: ClusterClient) -> Result<Self, MetastoreUrlError> {
        Self::replicas(&[url.to_string()], client)
    }

    /// The metastore whose replicas listen at `urls`: a call goes to the
    /// replica that answered last, then to the others in turn while none
    /// answers.
    pub fn replicas(urls: &[String], client: ClusterClient) -> Result<Self, MetastoreUrlError> {
        let bases = urls
            .iter()
            .map(|url| base_of(url))
            .collect::<Result<Vec<_>, _>>()?;
        if bases.is_empty() {
            return Err(MetastoreUrlError {
                url: String::new(),
                reason: "no metastore address given".into(),
            });
        }
        Ok(Self {
            client,
            bases,
            answering: AtomicUsize::new(0),
            // redb's fsync and a commit's index swap, with room to spare.
            timeout: Duration::from_secs(10),
            forwarded: false,
        })
    }

    /// The leader, as a replica sends it a command it was given.
    pub(crate) fn leader(url: &str, client: ClusterClient) -> Result<Self, MetastoreUrlError> {
        Ok(Self {
            forwarded: true,
            ..Self::new(url, client)?
        })
    }

    /// The answer of the first replica that gives one; what the last one
    /// asked said when none does.
    async fn call<M: Message + Default>(
        &self,
        method: &str,
        body: Vec<u8>,
    ) -> Result<M, MetastoreError> {
        let body = Bytes::from(body);
        let first = self.answering.load(Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..self.bases.len() {
            let at = (first + i) % self.bases.len();
            match self.call_one(&self.bases[at], method, body.clone()).await {
                Err(e @ MetastoreError::Unavailable(_)) => last_error = Some(e),
                answer => {
                    self.answering.store(at, Ordering::Relaxed);
                    return answer;
                }
            }
        }
        Err(last_error.expect("at least one metastore address"))
    }

    async fn call_one<M: Message + Default>(
        &self,
        base: &str,
        method: &str,
        body: Bytes,
    ) -> Result<M, MetastoreError> {
        let unavailable = |e: String| MetastoreError::Unavailable(format!("{base}: {e}"));
        let header = self.forwarded.then_some((FORWARDED, "1"));
        let (status, bytes) = self
            .client
            .post(&format!("{base}{method}"), header, body, self.timeout)
            .await
            .map_err(unavailable)?;
        if status.is_success() {
            return M::decode(bytes).map_err(|e| unavailable(format!("undecodable answer: {e}")));
        }
        match ErrorReply::decode(bytes) {
            Ok(reply) if status == StatusCode::UNAUTHORIZED => Err(unavailable(format!(
                "refused: {} (check --cluster-token)",
                reply.message
            ))),
            Ok(reply) => Err(reply.into()),
            Err(_) => Err(unavailable(format!("answered {status}"))),
        }
    }
}

/// `url` as the prefix of the metastore's routes.
fn base_of(url: &str) -> Result<String, MetastoreUrlError> {
    let bad = |reason: &str| MetastoreUrlError {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let base = url.trim_end_matches('/').to_string();
    let uri: http::Uri = base.parse().map_err(|e| bad(&format!("{e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(bad(
            "give http(s)://host:port of the metastore's --metastore-listen-addr",
        ));
    }
    Ok(base)
}

#[async_trait]
impl MetastoreClient for RemoteMetastore {
    async fn apply(&self, command: Command) -> Result<Applied, MetastoreError> {
        self.call::<AppliedReply>(APPLY, command.encode_to_vec())
            .await?
            .into_applied()
    }

    async fn add_blocks(&self, blocks: Vec<BlockMeta>) -> Result<(), MetastoreError> {
        self.call::<AppliedReply>(ADD_BLOCKS, AddBlocks { blocks }.encode_to_vec())
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl MetastoreIndex for RemoteMetastore {
    async fn datasets(&self, q: &BlockQuery) -> Result<Vec<DatasetRef>, MetastoreError> {
        let reply: DatasetsReply = self
            .call(QUERY_DATASETS, DatasetQuery::from(q).encode_to_vec())
            .await?;
        reply.datasets.into_iter().map(TryInto::try_into).collect()
    }

    async fn tenant_blocks(&self, tenant: &str) -> Result<Vec<BlockMeta>, MetastoreError> {
        let request = TenantBlocksRequest {
            tenant: tenant.to_string(),
        };
        let reply: TenantBlocksReply = self.call(TENANT_BLOCKS, request.encode_to_vec()).await?;
        Ok(reply.blocks)
    }

    async fn tenant_jobs(&self, tenant: &str) -> Result<Vec<Job>, MetastoreError> {
        let request = TenantBlocksRequest {
            tenant: tenant.to_string(),
        };
        let reply: TenantJobsReply = self.call(TENANT_JOBS, request.encode_to_vec()).await?;
        Ok(reply.jobs)
    }

    async fn live_instances(&self) -> Result<Vec<Instance>, MetastoreError> {
        let reply: InstancesReply = self
            .call(INSTANCES, InstancesRequest {}.encode_to_vec())
            .await?;
        Ok(reply.instances)
    }

    async fn job_waiting(&self, now: i64, max_level: Option<u32>) -> Result<bool, MetastoreError> {
        let request = JobWaitingRequest { now, max_level };
        let reply: JobWaitingReply = self.call(JOB_WAITING, request.encode_to_vec()).await?;
        Ok(reply.waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{command::Kind, LeaseJob, RenewLease};
    use crate::{InProcess, Metastore};

    async fn serve(metastore: Arc<Metastore>, token: &str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(Arc::new(InProcess(metastore.clone())), metastore, token);
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn commands_over_the_network_are_the_metastore_s_commands() {
        let dir = tempfile::tempdir().unwrap();
        let metastore = Arc::new(Metastore::open(&dir.path().join("m.redb")).unwrap());
        let url = serve(metastore.clone(), "secret").await;
        let remote = RemoteMetastore::new(&url, ClusterClient::new("secret")).unwrap();

        let block = ember_fixtures::level0_block(1, 4);
        remote.add_blocks(vec![block.clone()]).await.unwrap();
        assert!(metastore.knows_block(&block.id));

        let lease = LeaseJob {
            worker: "w".into(),
            now: 0,
            lease_nanos: 1,
            max_level: None,
        };
        let applied = remote.apply(Kind::LeaseJob(lease).into()).await.unwrap();
        assert_eq!(applied, Applied::Leased(None));

        // A renewal of a job nobody holds is a lease error on both sides.
        let renew = RenewLease {
            job_id: "nope".into(),
            token: 1,
            now: 0,
            lease_nanos: 1,
        };
        let e = remote
            .apply(Kind::RenewLease(renew).into())
            .await
            .unwrap_err();
        assert!(
            matches!(e, MetastoreError::Lease { ref job, .. } if job == "nope"),
            "{e}"
        );

        let e = remote.apply(Command { kind: None }).await.unwrap_err();
        assert!(matches!(e, MetastoreError::InvalidCommand(_)), "{e}");
    }

    #[tokio::test]
    async fn reads_over_the_network_are_the_index_s_answers() {
        let dir = tempfile::tempdir().unwrap();
        let metastore = Arc::new(Metastore::open(&dir.path().join("m.redb")).unwrap());
        let blocks: Vec<_> = (0..8).map(|i| ember_fixtures::level0_block(i, 5)).collect();
        metastore
            .apply_all(blocks.iter().cloned().map(Command::add_block).collect())
            .unwrap();
        // The first address is dead: the call moves on to the next.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_url = format!("http://{}", dead.local_addr().unwrap());
        drop(dead);
        let url = serve(metastore.clone(), "secret").await;
        let remote =
            RemoteMetastore::replicas(&[dead_url, url.clone()], ClusterClient::new("secret"))
                .unwrap();

        let summary = |d: &[DatasetRef]| {
            let mut out: Vec<_> = d
                .iter()
                .map(|d| {
                    (
                        d.block_id.to_string(),
                        d.path.to_string(),
                        (*d.dataset).clone(),
                    )
                })
                .collect();
            out.sort_by(|a, b| (&a.0, &a.2.service_name).cmp(&(&b.0, &b.2.service_name)));
            out
        };
        let queries = [
            BlockQuery {
                tenant: "bench".into(),
                start: i64::MIN,
                end: i64::MAX,
                ..BlockQuery::default()
            },
            BlockQuery {
                tenant: "bench".into(),
                start: 0,
                end: 15_000_000_000,
                service_names: Some(vec!["svc-00".into(), "svc-03".into()]),
                profile_types: Some(vec!["process_cpu:cpu:nanoseconds:cpu:nanoseconds".into()]),
                skip_level0: false,
            },
            BlockQuery {
                tenant: "other".into(),
                start: i64::MIN,
                end: i64::MAX,
                ..BlockQuery::default()
            },
        ];
        for q in &queries {
            let here = metastore.query(q);
            let there = remote.datasets(q).await.unwrap();
            assert_eq!(summary(&there), summary(&here), "{q:?}");
        }
        assert!(!remote.datasets(&queries[1]).await.unwrap().is_empty());
        assert!(remote.datasets(&queries[2]).await.unwrap().is_empty());
        let by_id = |mut b: Vec<BlockMeta>| {
            b.sort_by(|x, y| x.id.cmp(&y.id));
            b
        };
        let got = by_id(remote.tenant_blocks("bench").await.unwrap());
        assert_eq!(got.len(), blocks.len());
        assert_eq!(got, by_id(metastore.blocks("bench")));
        assert!(remote.tenant_blocks("other").await.unwrap().is_empty());
        assert!(remote.tenant_jobs("bench").await.unwrap().is_empty());
        let now = ember_engine::profile::now_nanos();
        assert!(!remote.job_waiting(now, None).await.unwrap());
        let plan = crate::PlanCompaction {
            now,
            levels: vec![crate::LevelRule {
                max_blocks: 2,
                max_age_nanos: i64::MAX,
            }],
            max_jobs: 100,
        };
        metastore.apply(Kind::PlanCompaction(plan).into()).unwrap();
        assert!(metastore.job_waiting(now, Some(0)));
        assert!(remote.job_waiting(now, Some(0)).await.unwrap());

        // Reads see every tenant's index: the cluster token guards them too.
        let stranger = RemoteMetastore::new(&url, ClusterClient::new("wrong")).unwrap();
        let e = stranger.datasets(&queries[0]).await.unwrap_err();
        assert!(e.to_string().contains("cluster token"), "{e}");
    }

    #[tokio::test]
    async fn a_wrong_token_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let metastore = Arc::new(Metastore::open(&dir.path().join("m.redb")).unwrap());
        let url = serve(metastore.clone(), "secret").await;
        let block = ember_fixtures::level0_block(2, 4);
        for token in ["wrong", ""] {
            let remote = RemoteMetastore::new(&url, ClusterClient::new(token)).unwrap();
            let e = remote.add_blocks(vec![block.clone()]).await.unwrap_err();
            assert!(e.to_string().contains("cluster token"), "{e}");
        }
        assert!(!metastore.knows_block(&block.id));
        assert_eq!(metastore.entry_count(), 0);
    }

    #[tokio::test]
    async fn an_unreachable_metastore_is_unavailable_not_a_lost_lease() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let remote = RemoteMetastore::new(&url, ClusterClient::new("secret")).unwrap();
        let e = remote.apply(Command { kind: None }).await.unwrap_err();
        assert!(matches!(e, MetastoreError::Unavailable(_)), "{e}");
        assert!(RemoteMetastore::new("ftp://x", ClusterClient::new("t")).is_err());
        assert!(RemoteMetastore::new("not a url", ClusterClient::new("t")).is_err());
    }
}
