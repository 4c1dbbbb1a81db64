//! The guards: who may call `/v0/management` (README, "Management and client keys") and `/v1/*` (README, "Proxy API").
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
//! time. The keys a request presents are read where they lie in the request, or (a `?key=`
//! that needs decoding, the copy an argon2 check takes off the runtime) copied into buffers
//! wiped when dropped.

pub mod ban_table;
mod browser;
mod client;
mod management;

pub use client::ClientAuth;
pub use management::{
    ARGON2_MEMORY_BUDGET_KIB, CHECK_WAIT, MAX_CHECKS, ManagementAuth, check_permits,
};

use super::HttpState;
use super::caller::Caller;
use super::management::Actor;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ban_table::Bans;
use zeroize::Zeroizing;

/// The guards' state: the management key's and the client keys', with their bans.
pub struct Guards {
    pub management: ManagementAuth,
    /// The client-key guard: `api_keys` and the bans of wrong ones.
    pub clients: ClientAuth,
}

impl Guards {
    /// From the config (see [`ManagementAuth::from_config`]); warns about trusted proxies too
    /// broad to trust.
    pub async fn from_config(config: &crate::config::Config) -> Result<Guards, String> {
        super::caller::warn_about_trusted_proxies(&config.server.trusted_proxies);
        Ok(Guards {
            management: ManagementAuth::from_config(&config.management).await?,
            clients: ClientAuth::new(&config.api_keys),
        })
    }
}

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

/// A client key as a request presents it: borrowed from its header, or percent-decoded from
/// the query into a buffer wiped when dropped.
pub enum PresentedKey<'a> {
    Header(&'a str),
    Query(Zeroizing<Vec<u8>>),
}

impl PresentedKey<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            PresentedKey::Header(s) => s.as_bytes(),
            PresentedKey::Query(v) => v,
        }
    }
}

impl std::fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresentedKey(..)")
    }
}

/// The client key a request presents, in any of the places the SDKs put it.
pub fn client_key(req: &Request) -> Option<PresentedKey<'_>> {
    let h = req.headers();
    if let Some(bearer) = bearer_token(h) {
        return Some(PresentedKey::Header(bearer));
    }
    for name in ["x-api-key", "x-goog-api-key"] {
        if let Some(v) = h.get(name).and_then(|v| v.to_str().ok()) {
            return Some(PresentedKey::Header(v.trim()));
        }
    }
    query_key(req.uri().query()?).map(PresentedKey::Query)
}

/// The first `key` parameter of a query (`application/x-www-form-urlencoded`: `+` is a
/// space, `%XX` a byte, a `%` without two hex digits itself), decoded straight into a wiped
/// buffer. Decoding never lengthens, so the buffer is never reallocated (which would leave
/// a copy behind).
fn query_key(query: &str) -> Option<Zeroizing<Vec<u8>>> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let mut decoded_name = Vec::with_capacity(name.len());
        form_decode(name.as_bytes(), &mut decoded_name);
        if decoded_name != b"key" {
            return None;
        }
        let mut out = Zeroizing::new(Vec::with_capacity(value.len()));
        form_decode(value.as_bytes(), &mut out);
        Some(out)
    })
}

fn form_decode(input: &[u8], out: &mut Vec<u8>) {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        let escaped = match (b, input.get(i + 1), input.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match (b, escaped) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (b, None) => {
                out.push(b);
                i += 1;
            }
        }
    }
}

/// Write the bans set since the last call to the auth log.
fn log_bans(state: &AppState, bans: &Bans) {
    let lines = bans.take_events();
    if !lines.is_empty() {
        state.auth_log.record_all(lines.iter().map(String::as_str));
    }
}

async fn guard_management(
    state: HttpState,
    mut req: Request,
    next: Next,
    recovery: bool,
) -> Response {
    let (app, management) = (&state.app, &state.guards.management);
    let caller = Caller::of_request(&req, &app.config.config.server.trusted_proxies);
    if let Err(e) = browser::check(&req, &caller, !management.key_configured()) {
        return e.into_response();
    }
    let decision = management
        .check(&caller, presented_key(req.headers()), recovery, app.now())
        .await;
    log_bans(app, management.bans());
    if let Err(e) = decision {
        return e.into_response();
    }
    req.extensions_mut().insert(Actor::from_caller(&caller));
    next.run(req).await
}

