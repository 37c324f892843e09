//! `ember serve`: every role in one process on the embedded default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ember_distributor::limits::{Limits, ProfileLimits};
use ember_distributor::Distributor;
use ember_engine::cluster_call::ClusterClient;
use ember_engine::store_layer::Layered;
use ember_engine::Authenticator;
use ember_faults::{Faults, FaultyMetastore, StoreFaults};
use ember_flight::EmberFlightSql;
use ember_metastore::raft::{self, ClusterConfig, Replicated, ReplicationMetrics};
use ember_metastore::rpc::RemoteMetastore;
use ember_metastore::Metastore;
use ember_metastore::{register_forever, InProcess, MetastoreClient, MetastoreIndex};
use ember_metastore::{LevelRule, Lifecycle, LifecycleConfig, Retention};
use ember_segment_writer::remote::RemoteSegmentWriters;
use ember_segment_writer::{
    recover_dlq_forever, FlushHook, SegmentConfig, SegmentMetrics, SegmentWriter,
    SegmentWriterClient, Sink,
};
use ember_sql::compaction::{CompactionConfig, CompactionMetrics, CompactionStep, Compactor};
use ember_sql::{QueryEngine, QueryEngineConfig, StatementLimits};
use object_store::ObjectStore;
use prometheus_client::registry::Registry;
use tracing::info;

