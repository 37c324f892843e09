//! The query engine: one DataFusion session per query, bound to a tenant, on
//! a runtime shared by all queries so that the memory limit is global.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::catalog::{
    CatalogProvider as _, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider as _,
};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreRegistry;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{SendableRecordBatchStream, SessionState};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use ember_engine::{Metastore, TenantId, DEFAULT_TENANT};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use url::Url;

use crate::diff::DiffFunction;
use crate::flamegraph::{
    FlameGraphCall, FlameGraphFunction, FlameGraphQuery, FlameGraphTable, Frame,
};
use crate::labels::LabelFunction;
use crate::lru::ByteLru;
use crate::pprof::PprofFunction;
use crate::series::SeriesFunction;
use crate::settings::Settings;
use crate::stack_dictionary::StackDictionary;
use crate::stack_totals::TotalsCache;
use crate::system::{SystemTable, SystemTableProvider, SCHEMA as SYSTEM_SCHEMA};
use crate::tables::{DatasetSource, SectionTable, TABLES};
use crate::tenant_memory::TenantPools;
use crate::SqlError;

pub const CATALOG: &str = "ember";

#[derive(Debug, Clone)]
pub struct QueryEngineConfig {
    /// Bytes that all running queries may hold at once.
    pub memory_limit: usize,
    /// Bytes that one tenant's running queries may hold at once.
    pub tenant_memory_limit: usize,
    pub target_partitions: usize,
    /// Bytes of stack nodes kept across queries, all tenants together.
    pub stack_dictionary_bytes: usize,
    /// Bytes of per-dataset stack totals kept across queries.
    pub totals_cache_bytes: usize,
    /// A query still running after this long fails with a timeout.
    pub query_timeout: Duration,
}

impl Default for QueryEngineConfig {
    fn default() -> Self {
        Self {
            memory_limit: 1 << 30,
            tenant_memory_limit: 512 << 20,
            target_partitions: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            stack_dictionary_bytes: 256 << 20,
            totals_cache_bytes: 256 << 20,
            query_timeout: Duration::from_secs(120),
        }
    }
}

/// The only object stores SQL can reach: the block store under its own URL.
/// DataFusion's default registry also serves `file://`, which would let a
/// statement read the server's files; this one serves nothing else.
#[derive(Debug)]
pub(crate) struct BlockStoreOnly {
    store: Arc<dyn ObjectStore>,
}

impl BlockStoreOnly {
    pub(crate) fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self { store }
    }
}

impl ObjectStoreRegistry for BlockStoreOnly {
    fn register_store(
        &self,
        _url: &Url,
        _store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        None
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        let blocks = crate::tables::store_url();
        if url.as_str().starts_with(blocks.as_str()) {
            Ok(self.store.clone())
        } else {
            Err(DataFusionError::Plan(format!(
                "no object store for {url}: SQL reads only Ember's blocks"
            )))
        }
    }
}

/// What every table and function of a session reads from.
#[derive(Clone)]
pub(crate) struct Storage {
    pub store: Arc<dyn ObjectStore>,
    pub metastore: Arc<Metastore>,
    pub stacks: Arc<StackDictionary>,
    pub totals: Arc<TotalsCache>,
}

/// Tenants whose built session state is kept (an entry counts as one).
const CACHED_SESSIONS: usize = 1024;

pub struct QueryEngine {
    storage: Storage,
    runtime: Arc<RuntimeEnv>,
    tenant_pools: TenantPools,
    /// Each tenant's session state, built once: building one registers every
    /// function DataFusion has, which cost more than planning a flame graph.
    /// Keyed by tenant, and a state holds only that tenant's catalog.
    sessions: Mutex<ByteLru<String, SessionState>>,
    config: QueryEngineConfig,
}

