//! The request path (design.md, "Data flow of one proxied request"): reserve on a credential,
//! call the provider with it, and settle what the provider reports. A failed attempt is read
//! into a [`Verdict`] before any byte reached the client, and the verdict decides
//! ([`after_failure`]): the credential's own failure marks it and moves on to the next one;
//! the client's own mistake, a provider overloaded twice, or one that refuses where this
//! server runs is answered at once, marking nothing; a provider that cannot be reached is
//! answered 502 at once (its keys share its host, so another would not reach it either). No
//! database transaction is held across the upstream call. Streams pass through chunk by chunk
//! with a usage tap, and are settled when they end or the client goes away (`settle.rs`).

mod settle;
#[cfg(test)]
mod tests;

pub(crate) use settle::Held;

use crate::http::error::ApiError;
use crate::providers::classify::{MAX_RETRY_AFTER, Verdict};
use crate::providers::json;
use crate::providers::tap::StreamTap;
use crate::providers::wire::{self, Peek};
use crate::providers::{Format, Provider, StreamUsage};
use crate::state::AppState;
use crate::store::{Mark, Reservation, ReservationKind, ReserveRequest, Unavailable};
use crate::upstream::{Answer, Cause, Target};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use settle::Tapped;
use std::sync::Arc;

/// Error bodies read from upstream at most (to classify them and pass them on).
const MAX_ERROR_BODY: usize = 256 * 1024;
/// How long a request waits for room held by requests in flight before it gives up.
pub const ROOM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
/// Non-streamed answers read at most.
const MAX_ANSWER_BODY: usize = 64 * 1024 * 1024;
/// The shortest an exhausted mark with the provider's date lasts: a date already past (our
/// clock ahead of the provider's) would otherwise leave the key to fail the next request too.
const MIN_EXHAUSTED: chrono::TimeDelta = chrono::TimeDelta::minutes(1);
/// The longest: a date further ahead (no provider names one; a misread one could) counts as
/// this far, so a mark always ends.
const MAX_EXHAUSTED: chrono::TimeDelta = chrono::TimeDelta::days(366);

/// Reads an upstream error answer into a verdict at a time (a wait named as a date counts
/// from it): [`crate::providers::classify::classify_at`], or a test's own.
type Classify = fn(Format, StatusCode, &HeaderMap, &[u8], DateTime<Utc>) -> Verdict;

/// One call to forward: where it goes and what it carries.
pub struct Call {
    pub provider: Arc<Provider>,
    /// Path and query after the provider's base URL, e.g. `/chat/completions`.
    pub path: String,
    /// What the request path reads of the body.
    pub peek: Peek,
    /// The body to forward: the client's bytes, unless something in them had to change.
    pub raw: Bytes,
    pub stream: bool,
    /// Headers of the client's request passed on (never its key).
    pub pass_headers: Vec<(HeaderName, HeaderValue)>,
}

impl Call {
    /// Whether the proxy asks this OpenAI-format stream for its usage on the client's behalf
    /// (and so hides the usage chunk from the client): only where the provider accepts
    /// `stream_options` (`providers.<name>.stream_usage`), and only when the client did not
    /// ask itself. Otherwise the body goes as it came, and the usage the provider sends on
    /// its own (Mistral's last chunk, Groq's `x_groq.usage`) is read as it passes.
    fn asks_for_usage(&self) -> bool {
        self.provider.format == Format::Openai
            && self.stream
            && self.provider.stream_usage == StreamUsage::Ask
            && !self.peek.includes_usage()
    }
}

/// `body` (a JSON object, as [`Peek::read`] found) with member `key` set to `value` (JSON
/// text), as new bytes; every other byte is kept as it came (see [`json::set_member`]).
pub fn rewrite(body: &[u8], key: &str, value: &str) -> Result<Bytes, ApiError> {
    json::set_member(body, key, value)
        .map(Bytes::from)
        .map_err(unusable_body)
}

