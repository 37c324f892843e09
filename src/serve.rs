//! `ember serve`: every role in one process on the embedded default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ember_engine::Metastore;
use ember_flight::EmberFlightSql;
use ember_ingest::distributor::{Distributor, Limits};
use ember_ingest::segment::{recover_dlq, SegmentConfig, SegmentMetrics, SegmentWriter, Sink};
use ember_sql::{QueryEngine, QueryEngineConfig};
use object_store::local::LocalFileSystem;
use object_store::ObjectStore;
use prometheus_client::registry::Registry;
use tracing::info;

use crate::http::{router, AppState};
use crate::metrics::HttpMetrics;
use crate::object_requests::{CountingStore, ObjectRequestMetrics};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Holds the object store (`objects/`) and the metastore file.
    #[arg(long, default_value = "./data", env = "EMBER_DATA_DIR")]
    data_dir: PathBuf,
    /// Pyroscope-compatible HTTP API, health and metrics.
    #[arg(long, default_value = "0.0.0.0:4040", env = "EMBER_HTTP_ADDR")]
    http_addr: SocketAddr,
    /// Arrow Flight SQL.
    #[arg(long, default_value = "0.0.0.0:50051", env = "EMBER_FLIGHT_ADDR")]
    flight_addr: SocketAddr,
    /// Segment-writer shards.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Least time between two flushes of one shard (the object-count cap).
    #[arg(long, default_value_t = 500)]
    flush_interval_ms: u64,
    /// Largest accepted push body, compressed.
    #[arg(long, default_value_t = 16 << 20)]
    max_request_bytes: usize,
    /// Largest push body or profile after decompression.
    #[arg(long, default_value_t = 64 << 20)]
    max_decompressed_bytes: usize,
    /// Memory all running queries may hold together.
    #[arg(long, default_value_t = 1 << 30)]
    query_memory_limit: usize,
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let objects = args.data_dir.join("objects");
    std::fs::create_dir_all(&objects).with_context(|| format!("creating {}", objects.display()))?;
    let local: Arc<dyn ObjectStore> = Arc::new(
        LocalFileSystem::new_with_prefix(&objects)
            .with_context(|| format!("opening {}", objects.display()))?,
    );
    let object_metrics = ObjectRequestMetrics::default();
    let store: Arc<dyn ObjectStore> = Arc::new(CountingStore::new(local, object_metrics.clone()));
    let metastore_path = args.data_dir.join("metastore.redb");
    let metastore = Arc::new(
        Metastore::open(&metastore_path)
            .with_context(|| format!("opening {}", metastore_path.display()))?,
    );
    recover_dlq(store.as_ref(), &metastore)
        .await
        .context("recovering dlq/")?;
    info!(data_dir = %args.data_dir.display(), entries = metastore.entry_count(), "metastore open");

    let mut registry = Registry::default();
    let segment_metrics = SegmentMetrics::default();
    segment_metrics.register(&mut registry);
    object_metrics.register(&mut registry);
    let http_metrics = HttpMetrics::new(&mut registry);

    let writer = Arc::new(SegmentWriter::start(
        SegmentConfig {
            shards: args.shards,
            min_flush_interval: Duration::from_millis(args.flush_interval_ms),
            ..SegmentConfig::default()
        },
        Sink {
            store: store.clone(),
            metastore: metastore.clone(),
        },
        segment_metrics,
    ));
    let distributor = Arc::new(Distributor::new(
        writer,
        Limits {
            max_request_bytes: args.max_request_bytes,
            max_decompressed_bytes: args.max_decompressed_bytes,
        },
    ));
    let engine = Arc::new(QueryEngine::new(
        store,
        metastore,
        QueryEngineConfig {
            memory_limit: args.query_memory_limit,
            ..QueryEngineConfig::default()
        },
    )?);

    let http_listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    let flight_listener = tokio::net::TcpListener::bind(args.flight_addr)
        .await
        .with_context(|| format!("binding {}", args.flight_addr))?;
    info!(http = %http_listener.local_addr()?, flight = %flight_listener.local_addr()?, "ember serving");

    let app = router(AppState {
        distributor,
        metrics: http_metrics,
        registry: Arc::new(registry),
    });
    let http = axum::serve(http_listener, app).with_graceful_shutdown(shutdown_signal());
    let flight = tonic::transport::Server::builder()
        .add_service(EmberFlightSql::new(engine).into_server())
        .serve_with_incoming_shutdown(tokio_stream_incoming(flight_listener), shutdown_signal());
    tokio::try_join!(async { http.await.context("HTTP server") }, async {
        flight.await.context("Flight SQL server")
    },)?;
    info!("ember stopped");
    Ok(())
}

fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((conn, listener))
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
