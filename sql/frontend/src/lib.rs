//! The query front ends: Pyroscope's `querier.v1` over Connect (protobuf
//! and JSON) and gRPC (`querier/`, one file per method), and the render
//! API Grafana's older data source reads (`render.rs`). Each request is one
//! typed call to the query engine; none builds SQL text.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use ember_engine::Authenticator;
use ember_sql::QueryEngine;

mod querier;
mod render;

pub use render::parse_time;

/// What the query routes share.
#[derive(Clone)]
pub struct QueryState {
    pub engine: Arc<QueryEngine>,
    pub auth: Arc<Authenticator>,
}

/// The query routes.
pub fn router(state: QueryState) -> Router {
    Router::new()
        .route("/querier.v1.QuerierService/{method}", post(querier::handle))
        .route("/pyroscope/render", get(render::render))
        .route("/pyroscope/render-diff", get(render::render_diff))
        .route("/pyroscope/label-values", get(render::label_values))
        .route("/pyroscope/labels", get(render::labels))
        .with_state(state)
}
