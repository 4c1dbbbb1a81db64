//! The proxy API (contract section 7): the provider-shaped endpoints applications call and the
//! lease API. The client-key guard in front of them is in [`super::guard`].

use super::Guards;
use super::error::ApiError;
use super::extract::{Json, Path, Query, read_bytes};
use crate::providers::wire::Peek;
use crate::providers::{Format, Provider};
use crate::proxy::{self, Call};
use crate::quota::RequestTokens;
use crate::state::AppState;
use crate::store::{Mark, ReservationKind, ReserveRequest};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Duration;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// Largest request body the proxy takes (prompts may carry images).
pub const MAX_PROXY_BODY: usize = 32 * 1024 * 1024;
/// How long a lease lasts before it is settled at its reservation.
const LEASE_MINUTES: i64 = 10;

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
            Err(e) => Err(proxy::unusable_body(e)),
        }
    }
}

/// Client headers an upstream of `format` may need (never a key).
fn pass_headers(format: Format, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let names: &[&str] = match format {
        Format::Anthropic => &["anthropic-version", "anthropic-beta"],
        _ => &[],
    };
    names
        .iter()
        .filter_map(|n| {
            headers
                .get(*n)
                .map(|v| (HeaderName::from_static(n), v.clone()))
        })
        .collect()
}

