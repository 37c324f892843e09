//! The query engine: one DataFusion session per query, bound to a tenant, on
//! a runtime shared by all queries so that the memory limit is global.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::catalog::{
    CatalogProvider as _, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider as _,
};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{SendableRecordBatchStream, SessionState};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use ember_engine::{TenantId, DEFAULT_TENANT};
use ember_metastore::MetastoreIndex;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;

use crate::deadline::{self, Deadline};
use crate::flamegraph::FlameGraphCall;
use crate::function_limits::{bound_functions, bound_string_concat};
use crate::lru::ByteLru;
use crate::profile_functions;
use crate::query_threads::QueryThreads;
use crate::regular_expressions::bound_patterns;
use crate::settings::Settings;
use crate::stack_dictionary::StackDictionary;
use crate::stack_totals::TotalsCache;
use crate::statement::{self, StatementLimits};
use crate::storage::{BlockStoreOnly, Storage};
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
    /// What one statement's text may be.
    pub statement_limits: StatementLimits,
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
            statement_limits: StatementLimits::default(),
        }
    }
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
    threads: QueryThreads,
    config: QueryEngineConfig,
}

impl QueryEngine {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        index: Arc<dyn MetastoreIndex>,
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
                index,
                stacks: Arc::new(StackDictionary::new(config.stack_dictionary_bytes)),
                totals: Arc::new(TotalsCache::new(config.totals_cache_bytes)),
            },
            runtime,
            tenant_pools,
            sessions: Mutex::new(ByteLru::new(CACHED_SESSIONS)),
            threads: QueryThreads::new(config.target_partitions)
                .map_err(|e| DataFusionError::External(Box::new(e)))?,
            config,
        })
    }

    /// The index the engine reads.
    pub fn index(&self) -> Arc<dyn MetastoreIndex> {
        self.storage.index.clone()
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    pub(crate) fn store(&self) -> Arc<dyn ObjectStore> {
        self.storage.store.clone()
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

    pub(crate) fn session_state(
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

    /// The most one scalar function may build for a batch: an eighth of
    /// what the tenant's queries may hold.
    fn function_output_bytes(&self) -> usize {
        self.config
            .tenant_memory_limit
            .min(self.config.memory_limit)
            / 8
    }

    /// Every function a statement of `tenant` can call: scalar, aggregate,
    /// window and table functions, sorted.
    pub async fn function_names(&self, tenant: &str) -> std::result::Result<Vec<String>, SqlError> {
        let state = self.session_state(tenant, &Settings::default())?;
        let mut names: Vec<String> = state
            .scalar_functions()
            .keys()
            .chain(state.aggregate_functions().keys())
            .chain(state.window_functions().keys())
            .chain(state.table_functions().keys())
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
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
        let mut ctx = SessionContext::new_with_config_rt(config, self.tenant_runtime(tenant));
        bound_functions(&ctx, self.function_output_bytes());
        bound_string_concat(&mut ctx, self.function_output_bytes())?;
        bound_patterns(&mut ctx)?;
        let schema = MemorySchemaProvider::new();
        for section in TABLES {
            let table = SectionTable::new(
                section,
                self.storage.store.clone(),
                DatasetSource::Tenant {
                    tenant: tenant.to_string(),
                    index: self.storage.index.clone(),
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
                SystemTableProvider::new(table, self.storage.index.clone(), tenant.to_string());
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
        profile_functions::register(&ctx, &self.storage, tenant);
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
    /// schema). Planning runs on the query threads, within the timeout.
    pub async fn plan_with_params(
        &self,
        tenant: &str,
        sql: &str,
        settings: &Settings,
        params: Vec<ScalarValue>,
    ) -> std::result::Result<DataFrame, SqlError> {
        let deadline = Deadline::after(self.config.query_timeout);
        let planning = self.planning(tenant, sql, settings, params, deadline)?;
        self.within_timeout(self.threads.run(planning)).await
    }

    /// The columns a statement answers with, and the types its placeholders
    /// take (`None` where the statement does not tell).
    pub async fn describe(
        &self,
        tenant: &str,
        sql: &str,
        settings: &Settings,
        params: Vec<ScalarValue>,
    ) -> std::result::Result<StatementSchema, SqlError> {
        let deadline = Deadline::after(self.config.query_timeout);
        let planning = self.planning(tenant, sql, settings, params, deadline)?;
        let describing = async move {
            let df = planning.await?;
            Ok(StatementSchema {
                columns: Arc::new(df.schema().as_arrow().clone()),
                parameters: df.logical_plan().get_parameter_types()?,
            })
        };
        self.within_timeout(self.threads.run(describing)).await
    }

    /// The work of planning `sql`, to run on the query threads; its
    /// optimizer rules stop at `deadline`.
    fn planning(
        &self,
        tenant: &str,
        sql: &str,
        settings: &Settings,
        params: Vec<ScalarValue>,
        deadline: Deadline,
    ) -> std::result::Result<
        impl std::future::Future<Output = std::result::Result<DataFrame, SqlError>> + Send + 'static,
        SqlError,
    > {
        let state = deadline::state_within(self.session_state(tenant, settings)?, deadline);
        let sql = sql.to_string();
        let limits = self.config.statement_limits;
        Ok(async move {
            let statement = statement::parse(&state, &sql, limits)?;
            let plan = state.statement_to_plan(statement).await?;
            SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false)
                .verify_plan(&plan)?;
            let df = DataFrame::new(state, plan);
            if params.is_empty() {
                return Ok(df);
            }
            Ok(df.with_param_values(params)?)
        })
    }

    /// `work`'s answer, or a timeout once the query timeout has passed. An
    /// answer that came past the deadline is a timeout too, as a query's
    /// stream reports it: CPU-bound work may not yield until it is done.
    pub(crate) async fn within_timeout<T, E: Into<SqlError>>(
        &self,
        work: impl std::future::Future<Output = std::result::Result<T, E>>,
    ) -> std::result::Result<T, SqlError> {
        let timeout = self.config.query_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| SqlError::Timeout(timeout))?
            .map_err(Into::into)?;
        if tokio::time::Instant::now() > deadline {
            return Err(SqlError::Timeout(timeout));
        }
        Ok(answer)
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

    /// Runs a statement with its placeholders bound to `params`. Planning
    /// and execution run on the query threads, both within the timeout;
    /// the stream's schema is the planned one, which every batch is cast to
    /// (the physical plan may differ in nullability).
    pub async fn execute_with_params(
        &self,
        tenant: &str,
        sql: &str,
        settings: &Settings,
        params: Vec<ScalarValue>,
    ) -> std::result::Result<SendableRecordBatchStream, SqlError> {
        let timeout = self.config.query_timeout;
        let planned_by = Deadline::after(timeout);
        let deadline = tokio::time::Instant::from_std(planned_by.at);
        let planning = self.planning(tenant, sql, settings, params, planned_by)?;
        let running = self.threads.stream(async move {
            let df = planning.await?;
            let schema = Arc::new(df.schema().as_arrow().clone());
            let stream = df
                .execute_stream()
                .await
                .map_err(|e| stopped_at_deadline(e.into(), timeout))?;
            Ok(with_schema(stream, schema))
        });
        let stream = tokio::time::timeout_at(deadline, running)
            .await
            .map_err(|_| SqlError::Timeout(timeout))??;
        Ok(with_deadline(stream, deadline, timeout))
    }
}

/// `e`, or a plain timeout if a rule stopped at the deadline.
fn stopped_at_deadline(e: SqlError, timeout: Duration) -> SqlError {
    match e.kind() {
        crate::ErrorKind::DeadlineExceeded => SqlError::Timeout(timeout),
        _ => e,
    }
}

/// What a statement answers with and what it takes, before it runs.
#[derive(Debug, Clone)]
pub struct StatementSchema {
    pub columns: SchemaRef,
    pub parameters: std::collections::HashMap<String, Option<DataType>>,
}

/// `stream` with `schema`, each batch cast to it: the schema a client was
/// told before the query ran is the one it receives.
fn with_schema(stream: SendableRecordBatchStream, schema: SchemaRef) -> SendableRecordBatchStream {
    if stream.schema() == schema {
        return stream;
    }
    let target = schema.clone();
    let batches = stream.map(move |batch| conform(batch?, &target));
    Box::pin(RecordBatchStreamAdapter::new(schema, batches))
}

fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                Ok(datafusion::arrow::compute::cast(column, field.data_type())?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
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
            Ok(Some(_)) if tokio::time::Instant::now() > deadline => {
                Some((timed_out(timeout), None))
            }
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((timed_out(timeout), None)),
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(schema, timed))
}

fn timed_out(timeout: Duration) -> Result<RecordBatch> {
    Err(DataFusionError::External(Box::new(SqlError::Timeout(
        timeout,
    ))))
}
