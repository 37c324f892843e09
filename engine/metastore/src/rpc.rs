//! The metastore's commands over the network, for roles that run in a
//! process of their own (`ember serve --roles compaction-worker`).
//!
//! The metastore's process serves them on `--metastore-listen-addr`, apart
//! from the public ports: a command changes the index, so only holders of
//! the cluster token (`--cluster-token`) may send one. Bodies are the
//! protobuf messages the state machine applies ([`Command`], [`AddBlocks`]);
//! answers are [`AppliedReply`], or an [`ErrorReply`] that keeps a lost
//! lease apart from a metastore that is down.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::{to_bytes, Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ember_engine::BlockMeta;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use thiserror::Error;

use crate::{
    AddBlocks, Applied, AppliedReply, Command, ErrorReply, MetastoreClient, MetastoreError,
};

const APPLY: &str = "/ember.metastore.v1.MetastoreService/Apply";
const ADD_BLOCKS: &str = "/ember.metastore.v1.MetastoreService/AddBlocks";
const PROTO: &str = "application/proto";
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
/// process's metastore.
pub fn router(metastore: Arc<dyn MetastoreClient>, token: &str) -> Router {
    commands_router(metastore.clone(), metastore, token)
}

/// The command routes of a metastore replica: `metastore` proposes to the
/// leader wherever it is, `leader_only` only as the leader.
pub(crate) fn commands_router(
    metastore: Arc<dyn MetastoreClient>,
    leader_only: Arc<dyn MetastoreClient>,
    token: &str,
) -> Router {
    Router::new()
        .route(APPLY, post(apply))
        .route(ADD_BLOCKS, post(add_blocks))
        .with_state(ServerState {
            metastore,
            leader_only,
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

/// Whether the request presents the cluster token.
pub(crate) fn has_cluster_token(headers: &HeaderMap, token: &str) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    ember_engine::auth::same_secret(presented, token)
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

/// A `--metastore-url` that names no metastore.
#[derive(Debug, Error)]
#[error("--metastore-url {url:?}: {reason}")]
pub struct MetastoreUrlError {
    url: String,
    reason: String,
}

/// The metastore of another process, reached at `--metastore-url`.
pub struct RemoteMetastore {
    client: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    base: String,
    token: String,
    timeout: Duration,
    forwarded: bool,
}

impl RemoteMetastore {
    pub fn new(url: &str, token: &str) -> Result<Self, MetastoreUrlError> {
        let bad = |reason: String| MetastoreUrlError {
            url: url.to_string(),
            reason,
        };
        let base = url.trim_end_matches('/').to_string();
        let uri: http::Uri = base.parse().map_err(|e| bad(format!("{e}")))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(bad(
                "give http://host:port of the metastore's --metastore-listen-addr".into(),
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Ok(Self {
            client: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build(connector),
            base,
            token: token.to_string(),
            // redb's fsync and a commit's index swap, with room to spare.
            timeout: Duration::from_secs(10),
            forwarded: false,
        })
    }

    /// The leader, as a replica sends it a command it was given.
    pub(crate) fn leader(url: &str, token: &str) -> Result<Self, MetastoreUrlError> {
        Ok(Self {
            forwarded: true,
            ..Self::new(url, token)?
        })
    }

    async fn call(&self, method: &str, body: Vec<u8>) -> Result<AppliedReply, MetastoreError> {
        let unavailable = |e: String| MetastoreError::Unavailable(format!("{}: {e}", self.base));
        let mut request = http::Request::post(format!("{}{method}", self.base))
            .header(header::CONTENT_TYPE, PROTO)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if self.forwarded {
            request = request.header(FORWARDED, "1");
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .to_bytes();
            Ok::<_, MetastoreError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unavailable(format!("no answer within {:?}", self.timeout)))??;
        if status.is_success() {
            return AppliedReply::decode(bytes)
                .map_err(|e| unavailable(format!("undecodable answer: {e}")));
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

#[async_trait]
impl MetastoreClient for RemoteMetastore {
    async fn apply(&self, command: Command) -> Result<Applied, MetastoreError> {
        self.call(APPLY, command.encode_to_vec())
            .await?
            .into_applied()
    }

    async fn add_blocks(&self, blocks: Vec<BlockMeta>) -> Result<(), MetastoreError> {
        self.call(ADD_BLOCKS, AddBlocks { blocks }.encode_to_vec())
            .await
            .map(|_| ())
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
        let app = router(Arc::new(InProcess(metastore)), token);
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn commands_over_the_network_are_the_metastore_s_commands() {
        let dir = tempfile::tempdir().unwrap();
        let metastore = Arc::new(Metastore::open(&dir.path().join("m.redb")).unwrap());
        let url = serve(metastore.clone(), "secret").await;
        let remote = RemoteMetastore::new(&url, "secret").unwrap();

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
    async fn a_wrong_token_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let metastore = Arc::new(Metastore::open(&dir.path().join("m.redb")).unwrap());
        let url = serve(metastore.clone(), "secret").await;
        let block = ember_fixtures::level0_block(2, 4);
        for token in ["wrong", ""] {
            let remote = RemoteMetastore::new(&url, token).unwrap();
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
        let remote = RemoteMetastore::new(&url, "secret").unwrap();
        let e = remote.apply(Command { kind: None }).await.unwrap_err();
        assert!(matches!(e, MetastoreError::Unavailable(_)), "{e}");
        assert!(RemoteMetastore::new("ftp://x", "t").is_err());
        assert!(RemoteMetastore::new("not a url", "t").is_err());
    }
}
