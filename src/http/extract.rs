//! Extractors whose rejections are our JSON error: a body parser that names the field at
//! fault and accepts a JSON body whatever its content type (curl's `-d` sends a form type),
//! and a query parser that does the same. Bodies are read within the listener's limits.

use super::error::ApiError;
use crate::providers::json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

/// Largest body we read, everywhere.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Read a body (at most [`MAX_BODY_BYTES`]) that holds JSON, checked whole without building
/// it (so a bad one is `invalid_json` wherever its fault is).
async fn read_json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let bytes = read_bytes(req, state, MAX_BODY_BYTES).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "The request body is empty; send JSON",
        ));
    }
    match json::not_an_object(&bytes) {
        Some(e) => Err(ApiError::bad_request(
            "invalid_json",
            format!("The body is not valid JSON: {e}"),
        )),
        None => Ok(bytes),
    }
}

/// A JSON object body, deserialized straight into `T` (never through a `serde_json::Value`,
/// which takes tens of times the body's size), with errors that name their field.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_json_bytes(req, state).await?;
        if !json::is_object(&bytes) {
            return Err(ApiError::bad_request(
                "invalid_body",
                "The body must be a JSON object",
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        deserialize_body(&mut de).map(Json)
    }
}

/// Deserialize a body with `de`; a failure is 400 `invalid_body` naming the field at fault.
pub(super) fn deserialize_body<'de, T: serde::Deserialize<'de>>(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'de>>,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if path == "." || path.is_empty() {
            format!("Invalid body: {inner}")
        } else {
            format!("Invalid body: {path}: {inner}")
        };
        ApiError::bad_request("invalid_body", message)
    })
}

/// A JSON body of any shape (the bulk import takes an object or an array), as a
/// `serde_json::Value`. Such a value can take tens of times the body's size, so one is held
/// at a time across the server: the turn is taken before the body is built and given back
/// when the handler drops the extractor, so at most one [`MAX_BODY_BYTES`] body's tree lives.
pub struct JsonValue(pub serde_json::Value, pub Turn);

/// A turn at holding a body built into a JSON tree (see [`JsonValue`]).
pub struct Turn(#[allow(dead_code)] tokio::sync::SemaphorePermit<'static>);

impl<S: Send + Sync> FromRequest<S> for JsonValue {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
        let bytes = read_json_bytes(req, state).await?;
        let turn = ONE_AT_A_TIME
            .acquire()
            .await
            .map_err(|e| ApiError::internal(&e))?;
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("The body is not valid JSON: {e}"))
        })?;
        Ok(JsonValue(value, Turn(turn)))
    }
}

/// Read a whole body of at most `limit` bytes, within the listener's budget and deadline
/// (see [`super::body`]).
pub async fn read_bytes<S: Send + Sync>(
    req: Request,
    _state: &S,
    limit: usize,
) -> Result<Bytes, ApiError> {
    super::body::read(req, limit).await
}

/// Query parameters, with errors that name the parameter.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let message = if path == "." {
                    format!("Invalid query: {inner}")
                } else {
                    format!("Invalid query parameter `{path}`: {inner}")
                };
                ApiError::bad_request("invalid_query", message)
            })
    }
}

/// A path parameter, with our error when it is not valid (bad percent-encoding, not UTF-8).
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|rej| {
                ApiError::bad_request("invalid_path", format!("Invalid path: {}", rej.body_text()))
            })
    }
}
