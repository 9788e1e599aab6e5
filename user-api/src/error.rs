//! [`ApiError`], the one error type every handler returns, and the extractors ([`ApiJson`], [`ApiPath`],
//! [`ApiQuery`], derived over axum's own with `#[from_request(via(..), rejection(ApiError))]`, and
//! [`OptionalJson`]) whose rejections become it, so every error body has the same shape.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::error;
use utoipa::ToSchema;

/// An API failure: an HTTP status, a stable machine-readable code, a message safe to show to clients, and
/// (for 5xx) the internal detail that is logged but never sent.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    internal: Option<String>,
    retry_after_secs: Option<u64>,
    hook_code: Option<i32>,
}

impl ApiError {
    /// An error with a status, a code and a client-facing message.
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            internal: None,
            retry_after_secs: None,
            hook_code: None,
        }
    }

    /// 400 `invalid_argument`: a field failed validation; `message` names it.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// 400 `bad_request`: the request could not be parsed.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 413 `payload_too_large`: a body over the limit.
    pub(crate) fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body too large",
        )
    }

    /// 401 with `code`.
    pub(crate) fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 403 with `code`.
    pub(crate) fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 404 with `code`.
    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409 with `code`.
    pub(crate) fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 429 `rate_limited` with a `Retry-After` of `secs`.
    pub(crate) fn rate_limited(secs: u64) -> Self {
        ApiError {
            retry_after_secs: Some(secs.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many attempts; retry later",
            )
        }
    }

    /// 500 `internal`; `detail` is logged, not sent.
    pub(crate) fn internal(detail: impl std::fmt::Display) -> Self {
        ApiError {
            internal: Some(detail.to_string()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }

    /// 503 `unavailable`; `detail` is logged, not sent.
    pub(crate) fn unavailable(detail: impl std::fmt::Display) -> Self {
        ApiError {
            internal: Some(detail.to_string()),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "a dependency is unavailable; retry later",
            )
        }
    }

    /// 503 `unavailable` with `message` (what to do next, e.g. retry with the same `client_msg_id`);
    /// `detail` is logged, not sent.
    pub(crate) fn unavailable_with(
        message: impl Into<String>,
        detail: impl std::fmt::Display,
    ) -> Self {
        ApiError {
            internal: Some(detail.to_string()),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    /// 403 `hook_rejected`: the app backend's before-send hook refused the message with its own `code`
    /// and `text`.
    pub(crate) fn hook_rejected(code: i32, text: impl Into<String>) -> Self {
        ApiError {
            hook_code: Some(code),
            ..Self::new(StatusCode::FORBIDDEN, "hook_rejected", text)
        }
    }

    /// The same error with a more specific code.
    pub(crate) fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// Storage failures the handler did not expect: the backend is down (503) or returned bad data (500).
/// Expected kinds (`NotFound`, `Conflict`) are matched at the call site, where their meaning is known.
impl From<zhibo_store::Error> for ApiError {
    fn from(e: zhibo_store::Error) -> Self {
        match e.kind {
            zhibo_store::ErrorKind::Unavailable => ApiError::unavailable(e),
            _ => ApiError::internal(e),
        }
    }
}

/// The error body: `{"error": {"code": "...", "message": "..."}}` (and `hook_code` with `hook_rejected`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// The error.
    pub(crate) error: ErrorDetail,
}

/// A code to branch on and a message to show.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable machine-readable code, e.g. `user_not_found`.
    pub(crate) code: String,
    /// Human-readable explanation.
    pub(crate) message: String,
    /// With `hook_rejected` only: the app backend's own code from its before-send hook answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) hook_code: Option<i32>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The one place a 5xx is logged, so each is logged exactly once.
        if self.status.is_server_error() {
            error!(
                status = self.status.as_u16(),
                code = self.code,
                error = self.internal.as_deref().unwrap_or(&self.message),
                "request failed"
            );
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                hook_code: self.hook_code,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A JSON body whose rejection (bad JSON, not an object, wrong content type, too large) is an
/// [`ApiError`]; also the JSON response wrapper.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json_type);
        if !json {
            return Err(ApiError::bad_request(
                "Expected request with `Content-Type: application/json`",
            ));
        }
        let body = object_body(req, state).await?;
        let axum::Json(value) = axum::Json::<T>::from_bytes(&body)?;
        Ok(ApiJson(value))
    }
}

/// `application/json`, or a `+json` type, any parameters after.
fn is_json_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The request's body (too large: 413), refused unless it is empty or starts a JSON object. Every body
/// is documented as an object; serde would also fill a struct from an array, by position (outside
/// audit: `["nick", null, "extra"]` updated a profile).
async fn object_body<S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<axum::body::Bytes, ApiError> {
    let body = axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|e| body_rejection(e.status(), e.body_text()))?;
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => Ok(body),
        Some(_) => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        body_rejection(rejection.status(), rejection.body_text())
    }
}

/// A body axum refused: too large (413), or unreadable / not the JSON expected (400 with axum's text,
/// which says which field or position is wrong, and nothing about the server).
fn body_rejection(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::payload_too_large();
    }
    ApiError::bad_request(text)
}

/// An optional JSON body: `None` when the body is empty, otherwise like [`ApiJson`] (the content type is
/// not checked, so `curl -X POST` without a body works).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OptionalJson<T>(pub(crate) Option<T>);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = object_body(req, state).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        serde_json::from_slice(&body)
            .map(|v| OptionalJson(Some(v)))
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Path parameters whose rejection is a 400 [`ApiError`].
#[derive(Debug, Clone, Copy, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub(crate) struct ApiPath<T>(pub(crate) T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request(rejection.body_text())
    }
}

/// A query string whose rejection is a 400 [`ApiError`].
#[derive(Debug, Clone, Copy, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(rejection.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_has_code_and_hides_internal_detail() {
        let response = ApiError::unavailable("redis at 10.0.0.7 refused").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
        assert!(text.contains(r#""code":"unavailable""#), "{text}");
        assert!(!text.contains("10.0.0.7"), "internal detail leaked: {text}");
    }

    #[test]
    fn rate_limited_sets_retry_after() {
        let response = ApiError::rate_limited(0).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
