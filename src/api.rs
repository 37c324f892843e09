//! What every HTTP front end shares (push, the query API, the render API,
//! gRPC on the same port): the server's state, the request's tenant, and
//! the one error type whose status and Connect body say why.

use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ember_distributor::Distributor;
use ember_distributor::IngestError;
use ember_engine::Authenticator;
use ember_sql::QueryEngine;
use prometheus_client::registry::Registry;

use crate::metrics::HttpMetrics;

#[derive(Clone)]
pub struct AppState {
    pub distributor: Arc<Distributor>,
    pub engine: Arc<QueryEngine>,
    pub auth: Arc<Authenticator>,
    pub metrics: HttpMetrics,
    pub registry: Arc<Registry>,
}

/// A refused request: the status and a Connect error body, whose `message`
/// says why.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        let (status, code) = match &e {
            IngestError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "resource_exhausted"),
            IngestError::Storage(_) | IngestError::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            IngestError::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
            IngestError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            IngestError::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_denied"),
            _ => (StatusCode::BAD_REQUEST, "invalid_argument"),
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

/// A Connect error: the status, the code and why.
pub(crate) fn connect_error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

/// The client's mistake, and why.
pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    connect_error(StatusCode::BAD_REQUEST, "invalid_argument", message)
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The request's tenant: its credentials' when authentication is on, else
/// the one `X-Scope-OrgID` names.
pub(crate) fn request_tenant(state: &AppState, headers: &HeaderMap) -> Result<String, IngestError> {
    let tenant = state.auth.tenant(
        header_str(headers, "authorization"),
        header_str(headers, "x-scope-orgid"),
    )?;
    Ok(tenant.into_string())
}
