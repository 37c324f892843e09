//! Pyroscope's HTTP render API, which Profiles Drilldown and older tools
//! call: `GET /pyroscope/render` (a flamebearer JSON flame graph with its
//! timeline), `/pyroscope/render-diff`, `/pyroscope/label-values` and
//! `/pyroscope/labels`. Each answer is built from the same calls as the
//! `querier.v1` API (`crate::querier`), so from the same engine as SQL.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use ember_engine::selector::Selector;
use ember_sql::labels::LabelQuery;
use ember_sql::Settings;
use serde_json::{json, Value};

use ember_api::connect::{header_str, invalid, request_tenant, ApiError};

use crate::querier::{diff, query_error, select_merge_stacktraces, select_series};
use crate::QueryState;
use ember_api::querier::v1::{
    FlameGraph, FlameGraphDiff, SelectMergeStacktracesRequest, SelectSeriesRequest,
};

type Params = Vec<(String, String)>;

fn param<'a>(params: &'a Params, names: &[&str]) -> Option<&'a str> {
    // The last name given wins, as Pyroscope reads `maxNodes` over `max-nodes`.
    names
        .iter()
        .rev()
        .find_map(|n| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str()))
}

fn json_response(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A time as Pyroscope's `attime` reads it, in epoch milliseconds: digits
/// are unix time by length (13 ms, 16 µs, 19 ns, else seconds); otherwise
/// `now`, optionally minus or plus an offset (`now-1h`, `now-30m`).
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 = t
            .parse()
            .map_err(|_| format!("time {t:?} is out of range"))?;
        return Ok(match t.len() {
            13 => n,
            16 => n / 1_000,
            19 => n / 1_000_000,
            _ => n.saturating_mul(1_000),
        });
    }
    let Some(rest) = t.strip_prefix("now") else {
        return Err(format!(
            "time {t:?}: give unix time or now[-+offset] such as now-1h"
        ));
    };
    if rest.is_empty() {
        return Ok(now_ms);
    }
    let (sign, offset) = match rest.as_bytes()[0] {
        b'-' => (-1, &rest[1..]),
        b'+' => (1, &rest[1..]),
        _ => return Err(format!("time {t:?}: an offset starts with - or +")),
    };
    let digits = offset.bytes().take_while(u8::is_ascii_digit).count();
    let (count, unit) = offset.split_at(digits);
    let count: i64 = count
        .parse()
        .map_err(|_| format!("time {t:?}: the offset needs a number"))?;
    let unit_ms: i64 = match unit {
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        "M" | "mon" => 30 * 86_400_000,
        "y" => 365 * 86_400_000,
        other => return Err(format!("time {t:?}: unknown unit {other:?}")),
    };
    Ok(now_ms.saturating_add(sign * count.saturating_mul(unit_ms)))
}

/// `process_cpu:cpu:nanoseconds:cpu:nanoseconds{service_name="x"}`: the
/// profile type (a sixth `:delta` part is dropped) and the selector.
fn parse_query(query: &str) -> Result<(String, String), String> {
    let query = query.trim();
    let (ty, selector) = match query.find('{') {
        Some(i) => (&query[..i], &query[i..]),
        None => (query, "{}"),
    };
    let parts: Vec<&str> = ty.split(':').collect();
    if !(5..=6).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "query {query:?}: start with a profile type name:sample_type:sample_unit:period_type:period_unit"
        ));
    }
    Selector::parse(selector).map_err(|e| format!("query {query:?}: {e}"))?;
    Ok((parts[..5].join(":"), selector.to_string()))
}

/// The range and flame graph options every render call shares.
struct RenderRange {
    from_ms: i64,
    until_ms: i64,
    max_nodes: Option<i64>,
}