/// Ask an OpenAI stream for its usage: `stream_options.include_usage` set, the other options
/// kept (a `stream_options` that is not an object is replaced).
fn ask_for_usage(body: &[u8]) -> Result<Bytes, ApiError> {
    let options = json::member(body, "stream_options")
        .map_err(unusable_body)?
        .and_then(|o| json::set_member(o.get().as_bytes(), "include_usage", "true").ok());
    let options = match &options {
        Some(o) => std::str::from_utf8(o).map_err(|_| unusable_body(None))?,
        None => r#"{"include_usage":true}"#,
    };
    rewrite(body, "stream_options", options)
}

/// The answer for a body that is not a JSON object: `None` when it is JSON of another kind.
pub fn unusable_body(error: Option<serde_json::Error>) -> ApiError {
    match error {
        None => ApiError::bad_request("invalid_body", "The body must be a JSON object"),
        Some(e) => {
            ApiError::bad_request("invalid_json", format!("The body is not valid JSON: {e}"))
        }
    }
}

/// Response headers worth passing back to the client: the answer's type, the provider's
/// waits and rate limits, and its request ids (for support). Nothing that says whose key
/// answered: OpenAI's `openai-organization` and `openai-project` name the pooled key's
/// owner, so of OpenAI's own headers only the version and the processing time pass (and no
/// `anthropic-organization-id`, no `x-goog-*`, no cookies).
fn passes_back(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "content-type"
            | "retry-after"
            | "request-id"
            | "x-request-id"
            | "openai-version"
            | "openai-processing-ms"
    ) || n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if passes_back(name) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// The answer for "nothing could be reserved".
pub fn unavailable(provider: &str, why: Unavailable) -> ApiError {
    match why {
        Unavailable::NoCredentials => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_credentials",
            format!("No credentials for provider {provider}"),
        ),
        Unavailable::Busy { retry_after, .. } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "credentials_busy",
            format!(
                "Every credential for provider {provider} is exhausted, cooling down or busy; retry in {retry_after} s"
            ),
        )
        .retry_after(retry_after),
        Unavailable::Exhausted => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "credentials_exhausted",
            format!(
                "Every credential for provider {provider} has no room left for this request, and its quota never resets (auth.quota.reset_schedule); raise or reset a limit"
            ),
        ),
        Unavailable::Unusable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_usable_credentials",
            format!("No usable credentials for provider {provider}: every one is disabled, invalid or expired"),
        ),
    }
}

pub fn provider_disabled(provider: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "provider_disabled",
        format!("Provider {provider} is disabled in the config"),
    )
}

/// The answer when the provider could not be reached at all: no credential is blamed, and
/// no other is tried (they all go to the same host).
pub fn unreachable(provider: &str, cause: Cause) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "provider_unreachable",
        format!(
            "Provider {provider} could not be reached: {}",
            cause.describe()
        ),
    )
}

/// The answer when the provider refuses where this server runs (a region block): a 502, as
/// the fault is neither the client's nor a key's, and every key would get the same.
pub fn location_refused(provider: &str, reason: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "provider_location_refused",
        format!(
            "Provider {provider} refuses to serve the location this server runs in ({reason}); no credential was marked, and none would be served from here"
        ),
    )
}

/// Release a reservation, marking its credential when the failure was the credential's own;
/// a mark is also written to the auth log (`context` says how it was learnt, if not from a
/// proxied request). `false` when the reservation was already settled or released.
pub async fn release(
    state: &AppState,
    reservation: &str,
    credential: &str,
    provider: &str,
    mark: Option<Mark>,
    context: &str,
) -> Result<bool, crate::store::StoreError> {
    if let Some(m) = &mark {
        state.auth_log.record(&format!(
            "credential {credential} ({provider}) marked{context}: {}",
            m.describe()
        ));
    }
    state
        .store
        .release(reservation, mark.as_ref(), state.now())
        .await
}