use crate::cluster::{follow_members, MemberMetrics};
use crate::connections::{
    admitted_incoming, connections_within_descriptors, serve_http, Admission, ConnectionLimits,
};
use crate::http::{health_router, Readiness};
use crate::tls::{TlsFiles, TlsListener};
use ember_distributor::http::PushState;
use ember_distributor::metrics::PushMetrics;
use ember_engine::object_requests::{CountRequests, ObjectRequestMetrics};
use ember_engine::object_store_url::{open_object_store, redacted};
use ember_query_frontend::QueryState;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Roles this process runs, Pyroscope v2's names: `all`, or a comma
    /// list of distributor, segment-writer, metastore, query-frontend,
    /// query-backend, compaction-worker (the query frontend runs beside a
    /// query backend). A process without the metastore reaches it through
    /// `--metastore-peers`; a distributor without a segment writer sends to
    /// those registered.
    #[arg(long, default_value = "all", env = "EMBER_ROLES")]
    roles: String,
    /// Serve the metastore to roles in other processes (and, for a replica,
    /// to the other replicas) on this address (requires `--cluster-token`).
    /// Keep it on an internal network.
    #[arg(long, env = "EMBER_METASTORE_LISTEN_ADDR", requires = "cluster_token")]
    metastore_listen_addr: Option<SocketAddr>,
    /// The metastore's replicas as `ID=http://host:port` (each one's
    /// `--metastore-listen-addr`), comma-separated. A process without the
    /// metastore role reaches it through any of them (`http://host:port`
    /// alone names an unreplicated one); a replica (`--node-id`) lists every
    /// replica, itself included.
    #[arg(long, env = "EMBER_METASTORE_PEERS", requires = "cluster_token")]
    metastore_peers: Option<String>,
    /// This process's replica number in a replicated metastore (with
    /// `--metastore-peers` and `--metastore-listen-addr`): the index then
    /// survives the death of any minority of its replicas.
    #[arg(
        long,
        env = "EMBER_NODE_ID",
        requires_all = ["metastore_peers", "metastore_listen_addr"]
    )]
    node_id: Option<u64>,
    /// How other processes reach this one's HTTP port, as host:port (default:
    /// `--http-addr`); registered with the metastore.
    #[arg(long, env = "EMBER_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Shared secret between the metastore and roles in other processes.
    #[arg(long, env = "EMBER_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    /// PEM certificates that calls to other processes' `https://`
    /// addresses trust (default: `--tls-cert`'s, for a cluster whose
    /// processes share one self-signed certificate). With `--tls-cert`,
    /// this process serves the metastore listener over TLS too and
    /// registers its address as `https://`.
    #[arg(long, env = "EMBER_CLUSTER_CA")]
    cluster_ca: Option<PathBuf>,
    /// Holds the metastore file, and the object store (`objects/`) unless
    /// `--object-store-url` names another.
    #[arg(long, default_value = "./data", env = "EMBER_DATA_DIR")]
    data_dir: PathBuf,
    /// Where blocks live: `file:///path`, `s3://bucket[/prefix]`,
    /// `gs://bucket[/prefix]` or `az://container[/prefix]` (default:
    /// `<data-dir>/objects`). Cloud stores read the `object_store` crate's
    /// environment variables (`AWS_REGION`, `AWS_ENDPOINT`, ...).
    #[arg(long, env = "EMBER_OBJECT_STORE_URL")]
    object_store_url: Option<String>,
    /// `key=value` for the object store, the same keys as its environment
    /// variables in lower case (`aws_access_key_id=...`); repeatable.
    #[arg(long = "object-store-option", value_name = "KEY=VALUE")]
    object_store_options: Vec<String>,
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
    /// Largest push request after decompression, its profiles included.
    #[arg(long, default_value_t = 64 << 20)]
    max_decompressed_bytes: usize,
    /// Bytes of push requests being decoded or awaiting their flush, across
    /// the process; beyond it pushes get 429 with Retry-After.
    #[arg(long, default_value_t = 512 << 20)]
    max_inflight_bytes: usize,
    /// Longest a push waits for a decoder before it is refused with 429
    /// and Retry-After: backpressure, so that the requests the server does
    /// take are acknowledged within the flush interval plus their decoding.
    #[arg(long, default_value_t = 100)]
    max_push_queue_ms: u64,
    /// Largest profile after decompression.
    #[arg(long, default_value_t = ProfileLimits::default().max_profile_size_bytes)]
    max_profile_size_bytes: usize,
    /// Most samples in one profile.
    #[arg(long, default_value_t = ProfileLimits::default().max_profile_stacktrace_samples)]
    max_profile_stacktrace_samples: usize,
    /// Most labels on one sample.
    #[arg(long, default_value_t = ProfileLimits::default().max_profile_stacktrace_sample_labels)]
    max_profile_stacktrace_sample_labels: usize,
    /// Deeper stacks are truncated to this many frames.
    #[arg(long, default_value_t = ProfileLimits::default().max_profile_stacktrace_depth)]
    max_profile_stacktrace_depth: usize,
    /// Longer symbol names are truncated to this many bytes.
    #[arg(long, default_value_t = ProfileLimits::default().max_profile_symbol_value_length)]
    max_profile_symbol_value_length: usize,
    /// Refuse profiles older than this many seconds (0: accept any age).
    #[arg(long, default_value_t = ProfileLimits::default().reject_older_than_seconds)]
    reject_older_than_seconds: u64,
    /// Refuse profiles more than this many seconds in the future (0: off).
    #[arg(long, default_value_t = ProfileLimits::default().reject_newer_than_seconds)]
    reject_newer_than_seconds: u64,
    /// Delete blocks whose 6 h partitions all ended this many seconds ago
    /// (0: keep everything); per tenant through `--limits-file` as
    /// `compactor_blocks_retention_period_seconds`.
    #[arg(long, default_value_t = 0)]
    retention_seconds: u64,
    /// Request bytes a second each tenant may push, in MB (0: no limit);
    /// past it, pushes get 429 with the reason. Per tenant through
    /// `--limits-file` as `ingestion_rate_mb`.
    #[arg(long, default_value_t = 0.0)]
    ingestion_rate_mb: f64,
    /// Bytes a tenant may push at once above its rate, in MB (at least one
    /// second of the rate); per tenant as `ingestion_burst_size_mb`.
    #[arg(long, default_value_t = 0.0)]
    ingestion_burst_size_mb: f64,
    /// PEM certificate (chain) to serve HTTP and Flight SQL over TLS.
    #[arg(long, env = "EMBER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "EMBER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Faults to inject, for tests: `put_error_rate=0.3,crash_at=after_upload`
    /// (see tests/faults).
    #[arg(long, env = "EMBER_FAULTS", hide = true)]
    faults: Option<String>,
    /// JSON file of credentials, which turns authentication on:
    /// `{"tokens": [{"token": "...", "tenant": "acme"}],
    /// "users": [{"username": "u", "password": "p", "tenant": "acme"}]}`.
    /// Without it the tenant is `X-Scope-OrgID` (`x-scope-orgid` in Flight).
    #[arg(long, env = "EMBER_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// JSON file of per-tenant limits:
    /// `{"tenants": {"acme": {"reject_older_than_seconds": 86400}}}`.
    #[arg(long)]
    limits_file: Option<PathBuf>,
    /// Connections open at once, HTTP and Flight SQL together; beyond it a
    /// connection is refused (HTTP with a 503 that says why). Lowered to
    /// what the open-file limit allows.
    #[arg(long, default_value_t = 8192)]
    max_connections: usize,
    /// Seconds a client has to send a request's head, counted from when
    /// the connection waits for it: a keep-alive connection idle this long
    /// is closed too.
    #[arg(long, default_value_t = 30)]
    http_header_read_timeout_seconds: u64,
    /// Seconds a client has to send a request's body after its head.
    #[arg(long, default_value_t = 30)]
    http_body_read_timeout_seconds: u64,
    /// Memory all running queries may hold together.
    #[arg(long, default_value_t = 1 << 30)]
    query_memory_limit: usize,
    /// Memory one tenant's running queries may hold together.
    #[arg(long, default_value_t = 512 << 20)]
    tenant_query_memory_limit: usize,
    /// A query still running after this many seconds fails, its planning
    /// included.
    #[arg(long, default_value_t = 120)]
    query_timeout_seconds: u64,
    /// Largest SQL statement, in bytes.
    #[arg(long, default_value_t = StatementLimits::default().max_bytes)]
    max_statement_bytes: usize,
    /// Deepest expression tree a statement may hold (a chain `a + b + ...`
    /// is as deep as it is long; `AND`/`OR` chains are balanced first), at
    /// most 2000; planning time grows with its square.
    #[arg(long, default_value_t = StatementLimits::default().max_expression_depth)]
    max_expression_depth: usize,
    /// Queries and tables one statement may name: the statement itself,
    /// each subquery and CTE, each table or table function it reads.
    #[arg(long, default_value_t = StatementLimits::default().max_relations)]
    max_statement_relations: usize,
    /// The sum, over every node of a statement's expressions, of its depth
    /// times the queries it is nested in: what planning them costs (a chain
    /// of 1,000 terms costs 1 million).
    #[arg(long, default_value_t = StatementLimits::default().max_expression_cost)]
    max_expression_cost: usize,
    /// Bytes of stack nodes cached across queries, all tenants together.
    #[arg(long, default_value_t = 256 << 20)]
    stack_cache_bytes: usize,
    /// Bytes of per-dataset stack totals cached across queries.
    #[arg(long, default_value_t = 256 << 20)]
    totals_cache_bytes: usize,
    /// Seconds between two passes over dlq/ (block metadata the metastore
    /// could not take when it was written).
    #[arg(long, default_value_t = 10)]
    dlq_retry_seconds: u64,
    /// Compaction workers run by this process, at low priority, each with
    /// its own `--compaction-memory-limit` (0: none; default: one per CPU).
    #[arg(long)]
    compaction_workers: Option<usize>,
    /// Memory one compaction job may hold; beyond it, sorts spill to
    /// `<data-dir>/compaction-tmp`.
    #[arg(long, default_value_t = 256 << 20)]
    compaction_memory_limit: usize,
    /// A compacted block larger than this many MiB is uploaded in parts of
    /// this size (multipart); smaller ones in one conditional PUT. At least
    /// 5 (S3's smallest part).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(5..=4096))]
    compaction_upload_part_mb: u64,
    /// When each level's queue is compacted: `blocks:seconds` per level,
    /// level 0 first (a job takes that many blocks, or fewer once the
    /// oldest is that many seconds old).
    #[arg(long, default_value = "20:36,10:720,10:10800")]
    compaction_levels: String,
    /// Seconds between a compaction's commit and the deletion of the
    /// blocks it replaced (queries that found them first finish meanwhile).
    #[arg(long, default_value_t = 900)]
    compaction_delete_delay_seconds: u64,
    /// Abort the process at a compaction step, for tests:
    /// compaction_after_read|after_upload|before_commit|after_commit.
    #[arg(long, env = "EMBER_COMPACTION_CRASH_AT", hide = true)]
    compaction_crash_at: Option<String>,
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let roles = Roles::parse(&args.roles).map_err(|e| anyhow::anyhow!("--roles: {e}"))?;
    if let Some(token) = &args.cluster_token {
        anyhow::ensure!(
            token.len() >= 16,
            "--cluster-token: at least 16 characters (it guards every change to the index)"
        );
    }
    if roles.compacts_only() {
        // This process runs nothing but compaction jobs, so freed pages go
        // back to the kernel at once: a job then stays within its memory
        // budget in RSS too (see BENCHMARKS.md, job memory).
        crate::allocator::return_freed_memory_at_once();
    } else {
        crate::allocator::reuse_freed_memory_for_a_second();
    }
    let tls = tls_files(&args)?;
    let cluster = cluster_client(&args)?;
    let (store, object_metrics, faults) = open_store(&args)?;
    let mut registry = Registry::default();
    object_metrics.register(&mut registry);
    let limits = limits(&args)?;
    // Every process refuses the flags the metastore's process would refuse.
    let lifecycle = lifecycle_config(&args, &limits)?;
    let reach = if roles.has(Role::Metastore) {
        let reached = (cluster.as_ref(), tls.as_ref());
        run_metastore(&args, lifecycle, store.clone(), reached, &mut registry).await?
    } else {
        remote_metastore(&args, &roles, cluster.as_ref())?
    };

    let segment_metrics = SegmentMetrics::default();
    segment_metrics.register(&mut registry);
    if roles.has(Role::Metastore) || roles.has(Role::SegmentWriter) {
        // dlq/ is in the object store: any of these processes registers
        // what a dead segment writer left there.
        tokio::spawn(recover_dlq_forever(
            store.clone(),
            reach.commands.clone(),
            segment_metrics.clone(),
            Duration::from_secs(args.dlq_retry_seconds.max(1)),
        ));
    }
    if roles.has(Role::CompactionWorker) {
        let workers = args.compaction_workers.unwrap_or_else(all_the_cpus);
        anyhow::ensure!(
            workers > 0 || !roles.compacts_only(),
            "--compaction-workers 0 leaves this process nothing to do"
        );
        start_workers(
            &args,
            compaction_config(&args)?,
            store.clone(),
            &reach,
            workers,
            &mut registry,
        )?;
    }
    let admission = Admission::new(connection_limits(&args), &mut registry);
    let auth = Arc::new(authenticator(&args)?);
    let local_writer = roles.has(Role::SegmentWriter).then(|| {
        Arc::new(SegmentWriter::start(
            SegmentConfig {
                shards: args.shards,
                min_flush_interval: Duration::from_millis(args.flush_interval_ms),
                ..SegmentConfig::default()
            },
            Sink {
                store: store.clone(),
                metastore: writer_metastore(reach.commands.clone(), &faults),
                flush_hook: faults
                    .crash_at
                    .map(|_| faults.clone() as Arc<dyn FlushHook>),
            },
            segment_metrics,
        ))
    });
    // A distributor without a segment writer beside it sends each shard to
    // the segment writer that owns it among those registered.
    let remote_writers = match (&local_writer, roles.has(Role::Distributor)) {
        (None, true) => Some(Arc::new(RemoteSegmentWriters::new(
            args.shards,
            cluster
                .clone()
                .context("a distributor alone needs --cluster-token")?,
        ))),
        _ => None,
    };
    let push = roles.has(Role::Distributor).then(|| {
        let writer: Arc<dyn SegmentWriterClient> = match (&local_writer, &remote_writers) {
            (Some(local), _) => local.clone(),
            (None, Some(remote)) => remote.clone(),
            (None, None) => {
                unreachable!("a distributor has a segment writer in or out of its process")
            }
        };
        PushState {
            distributor: Arc::new(Distributor::new(
                writer,
                limits,
                args.max_inflight_bytes,
                Duration::from_millis(args.max_push_queue_ms),
            )),
            auth: auth.clone(),
            metrics: PushMetrics::new(&mut registry),
        }
    });
    if clustered(&args) {
        // Registered, and following the others' registrations.
        let address = (args.advertise_addr.clone()).unwrap_or_else(|| args.http_addr.to_string());
        // Others reach this HTTP port the way it is served.
        let address = match &tls {
            Some(_) => format!("https://{address}"),
            None => address,
        };
        let instance = crate::cluster::this_instance(roles.names(), &address);
        tokio::spawn(register_forever(reach.commands.clone(), instance));
        let metrics = MemberMetrics::default();
        metrics.register(&mut registry);
        let distributor = push.as_ref().map(|p| p.distributor.clone());
        tokio::spawn(follow_members(
            reach.index.clone(),
            distributor,
            remote_writers.clone(),
            metrics,
        ));
    }
    let engine = if roles.has(Role::QueryFrontend) {
        let engine = Arc::new(query_engine(&args, store, reach.index)?);
        if let Err(e) = engine.warm_up().await {
            tracing::warn!(error = %e, "query warm-up failed");
        }
        Some(engine)
    } else {
        None
    };

    let readiness: Readiness = match &remote_writers {
        // A distributor serves once it knows where to send shards.
        Some(writers) => {
            let writers = writers.clone();
            Arc::new(move || {
                (!writers.has_writers())
                    .then(|| "no segment writer is registered with the metastore yet".to_string())
            })
        }
        None => Arc::new(|| None),
    };
    let mut app = health_router(Arc::new(registry), readiness);
    if let (Some(writer), true) = (&local_writer, clustered(&args)) {
        // Distributors in other processes append here.
        app = app.merge(ember_segment_writer::remote::router(
            writer.clone(),
            cluster_token(&args)?,
        ));
    }
    if let Some(push) = push {
        app = app.merge(ember_distributor::http::router(push));
    }
    if let Some(engine) = &engine {
        app = app.merge(ember_query_frontend::router(QueryState {
            engine: engine.clone(),
            auth: auth.clone(),
        }));
    }
    let http_listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    let http_addr = http_listener.local_addr()?;
    let http: futures::future::BoxFuture<'static, std::io::Result<()>> = match &tls {
        None => Box::pin(serve_http(
            http_listener,
            app,
            admission.clone(),
            shutdown_signal(),
        )),
        Some(files) => Box::pin(serve_http(
            TlsListener::new(http_listener, files)?,
            app,
            admission.clone(),
            shutdown_signal(),
        )),
    };
    let flight: futures::future::BoxFuture<'static, anyhow::Result<()>> = match engine {
        Some(engine) => Box::pin(serve_flight(&args, engine, auth, tls.as_ref(), admission).await?),
        None => Box::pin(async { Ok(()) }),
    };
    info!(roles = %args.roles, http = %http_addr, "ember serving");
    tokio::try_join!(async { http.await.context("HTTP server") }, flight)?;
    info!("ember stopped");
    Ok(())
}

