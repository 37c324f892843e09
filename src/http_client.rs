//! A small HTTP/1.1 client with pooled keep-alive connections, as agents
//! use: the benchmark's load and `ember ingest`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .build(connector),
        }
    }

    async fn send(&self, req: http::Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
        let resp = self.inner.request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<(u16, Bytes)> {
        self.send(http::Request::get(url).body(Full::new(Bytes::new()))?)
            .await
    }

    pub async fn post(
        &self,
        url: &str,
        tenant: &str,
        content_type: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.post_with(url, tenant, content_type, None, body).await
    }

    /// A POST with an optional `Content-Encoding`.
    pub async fn post_with(
        &self,
        url: &str,
        tenant: &str,
        content_type: &str,
        content_encoding: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut req = http::Request::post(url)
            .header("x-scope-orgid", tenant)
            .header("content-type", content_type);
        if let Some(encoding) = content_encoding {
            req = req.header("content-encoding", encoding);
        }
        self.send(req.body(Full::new(body))?).await
    }
}
