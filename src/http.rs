//! What every process serves on its HTTP port, whatever its roles: health
//! and metrics (the distributor's and the query frontend's routes join
//! them where those roles run).

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// Why this process cannot serve its roles yet, if it cannot.
pub type Readiness = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Health and metrics: `/ready` answers 503 with the reason until
/// `readiness` has none.
pub fn health_router(registry: Arc<Registry>, readiness: Readiness) -> Router {
    Router::new()
        .route(
            "/ready",
            get(move || {
                let not_ready = readiness();
                async move {
                    match not_ready {
                        None => (StatusCode::OK, "ready\n".to_string()),
                        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                    }
                }
            }),
        )
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
