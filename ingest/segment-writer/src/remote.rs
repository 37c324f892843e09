//! Segment writers in other processes: the route a segment writer serves
//! to distributors (`/ember.segmentwriter.v1.SegmentWriterService/Append`,
//! under the cluster token), and the distributor's side, which sends each
//! shard to the segment writer that owns it and, when that one does not
//! answer, to the next: a dead segment writer's shards move to the others
//! at once, and a push it never acknowledged is sent again by its agent.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::{to_bytes, Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ember_engine::cluster_call::{has_cluster_token, ClusterClient, PROTO};
use ember_engine::profile::Profile;
use prost::Message;

use crate::messages::{AppendError, AppendReply, AppendRequest};
use crate::wire::{groups_of, profiles_of};
use crate::{SegmentError, SegmentWriterClient};

const APPEND: &str = "/ember.segmentwriter.v1.SegmentWriterService/Append";
/// A request holds what one push decoded to; pushes are bounded far below.
const MAX_APPEND_BYTES: usize = 256 << 20;
/// An append waits for its shard's flush: the flush interval, an upload
/// and a registration, with retries.
const APPEND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct ServerState {
    writer: Arc<dyn SegmentWriterClient>,
    token: Arc<str>,
}

/// The route a segment writer serves to distributors in other processes.
pub fn router(writer: Arc<dyn SegmentWriterClient>, token: &str) -> Router {
    Router::new()
        .route(APPEND, post(append))
        .with_state(ServerState {
            writer,
            token: token.into(),
        })
}

async fn append(State(state): State<ServerState>, headers: HeaderMap, body: Body) -> Response {
    if !has_cluster_token(&headers, &state.token) {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "a valid cluster token is required",
            false,
        );
    }
    let bytes = match to_bytes(body, MAX_APPEND_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            let reason = format!("reading the append (at most {MAX_APPEND_BYTES} bytes): {e}");
            return refusal(StatusCode::BAD_REQUEST, &reason, false);
        }
    };
    let request = match AppendRequest::decode(bytes) {
        Ok(r) => r,
        Err(e) => return refusal(StatusCode::BAD_REQUEST, &format!("decoding: {e}"), false),
    };
    if request.shard >= state.writer.shards() {
        let reason = format!(
            "shard {} of a segment writer with {} (give every process the same --shards)",
            request.shard,
            state.writer.shards()
        );
        return refusal(StatusCode::BAD_REQUEST, &reason, false);
    }
    let profiles = match profiles_of(request.groups) {
        Ok(p) => p,
        Err(reason) => return refusal(StatusCode::BAD_REQUEST, &reason, false),
    };
    match state.writer.append(request.shard, profiles).await {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, PROTO)],
            AppendReply {}.encode_to_vec(),
        )
            .into_response(),
        Err(e) => refusal(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), true),
    }
}

fn refusal(status: StatusCode, message: &str, retry_elsewhere: bool) -> Response {
    let body = AppendError {
        message: message.to_string(),
        retry_elsewhere,
    };
    (
        status,
        [(header::CONTENT_TYPE, PROTO)],
        body.encode_to_vec(),
    )
        .into_response()
}

/// The segment writers of other processes, as the distributor reaches
/// them: each shard's owner first, then the others in turn.
pub struct RemoteSegmentWriters {
    client: ClusterClient,
    shards: u32,
    /// `http://host:port` of each live segment writer, in the order every
    /// distributor sees them (by instance id), so all agree on owners.
    writers: RwLock<Vec<String>>,
}

impl RemoteSegmentWriters {
    pub fn new(shards: u32, client: ClusterClient) -> Self {
        Self {
            client,
            shards: shards.max(1),
            writers: RwLock::new(Vec::new()),
        }
    }

    /// The live segment writers, as the cluster's registrations name them.
    pub fn set_writers(&self, urls: Vec<String>) {
        *self.writers.write().unwrap_or_else(|e| e.into_inner()) = urls;
    }

