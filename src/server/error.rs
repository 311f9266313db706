//! The HTTP layer's errors and their one mapping to status codes and OpenAI error bodies:
//! `{"error": {"message", "type", "param", "code"}}`.

use super::wire::{ErrorBody, ErrorObject, to_value};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::engine::{EngineError, EngineFailure};
use crate::model::ModelError;

/// Why the server could not start (before it takes any request).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the API keys file {path}: {message}")]
    ApiKeys { path: String, message: String },
    #[error("no device to serve on")]
    NoDevice,
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is missing, of the wrong type or out of range.
    #[error("{message}")]
    InvalidParam { param: Option<String>, message: String },
    /// A known OpenAI parameter this server does not implement.
    #[error("{message}")]
    Unsupported { param: String, message: String },
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed for this route")]
    MethodNotAllowed,
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("unsupported content type `{0}`: send the body as JSON with `Content-Type: application/json`")]
    UnsupportedMediaType(String),
    #[error("the server is at capacity; retry shortly")]
    Overloaded,
    /// The server cannot take work now (shutting down, not ready, no worker).
    #[error("{0}")]
    Unavailable(String),
    #[error("the request did not finish within the server's deadline of {0} s; its work was cancelled")]
    Timeout(u64),
    /// A missing or wrong API key.
    #[error("{0}")]
    Unauthorized(String),
    /// A failure inside the server: its details are logged with a request id, and the client
    /// gets a generic message and the id.
    #[error("{0}")]
    Internal(String),
}

impl From<crate::generate::FieldError> for ApiError {
    fn from(e: crate::generate::FieldError) -> Self {
        ApiError::InvalidParam { param: Some(e.field), message: e.message }
    }
}

impl ApiError {
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidParam { param: Some(param.to_string()), message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidParam { param: None, message: message.into() }
    }

    pub fn shutting_down() -> Self {
        ApiError::Unavailable("the server is shutting down and takes no new requests".into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParam { .. } | ApiError::Unsupported { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object. An internal error is logged here, under a new request id that
    /// the client gets instead of the details.
    pub fn body(&self) -> serde_json::Value {
        if let ApiError::Internal(detail) = self {
            let request_id = format!("req-{}", super::state::unique_id());
            tracing::error!(%request_id, %detail, "request failed");
            let message =
                format!("internal server error (request id {request_id}); the details are in the server's log");
            let error = ErrorObject {
                message,
                kind: "server_error",
                param: None,
                code: Some("internal_error"),
                request_id: Some(request_id),
            };
            return to_value(ErrorBody { error });
        }
        let (kind, param, code) = match self {
            ApiError::InvalidParam { param, .. } => ("invalid_request_error", param.clone(), None),
            ApiError::Unsupported { param, .. } => {
                ("invalid_request_error", Some(param.clone()), Some("unsupported_parameter"))
            }
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model".to_string()), Some("model_not_found")),
            ApiError::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
            ApiError::MethodNotAllowed => ("invalid_request_error", None, Some("method_not_allowed")),
            ApiError::PayloadTooLarge(_) => ("invalid_request_error", None, Some("payload_too_large")),
            ApiError::UnsupportedMediaType(_) => ("invalid_request_error", None, Some("unsupported_media_type")),
            ApiError::Overloaded => ("server_overloaded", None, Some("queue_full")),
            ApiError::Unavailable(_) => ("server_error", None, Some("unavailable")),
            ApiError::Timeout(_) => ("server_error", None, Some("timeout")),
            ApiError::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            ApiError::Internal(_) => ("server_error", None, Some("internal_error")),
        };
        to_value(ErrorBody { error: ErrorObject { message: self.to_string(), kind, param, code, request_id: None } })
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::QueueFull => ApiError::Overloaded,
            EngineError::Unavailable => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<EngineFailure> for ApiError {
    fn from(failure: EngineFailure) -> Self {
        ApiError::Internal(failure.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, ApiError::Overloaded) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
