//! The typed queries of Pyroscope's query API and render API: each answers
//! from the same code as its SQL function (`flamegraph()`, `series()`,
//! `label_names()`...), without SQL text.

use std::collections::BTreeSet;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use ember_engine::profile::Labels;
use ember_metastore::BlockQuery;

use crate::diff::diff_frame;
use crate::flamegraph::{FlameGraphCall, FlameGraphQuery, FlameGraphTable, Frame};
use crate::labels::{label_names, label_values, series_labels, LabelQuery};
use crate::pprof::profile_bytes;
use crate::series::{series_of, SeriesQuery, TimeSeries, NAME as SERIES};
use crate::settings::Settings;
use crate::{QueryEngine, SqlError};

impl QueryEngine {
    /// The profile types with data in the range, sorted.
    pub fn profile_types(&self, tenant: &str, start: i64, end: i64) -> Vec<String> {
        let datasets = self.metastore().query(&BlockQuery {
            tenant: tenant.to_string(),
            start,
            end,
            ..BlockQuery::default()
        });
        let types: BTreeSet<&String> = datasets
            .iter()
            .flat_map(|d| d.dataset.profile_types.iter())
            .collect();
        types.into_iter().cloned().collect()
    }

    /// Every matching series, with its profile type's labels, sorted.
    pub fn series_labels(&self, q: &LabelQuery) -> Vec<Labels> {
        series_labels(&self.metastore(), q)
    }

    /// Names of the labels of matching series, sorted.
    pub fn label_names(&self, q: &LabelQuery) -> Vec<String> {
        label_names(&self.metastore(), q)
    }

    /// Values of label `name` in matching series, sorted.
    pub fn label_values(&self, name: &str, q: &LabelQuery) -> Vec<String> {
        label_values(&self.metastore(), name, q)
    }
}

impl QueryEngine {
    /// The oldest and newest profile time (nanoseconds) the tenant has
    /// stored, if any: Pyroscope's `GetProfileStats`.
    pub fn profile_time_bounds(&self, tenant: &str) -> Option<(i64, i64)> {
        let datasets = self.metastore().query(&BlockQuery {
            tenant: tenant.to_string(),
            start: i64::MIN,
            end: i64::MAX,
            ..BlockQuery::default()
        });
        let oldest = datasets.iter().map(|d| d.dataset.min_time).min()?;
        let newest = datasets.iter().map(|d| d.dataset.max_time).max()?;
        Some((oldest, newest))
    }
}

impl QueryEngine {
    /// The series of profile totals a Pyroscope `SelectSeries` asks for.
    pub async fn select_series(
        &self,
        q: &SeriesQuery,
        settings: &Settings,
    ) -> std::result::Result<Vec<TimeSeries>, SqlError> {
        q.check()
            .map_err(|e| DataFusionError::Plan(format!("{SERIES}: {e}")))?;
        self.caught_up().await?;
        let ctx = self.session(&q.selection.tenant, settings)?;
        let state = ctx.state();
        let metastore = self.metastore();
        let store = self.store();
        self.within_timeout(series_of(&state, &metastore, store, q))
            .await
    }
}

impl QueryEngine {
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
        self.caught_up().await?;
        let state = self.session_state(tenant, settings)?;
        let table = self.flame_graph_table(call, tenant)?;
        self.within_timeout(async {
            let plan = table.plan(&state, None).await?;
            plan.run(state.task_ctx(), |tree| f(Frame::Tree(tree)))
                .await
        })
        .await
    }

    /// The flame graph of `call` as a pprof profile, encoded: what
    /// `pprof()` answers and Pyroscope's `SelectMergeProfile` returns.
    pub async fn merged_profile(
        &self,
        tenant: &str,
        settings: &Settings,
        call: FlameGraphCall,
    ) -> std::result::Result<Vec<u8>, SqlError> {
        self.caught_up().await?;
        let state = self.session_state(tenant, settings)?;
        let table = self.flame_graph_table(call, tenant)?;
        self.within_timeout(profile_bytes(&table, &state)).await
    }

    /// The two flame graphs side by side, as `diff_flamegraph()` answers:
    /// Pyroscope's `Diff`.
    pub async fn diff_flame_graph(
        &self,
        tenant: &str,
        settings: &Settings,
        left: FlameGraphCall,
        right: FlameGraphCall,
    ) -> std::result::Result<RecordBatch, SqlError> {
        self.caught_up().await?;
        let state = self.session_state(tenant, settings)?;
        let left = self.flame_graph_table(left, tenant)?;
        let right = self.flame_graph_table(right, tenant)?;
        self.within_timeout(diff_frame(&state, &left, &right)).await
    }

    fn flame_graph_table(
        &self,
        call: FlameGraphCall,
        tenant: &str,
    ) -> std::result::Result<FlameGraphTable, SqlError> {
        Ok(FlameGraphTable {
            storage: self.storage().clone(),
            query: FlameGraphQuery::of_call(call, tenant)?,
        })
    }
}
