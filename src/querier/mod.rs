//! Pyroscope's query API, `querier.v1.QuerierService`, over Connect unary
//! with binary protobuf: what Grafana's Pyroscope data source sends. Label
//! calls are answered from the index (`ember_sql::labels`); flame graphs run
//! as the SQL `flamegraph()` function does, by the same engine, but without
//! SQL's parsing and planning or the frame between the tree and the answer.
//!
//! Messages keep the package, names and field numbers of Pyroscope's
//! `api/querier/v1/querier.proto` and `api/types/v1/types.proto`.

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ember_engine::selector::Selector;
use ember_sql::flamegraph::{FlameGraphCall, Frame};
use ember_sql::labels::LabelQuery;
use ember_sql::selection::ProfileSelection;
use ember_sql::series::{Aggregation, SeriesQuery};
use ember_sql::Settings;
use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{connect_error, header_str, invalid, request_tenant, ApiError, AppState};

mod messages;
pub use messages::{querier_v1, types_v1};

use querier_v1::*;
use types_v1::*;

/// Largest accepted query request body.
const MAX_QUERY_REQUEST_BYTES: usize = 1 << 20;

fn unimplemented(message: impl Into<String>) -> ApiError {
    connect_error(StatusCode::NOT_IMPLEMENTED, "unimplemented", message)
}

/// How a call's messages are encoded: binary protobuf (Grafana, gRPC) or
/// proto3 JSON (Connect clients that send `application/json`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Codec {
    Proto,
    Json,
}

