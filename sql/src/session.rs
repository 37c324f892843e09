//! The query engine: one DataFusion session per query, bound to a tenant, on
//! a runtime shared by all queries so that the memory limit is global.

use std::sync::Arc;

use datafusion::catalog::{
    CatalogProvider as _, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider as _,
};
use datafusion::error::Result;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use ember_engine::Metastore;
use object_store::ObjectStore;

use crate::flamegraph::FlameGraphFunction;
use crate::stack_dictionary::StackDictionary;
use crate::stack_totals::TotalsCache;
use crate::tables::{DatasetSource, SectionTable, TABLES};
use crate::SqlError;

pub const CATALOG: &str = "ember";

#[derive(Debug, Clone)]
pub struct QueryEngineConfig {
    /// Bytes that all running queries may hold at once.
    pub memory_limit: usize,
    pub target_partitions: usize,
    /// Stack nodes kept across queries (about 100 bytes each).
    pub stack_dictionary_nodes: usize,
    /// (stack, value) pairs of dataset totals kept across queries (16 bytes each).
    pub totals_cache_entries: usize,
}

impl Default for QueryEngineConfig {
    fn default() -> Self {
        Self {
            memory_limit: 1 << 30,
            target_partitions: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            stack_dictionary_nodes: 2_000_000,
            totals_cache_entries: 16_000_000,
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

pub struct QueryEngine {
    storage: Storage,
    runtime: Arc<RuntimeEnv>,
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
            .build_arc()?;
        runtime.register_object_store(crate::tables::store_url().as_ref(), store.clone());
        Ok(Self {
            storage: Storage {
                store,
                metastore,
                stacks: Arc::new(StackDictionary::new(config.stack_dictionary_nodes)),
                totals: Arc::new(TotalsCache::new(config.totals_cache_entries)),
            },
            runtime,
            config,
        })
    }

    /// A session that sees only `tenant`'s data: catalog `ember`, schema
    /// named after the tenant, and the profile functions.
    pub fn session(&self, tenant: &str) -> std::result::Result<SessionContext, SqlError> {
        if tenant.is_empty() || tenant.contains(['"', '\'', '.', '/']) {
            return Err(SqlError::Tenant(tenant.to_string()));
        }
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, tenant)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true)
            .with_target_partitions(self.config.target_partitions);
        let options = config.options_mut();
        // Grafana's Flight SQL data source reads Utf8, not Utf8View.
        options.sql_parser.map_string_types_to_utf8view = false;
        options.execution.parquet.schema_force_view_types = false;
        let ctx = SessionContext::new_with_config_rt(config, self.runtime.clone());
        let schema = MemorySchemaProvider::new();
        for section in TABLES {
            let table = SectionTable::new(
                section,
                self.storage.clone(),
                DatasetSource::Tenant(tenant.to_string()),
            );
            schema.register_table(section.name().to_string(), Arc::new(table))?;
        }
        let catalog = MemoryCatalogProvider::new();
        catalog.register_schema(tenant, Arc::new(schema))?;
        ctx.register_catalog(CATALOG, Arc::new(catalog));
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
    pub async fn plan(&self, tenant: &str, sql: &str) -> std::result::Result<DataFrame, SqlError> {
        let ctx = self.session(tenant)?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        Ok(ctx.sql_with_options(sql, options).await?)
    }

    pub async fn execute(
        &self,
        tenant: &str,
        sql: &str,
    ) -> std::result::Result<SendableRecordBatchStream, SqlError> {
        Ok(self.plan(tenant, sql).await?.execute_stream().await?)
    }
}
