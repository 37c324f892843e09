//! The distributor's front end: Pyroscope's push API
//! (`push.v1.PusherService/Push` over Connect, protobuf or JSON, and gRPC),
//! the legacy `/ingest` (pprof, folded stacks, JFR, ...), and OTLP
//! profiles over HTTP and gRPC. Each request is decoded off the executor
//! and answered once its profiles are durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use ember_api::connect::{connect_error, header_str, request_tenant, ApiError};
use ember_engine::profile::now_nanos;
use ember_engine::Authenticator;

use crate::formats::jfr::JfrBody;
use crate::formats::legacy::{
    multipart_fields, multipart_profile, Format, IngestBody, IngestParams,
};
use crate::formats::otlp::OtlpBody;
use crate::formats::push::PushBody;
use crate::formats::{BodyEncoding, WireFormat};
use crate::metrics::PushMetrics;
use crate::{Distributor, IngestError};

/// What the push routes share.
#[derive(Clone)]
pub struct PushState {
    pub distributor: Arc<Distributor>,
    pub auth: Arc<Authenticator>,
    pub metrics: PushMetrics,
}

/// The push routes.
pub fn router(state: PushState) -> Router {
    Router::new()
        .route("/push.v1.PusherService/Push", post(push))
        .route("/ingest", post(ingest))
        .route("/v1development/profiles", post(otlp_export))
        .route(
            "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export",
            post(otlp_export),
        )
        .with_state(state)
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        let (status, code) = match &e {
            IngestError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "resource_exhausted"),
            IngestError::Storage(_) | IngestError::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            IngestError::Overloaded(_) | IngestError::RateLimited(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted")
            }
            IngestError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            IngestError::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_denied"),
            _ => (StatusCode::BAD_REQUEST, "invalid_argument"),
        };
        connect_error(status, code, e.to_string())
    }
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
async fn push(State(state): State<PushState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    if ember_api::grpc::is_grpc(&headers) {
        let result = push_grpc(&state, &headers, body).await;
        return finish(
            &state,
            "push",
            started,
            result.map(|()| false),
            true,
            |_| {
                // `push.v1.PushResponse` has no fields.
                ember_api::grpc::response(Ok(Bytes::new()))
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
    state: &PushState,
    api: &str,
    started: Instant,
    result: Result<bool, IngestError>,
    grpc: bool,
    ok: impl FnOnce(bool) -> Response,
) -> Response {
    state
        .metrics
        .pushes
        .get_or_create(&PushMetrics::api(api))
        .inc();
    match result {
        Ok(json) => {
            state
                .metrics
                .push_seconds
                .get_or_create(&PushMetrics::api(api))
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
                ember_api::grpc::response(Err(ApiError::from(e)))
            } else {
                ApiError::from(e).into_response()
            }
        }
    }
}

/// A gRPC push: the framed `PushRequest`, its gzip (when the message is
/// compressed) inflated under the same bound as a Connect body's.
async fn push_grpc(state: &PushState, headers: &HeaderMap, body: Body) -> Result<(), IngestError> {
    let max_request_bytes = state.distributor.limits().max_request_bytes;
    let tenant = request_tenant(&state.auth, headers)?;
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
    state: &PushState,
    headers: &HeaderMap,
    body: Body,
) -> Result<bool, IngestError> {
    let max_request_bytes = state.distributor.limits().max_request_bytes;
    let tenant = request_tenant(&state.auth, headers)?;
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
async fn otlp_export(State(state): State<PushState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let grpc = ember_api::grpc::is_grpc(&headers);
    let result = otlp_inner(&state, &headers, body, grpc).await;
    finish(&state, "otlp", started, result, grpc, |json| {
        // An empty `ExportProfilesServiceResponse`: nothing was rejected.
        if grpc {
            ember_api::grpc::response(Ok(Bytes::new()))
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
    state: &PushState,
    headers: &HeaderMap,
    body: Body,
    grpc: bool,
) -> Result<bool, IngestError> {
    let max_request_bytes = state.distributor.limits().max_request_bytes;
    let tenant = request_tenant(&state.auth, headers)?;
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
    ember_api::grpc::request_frame(headers, body, max_request_bytes)
        .await
        .map_err(|e| match e {
            ember_api::grpc::FrameError::TooLarge { size, limit } => {
                IngestError::TooLarge { size, limit }
            }
            ember_api::grpc::FrameError::Status(e) => IngestError::Unsupported(e.message),
        })
}

async fn ingest(
    State(state): State<PushState>,
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
    state: &PushState,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), IngestError> {
    let max_request_bytes = state.distributor.limits().max_request_bytes;
    let tenant = request_tenant(&state.auth, headers)?;
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
    state: &PushState,
    body: impl WireFormat,
    tenant: &str,
) -> Result<(), IngestError> {
    let (profiles, _inflight) = state.distributor.decode(body, tenant, now_nanos()).await?;
    state.metrics.profiles.inc_by(profiles.len() as u64);
    state.distributor.push(profiles).await
}
