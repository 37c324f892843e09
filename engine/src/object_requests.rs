//! Counts object-store requests and bytes: they are what object storage
//! bills, and the benchmark reports them per flush and per query.

use crate::store_layer::{Request, StoreLayer};
use async_trait::async_trait;
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

/// Counts every request an object store is asked for (wrap the store in
/// `Layered::new(store, CountRequests(metrics))`).
pub struct CountRequests(pub ObjectRequestMetrics);

#[async_trait]
impl StoreLayer for CountRequests {
    fn name(&self) -> &'static str {
        "Counting"
    }

    fn saw(&self, request: &Request<'_>) {
        let metrics = &self.0;
        match request {
            Request::Put { bytes, .. } => {
                metrics.count("put");
                metrics.written_bytes.inc_by(*bytes as u64);
            }
            Request::PutMultipart { .. } => metrics.count("put_multipart"),
            Request::Get { head: true, .. } => metrics.count("head"),
            Request::Get { head: false, .. } => metrics.count("get"),
            // Each range is a request on a real object store.
            Request::GetRanges { ranges, .. } => ranges.iter().for_each(|_| metrics.count("get")),
            Request::Delete => metrics.count("delete"),
            Request::List => metrics.count("list"),
            Request::Copy { .. } => metrics.count("copy"),
            Request::Rename { .. } => metrics.count("rename"),
        }
    }

    fn read(&self, bytes: u64) {
        self.0.read_bytes.inc_by(bytes);
    }
}