    /// Whether any segment writer is known.
    pub fn has_writers(&self) -> bool {
        !self
            .writers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The writers to try for `shard`: its owner, then the next ones.
    fn owners(&self, shard: u32) -> Vec<String> {
        let writers = self.writers.read().unwrap_or_else(|e| e.into_inner());
        let n = writers.len();
        (0..n)
            .map(|i| writers[(shard as usize + i) % n].clone())
            .collect()
    }

    async fn send(&self, url: &str, body: Bytes) -> Result<(), (SegmentError, bool)> {
        let (status, bytes) = self
            .client
            .post(&format!("{url}{APPEND}"), None, body, APPEND_TIMEOUT)
            .await
            .map_err(|e| (SegmentError::Storage(format!("{url}: {e}")), true))?;
        if status.is_success() {
            return Ok(());
        }
        let refused = AppendError::decode(bytes).unwrap_or(AppendError {
            message: format!("answered {status}"),
            retry_elsewhere: status.is_server_error(),
        });
        Err((
            SegmentError::Storage(format!("{url}: {}", refused.message)),
            refused.retry_elsewhere,
        ))
    }
}

#[async_trait]
impl SegmentWriterClient for RemoteSegmentWriters {
    fn shards(&self) -> u32 {
        self.shards
    }

    async fn append(&self, shard: u32, profiles: Vec<Profile>) -> Result<(), SegmentError> {
        let owners = self.owners(shard);
        if owners.is_empty() {
            return Err(SegmentError::Storage(
                "no segment writer is registered with the metastore".into(),
            ));
        }
        let body = Bytes::from(
            AppendRequest {
                shard,
                groups: groups_of(&profiles),
            }
            .encode_to_vec(),
        );
        let mut last = None;
        for url in owners {
            match self.send(&url, body.clone()).await {
                Ok(()) => return Ok(()),
                Err((e, true)) => {
                    tracing::warn!(shard, error = %e, "segment writer did not take the shard: trying the next");
                    last = Some(e);
                }
                Err((e, false)) => return Err(e),
            }
        }
        Err(last.expect("at least one segment writer"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ember_engine::profile::{Functions, Stacks};

    use super::*;

    /// Takes every append for the shards it has, and says which it took.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u32, Vec<Profile>)>>);

    #[async_trait]
    impl SegmentWriterClient for Recorder {
        fn shards(&self) -> u32 {
            4
        }

        async fn append(&self, shard: u32, profiles: Vec<Profile>) -> Result<(), SegmentError> {
            self.0.lock().unwrap().push((shard, profiles));
            Ok(())
        }
    }

    async fn serve(writer: Arc<Recorder>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = router(writer, "cluster-token-for-tests");
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn profile() -> Profile {
        let (stacks, samples) = Stacks::with_samples([(vec![0u32, 1], 7, None)]);
        Profile {
            tenant: "t".into(),
            labels: vec![("service_name".into(), "api".into())],
            profile_type: "cpu".into(),
            time_nanos: 1,
            duration_nanos: 0,
            period: 1,
            functions: Arc::new(["main", "work"].iter().collect::<Functions>()),
            stacks,
            samples,
        }
    }

    #[tokio::test]
    async fn a_shard_goes_to_its_owner_and_on_to_the_next_when_the_owner_is_gone() {
        let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let (url_a, url_b) = (serve(a.clone()).await, serve(b.clone()).await);
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url_dead = format!("http://{}", dead.local_addr().unwrap());
        drop(dead);
        let writers = RemoteSegmentWriters::new(4, ClusterClient::new("cluster-token-for-tests"));
        assert!(
            writers.append(0, vec![profile()]).await.is_err(),
            "no writer yet"
        );
        assert!(!writers.has_writers());

        writers.set_writers(vec![url_a.clone(), url_dead, url_b.clone()]);
        assert!(writers.has_writers());
        // Shard 0 is a's, shard 1 the dead one's (so b's), shard 2 b's.
        for shard in 0..3 {
            writers.append(shard, vec![profile()]).await.unwrap();
        }
        let shards =
            |r: &Recorder| -> Vec<u32> { r.0.lock().unwrap().iter().map(|(s, _)| *s).collect() };
        assert_eq!(shards(&a), [0]);
        assert_eq!(shards(&b), [1, 2]);
        assert_eq!(b.0.lock().unwrap()[0].1, vec![profile()]);

        // A wrong token is refused, and not tried elsewhere.
        let stranger = RemoteSegmentWriters::new(4, ClusterClient::new("wrong"));
        stranger.set_writers(vec![url_a, url_b]);
        let e = stranger.append(0, vec![profile()]).await.unwrap_err();
        assert!(e.to_string().contains("cluster token"), "{e}");
        assert_eq!(shards(&a).len() + shards(&b).len(), 3);

        // A shard the writers do not have is refused with the reason.
        let e = writers.append(9, vec![profile()]).await.unwrap_err();
        assert!(e.to_string().contains("same --shards"), "{e}");
    }
}
