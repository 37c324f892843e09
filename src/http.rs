//! The HTTP port: the distributor's push routes and the query front end's
//! routes on one router, with health and metrics.

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ember_distributor::http::PushState;
use ember_query_frontend::QueryState;
use prometheus_client::registry::Registry;

/// Every route of a serving process.
pub fn router(push: PushState, query: QueryState, registry: Arc<Registry>) -> Router {
    ember_distributor::http::router(push)
        .merge(ember_query_frontend::router(query))
        .merge(health_router(registry))
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
