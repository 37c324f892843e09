//! Calls between Ember's processes (the metastore's commands and index
//! reads, a distributor's appends to a segment writer): a protobuf body
//! posted with the cluster token as bearer, each call bounded in time, and
//! the check a receiving process makes of that token.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub const PROTO: &str = "application/proto";

/// A connection pool for calls to other processes, with the cluster token.
#[derive(Clone)]
pub struct ClusterClient {
    client: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    token: String,
}

impl ClusterClient {
    pub fn new(token: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            client: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build(connector),
            token: token.to_string(),
        }
    }

    /// Posts `body` to `url` (with `header`, if given) and returns the
    /// answer's status and body, or why none came within `timeout`.
    pub async fn post(
        &self,
        url: &str,
        header: Option<(&'static str, &'static str)>,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = http::Request::post(url)
            .header(header::CONTENT_TYPE, PROTO)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }
}

/// Whether the request presents the cluster token.
pub fn has_cluster_token(headers: &HeaderMap, token: &str) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    crate::auth::same_secret(presented, token)
}
