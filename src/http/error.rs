//! The one error type at the HTTP edge and its JSON shape:
//! `{"error": {"code": "snake_case_code", "message": "human sentence"}}`.
//! Internal faults are logged with their cause and answered with a generic message.

use crate::providers::exchange::BodyError;
use crate::proxy::PathError;
use crate::store::{StoreError, Unavailable};
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

impl From<PathError> for ApiError {
    /// The request path's errors: its sentence with the status and code each means here.
    fn from(e: PathError) -> Self {
        let (status, code) = match &e {
            PathError::UnknownProvider(_) => (StatusCode::BAD_REQUEST, "unknown_provider"),
            PathError::ProviderDisabled(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "provider_disabled")
            }
            PathError::Unavailable { why, .. } => match why {
                Unavailable::NoCredentials => (StatusCode::SERVICE_UNAVAILABLE, "no_credentials"),
                Unavailable::Busy { retry_after, .. } => {
                    let (status, code) = (StatusCode::TOO_MANY_REQUESTS, "credentials_busy");
                    return ApiError::new(status, code, e.to_string()).retry_after(*retry_after);
                }
                Unavailable::Exhausted => (StatusCode::TOO_MANY_REQUESTS, "credentials_exhausted"),
                Unavailable::Unusable => (StatusCode::SERVICE_UNAVAILABLE, "no_usable_credentials"),
            },
            PathError::Unreachable { .. } => (StatusCode::BAD_GATEWAY, "provider_unreachable"),
            PathError::LocationRefused { .. } => {
                (StatusCode::BAD_GATEWAY, "provider_location_refused")
            }
            PathError::NoneSucceeded(_) | PathError::CutShort => {
                (StatusCode::BAD_GATEWAY, "upstream_failed")
            }
            PathError::Body(BodyError::NotJson(_)) => (StatusCode::BAD_REQUEST, "invalid_json"),
            PathError::Body(BodyError::NotAnObject | BodyError::Invalid(_))
            | PathError::InvalidReport(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            PathError::InvalidPath => (StatusCode::BAD_REQUEST, "invalid_path"),
            PathError::LeaseNotFound => (StatusCode::NOT_FOUND, "lease_not_found"),
            PathError::LeaseCredentialUnusable(status) => {
                let code = "lease_credential_unusable";
                return ApiError::new(StatusCode::CONFLICT, code, e.to_string())
                    .with("status", *status);
            }
            PathError::Store(_) | PathError::Task(_) => return fault(e),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// A fault of the request path's own (its store, its task): logged, answered generically.
fn fault(e: PathError) -> ApiError {
    match e {
        PathError::Store(e) => ApiError::from(e),
        other => ApiError::internal(&other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ProviderName;
    use crate::upstream::Cause;

    #[test]
    fn path_errors_answer_their_sentence_with_their_status_and_code() {
        let provider = || ProviderName::from("claude");
        let unavailable = |why| PathError::Unavailable {
            provider: provider(),
            why,
        };
        let busy = Unavailable::Busy {
            retry_after: 7,
            in_flight: false,
        };
        let cases = [
            (
                PathError::UnknownProvider(provider().into_string()),
                400,
                "unknown_provider",
            ),
            (
                PathError::ProviderDisabled(provider()),
                503,
                "provider_disabled",
            ),
            (
                unavailable(Unavailable::NoCredentials),
                503,
                "no_credentials",
            ),
            (unavailable(busy), 429, "credentials_busy"),
            (
                unavailable(Unavailable::Exhausted),
                429,
                "credentials_exhausted",
            ),
            (
                unavailable(Unavailable::Unusable),
                503,
                "no_usable_credentials",
            ),
            (
                PathError::Unreachable {
                    provider: provider(),
                    cause: Cause::Refused,
                },
                502,
                "provider_unreachable",
            ),
            (
                PathError::LocationRefused {
                    provider: provider(),
                    reason: "not served in this region".into(),
                },
                502,
                "provider_location_refused",
            ),
            (PathError::NoneSucceeded(provider()), 502, "upstream_failed"),
            (PathError::CutShort, 502, "upstream_failed"),
            (BodyError::NotAnObject.into(), 400, "invalid_body"),
            (
                BodyError::Invalid("`max_tokens` is -1".into()).into(),
                400,
                "invalid_body",
            ),
            (PathError::InvalidPath, 400, "invalid_path"),
            (PathError::InvalidReport("no tokens"), 400, "invalid_body"),
            (PathError::LeaseNotFound, 404, "lease_not_found"),
            (
                PathError::LeaseCredentialUnusable("disabled"),
                409,
                "lease_credential_unusable",
            ),
        ];
        for (e, status, code) in cases {
            let message = e.to_string();
            let answer = ApiError::from(e);
            assert_eq!(
                (answer.status.as_u16(), answer.code, answer.message.as_str()),
                (status, code, message.as_str())
            );
            let retry_after = (code == "credentials_busy").then_some(7);
            assert_eq!(answer.retry_after, retry_after, "{code}");
        }
        let not_json = serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        let answer = ApiError::from(PathError::Body(BodyError::NotJson(not_json)));
        assert_eq!((answer.status.as_u16(), answer.code), (400, "invalid_json"));
        let internal = ApiError::from(PathError::Task("panicked".into()));
        assert_eq!(
            (internal.status.as_u16(), internal.code),
            (500, "internal_error")
        );
    }
}
