//! The HTTP surface: Pyroscope's push API (Connect unary, proto and JSON),
//! the legacy `/ingest`, Pyroscope's query API (`crate::querier`), health
//! and metrics.

use ember_engine::profile::now_nanos;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ember_distributor::formats::jfr::JfrBody;
use ember_distributor::formats::legacy::IngestBody;
use ember_distributor::formats::legacy::{
    multipart_fields, multipart_profile, Format, IngestParams,
};
use ember_distributor::formats::otlp::OtlpBody;
use ember_distributor::formats::push::PushBody;
use ember_distributor::formats::{BodyEncoding, WireFormat};
use ember_distributor::IngestError;
use prometheus_client::registry::Registry;

use crate::api::{header_str, request_tenant, ApiError, AppState};
use crate::metrics::HttpMetrics;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/push.v1.PusherService/Push", post(push))
        .route("/ingest", post(ingest))
        .route("/v1development/profiles", post(otlp_export))
        .route(
            "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export",
            post(otlp_export),
        )
        .route(
            "/querier.v1.QuerierService/{method}",
            post(crate::querier::handle),
        )
        .route("/pyroscope/render", get(crate::render::render))
        .route("/pyroscope/render-diff", get(crate::render::render_diff))
        .route("/pyroscope/label-values", get(crate::render::label_values))
        .route("/pyroscope/labels", get(crate::render::labels))
        .route("/ready", get(|| async { "ready\n" }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Whether a push body is gzipped, as its `Content-Encoding` says.
fn gzip_body(headers: &HeaderMap) -> Result<bool, IngestError> {
    match header_str(headers, "content-encoding") {
        None => Ok(false),
        Some(e) if e.eq_ignore_ascii_case("identity") => Ok(false),
        Some(e) if e.eq_ignore_ascii_case("gzip") => Ok(true),
        Some(other) => Err(IngestError::Unsupported(format!(
            "content encoding {other:?}"
        ))),
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, IngestError> {
    to_bytes(body, limit).await.map_err(|e| {
        // axum reports an over-limit body as a length-limit error.
        let text = e.to_string();
        if text.contains("length limit") {
            IngestError::TooLarge {
                size: limit + 1,
                limit,
            }
        } else {
            IngestError::Decode {
                what: "request body",
                reason: text,
            }
        }
    })
}

/// `push.v1.PusherService/Push` over Connect (protobuf or JSON) or gRPC.
async fn push(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    if crate::grpc::is_grpc(&headers) {
        let result = push_grpc(&state, &headers, body).await;
        return finish(
            &state,
            "push",
            started,
            result.map(|()| false),
            true,
            |_| {
                // `push.v1.PushResponse` has no fields.
                crate::grpc::response(Ok(Bytes::new()))
            },
        );
    }
    let result = push_inner(&state, &headers, body).await;
    finish(&state, "push", started, result, false, |json| {
        if json {
            ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
        } else {
            ([(header::CONTENT_TYPE, "application/proto")], Bytes::new()).into_response()
        }
    })
}

/// Counts and times a push and answers it: `ok` on success, else the
/// error as the request's protocol carries it.
fn finish(
    state: &AppState,
    api: &str,
    started: Instant,
    result: Result<bool, IngestError>,
    grpc: bool,
    ok: impl FnOnce(bool) -> Response,
) -> Response {
    state
        .metrics
        .pushes
        .get_or_create(&HttpMetrics::api(api))
        .inc();
    match result {
        Ok(json) => {
            state
                .metrics
                .push_seconds
                .get_or_create(&HttpMetrics::api(api))
                .observe(started.elapsed().as_secs_f64());
            ok(json)
        }
        Err(e) => {
            state.metrics.error(e.reason());
            if e.is_client_error() {
                tracing::info!(api, error = %e, "push refused");
            } else {
                tracing::warn!(api, error = %e, "push failed");
            }
            if grpc {
                crate::grpc::response(Err(ApiError::from(e)))
            } else {
                ApiError::from(e).into_response()
            }
        }
    }
}

/// A gRPC push: the framed `PushRequest`, its gzip (when the message is
/// compressed) inflated under the same bound as a Connect body's.
async fn push_grpc(state: &AppState, headers: &HeaderMap, body: Body) -> Result<(), IngestError> {
    let max_request_bytes = state.distributor.limits().max_request_bytes;
    let tenant = request_tenant(state, headers)?;
    let (gzip, message) = grpc_message(headers, body, max_request_bytes).await?;
    state.metrics.push_bytes.inc_by(message.len() as u64);
    let encoding = BodyEncoding { json: false, gzip };
    decode_and_push(
        state,
        PushBody {
            body: message,
            encoding,
        },
        &tenant,
    )
    .await
}

/// Returns whether the request was JSON, to answer in kind.
async fn push_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<bool, IngestError> {
    let max_request_bytes = state.distributor.limits().max_request_bytes;
    let tenant = request_tenant(state, headers)?;
    let content_type = header_str(headers, "content-type").unwrap_or("application/proto");
    let json = content_type.starts_with("application/json");
    if !json
        && !content_type.starts_with("application/proto")
        && !content_type.starts_with("application/x-protobuf")
    {
        return Err(IngestError::Unsupported(format!(
            "content type {content_type:?}: use application/proto or application/json"
        )));
    }
    let gzip = gzip_body(headers)?;
    let body = read_body(body, max_request_bytes).await?;
    state.metrics.push_bytes.inc_by(body.len() as u64);
    let encoding = BodyEncoding { json, gzip };
    decode_and_push(state, PushBody { body, encoding }, &tenant).await?;
    Ok(json)
}

/// OTLP profiles: `POST /v1development/profiles` (protobuf or JSON,
/// optionally gzip), and `ProfilesService/Export` over gRPC.
async fn otlp_export(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let grpc = crate::grpc::is_grpc(&headers);
    let result = otlp_inner(&state, &headers, body, grpc).await;
    finish(&state, "otlp", started, result, grpc, |json| {
        // An empty `ExportProfilesServiceResponse`: nothing was rejected.
        if grpc {
            crate::grpc::response(Ok(Bytes::new()))
        } else if json {
            ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
        } else {
            (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                Bytes::new(),
            )
                .into_response()
        }
    })
}

/// Returns whether the request was JSON, to answer in kind.
async fn otlp_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    grpc: bool,
) -> Result<bool, IngestError> {
    let max_request_bytes = state.distributor.limits().max_request_bytes;
    let tenant = request_tenant(state, headers)?;
    let (body, encoding) = if grpc {
        let (gzip, message) = grpc_message(headers, body, max_request_bytes).await?;
        (message, BodyEncoding { json: false, gzip })
    } else {
        let content_type = header_str(headers, "content-type").unwrap_or_default();
        let json = match content_type.split(';').next().unwrap_or_default().trim() {
            "application/x-protobuf" | "application/protobuf" => false,
            "application/json" => true,
            other => {
                return Err(IngestError::Unsupported(format!(
                    "content type {other:?}: OTLP profiles are application/x-protobuf or application/json"
                )))
            }
        };
        let gzip = gzip_body(headers)?;
        (
            read_body(body, max_request_bytes).await?,
            BodyEncoding { json, gzip },
        )
    };
    state.metrics.push_bytes.inc_by(body.len() as u64);
    decode_and_push(state, OtlpBody { body, encoding }, &tenant).await?;
    Ok(encoding.json)
}

/// A gRPC request's message as sent, and whether it is gzip-compressed.
async fn grpc_message(
    headers: &HeaderMap,
    body: Body,
    max_request_bytes: usize,
) -> Result<(bool, Bytes), IngestError> {
    crate::grpc::request_frame(headers, body, max_request_bytes)
        .await
        .map_err(|e| match e {
            crate::grpc::FrameError::TooLarge { size, limit } => {
                IngestError::TooLarge { size, limit }
            }
            crate::grpc::FrameError::Status(e) => IngestError::Unsupported(e.message),
        })
}

async fn ingest(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = ingest_inner(&state, &query, &headers, body).await;
    finish(
        &state,
        "ingest",
        started,
        result.map(|_| false),
        false,
        |_| StatusCode::OK.into_response(),
    )
}

async fn ingest_inner(
    state: &AppState,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), IngestError> {
    let max_request_bytes = state.distributor.limits().max_request_bytes;
    let tenant = request_tenant(state, headers)?;
    let params = IngestParams::from_query(query)?;
    let content_type = header_str(headers, "content-type")
        .unwrap_or_default()
        .to_string();
    let body = read_body(body, max_request_bytes).await?;
    state.metrics.push_bytes.inc_by(body.len() as u64);
    let multipart = content_type.starts_with("multipart/form-data");
    if query.get("format").is_some_and(|f| f == "jfr") {
        // pyroscope-java: the recording alone, or multipart with its
        // context labels beside it.
        let (recording, labels) = if multipart {
            let mut parts = multipart_fields(&content_type, body, &["jfr", "labels"]).await?;
            let recording = parts.remove("jfr").ok_or_else(|| {
                IngestError::Invalid("multipart body has no \"jfr\" field".into())
            })?;
            (recording, parts.remove("labels"))
        } else {
            (body, None)
        };
        let body = JfrBody {
            params,
            recording,
            labels,
        };
        return decode_and_push(state, body, &tenant).await;
    }
    let (format, body) = if multipart {
        (Format::Pprof, multipart_profile(&content_type, body).await?)
    } else {
        let format = Format::parse(query.get("format").map(String::as_str).or(
            // Agents that send pprof without a format say so by type.
            (content_type == "binary/octet-stream").then_some("pprof"),
        ))?;
        (format, body)
    };
    let body = IngestBody {
        params,
        format,
        body,
    };
    decode_and_push(state, body, &tenant).await
}

/// Decodes a request and returns once its profiles are durable; the
/// request's share of the in-flight budget is held until then.
async fn decode_and_push(
    state: &AppState,
    body: impl WireFormat,
    tenant: &str,
) -> Result<(), IngestError> {
    let (profiles, _inflight) = state.distributor.decode(body, tenant, now_nanos()).await?;
    state.metrics.profiles.inc_by(profiles.len() as u64);
    state.distributor.push(profiles).await
}

async fn metrics(State(state): State<AppState>) -> Response {
    encoded_metrics(&state.registry)
}

/// The routes of a process that serves no API: health and metrics only
/// (a compaction worker of its own).
pub fn health_router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/ready", get(|| async { "ready\n" }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { encoded_metrics(&registry) }
            }),
        )
}

fn encoded_metrics(registry: &Registry) -> Response {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