/// Whether this process is one of several: it then registers with the
/// metastore and follows the other members.
fn tls_files(args: &ServeArgs) -> anyhow::Result<Option<TlsFiles>> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles::read(cert, key)?)),
        (None, None) => Ok(None),
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
}

/// Calls to other processes, with the cluster token and the certificates
/// `https://` addresses must present (`--cluster-ca`, else `--tls-cert`).
fn cluster_client(args: &ServeArgs) -> anyhow::Result<Option<ClusterClient>> {
    let Some(token) = &args.cluster_token else {
        return Ok(None);
    };
    let Some(ca) = args.cluster_ca.as_ref().or(args.tls_cert.as_ref()) else {
        return Ok(Some(ClusterClient::new(token)));
    };
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let client = ClusterClient::trusting(token, &pem).with_context(|| ca.display().to_string())?;
    Ok(Some(client))
}

fn clustered(args: &ServeArgs) -> bool {
    args.metastore_peers.is_some() || args.metastore_listen_addr.is_some()
}

/// How the roles of this process reach the metastore.
struct MetastoreReach {
    /// Its commands.
    commands: Arc<dyn MetastoreClient>,
    /// Its index, as queries read it.
    index: Arc<dyn MetastoreIndex>,
    /// Ticks when the index changes, where it lives in this process (the
    /// compaction workers wake on it rather than poll).
    activity: Option<tokio::sync::watch::Receiver<u64>>,
}