fn range(params: &Params, from: &str, until: &str) -> Result<RenderRange, ApiError> {
    let now = now_ms();
    let time = |name: &str| match param(params, &[name]) {
        Some(t) => parse_time(t, now).map_err(invalid),
        None => Ok(now),
    };
    let (from_ms, until_ms) = (time(from)?, time(until)?);
    if until_ms < from_ms {
        return Err(invalid(format!("{until} is before {from}")));
    }
    let max_nodes = match param(params, &["max-nodes", "maxNodes"]) {
        None => None,
        Some(n) => n.parse::<i64>().ok().filter(|n| *n > 0),
    };
    Ok(RenderRange {
        from_ms,
        until_ms,
        max_nodes,
    })
}

/// `metadata` of a flamebearer: what its ticks count, as Pyroscope says.
fn metadata(profile_type: &str, format: &str) -> Value {
    let parts: Vec<&str> = profile_type.split(':').collect();
    let (sample_type, sample_unit) = (parts[1], parts[2]);
    let (units, sample_rate) = match sample_type {
        "cpu" => ("samples", 1_000_000_000),
        "inuse_objects" | "alloc_objects" | "goroutine" | "samples" => ("objects", 100),
        _ => (sample_unit, 100),
    };
    json!({
        "format": format,
        "spyName": "",
        "sampleRate": sample_rate,
        "units": units,
        "name": sample_type,
    })
}

fn levels_json(levels: &[ember_api::querier::v1::Level]) -> Vec<Vec<i64>> {
    levels.iter().map(|l| l.values.clone()).collect()
}

fn flamebearer(g: &FlameGraph) -> Value {
    json!({
        "names": g.names,
        "levels": levels_json(&g.levels),
        "numTicks": g.total,
        "maxSelf": g.max_self,
    })
}

/// Pyroscope's timeline step for a range: 1,500 points at most, 15 s at
/// least.
fn timeline_step_seconds(from_ms: i64, until_ms: i64) -> i64 {
    ((until_ms - from_ms) / 1_000 / 1_500).max(15)
}

fn timeline(start_s: i64, step_s: i64, until_ms: i64, points: &[(i64, f64)]) -> Value {
    // A profile counts at the end of its step, which may lie past `until`.
    let span = (until_ms / 1_000 - start_s).max(0);
    let len = ((span + step_s - 1) / step_s + 1) as usize;
    let mut samples = vec![0u64; len];
    for (t_ms, v) in points {
        let i = (t_ms / 1_000 - start_s) / step_s;
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| samples.get_mut(i)) {
            *slot += v.max(0.0) as u64;
        }
    }
    json!({
        "startTime": start_s,
        "samples": samples,
        "durationDelta": step_s,
        "watermarks": null,
    })
}

/// `GET /pyroscope/render`.
pub async fn render(
    State(state): State<QueryState>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    match render_inner(&state, &params, &headers).await {
        Ok(v) => json_response(&v),
        Err(e) => e.into_response(),
    }
}

async fn render_inner(
    state: &QueryState,
    params: &Params,
    headers: &HeaderMap,
) -> Result<Value, ApiError> {
    let (tenant, settings) = caller(state, headers)?;
    let request = merge_request(params, "query", "from", "until")?;
    let (profile_type, selector) = (
        request.profile_type_id.clone(),
        request.label_selector.clone(),
    );
    let (from_ms, until_ms) = (request.start, request.end);
    let graph = select_merge_stacktraces(state, &tenant, &settings, &request).await?;
    let step_s = timeline_step_seconds(from_ms, until_ms);
    let start_s = (from_ms / 1_000).div_euclid(step_s) * step_s;
    let group_by: Vec<String> = param(params, &["groupBy"])
        .filter(|g| !g.is_empty())
        .map(|g| vec![g.to_string()])
        .unwrap_or_default();
    let aggregation = match param(params, &["aggregation"]) {
        Some("avg") => Some(1),
        None | Some("sum") | Some("") => None,
        Some(other) => return Err(invalid(format!("aggregation {other:?}: sum or avg"))),
    };
    let series = select_series(
        state,
        &tenant,
        &settings,
        SelectSeriesRequest {
            profile_type_id: profile_type.clone(),
            label_selector: selector,
            start: start_s * 1_000,
            end: until_ms,
            group_by: group_by.clone(),
            step: step_s as f64,
            aggregation,
            ..SelectSeriesRequest::default()
        },
    )
    .await?;
    let points = |s: &ember_api::types::v1::Series| -> Vec<(i64, f64)> {
        s.points.iter().map(|p| (p.timestamp, p.value)).collect()
    };
    let all: Vec<(i64, f64)> = series.iter().flat_map(points).collect();
    let groups = if group_by.is_empty() {
        Value::Null
    } else {
        let mut groups: BTreeMap<String, Value> = BTreeMap::new();
        for s in &series {
            let key = s
                .labels
                .iter()
                .find(|l| l.name == group_by[0])
                .map_or("*".to_string(), |l| l.value.clone());
            groups.insert(key, timeline(start_s, step_s, until_ms, &points(s)));
        }
        json!(groups)
    };
    Ok(json!({
        "version": 1,
        "flamebearer": flamebearer(&graph),
        "metadata": metadata(&profile_type, "single"),
        "timeline": timeline(start_s, step_s, until_ms, &all),
        "groups": groups,
        "heatmap": null,
    }))
}

