//! Extractors whose rejections are our JSON error: a body parser that names the field at
//! fault and accepts a JSON body whatever its content type (curl's `-d` sends a form type),
//! and a query parser that does the same. Bodies are read within the listener's limits.

use super::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

/// Largest body we read, everywhere.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Read a body (at most [`MAX_BODY_BYTES`]) and parse it as JSON of any shape.
async fn read_json<S: Send + Sync>(req: Request, state: &S) -> Result<serde_json::Value, ApiError> {
    let bytes = read_bytes(req, state, MAX_BODY_BYTES).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "The request body is empty; send JSON",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("The body is not valid JSON: {e}"))
    })
}

/// A JSON object body, deserialized with errors that name their field.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = read_json(req, state).await?;
        if !value.is_object() {
            return Err(ApiError::bad_request(
                "invalid_body",
                "The body must be a JSON object",
            ));
        }
        crate::import::from_value(value)
            .map(Json)
            .map_err(|e| ApiError::bad_request("invalid_body", format!("Invalid body: {e}")))
    }
}

/// A JSON body of any shape (the bulk import takes an object or an array).
pub struct JsonValue(pub serde_json::Value);

impl<S: Send + Sync> FromRequest<S> for JsonValue {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_json(req, state).await.map(JsonValue)
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