impl QueryEngine {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        metastore: Arc<Metastore>,
        config: QueryEngineConfig,
    ) -> Result<Self> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(config.memory_limit, 1.0)
            .with_object_store_registry(Arc::new(BlockStoreOnly::new(store.clone())))
            .build_arc()?;
        let tenant_pools = TenantPools::new(
            runtime.memory_pool.clone(),
            config.tenant_memory_limit.min(config.memory_limit),
        );
        Ok(Self {
            storage: Storage {
                store,
                metastore,
                stacks: Arc::new(StackDictionary::new(config.stack_dictionary_bytes)),
                totals: Arc::new(TotalsCache::new(config.totals_cache_bytes)),
            },
            runtime,
            tenant_pools,
            sessions: Mutex::new(ByteLru::new(CACHED_SESSIONS)),
            config,
        })
    }

    pub fn metastore(&self) -> Arc<Metastore> {
        self.storage.metastore.clone()
    }

    pub(crate) fn store(&self) -> Arc<dyn ObjectStore> {
        self.storage.store.clone()
    }

    pub(crate) fn query_timeout(&self) -> Duration {
        self.config.query_timeout
    }

    /// Bytes held by the caches shared across queries (stack dictionary
    /// and totals), for metrics.
    pub fn cache_bytes(&self) -> (usize, usize) {
        (self.storage.stacks.bytes(), self.storage.totals.bytes())
    }

    /// The shared runtime with the tenant's memory pool in front of the
    /// global one.
    fn tenant_runtime(&self, tenant: &str) -> Arc<RuntimeEnv> {
        Arc::new(RuntimeEnv {
            memory_pool: self.tenant_pools.pool(tenant),
            disk_manager: self.runtime.disk_manager.clone(),
            cache_manager: self.runtime.cache_manager.clone(),
            object_store_registry: self.runtime.object_store_registry.clone(),
        })
    }

    /// A session that sees only `tenant`'s data: catalog `ember`, schema
    /// named after the tenant, and the profile functions.
    pub fn session(
        &self,
        tenant: &str,
        settings: &Settings,
    ) -> std::result::Result<SessionContext, SqlError> {
        Ok(SessionContext::new_with_state(
            self.session_state(tenant, settings)?,
        ))
    }

    fn session_state(
        &self,
        tenant: &str,
        settings: &Settings,
    ) -> std::result::Result<SessionState, SqlError> {
        let valid = TenantId::parse(Some(tenant)).is_ok_and(|t| t.as_str() == tenant);
        if !valid {
            return Err(SqlError::Tenant(tenant.to_string()));
        }
        let cached = self.lock_sessions().get(&tenant.to_string());
        let mut state = match cached {
            Some(state) => state,
            None => {
                let state = self.new_session(tenant)?.state();
                self.lock_sessions()
                    .insert(tenant.to_string(), state.clone(), 1);
                state
            }
        };
        state
            .config_mut()
            .options_mut()
            .extensions
            .insert(settings.clone());
        Ok(state)
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, ByteLru<String, SessionState>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_session(&self, tenant: &str) -> std::result::Result<SessionContext, SqlError> {
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, tenant)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true)
            .with_target_partitions(self.config.target_partitions)
            .with_option_extension(Settings::default());
        let options = config.options_mut();
        // Grafana's Flight SQL data source reads Utf8, not Utf8View.
        options.sql_parser.map_string_types_to_utf8view = false;
        options.execution.parquet.schema_force_view_types = false;
        let ctx = SessionContext::new_with_config_rt(config, self.tenant_runtime(tenant));
        let schema = MemorySchemaProvider::new();
        for section in TABLES {
            let table = SectionTable::new(
                section,
                self.storage.store.clone(),
                DatasetSource::Tenant {
                    tenant: tenant.to_string(),
                    metastore: self.storage.metastore.clone(),
                },
            );
            schema.register_table(section.name().to_string(), Arc::new(table))?;
        }
        // A tenant named `system` finds the system tables in its own schema.
        let system = if tenant == SYSTEM_SCHEMA {
            None
        } else {
            Some(MemorySchemaProvider::new())
        };
        for table in SystemTable::ALL {
            let provider =
                SystemTableProvider::new(table, self.storage.metastore.clone(), tenant.to_string());
            system
                .as_ref()
                .unwrap_or(&schema)
                .register_table(table.name().to_string(), Arc::new(provider))?;
        }
        let catalog = MemoryCatalogProvider::new();
        catalog.register_schema(tenant, Arc::new(schema))?;
        if let Some(system) = system {
            catalog.register_schema(SYSTEM_SCHEMA, Arc::new(system))?;
        }
        ctx.register_catalog(CATALOG, Arc::new(catalog));
        ctx.register_udtf(
            "diff_flamegraph",
            Arc::new(DiffFunction::new(self.storage.clone(), tenant.to_string())),
        );
        ctx.register_udtf(
            "label_names",
            Arc::new(LabelFunction::names(
                self.storage.metastore.clone(),
                tenant.to_string(),
            )),
        );
        ctx.register_udtf(
            "label_values",
            Arc::new(LabelFunction::values(
                self.storage.metastore.clone(),
                tenant.to_string(),
            )),
        );
        ctx.register_udtf(
            "span_flamegraph",
            Arc::new(FlameGraphFunction::of_spans(
                self.storage.clone(),
                tenant.to_string(),
            )),
        );
        ctx.register_udtf(
            "pprof",
            Arc::new(PprofFunction::new(self.storage.clone(), tenant.to_string())),
        );
        ctx.register_udtf(
            "series",
            Arc::new(SeriesFunction::new(
                self.storage.store.clone(),
                self.storage.metastore.clone(),
                tenant.to_string(),
            )),
        );
        ctx.register_udtf(
            "flamegraph",
            Arc::new(FlameGraphFunction::new(
                self.storage.clone(),
                tenant.to_string(),
            )),
        );
        Ok(ctx)
    }

    /// Plans a read-only statement: no DDL (so no external tables over local
    /// paths), no DML or COPY, no SET.
    pub async fn plan(
        &self,
        tenant: &str,
        sql: &str,
        settings: &Settings,
    ) -> std::result::Result<DataFrame, SqlError> {
        self.plan_with_params(tenant, sql, settings, Vec::new())
            .await
    }

    /// Plans a statement with its placeholders (`$1`...) bound to `params`
    /// (none: placeholders stay unbound, as for a prepared statement's
    /// schema).
    pub async fn plan_with_params(
        &self,
        tenant: &str,
        sql: &str,
        settings: &Settings,
        params: Vec<ScalarValue>,
    ) -> std::result::Result<DataFrame, SqlError> {
        let ctx = self.session(tenant, settings)?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let df = ctx.sql_with_options(sql, options).await?;
        if params.is_empty() {
            return Ok(df);
        }
        Ok(df.with_param_values(params)?)
    }

    /// Runs a flame graph over an empty range once, through SQL and through
    /// the query API's path, before the server takes queries: otherwise the first
    /// query after a start pays for paging in the code and building the first session.
    pub async fn warm_up(&self) -> std::result::Result<(), SqlError> {
        let sql = "SELECT * FROM flamegraph('warm:up:a:b:c', '{}', 0, 1)";
        self.execute(DEFAULT_TENANT, sql, &Settings::default())
            .await?
            .try_collect::<Vec<_>>()
            .await?;
        let call = FlameGraphCall {
            profile_type: "warm:up:a:b:c".into(),
            selector: "{}".into(),
            start: 0,
            end: 1,
            max_nodes: 1,
            spans: None,
        };
        self.flame_graph(DEFAULT_TENANT, &Settings::default(), call, |_| ())
            .await
    }

    /// Runs a flame graph as `flamegraph()` (or `span_flamegraph()`) does,
    /// handing its rows to `f` straight from the tree: the query API's path,
    /// which needs neither SQL's parsing and planning nor the frame.
    pub async fn flame_graph<R: Send>(
        &self,
        tenant: &str,
        settings: &Settings,
        call: FlameGraphCall,
        f: impl FnOnce(Frame<'_>) -> R + Send,
    ) -> std::result::Result<R, SqlError> {
        let state = self.session_state(tenant, settings)?;
        let run = async {
            let query = FlameGraphQuery::of_call(call, &state, tenant)?;
            let table = FlameGraphTable {
                storage: self.storage.clone(),
                query,
            };
            let plan = table.plan(&state, None).await?;
            plan.run(state.task_ctx(), |tree| f(Frame::Tree(tree)))
                .await
        };
        let timeout = self.query_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = tokio::time::timeout_at(deadline, run)
            .await
            .map_err(|_| SqlError::Timeout(timeout))??;
        // The fold is CPU-bound and never yields: a tree that took past the
        // deadline is a timeout, as SQL's stream reports it.
        if tokio::time::Instant::now() > deadline {
            return Err(SqlError::Timeout(timeout));
        }
        Ok(answer)
    }

    /// Runs a statement; the stream fails once the query timeout passes.
    pub async fn execute(
        &self,
        tenant: &str,
        sql: &str,
        settings: &Settings,
    ) -> std::result::Result<SendableRecordBatchStream, SqlError> {
        self.execute_with_params(tenant, sql, settings, Vec::new())
            .await
    }

    /// Runs a statement with its placeholders bound to `params`.
    pub async fn execute_with_params(
        &self,
        tenant: &str,
        sql: &str,
        settings: &Settings,
        params: Vec<ScalarValue>,
    ) -> std::result::Result<SendableRecordBatchStream, SqlError> {
        let deadline = tokio::time::Instant::now() + self.config.query_timeout;
        let timeout = self.config.query_timeout;
        let stream = tokio::time::timeout_at(deadline, async {
            self.plan_with_params(tenant, sql, settings, params)
                .await?
                .execute_stream()
                .await
                .map_err(SqlError::from)
        })
        .await
        .map_err(|_| SqlError::Timeout(timeout))??;
        Ok(with_deadline(stream, deadline, timeout))
    }
}

/// A stream that ends with a timeout error at `deadline`.
fn with_deadline(
    stream: SendableRecordBatchStream,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> SendableRecordBatchStream {
    let schema = stream.schema();
    let timed = futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        // A CPU-bound operator can return its batch after the deadline
        // without ever yielding: check the clock after each one too.
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(_)) if tokio::time::Instant::now() > deadline => Some((
                Err(DataFusionError::ResourcesExhausted(format!(
                    "query timed out after {timeout:?}"
                ))),
                None,
            )),
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((
                Err(DataFusionError::ResourcesExhausted(format!(
                    "query timed out after {timeout:?}"
                ))),
                None,
            )),
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, timed))
}