/// The tenant and settings of the request's caller.
fn caller(state: &QueryState, headers: &HeaderMap) -> Result<(String, Settings), ApiError> {
    let tenant = request_tenant(&state.auth, headers)?;
    let settings = Settings::from_headers(|name| header_str(headers, name)).map_err(invalid)?;
    Ok((tenant.to_string(), settings))
}

/// The flame graph a render call names with its `query`, `from` and `until`
/// parameters (or the left or right ones of a diff).
fn merge_request(
    params: &Params,
    query: &str,
    from: &str,
    until: &str,
) -> Result<SelectMergeStacktracesRequest, ApiError> {
    let text =
        param(params, &[query]).ok_or_else(|| invalid(format!("\"{query}\" is required")))?;
    let (profile_type_id, label_selector) = parse_query(text).map_err(invalid)?;
    let r = range(params, from, until)?;
    Ok(SelectMergeStacktracesRequest {
        profile_type_id,
        label_selector,
        start: r.from_ms,
        end: r.until_ms,
        max_nodes: r.max_nodes,
        ..SelectMergeStacktracesRequest::default()
    })
}

/// `GET /pyroscope/render-diff`.
pub async fn render_diff(
    State(state): State<QueryState>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    match render_diff_inner(&state, &params, &headers).await {
        Ok(v) => json_response(&v),
        Err(e) => e.into_response(),
    }
}

async fn render_diff_inner(
    state: &QueryState,
    params: &Params,
    headers: &HeaderMap,
) -> Result<Value, ApiError> {
    let (tenant, settings) = caller(state, headers)?;
    let left = merge_request(params, "leftQuery", "leftFrom", "leftUntil")?;
    let right = merge_request(params, "rightQuery", "rightFrom", "rightUntil")?;
    let g: FlameGraphDiff = diff(state, &tenant, &settings, &left, &right).await?;
    Ok(json!({
        "version": 1,
        "flamebearer": {
            "names": g.names,
            "levels": levels_json(&g.levels),
            "numTicks": g.total,
            "maxSelf": g.max_self,
        },
        "metadata": metadata(&left.profile_type_id, "double"),
        "leftTicks": g.left_ticks,
        "rightTicks": g.right_ticks,
        "timeline": null,
        "groups": null,
        "heatmap": null,
    }))
}

/// `GET /pyroscope/label-values?label=...`: profile types for `__name__`,
/// else the label's values (optionally within `query`, `from`, `until`).
pub async fn label_values(
    State(state): State<QueryState>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let inner = async {
        let tenant = request_tenant(&state.auth, &headers)?;
        let label = param(&params, &["label"])
            .filter(|l| !l.is_empty())
            .ok_or_else(|| invalid("label parameter is required"))?;
        let q = label_query(&params, tenant)?;
        let values = if label == "__name__" {
            state.engine.profile_types(&q.tenant, q.start, q.end).await
        } else {
            state.engine.label_values(label, &q).await
        };
        values.map_err(|e| query_error(&e))
    };
    match inner.await {
        Ok(values) => json_response(&json!(values)),
        Err(e) => e.into_response(),
    }
}

