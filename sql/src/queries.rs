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
    pub async fn profile_types(
        &self,
        tenant: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<String>, SqlError> {
        let datasets = self
            .index()
            .datasets(&BlockQuery {
                tenant: tenant.to_string(),
                start,
                end,
                ..BlockQuery::default()
            })
            .await
            .map_err(|e| SqlError::Unavailable(e.to_string()))?;
        let types: BTreeSet<&String> = datasets
            .iter()
            .flat_map(|d| d.dataset.profile_types.iter())
            .collect();
        Ok(types.into_iter().cloned().collect())
    }

    /// Every matching series, with its profile type's labels, sorted.
    pub async fn series_labels(&self, q: &LabelQuery) -> Result<Vec<Labels>, SqlError> {
        Ok(series_labels(self.index().as_ref(), q).await?)
    }

    /// Names of the labels of matching series, sorted.
    pub async fn label_names(&self, q: &LabelQuery) -> Result<Vec<String>, SqlError> {
        Ok(label_names(self.index().as_ref(), q).await?)
    }

    /// Values of label `name` in matching series, sorted.
    pub async fn label_values(&self, name: &str, q: &LabelQuery) -> Result<Vec<String>, SqlError> {
        Ok(label_values(self.index().as_ref(), name, q).await?)
    }
}

impl QueryEngine {
    /// The oldest and newest profile time (nanoseconds) the tenant has
    /// stored, if any: Pyroscope's `GetProfileStats`.
    pub async fn profile_time_bounds(&self, tenant: &str) -> Result<Option<(i64, i64)>, SqlError> {
        let datasets = self
            .index()
            .datasets(&BlockQuery {
                tenant: tenant.to_string(),
                start: i64::MIN,
                end: i64::MAX,
                ..BlockQuery::default()
            })
            .await
            .map_err(|e| SqlError::Unavailable(e.to_string()))?;
        let oldest = datasets.iter().map(|d| d.dataset.min_time).min();
        let newest = datasets.iter().map(|d| d.dataset.max_time).max();
        Ok(oldest.zip(newest))
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
        let ctx = self.session(&q.selection.tenant, settings)?;
        let state = ctx.state();
        let index = self.index();
        let store = self.store();
        self.within_timeout(series_of(&state, index.as_ref(), store, q))
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
