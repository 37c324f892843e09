//! Counts object-store requests and bytes: they are what object storage
//! bills, and the benchmark reports them per flush and per query.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Operation = Vec<(String, String)>;

#[derive(Clone, Default)]
pub struct ObjectRequestMetrics {
    requests: Family<Operation, Counter>,
    read_bytes: Counter,
    written_bytes: Counter,
}

impl ObjectRequestMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "ember_object_store_requests",
            "Object-store requests, by operation",
            self.requests.clone(),
        );
        r.register(
            "ember_object_store_read_bytes",
            "Bytes returned by object-store GETs",
            self.read_bytes.clone(),
        );
        r.register(
            "ember_object_store_written_bytes",
            "Bytes sent by object-store PUTs",
            self.written_bytes.clone(),
        );
    }

    fn count(&self, operation: &str) {
        self.requests
            .get_or_create(&vec![("operation".to_string(), operation.to_string())])
            .inc();
    }
}

/// An object store that counts every request it passes on.
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    metrics: ObjectRequestMetrics,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>, metrics: ObjectRequestMetrics) -> Self {
        Self { inner, metrics }
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

impl fmt::Debug for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({:?})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.metrics.count("put");
        self.metrics
            .written_bytes
            .inc_by(payload.content_length() as u64);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.metrics.count("put_multipart");
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        self.metrics.count(if head { "head" } else { "get" });
        let result = self.inner.get_opts(location, options).await?;
        if !head {
            let Range { start, end } = result.range;
            self.metrics.read_bytes.inc_by(end.saturating_sub(start));
        }
        Ok(result)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        // Each range is a request on a real object store.
        for r in ranges {
            self.metrics.count("get");
            self.metrics
                .read_bytes
                .inc_by(r.end.saturating_sub(r.start));
        }
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.metrics.count("delete");
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.metrics.count("list");
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.metrics.count("list");
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.metrics.count("copy");
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.metrics.count("rename");
        self.inner.rename_opts(from, to, options).await
    }
}