/// `GET /pyroscope/labels`: label names (optionally within `query`,
/// `from`, `until`).
pub async fn labels(
    State(state): State<QueryState>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let inner = async {
        let tenant = request_tenant(&state.auth, &headers)?;
        let q = label_query(&params, tenant)?;
        state
            .engine
            .label_names(&q)
            .await
            .map_err(|e| query_error(&e))
    };
    match inner.await {
        Ok(names) => json_response(&json!(names)),
        Err(e) => e.into_response(),
    }
}

/// A label query from optional `query` (a selector, with or without a
/// profile type), `from` and `until` (unbounded when absent).
fn label_query(params: &Params, tenant: String) -> Result<LabelQuery, ApiError> {
    let now = now_ms();
    let time = |name: &str, unbounded: i64| match param(params, &[name]) {
        Some(t) => parse_time(t, now)
            .map(|ms| ms.saturating_mul(1_000_000))
            .map_err(invalid),
        None => Ok(unbounded),
    };
    let selectors = match param(params, &["query"]).map(str::trim) {
        None | Some("") => Vec::new(),
        Some(q) => {
            let selector = &q[q.find('{').unwrap_or(q.len())..];
            let selector = if selector.is_empty() { "{}" } else { selector };
            vec![Selector::parse(selector).map_err(|e| invalid(format!("query {q:?}: {e}")))?]
        }
    };
    Ok(LabelQuery {
        tenant,
        selectors,
        start: time("from", i64::MIN)?,
        end: time("until", i64::MAX)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_attime_reads_them() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_time("now", now).unwrap(), now);
        assert_eq!(parse_time("now-1h", now).unwrap(), now - 3_600_000);
        assert_eq!(parse_time("now-30m", now).unwrap(), now - 1_800_000);
        assert_eq!(parse_time("now+2d", now).unwrap(), now + 2 * 86_400_000);
        assert_eq!(parse_time("1700000000", now).unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("1700000000123", now).unwrap(), 1_700_000_000_123);
        assert_eq!(
            parse_time("1700000000123456", now).unwrap(),
            1_700_000_000_123
        );
        assert_eq!(
            parse_time("1700000000123456789", now).unwrap(),
            1_700_000_000_123
        );
        for bad in [
            "yesterday",
            "now-",
            "now-5q",
            "now*2",
            "99999999999999999999",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_query_is_a_profile_type_then_a_selector() {
        let (ty, sel) =
            parse_query(r#"process_cpu:cpu:nanoseconds:cpu:nanoseconds{service_name="x"}"#)
                .unwrap();
        assert_eq!(ty, "process_cpu:cpu:nanoseconds:cpu:nanoseconds");
        assert_eq!(sel, r#"{service_name="x"}"#);
        let (ty, sel) = parse_query("memory:alloc_space:bytes:space:bytes:delta").unwrap();
        assert_eq!(
            (ty.as_str(), sel.as_str()),
            ("memory:alloc_space:bytes:space:bytes", "{}")
        );
        assert!(parse_query(r#"{service_name="x"}"#).is_err());
        assert!(parse_query("cpu{service_name=").is_err());
    }

    #[test]
    fn the_timeline_puts_each_point_in_its_step() {
        let t = timeline(
            1_000,
            15,
            1_052_000,
            &[
                (1_015_000, 3.0),
                (1_030_000, 4.0),
                (1_030_000, 1.0),
                (1_060_000, 2.0),
            ],
        );
        assert_eq!(t["startTime"], 1_000);
        assert_eq!(t["durationDelta"], 15);
        assert_eq!(t["samples"], json!([0, 3, 5, 0, 2]));
        assert_eq!(timeline_step_seconds(0, 3_600_000), 15);
        assert_eq!(timeline_step_seconds(0, 30 * 86_400_000), 1_728);
    }
}
