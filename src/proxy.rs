//! The request path (design.md, "Data flow of one proxied request"): reserve on a credential,
//! call the provider with it, and settle what the provider reports; on a 401/402/403/429/5xx
//! before any byte reached the client, mark the credential, release, and try the next one.
//! No database transaction is held across the upstream call. Streams pass through chunk by
//! chunk with a usage tap, and are settled when they end or the client goes away.

use crate::app::AppState;
use crate::http::error::ApiError;
use crate::providers::json;
use crate::providers::tap::StreamTap;
use crate::providers::wire::{self, Peek, Usage, Verdict};
use crate::providers::{Format, Provider};
use crate::store::{Mark, ReservationKind, ReserveRequest, Unavailable};
use crate::upstream::AnswerStream;
use axum::body::Body;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::Utc;
use futures_util::{Stream, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Error bodies read from upstream at most (to classify them and pass them on).
const MAX_ERROR_BODY: usize = 256 * 1024;
/// How long a request waits for room held by requests in flight before it gives up.
pub const ROOM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
/// Non-streamed answers read at most.
const MAX_ANSWER_BODY: usize = 64 * 1024 * 1024;

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

/// Response headers worth passing back to the client.
fn passes_back(name: &HeaderName) -> bool {
    let n = name.as_str();
    n == "content-type"
        || n == "retry-after"
        || n == "request-id"
        || n == "x-request-id"
        || n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
        || n.starts_with("openai-")
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

/// What to do with a credential after an upstream verdict.
pub fn mark_for(verdict: &Verdict, now: chrono::DateTime<Utc>) -> Option<Mark> {
    match verdict {
        Verdict::Invalid(r) => Some(Mark::Invalid(r.clone())),
        Verdict::Exhausted { reason, .. } => Some(Mark::Exhausted(reason.clone())),
        Verdict::RateLimited { wait, reason: r } => {
            // Waits are clamped where they are read; clamped again here so no wait, however
            // it was made, can overflow the clock.
            let wait =
                chrono::TimeDelta::from_std((*wait).min(wire::MAX_RETRY_AFTER)).unwrap_or_default();
            Some(Mark::Cooldown {
                until: now.checked_add_signed(wait).unwrap_or(now),
                reason: r.clone(),
            })
        }
        Verdict::ClientError | Verdict::Overloaded(_) | Verdict::Location(_) => None,
    }
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
    // Boxed: the exchange is a large future, and spawning it unboxed copies it twice.
    match tokio::spawn(Box::pin(exchange(state, call))).await {
        Ok(response) => response,
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

async fn exchange(state: Arc<AppState>, call: Call) -> Response {
    let name = call.provider.name.clone();
    if !call.provider.enabled {
        return provider_disabled(&name).into_response();
    }
    let format = call.provider.format;
    // OpenAI streams report usage only when asked; ask, and hide the answer from a client
    // that did not.
    let hide_usage_chunk = format == Format::Openai && call.stream && !call.peek.includes_usage();
    let body = if hide_usage_chunk {
        let asked = ask_for_usage(&call.raw);
        match asked {
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
        let held = Held::new(&state, &reservation, &name);
        let token = match state.store.open_token(&reservation.credential_id).await {
            Ok(Ok(t)) => t,
            Ok(Err(reason)) => {
                held.give_back(Some(Mark::Invalid(reason))).await;
                continue;
            }
            Err(e) => {
                held.give_back(None).await;
                return ApiError::from(e).into_response();
            }
        };
        let (auth_name, auth_prefix) = wire::credential_header(format);
        let sent = match crate::upstream::credential_value(auth_prefix, token.expose()) {
            Ok(auth) => {
                let mut headers = HeaderMap::with_capacity(4 + call.pass_headers.len());
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
                for (k, v) in &call.pass_headers {
                    headers.append(k, v.clone());
                }
                if format == Format::Anthropic && !headers.contains_key("anthropic-version") {
                    headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
                }
                headers.insert(auth_name, auth);
                state.upstream.post(&target, headers, body.clone()).await
            }
            Err(e) => Err(e),
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let verdict = wire::unreachable_verdict(&e);
                tracing::warn!(provider = %name, error = %e, "upstream request failed");
                held.give_back(mark_for(&verdict, state.now())).await;
                last_failure = Some(
                    ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_unreachable",
                        format!("Provider {name} could not be reached"),
                    )
                    .into_response(),
                );
                continue;
            }
        };
        let status = resp.status;
        let headers = std::mem::take(&mut resp.headers);
        if !status.is_success() {
            let body = resp.read_limited(MAX_ERROR_BODY).await.unwrap_or_default();
            let verdict = wire::classify(format, status, &headers, &body);
            let answer = plain_response(status, &headers, body);
            if verdict == Verdict::ClientError {
                held.give_back(None).await;
                return answer;
            }
            held.give_back(mark_for(&verdict, state.now())).await;
            last_failure = Some(answer);
            continue;
        }
        if !call.stream {
            let answer = match resp.read_limited(MAX_ANSWER_BODY).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(provider = %name, error = %e, "upstream answer cut short");
                    held.settler().settle(None, false);
                    return ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_failed",
                        "The provider's answer was cut short",
                    )
                    .into_response();
                }
            };
            let usage = wire::usage_from_answer(format, &answer);
            // The settlement may land after the answer: a crash before it leaves the
            // reservation, which the next start charges in full.
            held.settler().settle(usage, true);
            return plain_response(status, &headers, answer);
        }
        let json_array = format == Format::Gemini && !call.path.contains("alt=sse");
        let tapped = Tapped {
            inner: resp.into_stream(),
            tap: StreamTap::new(format, hide_usage_chunk, json_array),
            settler: Some(held.settler()),
            done: false,
        };
        let mut response = Response::new(Body::from_stream(tapped));
        *response.status_mut() = status;
        copy_headers(&headers, response.headers_mut());
        response.headers_mut().insert(
            axum::http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        return response;
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

/// A reservation between its grant and its settlement or release. Dropped while still held
/// (the exchange panicked, or its task was torn down), it is released without a mark, so a
/// fault in the request path never leaves tokens reserved until the next start.
pub(crate) struct Held {
    state: Arc<AppState>,
    reservation: String,
    credential: String,
    provider: String,
    done: bool,
}

impl Held {
    pub(crate) fn new(
        state: &Arc<AppState>,
        reservation: &crate::store::Reservation,
        provider: &str,
    ) -> Held {
        Held {
            state: state.clone(),
            reservation: reservation.id.clone(),
            credential: reservation.credential_id.clone(),
            provider: provider.to_string(),
            done: false,
        }
    }

    /// Release the reservation unused, marking the credential when the failure was its own.
    async fn give_back(self, mark: Option<Mark>) {
        if let Err(e) = self.release(mark, "").await {
            tracing::error!(error = %e, "cannot release a reservation");
        }
    }

    /// Release the reservation unused, with an optional mark (`context` says how the failure
    /// was learnt, for the auth log); `false` when it was already settled or released.
    pub(crate) async fn release(
        mut self,
        mark: Option<Mark>,
        context: &str,
    ) -> Result<bool, crate::store::StoreError> {
        self.done = true;
        let (id, cred, name) = (&self.reservation, &self.credential, &self.provider);
        release(&self.state, id, cred, name, mark, context).await
    }

    /// The reservation outlives the handler (a lease handed out): it is settled by a report
    /// or when it expires.
    pub(crate) fn keep(mut self) {
        self.done = true;
    }

    /// Hand the reservation to what settles it once the answer is read.
    fn settler(mut self) -> Settler {
        self.done = true;
        Settler {
            state: self.state.clone(),
            reservation: std::mem::take(&mut self.reservation),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.done {
            tracing::error!(
                reservation = %self.reservation,
                "a request ended without settling its reservation; releasing it"
            );
            self.state
                .store
                .release_later(&self.reservation, self.state.now());
        }
    }
}

struct Settler {
    state: Arc<AppState>,
    reservation: String,
}

impl Settler {
    /// Queue the settlement without waiting for it (the stream's poll cannot wait, and an
    /// answer need not): the ledger commits it with its group.
    fn settle(self, usage: Option<Usage>, complete: bool) {
        let exact = complete && usage.is_some();
        self.state.store.settle_later(
            &self.reservation,
            usage.unwrap_or_default(),
            !exact,
            self.state.now(),
        );
    }
}

/// A streamed answer with its usage tap; settles when it ends or is dropped.
struct Tapped {
    inner: AnswerStream,
    tap: StreamTap,
    settler: Option<Settler>,
    done: bool,
}

impl Stream for Tapped {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let out = self.tap.feed(chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    let usage = self.tap.usage();
                    if let Some(s) = self.settler.take() {
                        s.settle(usage, false);
                    }
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let rest = self.tap.finish();
                    let usage = self.tap.usage();
                    if let Some(s) = self.settler.take() {
                        s.settle(usage, true);
                    }
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(rest)));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for Tapped {
    fn drop(&mut self) {
        // The client went away (or the server is stopping) before the end: charge at least
        // the reservation.
        if let Some(s) = self.settler.take() {
            s.settle(self.tap.usage(), false);
        }
    }
}
