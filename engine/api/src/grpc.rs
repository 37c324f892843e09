//! gRPC unary calls on the HTTP port, beside Connect: the same handlers, the
//! same protobuf messages, only the framing differs (a 5-byte prefix on the
//! message, the status in trailers). Pyroscope serves both on one port, and
//! gRPC clients (profilecli's gRPC mode, generated stubs in any language)
//! expect it there. HTTP/2 without TLS is accepted with prior knowledge.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use http_body::Frame;

use crate::connect::{header_str, ApiError};

/// Whether a request is a gRPC call (any content type `application/grpc*`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    header_str(headers, "content-type").is_some_and(|t| t.starts_with("application/grpc"))
}

/// The one message of a unary gRPC request, decompressed.
pub async fn request_message(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let (compressed, message) = request_frame(headers, body, limit).await?;
    if compressed {
        gunzip(&message, limit).map(Bytes::from)
    } else {
        Ok(message)
    }
}

/// Why a request's message was not read.
pub enum FrameError {
    /// Its prefix, or what arrived, says `size` bytes, over the limit.
    TooLarge {
        size: usize,
        limit: usize,
    },
    Status(ApiError),
}

impl From<ApiError> for FrameError {
    fn from(e: ApiError) -> Self {
        FrameError::Status(e)
    }
}

impl From<FrameError> for ApiError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { size, limit } => status(
                "resource_exhausted",
                format!("request message of {size} bytes, over the limit of {limit}"),
            ),
            FrameError::Status(e) => e,
        }
    }
}

/// The one message of a unary gRPC request as sent, and whether it is
/// gzip-compressed (for callers that bound decompression themselves).
pub async fn request_frame(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<(bool, Bytes), FrameError> {
    let content_type = header_str(headers, "content-type").unwrap_or_default();
    if !matches!(content_type, "application/grpc" | "application/grpc+proto") {
        return Err(FrameError::Status(status(
            "unimplemented",
            format!("content type {content_type:?}: gRPC calls are served as protobuf"),
        )));
    }
    let body = prefixed_message(body, limit).await?;
    let (compressed, message) = unframe(&body)?;
    match header_str(headers, "grpc-encoding") {
        _ if !compressed => Ok((false, message)),
        Some("gzip") => Ok((true, message)),
        other => Err(FrameError::Status(status(
            "unimplemented",
            format!("message compression {other:?}: send gzip or no compression"),
        ))),
    }
}

/// The prefix and the message, read as they arrive: a message whose prefix
/// declares more than `limit` bytes is refused once the prefix is in,
/// without waiting for it.
async fn prefixed_message(mut body: Body, limit: usize) -> Result<Bytes, FrameError> {
    use http_body_util::BodyExt;
    let too_large = |size: usize| FrameError::TooLarge { size, limit };
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| status("invalid_argument", format!("request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
        }
        if read.len() >= 5 {
            let declared = u32::from_be_bytes([read[1], read[2], read[3], read[4]]) as usize;
            if declared > limit {
                return Err(too_large(declared));
            }
        }
        if read.len() > limit + 5 {
            return Err(too_large(read.len() - 5));
        }
    }
    Ok(read.freeze())
}

/// Splits `[flag][length u32 BE][message]`; a unary request has exactly one.
fn unframe(body: &Bytes) -> Result<(bool, Bytes), ApiError> {
    let invalid = |why: &str| status("invalid_argument", format!("gRPC framing: {why}"));
    if body.len() < 5 {
        return Err(invalid(
            "the body is shorter than the 5-byte message prefix",
        ));
    }
    let compressed = match body[0] {
        0 => false,
        1 => true,
        flag => return Err(invalid(&format!("unknown flag {flag}"))),
    };
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() - 5 != len {
        return Err(invalid(&format!(
            "the prefix says {len} bytes, the body holds {} (a unary call sends one message)",
            body.len() - 5
        )));
    }
    Ok((compressed, body.slice(5..)))
}

fn gunzip(compressed: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    let mut reader =
        std::io::Read::take(flate2::read::GzDecoder::new(compressed), limit as u64 + 1);
    std::io::Read::read_to_end(&mut reader, &mut out)
        .map_err(|e| status("invalid_argument", format!("gzip message: {e}")))?;
    if out.len() > limit {
        return Err(status(
            "resource_exhausted",
            format!("request message over {limit} bytes once decompressed"),
        ));
    }
    Ok(out)
}

/// The gRPC response of a unary call: the message then `grpc-status: 0`,
/// or, on error, the status alone in the headers ("trailers only").
pub fn response(result: Result<Bytes, ApiError>) -> Response {
    match result {
        Ok(message) => {
            let mut framed = Vec::with_capacity(message.len() + 5);
            framed.push(0);
            framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
            framed.extend_from_slice(&message);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let frames = futures::stream::iter([
                Ok::<_, Infallible>(Frame::data(Bytes::from(framed))),
                Ok(Frame::trailers(trailers)),
            ]);
            let mut response = Response::new(Body::new(http_body_util::StreamBody::new(frames)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(e) => {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::OK;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code_number(e.code)));
            if let Ok(message) = HeaderValue::from_str(&percent_encode(&e.message)) {
                headers.insert("grpc-message", message);
            }
            response
        }
    }
}

fn status(code: &'static str, message: String) -> ApiError {
    ApiError {
        status: StatusCode::OK,
        code,
        message,
    }
}

/// gRPC's number for a Connect code (the names are the same in both).
fn code_number(code: &str) -> u16 {
    match code {
        "canceled" => 1,
        "invalid_argument" => 3,
        "deadline_exceeded" => 4,
        "not_found" => 5,
        "already_exists" => 6,
        "permission_denied" => 7,
        "resource_exhausted" => 8,
        "failed_precondition" => 9,
        "aborted" => 10,
        "out_of_range" => 11,
        "unimplemented" => 12,
        "internal" => 13,
        "unavailable" => 14,
        "data_loss" => 15,
        "unauthenticated" => 16,
        _ => 2,
    }
}

/// `grpc-message` is percent-encoded UTF-8 (printable ASCII except `%`
/// stays as it is).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_framed_message_is_read_and_anything_else_is_refused() {
        let framed = Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]);
        let (compressed, message) = unframe(&framed).unwrap();
        assert!(!compressed);
        assert_eq!(&message[..], &[8, 1]);
        for bad in [&[0u8, 0, 0][..], &[0, 0, 0, 0, 3, 8, 1], &[7, 0, 0, 0, 0]] {
            let e = unframe(&Bytes::copy_from_slice(bad)).unwrap_err();
            assert_eq!(e.code, "invalid_argument", "{bad:?}");
        }
    }

    #[test]
    fn a_compressed_message_over_the_limit_is_refused() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &vec![0u8; 1 << 20]).unwrap();
        let e = gunzip(&gz.finish().unwrap(), 1000).unwrap_err();
        assert_eq!(e.code, "resource_exhausted");
    }

    #[test]
    fn error_messages_are_percent_encoded() {
        assert_eq!(percent_encode("100% é\n"), "100%25 %C3%A9%0A");
        assert_eq!(code_number("unimplemented"), 12);
    }
}