fn provider_of(state: &AppState, name: &str) -> AppResult<Arc<Provider>> {
    state.registry.get(name).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unknown_provider",
            format!("Provider {name} is not configured"),
        )
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ProxyBody(peek, raw): ProxyBody,
) -> Response {
    let Some(model) = peek.model() else {
        return ApiError::bad_request("invalid_body", "The body needs a `model`").into_response();
    };
    let Some((provider, upstream_model)) = state.registry.route_openai(model) else {
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
        match proxy::rewrite(&raw, "model", &model) {
            Ok(body) => body,
            Err(e) => return e.into_response(),
        }
    };
    let call = Call {
        pass_headers: pass_headers(provider.format, &headers),
        provider: provider.clone(),
        path: "/chat/completions".into(),
        stream: peek.stream(),
        peek,
        raw,
    };
    proxy::forward(state, call).await
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ProxyBody(peek, raw): ProxyBody,
) -> Response {
    let provider = match provider_of(&state, "claude") {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let call = Call {
        pass_headers: pass_headers(provider.format, &headers),
        provider,
        path: "/v1/messages".into(),
        stream: peek.stream(),
        peek,
        raw,
    };
    proxy::forward(state, call).await
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
    State(state): State<Arc<AppState>>,
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
    let provider = match provider_of(&state, "gemini") {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut path = format!("/models/{model}:{action}");
    if let Some(alt) = q
        .alt
        .filter(|a| a.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        path.push_str(&format!("?alt={alt}"));
    }
    let call = Call {
        pass_headers: Vec::new(),
        provider,
        path,
        peek,
        raw,
        stream,
    };
    proxy::forward(state, call).await
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseInput {
    provider: String,
    estimated_tokens: Option<RequestTokens>,
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
    State(state): State<Arc<AppState>>,
    State(guards): State<Arc<Guards>>,
    body: Result<Json<LeaseInput>, ApiError>,
) -> AppResult<Response> {
    leases_allowed(&guards)?;
    let Json(input) = body?;
    let provider = state
        .registry
        .get(&input.provider)
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request(
                "unknown_provider",
                format!("Unknown provider `{}`", input.provider),
            )
        })?;
    if !provider.enabled {
        return Err(proxy::provider_disabled(&provider.name));
    }
    let config = &state.config.config;
    let tokens = input
        .estimated_tokens
        .map_or(config.auth.quota.default_reservation, RequestTokens::get);
    let expires_at = state.now() + Duration::minutes(LEASE_MINUTES);
    let mut tried = Vec::new();
    for _ in 0..config.proxy.max_attempts {
        let req = ReserveRequest {
            provider: &provider.name,
            tokens,
            strategy: config.auth.selection_strategy,
            exclude: &tried,
            kind: ReservationKind::Lease,
            expires_at: Some(expires_at),
        };
        let r = match state
            .store
            .reserve_waiting(&req, || state.now(), proxy::ROOM_PATIENCE)
            .await?
        {
            Ok(r) => r,
            Err(why) => return Err(proxy::unavailable(&provider.name, why)),
        };
        let held = proxy::Held::new(&state, &r, &provider.name);
        match state.store.open_token(&r.credential_id).await? {
            Ok(token) => {
                held.keep();
                let body = json!({
                    "lease_id": r.id,
                    "credential_id": r.credential_id,
                    "provider": provider.name,
                    "token": token.expose(),
                    "base_url": provider.base_url,
                    "expires_at": crate::domain::rfc3339(expires_at),
                });
                return Ok((StatusCode::CREATED, axum::Json(body)).into_response());
            }
            Err(reason) => {
                held.release(Some(Mark::Invalid(reason)), " for a lease")
                    .await?;
                tried.push(r.credential_id);
            }
        }
    }
    Err(proxy::unavailable(
        &provider.name,
        crate::store::Unavailable::Unusable,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportInput {
    tokens_used: Option<RequestTokens>,
    input_tokens: Option<RequestTokens>,
    output_tokens: Option<RequestTokens>,
    error_status: Option<u16>,
    /// Seconds, as the provider's `Retry-After` said; past a day it counts as a day.
    retry_after: Option<u64>,
    /// The provider's error body as it came (text), read as the proxy reads the answers it
    /// gets itself: what it says about the credential (exhausted until a date, a region
    /// block, an overload) decides the mark, not the status alone.
    error_body: Option<String>,
}

pub async fn report(
    State(state): State<Arc<AppState>>,
    State(guards): State<Arc<Guards>>,
    lease_id: Result<Path<String>, ApiError>,
    body: Result<Json<ReportInput>, ApiError>,
) -> AppResult<Response> {
    leases_allowed(&guards)?;
    let (Path(lease_id), Json(input)) = (lease_id?, body?);
    let Some((credential_id, provider)) = state.store.lease(&lease_id).await? else {
        return Err(ApiError::not_found(
            "lease_not_found",
            "No such lease, or it was already reported or expired",
        ));
    };
    if input.error_body.is_some() && input.error_status.is_none() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "error_body comes with the error_status it was answered with",
        ));
    }
    if let Some(status) = input.error_status {
        let status = StatusCode::from_u16(status).map_err(|_| {
            ApiError::bad_request("invalid_body", "error_status is not an HTTP status")
        })?;
        // From here the lease is released, even if reading the report were to fail.
        let lease = crate::store::Reservation {
            id: lease_id.clone(),
            credential_id,
            tokens: 0,
        };
        let held = proxy::Held::new(&state, &lease, &provider);
        let format = state
            .registry
            .get(&provider)
            .map(|p| p.format)
            .unwrap_or(Format::Openai);
        let mut headers = HeaderMap::new();
        if let Some(secs) = input.retry_after {
            let secs = secs.min(crate::providers::classify::MAX_RETRY_AFTER.as_secs());
            headers.insert(reqwest::header::RETRY_AFTER, secs.into());
        }
        let body = input.error_body.as_deref().unwrap_or("").as_bytes();
        let verdict =
            crate::providers::classify::classify_at(format, status, &headers, body, state.now());
        // The same verdicts as a proxied request's: only the credential's own failure marks
        // it; an overload, a region block or the client's own error marks nothing.
        let mark = proxy::mark_for(&verdict, state.now());
        held.release(mark, " by a lease report").await?;
        return Ok(axum::Json(json!({"lease_id": lease_id, "released": true})).into_response());
    }
    let count = |t: Option<RequestTokens>| t.map_or(0, RequestTokens::get);
    let usage = match (input.tokens_used, input.input_tokens, input.output_tokens) {
        (Some(t), None, None) => crate::providers::wire::Usage::reported(0, t.get()),
        (None, i, o) if i.is_some() || o.is_some() => {
            crate::providers::wire::Usage::reported(count(i), count(o))
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "Report tokens_used (or input_tokens and output_tokens), or error_status",
            ));
        }
    };
    if !state
        .store
        .settle(&lease_id, usage, false, state.now())
        .await?
    {
        return Err(ApiError::not_found(
            "lease_not_found",
            "No such lease, or it was already reported or expired",
        ));
    }
    Ok(
        axum::Json(json!({"lease_id": lease_id, "settled": true, "tokens_used": usage.total()}))
            .into_response(),
    )
}
