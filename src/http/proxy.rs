//! The proxy API: the provider-shaped endpoints applications call, and the lease API. The
//! client-key guard in front of them is in [`super::guard`]. The routes pick the provider (by
//! model, or by endpoint) and hand the call to the request path
//! ([`crate::proxy::RequestPath`]); they turn what it answers into responses and decide nothing
//! else.

use super::Guards;
use super::error::ApiError;
use super::extract::{Json, Path, Query, read_bytes};
use crate::domain::ReservationId;
use crate::providers::exchange::{self as format, BodyError};
use crate::providers::wire::Peek;
use crate::providers::{Format, Provider, Registry};
use crate::proxy::{
    AnswerBody, Call, Forwarded, Lease, LeaseInput, PathError, ReportInput, Reported, RequestPath,
};
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// Largest request body the proxy takes (prompts may carry images).
pub const MAX_PROXY_BODY: usize = 32 * 1024 * 1024;

type AppResult<T> = Result<T, ApiError>;

/// A JSON object body of up to [`MAX_PROXY_BODY`] bytes: the fields the request path reads,
/// and its bytes, forwarded as they came unless something in them must change.
pub struct ProxyBody(pub Peek, pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ProxyBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_bytes(req, state, MAX_PROXY_BODY).await?;
        // Peek skips what it does not read, and skipped strings are not checked for UTF-8.
        if let Err(e) = std::str::from_utf8(&bytes) {
            return Err(ApiError::bad_request(
                "invalid_json",
                format!("The body is not valid JSON: it is not UTF-8 ({e})"),
            ));
        }
        match Peek::read(&bytes) {
            Ok(peek) => Ok(ProxyBody(peek, bytes)),
            Err(e) => Err(PathError::Body(BodyError::from(e)).into()),
        }
    }
}

/// The response for what the request path answered a forwarded call.
fn respond(forwarded: Result<Forwarded, PathError>) -> Response {
    let forwarded = match forwarded {
        Ok(f) => f,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (body, streamed) = match forwarded.body {
        AnswerBody::Whole(bytes) => (Body::from(bytes), false),
        AnswerBody::Stream(tapped) => (Body::from_stream(tapped), true),
    };
    let mut response = Response::new(body);
    *response.status_mut() = forwarded.status;
    *response.headers_mut() = forwarded.headers;
    if streamed {
        response
            .headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    response
}

fn provider_of(registry: &Registry, name: &str) -> AppResult<Arc<Provider>> {
    registry.get(name).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unknown_provider",
            format!("Provider {name} is not configured"),
        )
    })
}

pub async fn chat_completions(
    State(path): State<RequestPath>,
    headers: HeaderMap,
    ProxyBody(peek, raw): ProxyBody,
) -> Response {
    let Some(model) = peek.model() else {
        return ApiError::bad_request("invalid_body", "The body needs a `model`").into_response();
    };
    let Some((provider, upstream_model)) = path.registry().route_openai(model) else {
        return ApiError::not_found(
            "unknown_model",
            format!("No configured provider serves model `{model}`"),
        )
        .into_response();
    };
    // A `provider/` prefix is stripped; otherwise the body goes on as it came.
    let raw = if upstream_model == model {
        raw
    } else {
        let model = serde_json::to_string(upstream_model).expect("a string serializes");
        match format::rewrite(&raw, "model", &model) {
            Ok(body) => body,
            Err(e) => return ApiError::from(PathError::Body(e)).into_response(),
        }
    };
    let call = Call {
        pass_headers: format::pass_headers(provider.format, &headers),
        provider: provider.clone(),
        path: "/chat/completions".into(),
        stream: peek.stream(),
        peek,
        raw,
    };
    respond(path.forward(call).await)
}