/// The metastore role: the index in `<data-dir>/metastore.redb` (a replica
/// of a replicated one with `--node-id`), compaction planning, retention and
/// the deleter, and `--metastore-listen-addr` for other processes.
async fn run_metastore(
    args: &ServeArgs,
    lifecycle: LifecycleConfig,
    store: Arc<dyn ObjectStore>,
    (cluster, tls): (Option<&ClusterClient>, Option<&TlsFiles>),
    registry: &mut Registry,
) -> anyhow::Result<MetastoreReach> {
    let metastore_path = args.data_dir.join("metastore.redb");
    let metastore = Arc::new(
        Metastore::open(&metastore_path)
            .with_context(|| format!("opening {}", metastore_path.display()))?,
    );
    info!(data_dir = %args.data_dir.display(), entries = metastore.entry_count(), "metastore open");
    let replicated = start_replication(args, &metastore, cluster).await?;
    if let Some(r) = &replicated {
        let metrics = ReplicationMetrics::default();
        metrics.register(registry);
        tokio::spawn(metrics.follow(r.raft().clone()));
    }
    let reach = match &replicated {
        Some(r) => MetastoreReach {
            commands: Arc::new(r.clone()),
            index: r.index(),
            activity: Some(metastore.activity()),
        },
        None => MetastoreReach {
            commands: Arc::new(InProcess(metastore.clone())),
            index: metastore.clone(),
            activity: Some(metastore.activity()),
        },
    };
    start_lifecycle(lifecycle, store, metastore, replicated.clone(), registry);
    if let Some(addr) = args.metastore_listen_addr {
        let routes = match &replicated {
            Some(r) => r.router(),
            None => ember_metastore::rpc::router(
                reach.commands.clone(),
                reach.index.clone(),
                cluster_token(args)?,
            ),
        };
        serve_metastore(addr, routes, tls).await?;
    }
    Ok(reach)
}