/// The management guard, for every management route but the ban endpoints.
pub async fn management_guard(
    State(state): State<HttpState>,
    req: Request,
    next: Next,
) -> Response {
    guard_management(state, req, next, false).await
}

/// The management guard for the ban endpoints: the operator at the console passes a ban.
pub async fn recovery_guard(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    guard_management(state, req, next, true).await
}

/// The OAuth pages' guard: the management rules but the key, which the page asks for and
/// sends with every JSON call (see [`ManagementAuth::check_page`]).
pub async fn page_guard(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let (app, management) = (&state.app, &state.guards.management);
    let caller = Caller::of_request(&req, &app.config.config.server.trusted_proxies);
    if let Err(e) = browser::check_page(&req, &caller, !management.key_configured()) {
        return e.into_response();
    }
    match management.check_page(&caller, app.now()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Client keys for `/v1/*`.
pub async fn client_guard(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let (app, clients) = (&state.app, &state.guards.clients);
    let caller = Caller::of_request(&req, &app.config.config.server.trusted_proxies);
    // Only where the loopback rule stands in for a key: a key is a header no other site's
    // page can make a browser send.
    if !clients.has_keys()
        && let Err(e) = browser::check(&req, &caller, true)
    {
        return e.into_response();
    }
    let decision = {
        let presented = client_key(&req);
        let presented = presented.as_ref().map(PresentedKey::as_bytes);
        clients.check(&caller, presented, app.now())
    };
    log_bans(app, clients.bans());
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

    #[test]
    fn client_keys_are_read_from_every_place_without_a_plain_copy() {
        let key = |headers: &[(&str, &str)], uri: &str| {
            let mut req = Request::builder().uri(uri);
            for (n, v) in headers {
                req = req.header(*n, *v);
            }
            let req = req.body(axum::body::Body::empty()).unwrap();
            let k = client_key(&req);
            let borrowed = matches!(k, Some(PresentedKey::Header(_)));
            (k.map(|k| k.as_bytes().to_vec()), borrowed)
        };
        let some = |b: &[u8]| Some(b.to_vec());
        // Headers are borrowed, in their order of precedence.
        assert_eq!(
            key(&[("authorization", "Bearer a")], "/"),
            (some(b"a"), true)
        );
        assert_eq!(
            key(&[("x-api-key", " b "), ("x-goog-api-key", "c")], "/?key=d"),
            (some(b"b"), true)
        );
        assert_eq!(
            key(&[("x-goog-api-key", "c")], "/?key=d"),
            (some(b"c"), true)
        );
        assert_eq!(key(&[("x-api-key", "")], "/"), (some(b""), true));
        // The query is decoded as a form, into the wiped buffer.
        for (q, want) in [
            ("key=d", &b"d"[..]),
            ("key=", b""),
            ("key", b""),
            ("a=1&key=x%2By+z&key=second", b"x+y z"),
            ("k%65y=named", b"named"),
            ("key=%zz%4", b"%zz%4"),
            ("key=%", b"%"),
            ("key=%ff%00", b"\xff\x00"),
            ("&&key=after-empty", b"after-empty"),
            ("key=a%3Db%26c", b"a=b&c"),
        ] {
            assert_eq!(key(&[], &format!("/?{q}")), (some(want), false), "{q}");
        }
        for uri in ["/", "/?", "/?keys=x", "/?a=key", "/?KEY=x", "/?k=key"] {
            assert_eq!(key(&[], uri), (None, false), "{uri}");
        }
        // A key is never shown by Debug.
        let req = Request::builder()
            .uri("/?key=sk-secret")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(format!("{:?}", client_key(&req)), "Some(PresentedKey(..))");
    }
}
