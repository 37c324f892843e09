//! The query suite against Ember over Flight SQL: flame graphs at growing
//! sizes, a time series and series listing, each cold (first run after a
//! server start) and warm, with the object-store requests and the memory
//! each one costs.

use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use serde::Serialize;

use super::server::Server;
use crate::query::{connect, run_sql};

pub const TENANT: &str = "bench";

/// A flame graph query, also run by the peers.
#[derive(Debug, Clone, Serialize)]
pub struct FlameQuery {
    pub name: String,
    pub profile_type: String,
    pub service_name: Option<String>,
    pub start_ns: i64,
    pub end_ns: i64,
    /// Samples (stored rows) the range holds, from Ember's profiles table.
    pub samples: u64,
    /// Sum of the values in range: the flame graph's root must equal it.
    pub total: i64,
}

impl FlameQuery {
    pub fn sql(&self) -> String {
        let selector = match &self.service_name {
            Some(s) => format!("{{service_name=\"{s}\"}}"),
            None => "{}".to_string(),
        };
        format!(
            "SELECT * FROM flamegraph('{}', '{}', '{}', '{}')",
            self.profile_type,
            selector,
            rfc3339(self.start_ns),
            rfc3339(self.end_ns)
        )
    }
}

/// A nanosecond-exact UTC timestamp literal (integers are milliseconds).
fn rfc3339(nanos: i64) -> String {
    arrow::temporal_conversions::timestamp_ns_to_datetime(nanos)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryRun {
    pub name: String,
    pub sql: String,
    pub samples: u64,
    pub cold_ms: f64,
    pub warm_median_ms: f64,
    pub warm_min_ms: f64,
    pub rows: usize,
    /// Object-store GET requests and bytes of the cold run.
    pub cold_gets: f64,
    pub cold_read_bytes: f64,
    pub warm_gets: f64,
    /// Growth of the server's resident memory during the warm run's peak.
    pub peak_memory_bytes: Option<u64>,
    pub root_total: Option<i64>,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The value of the flame graph's `total` row.
pub fn root_total(batches: &[RecordBatch]) -> Option<i64> {
    let b = batches.iter().find(|b| b.num_rows() > 0)?;
    let value = b.column_by_name("value")?.as_primitive_opt::<Int64Type>()?;
    value.is_valid(0).then(|| value.value(0))
}

async fn timed(server: &Server, sql: &str) -> anyhow::Result<(Duration, Vec<RecordBatch>)> {
    let mut client = connect(&server.flight, TENANT).await?;
    let t = Instant::now();
    let batches = run_sql(&mut client, sql)
        .await
        .with_context(|| format!("running {sql}"))?;
    Ok((t.elapsed(), batches))
}

fn get_requests(m: &std::collections::HashMap<String, f64>) -> f64 {
    m.get("ember_object_store_requests_total{operation=\"get\"}")
        .copied()
        .unwrap_or(0.0)
}

fn read_bytes(m: &std::collections::HashMap<String, f64>) -> f64 {
    m.get("ember_object_store_read_bytes_total")
        .copied()
        .unwrap_or(0.0)
}

/// One query: cold on a freshly started server, then `repeats` warm runs.
pub async fn measure(
    server: &mut Server,
    name: &str,
    sql: &str,
    samples: u64,
    repeats: usize,
) -> anyhow::Result<QueryRun> {
    server.restart().await?;
    let before = server.metrics().await?;
    let (cold, batches) = timed(server, sql).await?;
    let after = server.metrics().await?;
    let mut warm = Vec::new();
    for _ in 0..repeats.saturating_sub(1) {
        warm.push(timed(server, sql).await?.0.as_secs_f64() * 1e3);
    }
    let rss = server.rss_bytes()?;
    let peak_memory = if server.reset_peak_rss() {
        let m0 = server.metrics().await?;
        let d = timed(server, sql).await?.0;
        warm.push(d.as_secs_f64() * 1e3);
        let m1 = server.metrics().await?;
        let peak = server.peak_rss_bytes()?.saturating_sub(rss);
        Some((peak, get_requests(&m1) - get_requests(&m0)))
    } else {
        None
    };
    let run = QueryRun {
        name: name.to_string(),
        sql: sql.to_string(),
        samples,
        cold_ms: cold.as_secs_f64() * 1e3,
        warm_median_ms: median(warm.clone()),
        warm_min_ms: warm.iter().copied().fold(f64::INFINITY, f64::min),
        rows: batches.iter().map(|b| b.num_rows()).sum(),
        cold_gets: get_requests(&after) - get_requests(&before),
        cold_read_bytes: read_bytes(&after) - read_bytes(&before),
        warm_gets: peak_memory.map(|p| p.1).unwrap_or(f64::NAN),
        peak_memory_bytes: peak_memory.map(|p| p.0),
        root_total: root_total(&batches),
    };
    tracing::info!(
        "query {name}: cold {:.1} ms, warm {:.1} ms, {} rows",
        run.cold_ms,
        run.warm_median_ms,
        run.rows
    );
    Ok(run)
}

/// Rows of a statement as strings, for small result sets.
pub async fn rows(server: &Server, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
    Ok(timed(server, sql).await?.1)
}