impl Codec {
    /// The codec a Connect request's content type asks for.
    fn of_connect(headers: &HeaderMap) -> Result<Codec, ApiError> {
        match header_str(headers, "content-type").unwrap_or("application/proto") {
            t if t.starts_with("application/proto") => Ok(Codec::Proto),
            t if t.starts_with("application/json") => Ok(Codec::Json),
            other => Err(connect_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unimplemented",
                format!(
                    "content type {other:?}: the query API serves application/proto and application/json"
                ),
            )),
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Codec::Proto => "application/proto",
            Codec::Json => "application/json",
        }
    }

    fn decode<M: Message + Default + DeserializeOwned>(self, body: &[u8]) -> Result<M, ApiError> {
        match self {
            Codec::Proto => M::decode(body).map_err(|e| invalid(format!("request body: {e}"))),
            Codec::Json => ember_engine::protojson::from_json(body)
                .map_err(|e| invalid(format!("request body: {e}"))),
        }
    }

    fn encode<M: Message + Serialize>(self, message: &M) -> Result<Bytes, ApiError> {
        match self {
            Codec::Proto => Ok(Bytes::from(message.encode_to_vec())),
            Codec::Json => ember_engine::protojson::to_json(message)
                .map(Bytes::from)
                .map_err(|e| {
                    connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                }),
        }
    }

    /// A flame graph answer (`SelectMergeStacktracesResponse`, or
    /// `SelectMergeSpanProfileResponse`: the same fields).
    fn encode_flame_graph(
        self,
        flamegraph: Option<FlameGraph>,
        tree: Vec<u8>,
    ) -> Result<Bytes, ApiError> {
        match (self, flamegraph) {
            (Codec::Proto, Some(g)) if tree.is_empty() => Ok(Bytes::from(g.response_bytes())),
            (_, flamegraph) => self.encode(&SelectMergeStacktracesResponse { flamegraph, tree }),
        }
    }

    /// A `google.v1.Profile` that is already protobuf.
    fn encode_profile(self, profile: Vec<u8>) -> Result<Bytes, ApiError> {
        match self {
            Codec::Proto => Ok(Bytes::from(profile)),
            Codec::Json => {
                let profile = ember_engine::pprof::Profile::decode(&profile[..]).map_err(|e| {
                    connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?;
                self.encode(&profile)
            }
        }
    }
}

/// `POST /querier.v1.QuerierService/{method}`, over Connect or gRPC.
pub async fn handle(
    State(state): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let grpc = crate::grpc::is_grpc(&headers);
    let result = async {
        let tenant = request_tenant(&state, &headers)?;
        let settings =
            Settings::from_headers(|name| header_str(&headers, name)).map_err(invalid)?;
        let (codec, message) = if grpc {
            let message =
                crate::grpc::request_message(&headers, body, MAX_QUERY_REQUEST_BYTES).await?;
            (Codec::Proto, message)
        } else {
            (
                Codec::of_connect(&headers)?,
                read_request(&headers, body).await?,
            )
        };
        let reply = call(&state, &method, &tenant, &settings, codec, &message).await?;
        Ok::<_, ApiError>((codec, reply))
    }
    .await;
    if let Err(e) = &result {
        tracing::info!(method, grpc, error = %e.message, "query API request refused");
    }
    if grpc {
        return crate::grpc::response(result.map(|(_, reply)| reply));
    }
    match result {
        Ok((codec, reply)) => {
            ([(header::CONTENT_TYPE, codec.content_type())], reply).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The encoded reply of one query API method.
async fn call(
    state: &AppState,
    method: &str,
    tenant: &str,
    settings: &Settings,
    codec: Codec,
    body: &[u8],
) -> Result<Bytes, ApiError> {
    match method {
        "ProfileTypes" => {
            let req = codec.decode::<ProfileTypesRequest>(body)?;
            let (start, end) = range(req.start, req.end);
            let profile_types = state
                .engine
                .profile_types(tenant, start, end)
                .iter()
                .map(|id| profile_type(id))
                .collect();
            codec.encode(&ProfileTypesResponse { profile_types })
        }
        "LabelNames" => {
            let req = codec.decode::<LabelNamesRequest>(body)?;
            let q = label_query(tenant, &req.matchers, req.start, req.end)?;
            let names = state.engine.label_names(&q);
            codec.encode(&LabelNamesResponse { names })
        }
        "LabelValues" => {
            let req = codec.decode::<LabelValuesRequest>(body)?;
            let q = label_query(tenant, &req.matchers, req.start, req.end)?;
            let names = state.engine.label_values(&req.name, &q);
            codec.encode(&LabelValuesResponse { names })
        }
        "Series" => {
            let req = codec.decode::<SeriesRequest>(body)?;
            let q = label_query(tenant, &req.matchers, req.start, req.end)?;
            // Projected on `label_names`, distinct series can become one.
            let sets: std::collections::BTreeSet<ember_engine::Labels> = state
                .engine
                .series_labels(&q)
                .into_iter()
                .map(|labels| {
                    labels
                        .into_iter()
                        .filter(|(n, _)| req.label_names.is_empty() || req.label_names.contains(n))
                        .collect()
                })
                .collect();
            let labels_set = sets
                .into_iter()
                .map(|labels| Labels {
                    labels: labels
                        .into_iter()
                        .map(|(name, value)| LabelPair { name, value })
                        .collect(),
                })
                .collect();
            codec.encode(&SeriesResponse { labels_set })
        }
        "SelectMergeStacktraces" => {
            let req = codec.decode::<SelectMergeStacktracesRequest>(body)?;
            let (flamegraph, tree) = stacktraces(state, tenant, settings, &req).await?;
            codec.encode_flame_graph(flamegraph, tree)
        }
        "SelectMergeProfile" => {
            let req = codec.decode::<SelectMergeProfileRequest>(body)?;
            let profile = select_merge_profile(state, tenant, settings, &req).await?;
            codec.encode_profile(profile)
        }
        "SelectSeries" => {
            let req = codec.decode::<SelectSeriesRequest>(body)?;
            let series = select_series(state, tenant, settings, req).await?;
            codec.encode(&SelectSeriesResponse { series })
        }
        "SelectMergeSpanProfile" => {
            let req = codec.decode::<SelectMergeSpanProfileRequest>(body)?;
            if req.span_selector.is_empty() {
                return Err(invalid(
                    "span_selector is empty: give the span IDs to merge",
                ));
            }
            let req = SelectMergeStacktracesRequest {
                profile_type_id: req.profile_type_id,
                label_selector: req.label_selector,
                start: req.start,
                end: req.end,
                max_nodes: req.max_nodes,
                format: req.format,
                span_selector: req.span_selector,
                ..Default::default()
            };
            let (flamegraph, tree) = stacktraces(state, tenant, settings, &req).await?;
            codec.encode_flame_graph(flamegraph, tree)
        }
        "Diff" => {
            let req = codec.decode::<DiffRequest>(body)?;
            let (Some(left), Some(right)) = (req.left, req.right) else {
                return Err(invalid("Diff needs both left and right"));
            };
            let flamegraph = diff(state, tenant, settings, &left, &right).await?;
            codec.encode(&DiffResponse {
                flamegraph: Some(flamegraph),
            })
        }
        "GetProfileStats" => {
            // The request (`types.v1.GetProfileStatsRequest`) has no fields.
            let stats = match state.engine.profile_time_bounds(tenant) {
                Some((oldest, newest)) => GetProfileStatsResponse {
                    data_ingested: true,
                    oldest_profile_time: oldest / 1_000_000,
                    newest_profile_time: newest / 1_000_000,
                },
                // Pyroscope's answer for a tenant without data.
                None => GetProfileStatsResponse {
                    data_ingested: false,
                    oldest_profile_time: i64::MAX,
                    newest_profile_time: i64::MIN,
                },
            };
            codec.encode(&stats)
        }
        other => Err(unimplemented(format!(
            "querier.v1.QuerierService/{other} is not served"
        ))),
    }
}

async fn read_request(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let body = axum::body::to_bytes(body, MAX_QUERY_REQUEST_BYTES)
        .await
        .map_err(|e| {
            connect_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "resource_exhausted",
                format!("query request over {MAX_QUERY_REQUEST_BYTES} bytes: {e}"),
            )
        })?;
    match header_str(headers, "content-encoding") {
        None | Some("identity") => Ok(body),
        Some("gzip") => {
            let mut out = Vec::new();
            let mut reader = std::io::Read::take(
                flate2::read::GzDecoder::new(&body[..]),
                MAX_QUERY_REQUEST_BYTES as u64 + 1,
            );
            std::io::Read::read_to_end(&mut reader, &mut out)
                .map_err(|e| invalid(format!("gzip body: {e}")))?;
            if out.len() > MAX_QUERY_REQUEST_BYTES {
                return Err(invalid(format!(
                    "query request over {MAX_QUERY_REQUEST_BYTES} bytes once decompressed"
                )));
            }
            Ok(Bytes::from(out))
        }
        Some(other) => Err(unimplemented(format!("content encoding {other:?}"))),
    }
}

/// Milliseconds (0: unbounded, as Pyroscope reads a missing range) to an
/// inclusive range of nanoseconds.
fn range(start_ms: i64, end_ms: i64) -> (i64, i64) {
    let start = if start_ms <= 0 {
        i64::MIN
    } else {
        start_ms.saturating_mul(1_000_000)
    };
    let end = if end_ms <= 0 {
        i64::MAX
    } else {
        end_ms.saturating_mul(1_000_000)
    };
    (start, end)
}

fn label_query(
    tenant: &str,
    matchers: &[String],
    start_ms: i64,
    end_ms: i64,
) -> Result<LabelQuery, ApiError> {
    let selectors = matchers
        .iter()
        .filter(|m| !m.trim().is_empty())
        .map(|m| Selector::parse(m).map_err(|e| invalid(format!("matcher {m:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let (start, end) = range(start_ms, end_ms);
    Ok(LabelQuery {
        tenant: tenant.to_string(),
        selectors,
        start,
        end,
    })
}

/// A profile type ID split into Pyroscope's message.
fn profile_type(id: &str) -> ProfileType {
    let parts: Vec<&str> = id.split(':').collect();
    let part = |i: usize| parts.get(i).copied().unwrap_or_default().to_string();
    ProfileType {
        id: id.to_string(),
        name: part(0),
        sample_type: part(1),
        sample_unit: part(2),
        period_type: part(3),
        period_unit: part(4),
    }
}

pub(crate) async fn select_merge_stacktraces(
    state: &AppState,
    tenant: &str,
    settings: &Settings,
    req: &SelectMergeStacktracesRequest,
) -> Result<FlameGraph, ApiError> {
    with_flame_graph(state, tenant, settings, req, flame_graph).await
}

/// The merged stacks in the format asked for: a flame graph, or the tree
/// bytes when the format is `TREE`.
async fn stacktraces(
    state: &AppState,
    tenant: &str,
    settings: &Settings,
    req: &SelectMergeStacktracesRequest,
) -> Result<(Option<FlameGraph>, Vec<u8>), ApiError> {
    if req.format == ProfileFormat::Tree as i32 {
        let tree = with_flame_graph(state, tenant, settings, req, tree_bytes).await?;
        Ok((None, tree))
    } else {
        let graph = with_flame_graph(state, tenant, settings, req, flame_graph).await?;
        Ok((Some(graph), Vec::new()))
    }
}

/// Refuses the selectors Ember does not serve yet, rather than answering as
/// if they were absent.
fn unserved_selectors(
    stack_trace: bool,
    profile_ids: &[String],
    trace_ids: &[String],
) -> Result<(), ApiError> {
    if stack_trace || !profile_ids.is_empty() || !trace_ids.is_empty() {
        return Err(unimplemented(
            "stack trace, profile id and trace id selectors are not served yet",
        ));
    }
    Ok(())
}

/// The request's flame graph laid out by `layout`: run as `flamegraph()`,
/// or `span_flamegraph()` when the request selects spans, with the same
/// checks, but without SQL around it.
async fn with_flame_graph<R: Send>(
    state: &AppState,
    tenant: &str,
    settings: &Settings,
    req: &SelectMergeStacktracesRequest,
    layout: impl FnOnce(Frame<'_>) -> Result<R, String> + Send,
) -> Result<R, ApiError> {
    unserved_selectors(
        req.stack_trace_selector.is_some(),
        &req.profile_id_selector,
        &req.trace_id_selector,
    )?;
    let max_nodes = max_nodes(req.max_nodes)?;
    let (start, end) = time_range_ms(req.start, req.end);
    let spans = if req.span_selector.is_empty() {
        None
    } else {
        let spans = req.span_selector.join(",");
        ember_sql::flamegraph::parse_span_ids(&spans)
            .map_err(|e| invalid(format!("span_selector: {e}")))?;
        Some(spans)
    };
    let call = FlameGraphCall {
        profile_type: req.profile_type_id.clone(),
        selector: selector_or_all(&req.label_selector).to_string(),
        start,
        end,
        max_nodes,
        spans,
    };
    state
        .engine
        .flame_graph(tenant, settings, call, layout)
        .await
        .map_err(|e| query_error(&e))?
        .map_err(|e| connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))
}

pub(crate) async fn diff(
    state: &AppState,
    tenant: &str,
    settings: &Settings,
    left: &SelectMergeStacktracesRequest,
    right: &SelectMergeStacktracesRequest,
) -> Result<FlameGraphDiff, ApiError> {
    if left.profile_type_id != right.profile_type_id {
        return Err(invalid("profile types must match"));
    }
    let max_nodes = max_nodes(left.max_nodes.or(right.max_nodes))?;
    let side = |req: &SelectMergeStacktracesRequest| {
        let (start, end) = time_range_ms(req.start, req.end);
        FlameGraphCall {
            profile_type: req.profile_type_id.clone(),
            selector: selector_or_all(&req.label_selector).to_string(),
            start,
            end,
            max_nodes,
            spans: None,
        }
    };
    let frame = state
        .engine
        .diff_flame_graph(tenant, settings, side(left), side(right))
        .await
        .map_err(|e| query_error(&e))?;
    flame_graph_diff(std::slice::from_ref(&frame))
        .map_err(|e| connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))
}

/// `max_nodes` as Pyroscope reads it: absent or 0 is the default.
fn max_nodes(requested: Option<i64>) -> Result<i64, ApiError> {
    match requested {
        None | Some(0) => Ok(ember_sql::flamegraph::DEFAULT_MAX_NODES as i64),
        Some(n) if n < 0 => Err(invalid(format!("max_nodes {n} is negative"))),
        Some(n) => Ok(n),
    }
}

/// A request's `[start, end]` in epoch milliseconds, an end of 0 meaning
/// no end.
pub(crate) fn time_range_ms(start: i64, end: i64) -> (i64, i64) {
    let end = if end <= 0 { i64::MAX / 1_000_000 } else { end };
    (start.max(0), end)
}

fn selector_or_all(selector: &str) -> &str {
    if selector.trim().is_empty() {
        "{}"
    } else {
        selector
    }
}

async fn select_merge_profile(
    state: &AppState,
    tenant: &str,
    settings: &Settings,
    req: &SelectMergeProfileRequest,
) -> Result<Vec<u8>, ApiError> {
    unserved_selectors(
        req.stack_trace_selector.is_some(),
        &req.profile_id_selector,
        &req.trace_id_selector,
    )?;
    let (start, end) = time_range_ms(req.start, req.end);
    let call = FlameGraphCall {
        profile_type: req.profile_type_id.clone(),
        selector: selector_or_all(&req.label_selector).to_string(),
        start,
        end,
        max_nodes: max_nodes(req.max_nodes)?,
        spans: None,
    };
    state
        .engine
        .merged_profile(tenant, settings, call)
        .await
        .map_err(|e| query_error(&e))
}

pub(crate) async fn select_series(
    state: &AppState,
    tenant: &str,
    settings: &Settings,
    req: SelectSeriesRequest,
) -> Result<Vec<Series>, ApiError> {
    if req.stack_trace_selector.is_some() {
        return Err(unimplemented("stack trace selectors are not served yet"));
    }
    if !(req.step.is_finite() && req.step > 0.0 && req.step < 1e10) {
        return Err(invalid(format!(
            "step {} must be a positive number of seconds",
            req.step
        )));
    }
    let selector = Selector::parse(selector_or_all(&req.label_selector))
        .map_err(|e| invalid(format!("label_selector: {e}")))?;
    let (start, end) = time_range_ms(req.start, req.end);
    let aggregation = match req.aggregation {
        None | Some(0) => Aggregation::Sum,
        Some(1) => Aggregation::Average,
        Some(other) => return Err(invalid(format!("aggregation {other} is unknown"))),
    };
    let limit = match req.limit {
        None | Some(0) => None,
        Some(n) => Some(usize::try_from(n).map_err(|_| invalid(format!("limit {n} is negative")))?),
    };
    let q = SeriesQuery {
        selection: ProfileSelection {
            tenant: tenant.to_string(),
            profile_type: req.profile_type_id,
            selector,
            start: start.saturating_mul(1_000_000),
            end: end.saturating_mul(1_000_000),
        },
        step_nanos: (req.step * 1e9).round() as i64,
        group_by: req.group_by,
        aggregation,
        limit,
    };
    q.check().map_err(invalid)?;
    let series = state
        .engine
        .select_series(&q, settings)
        .await
        .map_err(|e| query_error(&e))?;
    Ok(series
        .into_iter()
        .map(|s| Series {
            labels: s
                .labels
                .into_iter()
                .map(|(name, value)| LabelPair { name, value })
                .collect(),
            points: s
                .points
                .into_iter()
                .map(|p| Point {
                    value: p.value,
                    timestamp: p.time_ms,
                })
                .collect(),
        })
        .collect())
}

/// A query error as Connect reports it: the client's mistakes are
/// `invalid_argument`, exhausted memory `resource_exhausted`.
fn query_error(e: &ember_sql::SqlError) -> ApiError {
    use ember_sql::ErrorKind;
    let text = e.to_string();
    match e.kind() {
        ErrorKind::ResourceExhausted => connect_error(
            StatusCode::TOO_MANY_REQUESTS,
            "resource_exhausted",
            format!("query exceeds the memory limit: {text}"),
        ),
        ErrorKind::DeadlineExceeded => {
            connect_error(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded", text)
        }
        ErrorKind::InvalidArgument => invalid(text),
        ErrorKind::Internal => connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", text),
    }
}

/// Depth-first flame graph rows laid out as Pyroscope's levels: per bar
/// and per side (one, or left and right for a diff), the x offset from the
/// end of the previous bar on that level, the total and the self value;
/// then the index of the bar's name. Level 0 is the root, `names[0]` its
/// name ("total").
struct Levels<'a, const SIDES: usize> {
    names: Vec<String>,
    /// Borrowed from the frame: a name costs an allocation once, not per bar.
    name_index: foldhash::HashMap<&'a str, i64>,
    levels: Vec<Level>,
    /// Per depth and side: where the last bar ended.
    last_end: Vec<[i64; SIDES]>,
    /// Per depth and side: where the next child of the last bar there starts.
    child_x: Vec<[i64; SIDES]>,
    max_self: i64,
}

impl<'a, const SIDES: usize> Levels<'a, SIDES> {
    fn new() -> Self {
        Self {
            names: Vec::new(),
            name_index: foldhash::HashMap::default(),
            levels: Vec::new(),
            last_end: Vec::new(),
            child_x: Vec::new(),
            max_self: 0,
        }
    }

    /// The index of `name` in `names`, numbered in the order first seen.
    /// Rows from the tree carry that number already (the tree numbers names
    /// in the same order), so only a frame's labels are hashed here.
    fn name(&mut self, name: &'a str, number: Option<u32>) -> Result<i64, String> {
        let next = self.names.len();
        match number.map(|n| n as usize) {
            Some(n) if n < next => Ok(n as i64),
            Some(n) if n == next => {
                self.names.push(name.to_string());
                Ok(n as i64)
            }
            Some(n) => Err(format!("name number {n} skips past {next}")),
            None => Ok(*self.name_index.entry(name).or_insert_with(|| {
                self.names.push(name.to_string());
                next as i64
            })),
        }
    }

    /// Adds the next row: its depth, name index and (total, self) per side.
    fn push(&mut self, depth: usize, index: i64, sides: [(i64, i64); SIDES]) -> Result<(), String> {
        if depth > self.levels.len() || (depth == 0) != self.levels.is_empty() {
            return Err(format!(
                "a row at level {depth} is out of depth-first order"
            ));
        }
        let mut x = [0; SIDES];
        if depth > 0 {
            x = self.child_x[depth - 1];
            for (side, (total, _)) in sides.iter().enumerate() {
                self.child_x[depth - 1][side] += total;
            }
        }
        self.child_x.truncate(depth);
        self.child_x.push(x);
        if depth == self.levels.len() {
            self.levels.push(Level::default());
            self.last_end.push([0; SIDES]);
        }
        let values = &mut self.levels[depth].values;
        for (side, (total, own)) in sides.iter().enumerate() {
            values.extend([x[side] - self.last_end[depth][side], *total, *own]);
            self.last_end[depth][side] = x[side] + total;
            self.max_self = self.max_self.max(*own);
        }
        values.push(index);
        Ok(())
    }
}

fn int_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::Int64Array, String> {
    b.column_by_name(name)
        .map(|c| c.as_primitive::<Int64Type>())
        .ok_or_else(|| format!("flame graph frame without {name}"))
}

fn label_column(b: &RecordBatch) -> Result<&arrow::array::StringArray, String> {
    b.column_by_name("label")
        .map(|c| c.as_string::<i32>())
        .ok_or_else(|| "flame graph frame without label".to_string())
}

/// Grafana's flame graph frame (`level`, `value`, `self`, `label`, depth
/// first, children by name) as Pyroscope's `FlameGraph`: level 0 is
/// `[0, total, self, 0]` with `names[0] = "total"`.
pub fn flame_graph(frame: Frame<'_>) -> Result<FlameGraph, String> {
    let mut levels = Levels::<1>::new();
    let mut total = 0;
    frame.for_each_row(|row| {
        if row.depth == 0 {
            total = row.total;
        }
        let name = levels.name(row.label, row.name)?;
        levels.push(row.depth, name, [(row.total, row.own)])
    })?;
    Ok(FlameGraph {
        names: levels.names,
        levels: levels.levels,
        total,
        max_self: levels.max_self,
    })
}

/// The flame graph frame as Pyroscope's tree bytes (the `TREE` format):
/// nodes in pre-order, each as varints `name length`, the name, `self`,
/// `child count`, from a nameless root whose children are the frame's
/// level-1 nodes.
pub fn tree_bytes(frame: Frame<'_>) -> Result<Vec<u8>, String> {
    let mut rows: Vec<(usize, &str, i64)> = Vec::new();
    frame.for_each_row(|row| {
        rows.push((row.depth, row.label, row.own));
        Ok(())
    })?;
    // Children per row: the rows one level deeper before the next row at
    // the same level or above.
    let mut children = vec![0u64; rows.len()];
    let mut open: Vec<usize> = Vec::new();
    for (i, (depth, _, _)) in rows.iter().enumerate() {
        open.truncate(*depth);
        if let Some(&parent) = open.last() {
            children[parent] += 1;
        }
        open.push(i);
    }
    let mut out = Vec::new();
    for (i, (depth, name, own)) in rows.iter().enumerate() {
        let name = if *depth == 0 { "" } else { name };
        let own = if *depth == 0 { 0 } else { *own };
        prost::encoding::encode_varint(name.len() as u64, &mut out);
        out.extend_from_slice(name.as_bytes());
        prost::encoding::encode_varint(own.max(0) as u64, &mut out);
        prost::encoding::encode_varint(children[i], &mut out);
    }
    Ok(out)
}

/// The diff frame (`value`/`self` left, `valueRight`/`selfRight`) as
/// Pyroscope's `FlameGraphDiff`: seven numbers per bar, each side's x
/// offsets delta encoded on their own.
pub fn flame_graph_diff(batches: &[RecordBatch]) -> Result<FlameGraphDiff, String> {
    let mut levels = Levels::<2>::new();
    let (mut left_ticks, mut right_ticks) = (0, 0);
    for b in batches {
        let (level, value, own) = (
            int_column(b, "level")?,
            int_column(b, "value")?,
            int_column(b, "self")?,
        );
        let (value_r, own_r) = (int_column(b, "valueRight")?, int_column(b, "selfRight")?);
        let label = label_column(b)?;
        for i in 0..b.num_rows() {
            let depth = usize::try_from(level.value(i)).map_err(|e| e.to_string())?;
            if depth == 0 {
                (left_ticks, right_ticks) = (value.value(i), value_r.value(i));
            }
            let name = levels.name(label.value(i), None)?;
            levels.push(
                depth,
                name,
                [
                    (value.value(i), own.value(i)),
                    (value_r.value(i), own_r.value(i)),
                ],
            )?;
        }
    }
    Ok(FlameGraphDiff {
        names: levels.names,
        levels: levels.levels,
        total: left_ticks + right_ticks,
        max_self: levels.max_self,
        left_ticks,
        right_ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use std::sync::Arc;

    fn frame(rows: &[(i64, i64, i64, &str)]) -> RecordBatch {
        RecordBatch::try_from_iter([
            (
                "level",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as _,
            ),
            (
                "value",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))) as _,
            ),
            (
                "self",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))) as _,
            ),
            (
                "label",
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))) as _,
            ),
        ])
        .unwrap()
    }

    /// (x, total, self, name) of every bar, offsets decoded as Grafana does.
    fn bars(g: &FlameGraph) -> Vec<Vec<(i64, i64, i64, String)>> {
        g.levels
            .iter()
            .map(|l| {
                let mut end = 0;
                l.values
                    .chunks(4)
                    .map(|v| {
                        let x = end + v[0];
                        end = x + v[1];
                        (x, v[1], v[2], g.names[v[3] as usize].clone())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_depth_first_frame_becomes_delta_encoded_levels() {
        // total 11: gc 1; main 10 = a 5 (x 3, self 2) + b 5.
        let g = flame_graph(Frame::Batches(&[frame(&[
            (0, 11, 0, "total"),
            (1, 1, 1, "gc"),
            (1, 10, 0, "main"),
            (2, 5, 2, "a"),
            (3, 3, 3, "x"),
            (2, 5, 5, "b"),
        ])]))
        .unwrap();
        assert_eq!(g.names[0], "total");
        assert_eq!(g.levels[0].values, vec![0, 11, 0, 0]);
        assert_eq!((g.total, g.max_self), (11, 5));
        let s = |x: &str| x.to_string();
        assert_eq!(
            bars(&g),
            vec![
                vec![(0, 11, 0, s("total"))],
                vec![(0, 1, 1, s("gc")), (1, 10, 0, s("main"))],
                vec![(1, 5, 2, s("a")), (6, 5, 5, s("b"))],
                vec![(1, 3, 3, s("x"))],
            ]
        );
        // Offsets are relative to the previous bar's end on the level.
        assert_eq!(g.levels[2].values, vec![1, 5, 2, 3, 0, 5, 5, 5]);
    }

    #[test]
    fn the_tree_lays_out_as_its_frame_does_for_every_fixture() {
        use ember_distributor::formats::pprof::FlatProfile;
        use ember_distributor::normalise::{normalise, validate_labels, Destination};
        use ember_sql::flamegraph::{stack_tree, FlameTree, NodeSources};

        let dest = Destination {
            tenant: "t".into(),
            labels: validate_labels(vec![("service_name".into(), "svc".into())]).unwrap(),
            received_at_nanos: 1_700_000_000_000_000_000,
            limits: Default::default(),
        };
        let mut checked = 0;
        for (name, bytes) in ember_fixtures::pprof_fixtures() {
            let Ok(raw) =
                ember_distributor::formats::pprof::maybe_gunzip(&bytes, 64 << 20, "pprof")
            else {
                continue;
            };
            let Ok(flat) = FlatProfile::decode(&raw) else {
                continue;
            };
            for p in normalise(&flat, &dest).unwrap() {
                let (nodes, values) = stack_tree(std::slice::from_ref(&p));
                // Small enough that the larger fixtures fold into `other`.
                let tree = FlameTree::build(NodeSources::of(&nodes), &values, 512).unwrap();
                let frame = [tree.frame().unwrap()];
                assert_eq!(
                    flame_graph(Frame::Tree(&tree)).unwrap(),
                    flame_graph(Frame::Batches(&frame)).unwrap(),
                    "{name} {}",
                    p.profile_type
                );
                assert_eq!(
                    tree_bytes(Frame::Tree(&tree)).unwrap(),
                    tree_bytes(Frame::Batches(&frame)).unwrap()
                );
                let g = flame_graph(Frame::Tree(&tree)).unwrap();
                assert_eq!(g.response_bytes(), response(g.clone()), "{name}");
                checked += 1;
            }
        }
        assert!(checked > 10, "only {checked} fixture profiles checked");
    }

    /// What prost writes for the flame graph answer.
    fn response(g: FlameGraph) -> Vec<u8> {
        let response = SelectMergeStacktracesResponse {
            flamegraph: Some(g),
            tree: Vec::new(),
        };
        response.encode_to_vec()
    }

    #[test]
    fn a_flame_graph_answer_encodes_as_prost_does_with_empty_parts() {
        let mut g = FlameGraph {
            names: vec!["total".into(), String::new()],
            levels: vec![
                Level {
                    values: vec![0, 300, -1, 0],
                },
                Level::default(),
                Level {
                    values: vec![i64::MIN, i64::MAX, 0, 1],
                },
            ],
            total: 300,
            max_self: -1,
        };
        assert_eq!(g.response_bytes(), response(g.clone()));
        (g.total, g.max_self) = (0, 0);
        assert_eq!(g.response_bytes(), response(g.clone()));
        assert_eq!(
            FlameGraph::default().response_bytes(),
            response(FlameGraph::default())
        );
    }

    /// Reads tree bytes back as Pyroscope's `UnmarshalTree` does: a stack
    /// of parents, each pushed once per child. Returns `a;b` -> self.
    fn read_tree(b: &[u8]) -> std::collections::BTreeMap<String, i64> {
        let mut buf = b;
        let mut parents: Vec<Vec<String>> = vec![Vec::new()];
        let mut first = true;
        let mut out = std::collections::BTreeMap::new();
        while let Some(parent) = parents.pop() {
            let len = prost::encoding::decode_varint(&mut buf).unwrap() as usize;
            let name = String::from_utf8(buf[..len].to_vec()).unwrap();
            buf = &buf[len..];
            let own = prost::encoding::decode_varint(&mut buf).unwrap() as i64;
            let kids = prost::encoding::decode_varint(&mut buf).unwrap();
            let mut path = parent.clone();
            if !first {
                path.push(name);
            }
            first = false;
            if own > 0 {
                *out.entry(path.join(";")).or_default() += own;
            }
            for _ in 0..kids {
                parents.push(path.clone());
            }
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn tree_bytes_read_back_as_pyroscope_reads_them() {
        let bytes = tree_bytes(Frame::Batches(&[frame(&[
            (0, 11, 0, "total"),
            (1, 1, 1, "gc"),
            (1, 10, 0, "main"),
            (2, 5, 2, "a"),
            (3, 3, 3, "x"),
            (2, 5, 5, "b"),
        ])]))
        .unwrap();
        // The nameless root with its two children comes first.
        assert_eq!(&bytes[..3], &[0, 0, 2]);
        let got = read_tree(&bytes);
        let want: std::collections::BTreeMap<String, i64> =
            [("gc", 1), ("main;a", 2), ("main;a;x", 3), ("main;b", 5)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(got, want);
        assert!(tree_bytes(Frame::Batches(&[frame(&[
            (0, 1, 0, "total"),
            (2, 1, 1, "a")
        ])]))
        .is_err());
    }

    #[test]
    fn a_frame_out_of_order_is_an_error() {
        assert!(flame_graph(Frame::Batches(&[frame(&[(1, 1, 1, "a")])])).is_err());
        assert!(flame_graph(Frame::Batches(&[frame(&[
            (0, 1, 0, "total"),
            (2, 1, 1, "a")
        ])]))
        .is_err());
    }
}