/// What to do with a credential after an upstream verdict: only its own failures mark it.
pub fn mark_for(verdict: &Verdict, now: DateTime<Utc>) -> Option<Mark> {
    match verdict {
        Verdict::Invalid(r) => Some(Mark::Invalid(r.clone())),
        Verdict::Exhausted { reason, until } => Some(Mark::Exhausted {
            reason: reason.clone(),
            until: until.map(|u| u.clamp(now + MIN_EXHAUSTED, now + MAX_EXHAUSTED)),
        }),
        Verdict::RateLimited { wait, reason: r } => {
            // Waits are clamped where they are read; clamped again here so no wait, however
            // it was made, can overflow the clock.
            let wait =
                chrono::TimeDelta::from_std((*wait).min(MAX_RETRY_AFTER)).unwrap_or_default();
            Some(Mark::Cooldown {
                until: now.checked_add_signed(wait).unwrap_or(now),
                reason: r.clone(),
            })
        }
        Verdict::ClientError | Verdict::Overloaded(_) | Verdict::Location(_) => None,
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Then {
    /// Try the next credential.
    TryAnother,
    /// Answer the provider's error as it came.
    Answer,
    /// Answer [`location_refused`] with this reason.
    Refused(String),
}

/// What a failed attempt's verdict leads to: the mark on its credential, and what follows.
/// `overloaded` says whether an earlier attempt of the same request found the provider
/// overloaded, and is set here. Overload is the provider's state, not the key's: nothing is
/// marked (cooling the keys would turn a provider's brief outage into our own 429s for
/// longer), and one other key is tried, since an overload is often one busy machine behind
/// the provider's balancer and a second request may reach another; a second overload goes
/// back to the client as the provider's answer, so one request never adds more than one
/// call to an outage.
fn after_failure(
    verdict: &Verdict,
    overloaded: &mut bool,
    now: DateTime<Utc>,
) -> (Option<Mark>, Then) {
    let then = match verdict {
        Verdict::ClientError => Then::Answer,
        Verdict::Invalid(_) | Verdict::Exhausted { .. } | Verdict::RateLimited { .. } => {
            Then::TryAnother
        }
        Verdict::Overloaded(_) if !*overloaded => {
            *overloaded = true;
            Then::TryAnother
        }
        Verdict::Overloaded(_) => Then::Answer,
        Verdict::Location(reason) => Then::Refused(reason.clone()),
    };
    (mark_for(verdict, now), then)
}

fn plain_response(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    copy_headers(headers, response.headers_mut());
    response
}

/// Forward a call, rotating across credentials as the contract says. The exchange runs in a
/// task of its own, so a client that goes away does not cancel it half-way: the provider's
/// answer is still read and settled exactly (a stream is then charged as cut short).
pub async fn forward(state: Arc<AppState>, call: Call) -> Response {
    forward_with(state, call, crate::providers::classify::classify_at).await
}

/// [`forward`] with the verdicts of `classify`.
async fn forward_with(state: Arc<AppState>, call: Call, classify: Classify) -> Response {
    // Boxed: the exchange is a large future, and spawning it unboxed copies it twice.
    match tokio::spawn(Box::pin(exchange(state, call, classify))).await {
        Ok(response) => response,
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

async fn exchange(state: Arc<AppState>, call: Call, classify: Classify) -> Response {
    let name = call.provider.name.clone();
    if !call.provider.enabled {
        return provider_disabled(&name).into_response();
    }
    let format = call.provider.format;
    let hide_usage_chunk = call.asks_for_usage();
    let body = if hide_usage_chunk {
        match ask_for_usage(&call.raw) {
            Ok(body) => body,
            Err(e) => return e.into_response(),
        }
    } else {
        call.raw.clone()
    };
    let config = &state.config.config;
    let tokens = match wire::reservation(
        format,
        &call.peek,
        body.len(),
        config.auth.quota.default_reservation,
    ) {
        Ok(tokens) => tokens,
        Err(message) => return ApiError::bad_request("invalid_body", message).into_response(),
    };
    let Some(target) = call.provider.target(&call.path) else {
        return ApiError::bad_request(
            "invalid_path",
            "This request's path and the provider's base URL do not make a URL HTTP can carry",
        )
        .into_response();
    };
    let mut tried: Vec<String> = Vec::new();
    let mut last_failure: Option<Response> = None;
    let mut overloaded = false;
    for _ in 0..config.proxy.max_attempts {
        let req = ReserveRequest {
            provider: &name,
            tokens,
            strategy: config.auth.selection_strategy,
            exclude: &tried,
            kind: ReservationKind::Request,
            expires_at: None,
        };
        let reservation = match state
            .store
            .reserve_waiting(&req, || state.now(), ROOM_PATIENCE)
            .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => {
                return last_failure.unwrap_or_else(|| unavailable(&name, why).into_response());
            }
            Err(e) => return ApiError::from(e).into_response(),
        };
        tried.push(reservation.credential_id.clone());
        let (held, mut answer) = match attempt(&state, &call, &reservation, &target, &body).await {
            Attempt::Answered(held, answer) => (held, answer),
            Attempt::Failed(response) => return response,
            Attempt::NextCredential => continue,
        };
        let status = answer.status;
        if status.is_success() {
            return deliver(held, answer, &call, hide_usage_chunk).await;
        }
        let headers = std::mem::take(&mut answer.headers);
        let body = answer
            .read_limited(MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        let verdict = classify(format, status, &headers, &body, state.now());
        let (mark, then) = after_failure(&verdict, &mut overloaded, state.now());
        held.give_back(mark).await;
        let answer = plain_response(status, &headers, body);
        match then {
            Then::Answer => return answer,
            Then::Refused(reason) => return location_refused(&name, &reason).into_response(),
            Then::TryAnother => last_failure = Some(answer),
        }
    }
    last_failure.unwrap_or_else(|| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            format!("No credential of provider {name} succeeded"),
        )
        .into_response()
    })
}

/// How one attempt on a reserved credential went.
enum Attempt {
    /// The provider answered (any status): its answer, with the reservation still held.
    Answered(Held, Answer),
    /// The credential could not be sent (marked, reservation released): try the next.
    NextCredential,
    /// The request is over with this answer (reservation released).
    Failed(Response),
}

/// Send the call with the reserved credential, up to the answer's status and headers.
async fn attempt(
    state: &Arc<AppState>,
    call: &Call,
    reservation: &Reservation,
    target: &Target,
    body: &Bytes,
) -> Attempt {
    let name = &call.provider.name;
    let held = Held::new(state, reservation, name);
    let token = match state.store.open_token(&reservation.credential_id).await {
        Ok(Ok(t)) => t,
        Ok(Err(reason)) => {
            held.give_back(Some(Mark::Invalid(reason))).await;
            return Attempt::NextCredential;
        }
        Err(e) => {
            held.give_back(None).await;
            return Attempt::Failed(ApiError::from(e).into_response());
        }
    };
    let headers = match crate::providers::exchange::headers(
        call.provider.format,
        &call.pass_headers,
        token.expose(),
    ) {
        Ok(h) => h,
        Err(reason) => {
            held.give_back(Some(Mark::Invalid(reason))).await;
            return Attempt::NextCredential;
        }
    };
    match state.upstream.post(target, headers, body.clone()).await {
        Ok(answer) => Attempt::Answered(held, answer),
        Err(e) => {
            // Nothing reached the provider, or nothing came back by the deadline: the
            // provider's state, not the key's. Its other keys go to the same host, so
            // trying them would only make the client wait as long again.
            tracing::warn!(provider = %name, error = %e, "upstream request failed");
            held.give_back(None).await;
            Attempt::Failed(unreachable(name, e.cause()).into_response())
        }
    }
}

/// Pass a successful answer on, settling the reservation from the usage it reports: read
/// whole when not streamed, else tapped as it streams.
async fn deliver(held: Held, mut answer: Answer, call: &Call, hide_usage_chunk: bool) -> Response {
    let format = call.provider.format;
    let status = answer.status;
    let headers = std::mem::take(&mut answer.headers);
    if !call.stream {
        let body = match answer.read_limited(MAX_ANSWER_BODY).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(provider = %call.provider.name, error = %e, "upstream answer cut short");
                held.settler().settle(None, false);
                return ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    "The provider's answer was cut short",
                )
                .into_response();
            }
        };
        let usage = wire::usage_from_answer(format, &body);
        // The settlement may land after the answer: a crash before it leaves the
        // reservation, which the next start charges in full.
        held.settler().settle(usage, true);
        return plain_response(status, &headers, body);
    }
    let json_array = format == Format::Gemini && !call.path.contains("alt=sse");
    let tapped = Tapped::new(
        answer.into_stream(),
        StreamTap::new(format, hide_usage_chunk, json_array),
        held.settler(),
    );
    let mut response = Response::new(Body::from_stream(tapped));
    *response.status_mut() = status;
    copy_headers(&headers, response.headers_mut());
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}