/// The metastore of other processes, for a process without the role.
fn remote_metastore(
    args: &ServeArgs,
    roles: &Roles,
    cluster: Option<&ClusterClient>,
) -> anyhow::Result<MetastoreReach> {
    let (Some(peers), Some(client)) = (&args.metastore_peers, cluster) else {
        anyhow::bail!(
            "--roles {}: a process without the metastore reaches it through \
             --metastore-peers (its replicas' --metastore-listen-addr, as \
             http://host:port) and --cluster-token",
            args.roles
        );
    };
    anyhow::ensure!(
        args.node_id.is_none() && args.metastore_listen_addr.is_none(),
        "--node-id and --metastore-listen-addr are for a metastore's process: \
         add the metastore role to --roles"
    );
    let urls = metastore_urls(peers);
    let remote = Arc::new(RemoteMetastore::replicas(&urls, client.clone())?);
    info!(metastore = ?urls, roles = ?roles.0, "metastore reached over the network");
    Ok(MetastoreReach {
        commands: remote.clone(),
        index: remote,
        activity: None,
    })
}

/// `1=http://a:4041,http://b:4041` -> the URLs, whether or not each names
/// its replica's id.
fn metastore_urls(peers: &str) -> Vec<String> {
    peers
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((id, url)) if id.chars().all(|c| c.is_ascii_digit()) => url.to_string(),
            _ => p.to_string(),
        })
        .collect()
}

fn query_engine(
    args: &ServeArgs,
    store: Arc<dyn ObjectStore>,
    index: Arc<dyn MetastoreIndex>,
) -> anyhow::Result<QueryEngine> {
    Ok(QueryEngine::new(
        store,
        index,
        QueryEngineConfig {
            memory_limit: args.query_memory_limit,
            tenant_memory_limit: args.tenant_query_memory_limit,
            query_timeout: Duration::from_secs(args.query_timeout_seconds.max(1)),
            statement_limits: StatementLimits {
                max_bytes: args.max_statement_bytes,
                max_expression_depth: args.max_expression_depth,
                max_relations: args.max_statement_relations,
                max_expression_cost: args.max_expression_cost,
            },
            stack_dictionary_bytes: args.stack_cache_bytes,
            totals_cache_bytes: args.totals_cache_bytes,
            ..QueryEngineConfig::default()
        },
    )?)
}

/// Arrow Flight SQL on `--flight-addr`, for a process with the query
/// frontend.
async fn serve_flight(
    args: &ServeArgs,
    engine: Arc<QueryEngine>,
    auth: Arc<Authenticator>,
    tls: Option<&TlsFiles>,
    admission: Admission,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(args.flight_addr)
        .await
        .with_context(|| format!("binding {}", args.flight_addr))?;
    info!(flight = %listener.local_addr()?, "Flight SQL serving");
    // Live clients answer the pings; dead peers' connections close. A
    // handler (planning included) ends within the query timeout; the
    // margin is for the client's own slowness.
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .timeout(Duration::from_secs(args.query_timeout_seconds.max(1) + 30));
    if let Some(files) = tls {
        server = server
            .tls_config(files.tonic_config())
            .context("TLS for Flight SQL")?;
        info!("TLS on for HTTP and Flight SQL");
    }
    let serving = server
        .add_service(EmberFlightSql::new(engine, auth).into_server())
        .serve_with_incoming_shutdown(admitted_incoming(listener, admission), shutdown_signal());
    Ok(async move { serving.await.context("Flight SQL server") })
}

