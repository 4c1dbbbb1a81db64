//! The one error type at the HTTP edge and its JSON shape:
//! `{"error": {"code": "snake_case_code", "message": "human sentence"}}`.
//! Internal faults are logged with their cause and answered with a generic message.

use crate::store::StoreError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra fields inside the `error` object (the existing id of a duplicate, …).
    pub extra: Option<Box<Map<String, Value>>>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra
            .get_or_insert_with(Default::default)
            .insert(key.to_string(), value.into());
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn unknown_provider(provider: &str) -> Self {
        Self::not_found("unknown_provider", format!("Unknown provider `{provider}`"))
    }

    /// A server fault: logged here with its cause, answered without it.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "The server failed to handle the request; the cause is in its log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = Map::new();
        error.insert("code".into(), Value::from(self.code));
        error.insert("message".into(), Value::from(self.message));
        if let Some(extra) = self.extra {
            error.extend(*extra);
        }
        let mut response = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => {
                ApiError::not_found("credential_not_found", "No such credential")
            }
            StoreError::Duplicate { id } => ApiError::new(
                StatusCode::CONFLICT,
                "duplicate_credential",
                format!("This credential already exists as {id}"),
            )
            .with("id", id),
            // Only possible if something rotated the key around the server's lock: nothing
            // was written, and nothing will be until the server starts with the new key.
            StoreError::KeyRotated => {
                tracing::error!(
                    "the encryption key was rotated under this running server; restart it with the new key"
                );
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "key_rotated",
                    "The database's encryption key was rotated under this server; nothing was written. Restart the server with the new key",
                )
            }
            other => ApiError::internal(&other),
        }
    }
}
