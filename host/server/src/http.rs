//! HTTP plumbing: the response body type, OpenAI-style errors, reading a bounded
//! body and answering with JSON.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{header, Response, StatusCode};
use kframe_engine::{EngineError, InvalidRequest};
use serde_json::json;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// A whole body, or server-sent events as a task produces them.
pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// An error as OpenAI's API reports one: a status and
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code: None, message: message.into(), retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or unknown api key: send `Authorization: Bearer <key>`",
        )
        .with_code("invalid_api_key")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message) }
    }

    /// A 500. Its body carries the error's first line only: a candle error can
    /// carry a backtrace (registry paths, the compiler's commit) when
    /// RUST_BACKTRACE is set, and no response ever shows one; the log has it all.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!("internal error: {message}");
        let first = message.lines().next().unwrap_or("internal error").to_owned();
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", first)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn response(&self) -> Response<Body> {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        let mut resp = json_response(self.status, &body);
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        resp
    }
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("a JSON value serializes");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::Full(Some(bytes.into())))
        .expect("a valid response")
}

pub fn text_response(status: StatusCode, content_type: &'static str, text: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::Full(Some(text.into())))
        .expect("a valid response")
}

/// Reads the request body, refusing (413) one over `limit` bytes, whether its
/// Content-Length says so up front or it only turns out so, and giving up (408)
/// on a client that sends too slowly.
pub async fn read_body(req: hyper::Request<Incoming>, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("the body is over {limit} bytes"))
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(req.into_body(), limit);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => {
            Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "the body arrived too slowly"))
        }
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("reading the body: {e}"))),
    }
}

/// The bearer token of `Authorization`, if any. Two `Authorization` headers are a
/// 400: which one a proxy or a client library forwards differs, so neither is
/// taken.
pub fn bearer(req: &hyper::Request<Incoming>) -> Result<Option<&str>, ApiError> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::bad_request("more than one Authorization header"));
    }
    let Ok(value) = value.to_str() else { return Ok(None) };
    let Some((scheme, token)) = value.split_once(' ') else { return Ok(None) };
    Ok(scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()))
}

/// Parses a JSON body into `T`, with serde's message (which names the field).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The HTTP answer to an engine's refusal or failure.
pub fn engine_error(e: EngineError) -> ApiError {
    let msg = e.to_string();
    match e {
        EngineError::Rejected(_) => ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", msg).with_code("admission_rejected")
        },
        EngineError::QueueFull(_) | EngineError::ShutDown => ApiError::unavailable(msg),
        EngineError::OverBudget { needed, budget } if needed > budget => {
            ApiError::bad_request(msg).with_code("context_length_exceeded")
        }
        EngineError::OverBudget { .. } => ApiError::unavailable(msg),
        EngineError::OverQuota { .. } => ApiError::bad_request(msg).with_code("context_length_exceeded"),
        EngineError::TenantBusy { .. } => ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", msg).with_code("tenant_limit")
        },
        EngineError::SessionBusy | EngineError::StaleEpoch { .. } => ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::CONFLICT, "invalid_request_error", msg).with_code("session_busy")
        },
        EngineError::TenantDeleted => ApiError::unauthorized(),
        EngineError::Invalid(InvalidRequest::TooLong { .. }) => {
            ApiError::bad_request(msg).with_code("context_length_exceeded")
        }
        EngineError::Invalid(_) => ApiError::bad_request(msg),
        EngineError::Model(_) => ApiError::internal(msg),
    }
}