/// The object store every role of this process shares (`--object-store-url`,
/// else the local directory `<data-dir>/objects`), counted, with test faults
/// when asked.
fn open_store(
    args: &ServeArgs,
) -> anyhow::Result<(Arc<dyn ObjectStore>, ObjectRequestMetrics, Arc<Faults>)> {
    let mut local = open_object_store(
        args.object_store_url.as_deref(),
        &args.data_dir.join("objects"),
        &args.object_store_options,
    )?;
    let url = args.object_store_url.as_deref().map(redacted);
    info!(url = url.as_deref().unwrap_or("<data-dir>/objects"), store = %local, "object store");
    let faults = Arc::new(match &args.faults {
        Some(spec) => Faults::parse(spec).map_err(|e| anyhow::anyhow!("--faults: {e}"))?,
        None => Faults::default(),
    });
    if args.faults.is_some() {
        tracing::warn!(spec = ?args.faults, "fault injection on: for tests only");
    }
    if faults.touches_store() {
        local = Arc::new(Layered::new(local, StoreFaults(faults.clone())));
    }
    let object_metrics = ObjectRequestMetrics::default();
    let counted = CountRequests(object_metrics.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(Layered::new(local, counted));
    Ok((store, object_metrics, faults))
}

/// The metastore as the segment writer reaches it: with the test faults
/// on its commands, when `--faults` asks for some.
fn writer_metastore(
    client: Arc<dyn MetastoreClient>,
    faults: &Arc<Faults>,
) -> Arc<dyn MetastoreClient> {
    if faults.touches_metastore() {
        return Arc::new(FaultyMetastore::new(client, faults.clone()));
    }
    client
}

/// The metastore for roles in other processes (and, for a replica, Raft's
/// calls), on its own listener.
async fn serve_metastore(
    addr: SocketAddr,
    routes: axum::Router,
    tls: Option<&TlsFiles>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metastore-listen-addr {addr}"))?;
    info!(addr = %listener.local_addr()?, tls = tls.is_some(), "metastore served to other processes");
    let served: futures::future::BoxFuture<'static, std::io::Result<()>> = match tls {
        None => Box::pin(async move {
            axum::serve(listener, routes)
                .with_graceful_shutdown(shutdown_signal())
                .await
        }),
        Some(files) => {
            let listener = TlsListener::new(listener, files)?;
            Box::pin(async move {
                axum::serve(listener, routes)
                    .with_graceful_shutdown(shutdown_signal())
                    .await
            })
        }
    };
    tokio::spawn(async move {
        if let Err(e) = served.await {
            tracing::error!(error = %e, "metastore server stopped");
        }
    });
    Ok(())
}

fn cluster_token(args: &ServeArgs) -> anyhow::Result<&str> {
    args.cluster_token
        .as_deref()
        .context("roles in several processes need --cluster-token")
}

/// This process's replica of the metastore, when `--node-id` names one: its Raft log beside the metastore file.
async fn start_replication(
    args: &ServeArgs,
    metastore: &Arc<Metastore>,
    cluster: Option<&ClusterClient>,
) -> anyhow::Result<Option<Replicated>> {
    let Some(node_id) = args.node_id else {
        return Ok(None);
    };
    let peers = args
        .metastore_peers
        .as_deref()
        .context("--node-id needs --metastore-peers")?;
    let cluster = ClusterConfig {
        node_id,
        peers: ClusterConfig::parse_peers(peers)?,
        client: cluster
            .cloned()
            .context("a replica needs --cluster-token")?,
    };
    let replicated = raft::start(&args.data_dir, metastore.clone(), &cluster).await?;
    info!(
        node_id,
        replicas = cluster.peers.len(),
        "metastore replica started"
    );
    Ok(Some(replicated))
}

fn compaction_config(args: &ServeArgs) -> anyhow::Result<CompactionConfig> {
    let spill_dir = args.data_dir.join("compaction-tmp");
    std::fs::create_dir_all(&spill_dir)
        .with_context(|| format!("creating {}", spill_dir.display()))?;
    Ok(CompactionConfig {
        job_memory_limit: args.compaction_memory_limit,
        spill_dir: Some(spill_dir),
        delete_delay: Duration::from_secs(args.compaction_delete_delay_seconds),
        upload_part_bytes: (args.compaction_upload_part_mb as usize) << 20,
        ..CompactionConfig::default()
    })
}

fn lifecycle_config(args: &ServeArgs, limits: &Limits) -> anyhow::Result<LifecycleConfig> {
    Ok(LifecycleConfig {
        levels: parse_levels(&args.compaction_levels)
            .map_err(|e| anyhow::anyhow!("--compaction-levels: {e}"))?,
        delete_delay: Duration::from_secs(args.compaction_delete_delay_seconds),
        retention: Retention {
            default: Duration::from_secs(limits.defaults.compactor_blocks_retention_period_seconds),
            tenants: limits
                .tenants
                .iter()
                .map(|(t, l)| {
                    let keep = l.compactor_blocks_retention_period_seconds;
                    (t.clone(), Duration::from_secs(keep))
                })
                .collect(),
        },
        ..LifecycleConfig::default()
    })
}

