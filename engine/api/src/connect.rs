//! What every HTTP front end shares (push, the query API, the render API,
//! gRPC on the same port): the request's tenant, and the one error type
//! whose status and Connect body say why.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ember_engine::{AuthError, Authenticator};

/// A refused request: the status and a Connect error body, whose `message`
/// says why.
#[derive(Debug)]
pub struct ApiError {
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

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, code) = match &e {
            AuthError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            AuthError::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_denied"),
            AuthError::InvalidTenant(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
        };
        connect_error(status, code, e.to_string())
    }
}

/// A Connect error: the status, the code and why.
pub fn connect_error(
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
pub fn invalid(message: impl Into<String>) -> ApiError {
    connect_error(StatusCode::BAD_REQUEST, "invalid_argument", message)
}

pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The request's tenant: its credentials' when authentication is on, else
/// the one `X-Scope-OrgID` names.
pub fn request_tenant(auth: &Authenticator, headers: &HeaderMap) -> Result<String, AuthError> {
    let tenant = auth.tenant(
        header_str(headers, "authorization"),
        header_str(headers, "x-scope-orgid"),
    )?;
    Ok(tenant.into_string())
}
