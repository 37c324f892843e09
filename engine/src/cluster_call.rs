//! Calls between Ember's processes (the metastore's commands, index reads
//! and Raft, a distributor's appends to a segment writer): a body posted
//! with the cluster token as bearer, each call bounded in time, over TLS
//! to `https://` addresses (verified against the cluster's certificates),
//! and the check a receiving process makes of that token.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use thiserror::Error;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

pub const PROTO: &str = "application/proto";

#[derive(Debug, Error)]
pub enum TrustError {
    #[error("the cluster's certificates: {0}")]
    Pem(String),
    #[error("the cluster's certificates: none found in the PEM text")]
    Empty,
    #[error("the cluster's certificates: {0}")]
    Tls(#[from] rustls::Error),
}

/// A connection pool for calls to other processes, with the cluster token.
#[derive(Clone)]
pub struct ClusterClient {
    client: hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token: Arc<str>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("ClusterClient").finish_non_exhaustive()
    }
}

impl ClusterClient {
    /// Calls over plain `http://` only: an `https://` address is refused,
    /// no certificate being trusted.
    pub fn new(token: &str) -> Self {
        Self::with_roots(token, RootCertStore::empty())
            .expect("an empty trust store builds a TLS client")
    }

    /// Calls over `http://`, and over `https://` to processes whose
    /// certificate chains to one of `pem`'s (the cluster's CA, or the one
    /// self-signed certificate every process serves).
    pub fn trusting(token: &str, pem: &[u8]) -> Result<Self, TrustError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots.add(cert.map_err(|e| TrustError::Pem(e.to_string()))?)?;
        }
        if roots.is_empty() {
            return Err(TrustError::Empty);
        }
        Self::with_roots(token, roots)
    }

    fn with_roots(token: &str, roots: RootCertStore) -> Result<Self, TrustError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            client: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build(connector),
            token: token.into(),
        })
    }

    /// The token this client presents, which a process of the same
    /// cluster also expects.
    pub fn token(&self) -> &str {
        &self.token
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
        self.post_as(url, PROTO, header, body, timeout).await
    }

    /// [`Self::post`] with a body of another `content_type`.
    pub async fn post_as(
        &self,
        url: &str,
        content_type: &'static str,
        header: Option<(&'static str, &'static str)>,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = http::Request::post(url)
            .header(header::CONTENT_TYPE, content_type)
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
                .map_err(|e| failure_with_cause(&e))?;
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

/// A failed call's message with its causes: hyper's own says only
/// "client error (Connect)", the cause says which (refused, a certificate
/// not trusted, ...).
fn failure_with_cause(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