/// The planner, retention and the deleter, beside the metastore on the
/// main runtime (they only apply its commands and delete objects).
fn start_lifecycle(
    config: LifecycleConfig,
    store: Arc<dyn ObjectStore>,
    metastore: Arc<Metastore>,
    replicated: Option<Replicated>,
    registry: &mut Registry,
) {
    let levels = config.levels.len();
    let lifecycle = match replicated {
        Some(r) => Lifecycle::replicated(store, metastore, r, config),
        None => Lifecycle::new(store, metastore, config),
    };
    lifecycle.metrics.register(registry);
    let lifecycle = Arc::new(lifecycle);
    tokio::spawn(lifecycle.clone().plan_forever());
    tokio::spawn(lifecycle.delete_forever());
    info!(levels, "compaction planned");
}

/// Each worker on a thread of its own at a lower priority than ingest and
/// queries. With more than one, the first takes only level-0 jobs: the
/// write-to-first-compaction lag then never includes a higher level's merge
/// (shards' level-1 jobs fall due in the same round and would hold every
/// worker for several times a level-0 job).
fn start_workers(
    args: &ServeArgs,
    config: CompactionConfig,
    store: Arc<dyn ObjectStore>,
    reach: &MetastoreReach,
    workers: usize,
    registry: &mut Registry,
) -> anyhow::Result<()> {
    let crash_at = match &args.compaction_crash_at {
        Some(step) => {
            let at = CompactionStep::parse(step)
                .ok_or_else(|| anyhow::anyhow!("--compaction-crash-at: unknown step {step:?}"))?;
            tracing::warn!(step, "compaction crash point armed: for tests only");
            Some(at)
        }
        None => None,
    };
    let metrics = CompactionMetrics::default();
    metrics.register(registry);
    for i in 0..workers {
        // Each worker has its own memory pool: the budget is per job.
        let mut compactor = Compactor::new(
            store.clone(),
            reach.commands.clone(),
            reach.index.clone(),
            config.clone(),
        )?
        .with_metrics(metrics.clone());
        if let Some(activity) = &reach.activity {
            compactor = compactor.with_wake(activity.clone());
        }
        if i == 0 && workers > 1 {
            compactor = compactor.for_level0_only();
        }
        if let Some(at) = crash_at {
            compactor = compactor.with_step_hook(Arc::new(move |s| {
                if s == at {
                    tracing::error!(step = ?s, "crashing at compaction step (test fault)");
                    std::process::abort();
                }
            }));
        }
        let compactor = Arc::new(compactor);
        let name = format!("compaction-{i}");
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                lower_thread_priority();
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(compactor.work_forever(name)),
                    Err(e) => tracing::error!(error = %e, "compaction worker runtime"),
                }
            })
            .context("starting a compaction worker")?;
    }
    info!(workers, levels = %args.compaction_levels, "compaction workers on");
    Ok(())
}

/// Workers run at low priority, so in a process that also ingests and
/// answers queries they take what those leave: one per CPU lets the shards'
/// level-0 jobs, which become due together, run side by side.
fn all_the_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One of Pyroscope v2's roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Distributor,
    SegmentWriter,
    Metastore,
    QueryFrontend,
    QueryBackend,
    CompactionWorker,
}

const ROLES: [(&str, Role); 6] = [
    ("distributor", Role::Distributor),
    ("segment-writer", Role::SegmentWriter),
    ("metastore", Role::Metastore),
    ("query-frontend", Role::QueryFrontend),
    ("query-backend", Role::QueryBackend),
    ("compaction-worker", Role::CompactionWorker),
];

/// The roles of this process, checked to be a layout Ember can run.
#[derive(Debug, PartialEq)]
struct Roles(std::collections::BTreeSet<Role>);

impl Roles {
    fn parse(spec: &str) -> Result<Self, String> {
        let mut roles = std::collections::BTreeSet::new();
        for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "all" {
                roles.extend(ROLES.iter().map(|(_, r)| *r));
                continue;
            }
            let role = ROLES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, r)| *r)
                .ok_or_else(|| {
                    let known: Vec<&str> = ROLES.iter().map(|(n, _)| *n).collect();
                    format!("unknown role {name:?}; roles are all, {}", known.join(", "))
                })?;
            roles.insert(role);
        }
        if roles.is_empty() {
            return Err("name at least one role".into());
        }
        let roles = Self(roles);
        // A query frontend runs its whole query on the backend in its
        // process until queries spread over backends (issue 46).
        for (a, b) in [(Role::QueryFrontend, Role::QueryBackend)] {
            if roles.has(a) != roles.has(b) {
                return Err(format!(
                    "{spec:?}: {} and {} run together, in one process",
                    name_of(a),
                    name_of(b)
                ));
            }
        }
        Ok(roles)
    }

    fn has(&self, role: Role) -> bool {
        self.0.contains(&role)
    }

    /// The roles' names, as the metastore registers them.
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|r| name_of(*r).to_string()).collect()
    }

    /// Whether this process does nothing but compaction jobs.
    fn compacts_only(&self) -> bool {
        self.0.len() == 1 && self.has(Role::CompactionWorker)
    }
}