pub async fn messages(
    State(path): State<RequestPath>,
    headers: HeaderMap,
    ProxyBody(peek, raw): ProxyBody,
) -> Response {
    let provider = match provider_of(path.registry(), "claude") {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let call = Call {
        pass_headers: format::pass_headers(provider.format, &headers),
        provider,
        path: "/v1/messages".into(),
        stream: peek.stream(),
        peek,
        raw,
    };
    respond(path.forward(call).await)
}

#[derive(Debug, Deserialize)]
pub struct GeminiQuery {
    alt: Option<String>,
}

/// A model name that stays one path segment under `/models/` upstream. The router decodes
/// `%2F` and `%3F`, so without this a client could send a pooled credential to any path or
/// query on the provider's host (`../files`, `x?alt=sse`).
fn plain_model(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= 256
        && !model.contains("..")
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

pub async fn gemini(
    State(path): State<RequestPath>,
    Path(model_action): Path<String>,
    Query(q): Query<GeminiQuery>,
    ProxyBody(peek, raw): ProxyBody,
) -> Response {
    let Some((model, action)) = model_action.rsplit_once(':') else {
        return ApiError::not_found(
            "not_found",
            "Use models/{model}:generateContent or :streamGenerateContent",
        )
        .into_response();
    };
    let stream = match action {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => {
            return ApiError::not_found(
                "not_found",
                format!("Unsupported Gemini method `{action}`"),
            )
            .into_response();
        }
    };
    if !plain_model(model) {
        return ApiError::bad_request(
            "invalid_model",
            "A Gemini model name is letters, digits, `-`, `.` and `_`",
        )
        .into_response();
    }
    let provider = match provider_of(path.registry(), "gemini") {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut target = format!("/models/{model}:{action}");
    if let Some(alt) = q
        .alt
        .filter(|a| a.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        target.push_str(&format!("?alt={alt}"));
    }
    let call = Call {
        pass_headers: Vec::new(),
        provider,
        path: target,
        peek,
        raw,
        stream,
    };
    respond(path.forward(call).await)
}

/// `GET /v1/models`: the model patterns of the enabled OpenAI-format providers, and each as
/// `provider/*` (an explicit prefix routes any model to that provider).
pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let mut data = Vec::new();
    for p in state
        .registry
        .all()
        .filter(|p| p.enabled && p.format == Format::Openai)
    {
        for m in &p.models {
            data.push(json!({"id": m, "object": "model", "created": 0, "owned_by": p.name}));
        }
        data.push(json!({"id": format!("{}/*", p.name), "object": "model", "created": 0, "owned_by": p.name}));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Leases hand out the token itself, so they need a client key, even from loopback: with no
/// `api_keys` any local process could take a token in clear.
fn leases_allowed(guards: &Guards) -> AppResult<()> {
    if !guards.clients.has_keys() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "leases_need_client_key",
            "Leases hand out the credential itself, so they need a client key: configure api_keys",
        ));
    }
    Ok(())
}

pub async fn lease(
    State(path): State<RequestPath>,
    State(guards): State<Arc<Guards>>,
    body: Result<Json<LeaseInput>, ApiError>,
) -> AppResult<Response> {
    leases_allowed(&guards)?;
    let Json(input) = body?;
    let lease = path.lease(input).await?;
    Ok((StatusCode::CREATED, lease_answer(&lease)).into_response())
}

/// A lease as its holder reads it, on leasing and on renewal alike. The token is in clear here
/// and nowhere else: this body is not logged.
fn lease_answer(lease: &Lease) -> axum::Json<serde_json::Value> {
    axum::Json(json!({
        "lease_id": lease.id,
        "credential_id": lease.credential_id,
        "provider": lease.provider.name,
        "token": lease.token.expose(),
        "base_url": lease.base_url,
        "expires_at": crate::domain::rfc3339(lease.expires_at),
        "token_expires_at": lease.token_expires_at.map(crate::domain::rfc3339),
    }))
}

/// `POST /v1/credentials/lease/{lease_id}/renew`: the body, if any, is not read.
pub async fn renew(
    State(path): State<RequestPath>,
    State(guards): State<Arc<Guards>>,
    lease_id: Result<Path<String>, ApiError>,
) -> AppResult<Response> {
    leases_allowed(&guards)?;
    let Path(lease_id) = lease_id?;
    let lease = path.renew(&ReservationId::from(lease_id)).await?;
    Ok(lease_answer(&lease).into_response())
}

pub async fn report(
    State(path): State<RequestPath>,
    State(guards): State<Arc<Guards>>,
    lease_id: Result<Path<String>, ApiError>,
    body: Result<Json<ReportInput>, ApiError>,
) -> AppResult<Response> {
    leases_allowed(&guards)?;
    let (Path(lease_id), Json(input)) = (lease_id?, body?);
    let lease_id = ReservationId::from(lease_id);
    let body = match path.report(&lease_id, input).await? {
        Reported::Released => json!({"lease_id": lease_id, "released": true}),
        Reported::Settled { tokens_used } => {
            json!({"lease_id": lease_id, "settled": true, "tokens_used": tokens_used})
        }
    };
    Ok(axum::Json(body).into_response())
}
