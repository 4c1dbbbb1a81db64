//! The guards: who may call `/v0/management` (contract section 8) and `/v1/*` (section 7).
//!
//! Management ([`ManagementAuth`]): without a configured key only loopback clients are served.
//! With one, every call presents it (`Authorization: Bearer` or `X-Management-Key`), checked
//! against its argon2id hash off the async runtime; remote clients also need `allow_remote`.
//! Five wrong keys from one address ban it for 30 minutes ([`ban_table::MANAGEMENT_RULE`]).
//! Each argon2 check holds the hash's `m` of memory, so they are bounded twice: an attempt is
//! counted against its address before it runs (a burst from one address runs at most five,
//! the rest wait and then meet the ban), and a semaphore caps the checks in flight so that
//! together they hold at most [`ARGON2_MEMORY_BUDGET_KIB`] (or one check, if a single one
//! needs more), plus one check kept for the console. A check that cannot start within
//! [`CHECK_WAIT`] is refused with 503 `server_busy`. The right key, once verified, is
//! recognised by a keyed digest without argon2.
//!
//! Client keys ([`ClientAuth`]): one of `api_keys`, compared in constant time, or (with none
//! configured) a loopback client. Wrong keys are counted per address too
//! ([`ban_table::CLIENT_RULE`]), and a banned address is refused before any key is compared;
//! a direct loopback peer is not counted.
//!
//! The address is the one [`Caller`] resolves (the TCP peer, or behind a trusted proxy the
//! client it names). The operator at the console (a loopback TCP peer, not a forwarded client)
//! may list and lift bans even while loopback is banned, still with the key, one check at a
//! time.

pub mod ban_table;
mod client;
mod management;

pub use client::ClientAuth;
pub use management::{
    ARGON2_MEMORY_BUDGET_KIB, CHECK_WAIT, MAX_CHECKS, ManagementAuth, check_permits,
};

use super::caller::Caller;
use super::management::Actor;
use crate::app::AppState;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ban_table::Bans;
use std::sync::Arc;

/// The token of an `Authorization: Bearer TOKEN` header. The scheme is case-insensitive and
/// may be followed by any number of spaces or tabs.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim_start();
    let scheme = value.get(..6)?;
    let rest = value.get(6..)?;
    if !scheme.eq_ignore_ascii_case("bearer") || !rest.starts_with([' ', '\t']) {
        return None;
    }
    Some(rest.trim()).filter(|t| !t.is_empty())
}

/// The management key a request presents, if any.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-management-key") {
        return v.to_str().ok().map(str::trim);
    }
    bearer_token(headers)
}

/// The client key a request presents, in any of the places the SDKs put it.
pub fn client_key(req: &Request) -> Option<String> {
    let h = req.headers();
    let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(bearer) = bearer_token(h) {
        return Some(bearer.to_string());
    }
    for name in ["x-api-key", "x-goog-api-key"] {
        if let Some(v) = header(name) {
            return Some(v.to_string());
        }
    }
    let query = req.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "key")
        .map(|(_, v)| v.into_owned())
}

/// Write the bans set since the last call to the auth log.
fn log_bans(state: &AppState, bans: &Bans) {
    let lines = bans.take_events();
    if !lines.is_empty() {
        state.auth_log.record_all(lines.iter().map(String::as_str));
    }
}

async fn guard_management(
    state: Arc<AppState>,
    mut req: Request,
    next: Next,
    recovery: bool,
) -> Response {
    let caller = Caller::of_request(&req, &state.config.config.server.trusted_proxies);
    let decision = state
        .management
        .check(&caller, presented_key(req.headers()), recovery, state.now())
        .await;
    log_bans(&state, state.management.bans());
    if let Err(e) = decision {
        return e.into_response();
    }
    req.extensions_mut().insert(Actor::from_caller(&caller));
    next.run(req).await
}

/// The management guard, for every management route but the ban endpoints.
pub async fn management_guard(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    guard_management(state, req, next, false).await
}

/// The management guard for the ban endpoints: the operator at the console passes a ban.
pub async fn recovery_guard(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    guard_management(state, req, next, true).await
}

/// Client keys for `/v1/*`.
pub async fn client_guard(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let caller = Caller::of_request(&req, &state.config.config.server.trusted_proxies);
    let presented = client_key(&req);
    let decision = state.clients.check(
        &caller,
        presented.as_deref().map(str::as_bytes),
        state.now(),
    );
    log_bans(&state, state.clients.bans());
    match decision {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let token = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert("authorization", HeaderValue::from_bytes(v).unwrap());
            bearer_token(&h).map(str::to_string)
        };
        for v in [
            &b"Bearer k"[..],
            b"bearer k",
            b"BEARER k",
            b"bEaReR k",
            b"Bearer     k",
            b"Bearer\tk",
            b"Bearer \t  k  ",
            b"  Bearer k",
        ] {
            assert_eq!(token(v).as_deref(), Some("k"), "{v:?}");
        }
        for v in [
            &b"Bearerk"[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer    ",
            b"Basic k",
            b"Bear k",
            b"Bearer-k",
            b"",
            b"\xffearer k",
            b"Bearer \xff",
            b"B\xc3\xa9arer k",
        ] {
            assert_eq!(token(v), None, "{v:?}");
        }
        assert_eq!(token(b"BEARER a b").as_deref(), Some("a b"));
    }
}