fn name_of(role: Role) -> &'static str {
    ROLES
        .iter()
        .find(|(_, r)| *r == role)
        .map_or("?", |(n, _)| n)
}

/// `20:36,10:720` -> one rule per level: blocks per job, age in seconds.
fn parse_levels(spec: &str) -> Result<Vec<LevelRule>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|level| {
            let (blocks, secs) = level
                .split_once(':')
                .ok_or_else(|| format!("{level:?} is not blocks:seconds"))?;
            let max_blocks: u32 = blocks
                .parse()
                .map_err(|_| format!("{blocks:?} is not a block count"))?;
            let secs: f64 = secs
                .parse()
                .map_err(|_| format!("{secs:?} is not a number of seconds"))?;
            if max_blocks == 0 || !(0.0..=1e9).contains(&secs) {
                return Err(format!("{level:?}: blocks >= 1 and seconds >= 0"));
            }
            Ok(LevelRule {
                max_blocks,
                max_age_nanos: (secs * 1e9) as i64,
            })
        })
        .collect()
}

/// Compaction yields the CPU to ingest and queries (nice 10; Linux gives
/// each thread its own nice value).
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its arguments; 0 is the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

fn authenticator(args: &ServeArgs) -> anyhow::Result<Authenticator> {
    let Some(path) = &args.auth_file else {
        return Ok(Authenticator::open());
    };
    let json =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let auth =
        Authenticator::from_json(&json).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    info!(file = %path.display(), "authentication on");
    Ok(auth)
}

fn limits(args: &ServeArgs) -> anyhow::Result<Limits> {
    let limits = Limits {
        max_request_bytes: args.max_request_bytes,
        max_decompressed_bytes: args.max_decompressed_bytes,
        defaults: ProfileLimits {
            max_profile_size_bytes: args.max_profile_size_bytes,
            max_profile_stacktrace_samples: args.max_profile_stacktrace_samples,
            max_profile_stacktrace_sample_labels: args.max_profile_stacktrace_sample_labels,
            max_profile_stacktrace_depth: args.max_profile_stacktrace_depth,
            max_profile_symbol_value_length: args.max_profile_symbol_value_length,
            reject_older_than_seconds: args.reject_older_than_seconds,
            reject_newer_than_seconds: args.reject_newer_than_seconds,
            compactor_blocks_retention_period_seconds: args.retention_seconds,
            ingestion_rate_mb: args.ingestion_rate_mb,
            ingestion_burst_size_mb: args.ingestion_burst_size_mb,
        },
        tenants: Default::default(),
    };
    limits
        .defaults
        .check()
        .map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
    let Some(path) = &args.limits_file else {
        return Ok(limits);
    };
    let json =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    limits
        .with_overrides_json(&json)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn connection_limits(args: &ServeArgs) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: connections_within_descriptors(args.max_connections.max(1)),
        header_read_timeout: Duration::from_secs(args.http_header_read_timeout_seconds.max(1)),
        body_read_timeout: Duration::from_secs(args.http_body_read_timeout_seconds.max(1)),
        max_body_bytes: args.max_request_bytes,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_the_layouts_ember_runs() {
        let all = Roles::parse("all").unwrap();
        assert!(ROLES.iter().all(|(_, r)| all.has(*r)));
        let no_worker =
            Roles::parse("distributor, segment-writer,metastore,query-frontend,query-backend")
                .unwrap();
        assert!(!no_worker.has(Role::CompactionWorker));
        assert!(no_worker.has(Role::Metastore));
        let worker = Roles::parse("compaction-worker").unwrap();
        assert!(worker.has(Role::CompactionWorker) && !worker.has(Role::Metastore));

        let e = Roles::parse("compactor").unwrap_err();
        assert!(
            e.contains("unknown role \"compactor\"") && e.contains("compaction-worker"),
            "{e}"
        );
        assert!(Roles::parse("").is_err());
        for layout in [
            "metastore",
            "distributor,segment-writer",
            "distributor",
            "segment-writer,metastore",
            "query-frontend,query-backend,compaction-worker",
            "metastore,compaction-worker",
        ] {
            assert!(Roles::parse(layout).is_ok(), "{layout}");
        }
        for split in ["query-frontend", "query-backend,metastore"] {
            let e = Roles::parse(split).unwrap_err();
            assert!(e.contains("run together, in one process"), "{split}: {e}");
        }
        assert!(Roles::parse("compaction-worker").unwrap().compacts_only());
        assert!(!Roles::parse("compaction-worker,metastore")
            .unwrap()
            .compacts_only());
    }
}

#[cfg(test)]
mod metastore_urls_tests {
    use super::metastore_urls;

    #[test]
    fn peers_name_urls_with_or_without_their_ids() {
        assert_eq!(
            metastore_urls("1=http://a:4041, 2=http://b:4041,http://c:4041,"),
            ["http://a:4041", "http://b:4041", "http://c:4041"]
        );
    }
}
