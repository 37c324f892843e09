//! The query suite against Ember over Flight SQL and Pyroscope's query
//! API (Connect, binary protobuf, as Grafana sends it): flame graphs at
//! growing sizes, time series and label calls, each cold (the median of
//! first runs after server starts) and warm, with the object-store requests
//! and the memory each one costs.

use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use serde::Serialize;

use bytes::Bytes;
use ember_api::querier::v1 as q;
use ember_api::types::v1 as t;
use prost::Message;

use super::server::Server;
use ember::query::{connect, run_sql};

pub const TENANT: &str = "bench";

/// The `max_nodes` Grafana's Pyroscope data source asks for by default.
pub const GRAFANA_MAX_NODES: i64 = 16_384;

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
    pub fn selector(&self) -> String {
        match &self.service_name {
            Some(s) => format!("{{service_name=\"{s}\"}}"),
            None => "{}".to_string(),
        }
    }

    pub fn sql(&self) -> String {
        format!(
            "SELECT * FROM flamegraph('{}', '{}', '{}', '{}')",
            self.profile_type,
            self.selector(),
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
    /// Median of the cold runs, each right after a restart.
    pub cold_ms: f64,
    pub cold_runs_ms: Vec<f64>,
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

/// One query as a client sends it.
#[derive(Debug, Clone)]
pub enum Call {
    /// A statement over Flight SQL.
    Sql(String),
    /// A `querier.v1.QuerierService` method over Connect, protobuf body.
    Connect {
        method: &'static str,
        body: Bytes,
        tenant: &'static str,
    },
}

impl Call {
    pub fn select_merge_stacktraces(q: &FlameQuery, max_nodes: i64) -> Call {
        let req = q::SelectMergeStacktracesRequest {
            profile_type_id: q.profile_type.clone(),
            label_selector: q.selector(),
            start: q.start_ns.div_euclid(1_000_000),
            end: (q.end_ns + 999_999).div_euclid(1_000_000),
            max_nodes: Some(max_nodes),
            ..Default::default()
        };
        Call::connect("SelectMergeStacktraces", &req)
    }

    pub fn select_merge_profile(q: &FlameQuery, max_nodes: i64) -> Call {
        let req = q::SelectMergeProfileRequest {
            profile_type_id: q.profile_type.clone(),
            label_selector: q.selector(),
            start: q.start_ns.div_euclid(1_000_000),
            end: (q.end_ns + 999_999).div_euclid(1_000_000),
            max_nodes: Some(max_nodes),
            ..Default::default()
        };
        Call::connect("SelectMergeProfile", &req)
    }

    /// A time series at Grafana's resolution for the range: about 1,000
    /// points, never under 15 s.
    pub fn select_series(q: &FlameQuery, group_by: &str) -> Call {
        let range_s = (q.end_ns - q.start_ns) as f64 / 1e9;
        let req = q::SelectSeriesRequest {
            profile_type_id: q.profile_type.clone(),
            label_selector: q.selector(),
            start: q.start_ns.div_euclid(1_000_000),
            end: (q.end_ns + 999_999).div_euclid(1_000_000),
            group_by: vec![group_by.to_string()],
            step: (range_s / 1000.0).max(15.0).ceil(),
            ..Default::default()
        };
        Call::connect("SelectSeries", &req)
    }

    pub fn connect(method: &'static str, req: &impl Message) -> Call {
        Call::Connect {
            method,
            body: Bytes::from(req.encode_to_vec()),
            tenant: TENANT,
        }
    }

    /// What the report shows as the query.
    pub fn describe(&self) -> String {
        match self {
            Call::Sql(sql) => sql.clone(),
            Call::Connect { method, .. } => format!("POST /querier.v1.QuerierService/{method}"),
        }
    }
}

/// What a call answered, reduced to what the report checks.
struct Answer {
    rows: usize,
    /// The flame graph's root, the merged profile's or the series' sum.
    total: Option<i64>,
}

async fn timed(server: &Server, call: &Call) -> anyhow::Result<(Duration, Answer)> {
    match call {
        Call::Sql(sql) => {
            let mut client = connect(&server.flight, TENANT).await?;
            let t = Instant::now();
            let batches = run_sql(&mut client, sql)
                .await
                .with_context(|| format!("running {sql}"))?;
            let elapsed = t.elapsed();
            let answer = Answer {
                rows: batches.iter().map(|b| b.num_rows()).sum(),
                total: root_total(&batches),
            };
            Ok((elapsed, answer))
        }
        Call::Connect {
            method,
            body,
            tenant,
        } => {
            let url = format!("{}/querier.v1.QuerierService/{method}", server.http);
            let client = ember::http_client::Client::new();
            let t = Instant::now();
            let (status, reply) = client
                .post(&url, tenant, "application/proto", body.clone())
                .await?;
            let elapsed = t.elapsed();
            anyhow::ensure!(
                status == 200,
                "{method}: HTTP {status}: {}",
                String::from_utf8_lossy(&reply)
            );
            Ok((elapsed, connect_answer(method, &reply)?))
        }
    }
}

fn connect_answer(method: &str, reply: &[u8]) -> anyhow::Result<Answer> {
    Ok(match method {
        "SelectMergeStacktraces" => {
            let graph = q::SelectMergeStacktracesResponse::decode(reply)?
                .flamegraph
                .unwrap_or_default();
            Answer {
                rows: graph.levels.iter().map(|l| l.values.len() / 4).sum(),
                total: Some(graph.total),
            }
        }
        "SelectMergeProfile" => {
            let profile = ember_api::google::v1::Profile::decode(reply)?;
            Answer {
                rows: profile.sample.len(),
                total: Some(profile.sample.iter().filter_map(|s| s.value.first()).sum()),
            }
        }
        "SelectSeries" => {
            let series = q::SelectSeriesResponse::decode(reply)?.series;
            let points = series.iter().flat_map(|s| &s.points);
            Answer {
                rows: series.iter().map(|s| s.points.len()).sum(),
                total: Some(points.map(|p| p.value.round() as i64).sum()),
            }
        }
        "LabelValues" => Answer {
            rows: t::LabelValuesResponse::decode(reply)?.names.len(),
            total: None,
        },
        "LabelNames" => Answer {
            rows: t::LabelNamesResponse::decode(reply)?.names.len(),
            total: None,
        },
        "Series" => Answer {
            rows: q::SeriesResponse::decode(reply)?.labels_set.len(),
            total: None,
        },
        _ => Answer {
            rows: 0,
            total: None,
        },
    })
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

/// One query: cold on a freshly started server `repeats` times (a single
/// cold sample varied as much as the figure between restarts), then
/// `repeats` warm runs on the last of them.
pub async fn measure(
    server: &mut Server,
    name: &str,
    call: &Call,
    samples: u64,
    repeats: usize,
) -> anyhow::Result<QueryRun> {
    server.restart().await?;
    let before = server.metrics().await?;
    let (first_cold, answer) = timed(server, call).await?;
    let after = server.metrics().await?;
    let mut cold = vec![first_cold.as_secs_f64() * 1e3];
    for _ in 1..repeats {
        server.restart().await?;
        cold.push(timed(server, call).await?.0.as_secs_f64() * 1e3);
    }
    let mut warm = Vec::new();
    for _ in 0..repeats.saturating_sub(1) {
        warm.push(timed(server, call).await?.0.as_secs_f64() * 1e3);
    }
    let rss = server.rss_bytes()?;
    let peak_memory = if server.reset_peak_rss() {
        let m0 = server.metrics().await?;
        let d = timed(server, call).await?.0;
        warm.push(d.as_secs_f64() * 1e3);
        let m1 = server.metrics().await?;
        let peak = server.peak_rss_bytes()?.saturating_sub(rss);
        Some((peak, get_requests(&m1) - get_requests(&m0)))
    } else {
        None
    };
    let run = QueryRun {
        name: name.to_string(),
        sql: call.describe(),
        samples,
        cold_ms: median(cold.clone()),
        cold_runs_ms: cold,
        warm_median_ms: median(warm.clone()),
        warm_min_ms: warm.iter().copied().fold(f64::INFINITY, f64::min),
        rows: answer.rows,
        cold_gets: get_requests(&after) - get_requests(&before),
        cold_read_bytes: read_bytes(&after) - read_bytes(&before),
        warm_gets: peak_memory.map(|p| p.1).unwrap_or(f64::NAN),
        peak_memory_bytes: peak_memory.map(|p| p.0),
        root_total: answer.total,
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
    let mut client = connect(&server.flight, TENANT).await?;
    run_sql(&mut client, sql)
        .await
        .with_context(|| format!("running {sql}"))
}
