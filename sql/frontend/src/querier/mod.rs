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

use ember_api::connect::{connect_error, header_str, invalid, request_tenant, ApiError};

use crate::QueryState;

mod diff;
mod levels;
mod select_merge_profile;
mod select_merge_stacktraces;
mod select_series;

pub(crate) use diff::diff;
use ember_api::{querier::v1 as querier_v1, types::v1 as types_v1};
use levels::{flame_graph, flame_graph_diff, tree_bytes};
use select_merge_profile::select_merge_profile;
pub(crate) use select_merge_stacktraces::select_merge_stacktraces;
use select_merge_stacktraces::stacktraces;
pub(crate) use select_series::select_series;

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
            Codec::Json => {
                ember_api::json::from_json(body).map_err(|e| invalid(format!("request body: {e}")))
            }
        }
    }

    fn encode<M: Message + Serialize>(self, message: &M) -> Result<Bytes, ApiError> {
        match self {
            Codec::Proto => Ok(Bytes::from(message.encode_to_vec())),
            Codec::Json => ember_api::json::to_json(message)
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
                let profile =
                    ember_api::google::v1::Profile::decode(&profile[..]).map_err(|e| {
                        connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                    })?;
                self.encode(&profile)
            }
        }
    }
}

/// `POST /querier.v1.QuerierService/{method}`, over Connect or gRPC.
pub async fn handle(
    State(state): State<QueryState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let grpc = ember_api::grpc::is_grpc(&headers);
    let result = async {
        let tenant = request_tenant(&state.auth, &headers)?;
        let settings =
            Settings::from_headers(|name| header_str(&headers, name)).map_err(invalid)?;
        let (codec, message) = if grpc {
            let message =
                ember_api::grpc::request_message(&headers, body, MAX_QUERY_REQUEST_BYTES).await?;
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
        return ember_api::grpc::response(result.map(|(_, reply)| reply));
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
    state: &QueryState,
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
                .await
                .map_err(|e| query_error(&e))?
                .iter()
                .map(|id| profile_type(id))
                .collect();
            codec.encode(&ProfileTypesResponse { profile_types })
        }
        "LabelNames" => {
            let req = codec.decode::<LabelNamesRequest>(body)?;
            let q = label_query(tenant, &req.matchers, req.start, req.end)?;
            let names = state
                .engine
                .label_names(&q)
                .await
                .map_err(|e| query_error(&e))?;
            codec.encode(&LabelNamesResponse { names })
        }
        "LabelValues" => {
            let req = codec.decode::<LabelValuesRequest>(body)?;
            let q = label_query(tenant, &req.matchers, req.start, req.end)?;
            let names = state
                .engine
                .label_values(&req.name, &q)
                .await
                .map_err(|e| query_error(&e))?;
            codec.encode(&LabelValuesResponse { names })
        }
        "Series" => {
            let req = codec.decode::<SeriesRequest>(body)?;
            let q = label_query(tenant, &req.matchers, req.start, req.end)?;
            // Projected on `label_names`, distinct series can become one.
            let sets: std::collections::BTreeSet<ember_engine::Labels> = state
                .engine
                .series_labels(&q)
                .await
                .map_err(|e| query_error(&e))?
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
            let bounds = state
                .engine
                .profile_time_bounds(tenant)
                .await
                .map_err(|e| query_error(&e))?;
            let stats = match bounds {
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

/// A query error as Connect reports it: the client's mistakes are
/// `invalid_argument`, exhausted memory `resource_exhausted`.
pub(crate) fn query_error(e: &ember_sql::SqlError) -> ApiError {
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
        ErrorKind::Unavailable => {
            connect_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", text)
        }
        ErrorKind::Internal => connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", text),
    }
}
