//! The request path as a service ([`RequestPath`]): the proxy routes forward calls through it,
//! the lease routes lease and report through it. It owns what those need (the store, the
//! upstream client, the auth log, the registry, the clock and the settings it reads), answers
//! with plain values or its own [`PathError`], and never builds an HTTP response: the HTTP
//! edge turns both into responses and the JSON error shape.
//!
//! A request reserves on a credential, calls the provider with it, and settles what the
//! provider reports. One attempt loop ([`attempts`]) serves proxying and leasing: reserve on a
//! credential not tried yet, open its token, and when the token does not open mark the
//! credential invalid and take the next. A failed call is read into a [`Verdict`] before any
//! byte reached the client, and the verdict decides ([`attempts::after_failure`]): the
//! credential's own failure marks it and moves on to the next one; the client's own mistake, a
//! provider overloaded twice, or one that refuses where this server runs is answered at once,
//! marking nothing; a provider that cannot be reached is answered 502 at once (its keys share
//! its host, so another would not reach it either). No database transaction is held across
//! the upstream call. Streams pass through chunk by chunk with a usage tap, and are settled
//! when they end or the client goes away (`settle.rs`). Whatever differs by format is asked of
//! [`crate::providers`].
//!
//! One span per request (`request_path`, or `lease` and `report`), at debug level so the
//! default filter costs a request nothing, names the provider, and the credential and the
//! attempt as each reservation is made; the upstream call and the store's work run inside it.
//! It never holds a token or a body. Only the outermost (boxed) future is instrumented: every
//! `Instrumented` wrapper or async function between the attempt loop and the futures of the
//! store and the upstream client copies those futures once more per request. With a span per
//! attempt and per upstream call, and the reservation in a function of its own, a request cost
//! 2 % more instructions than without (bench/README.md's callgrind method); as built, within
//! 0.5 % of the request path before it became a service.

mod attempts;
mod error;
mod exchange;
mod lease;
mod settle;
#[cfg(test)]
mod tests;

pub use error::PathError;
pub use lease::{Lease, LeaseInput, ReportInput, Reported};
pub use settle::Tapped;

use crate::config::{Config, SelectionStrategy};
use crate::domain::{CredentialId, ProviderName, ReservationId};
use crate::events::AuthLog;
use crate::notify::{Event, EventKind, Notifier};
use crate::providers::classify::Verdict;
use crate::providers::wire::Peek;
use crate::providers::{Format, Provider, Registry};
use crate::refresh::Refresher;
use crate::state::Clock;
use crate::store::{Mark, Store, StoreError};
use crate::upstream::Upstream;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use tracing::Instrument;

/// How long a request waits for room held by requests in flight before it gives up.
pub const ROOM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The span of one request or lease of `provider`; [`attempts::Attempts`] records the
/// credential and the attempt on it.
fn request_span(provider: &str) -> tracing::Span {
    tracing::debug_span!(
        "request_path",
        provider,
        attempt = tracing::field::Empty,
        credential = tracing::field::Empty,
    )
}

/// Reads an upstream error answer into a verdict at a time (a wait named as a date counts
/// from it): [`crate::providers::classify::classify_at`], or a test's own.
type Classify = fn(Format, StatusCode, &HeaderMap, &[u8], DateTime<Utc>) -> Verdict;

/// The settings the request path reads (`proxy:` and `auth:`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Credentials tried per request at most (`proxy.max_attempts`).
    pub max_attempts: u32,
    pub strategy: SelectionStrategy,
    /// Tokens reserved for a request that names no output cap, and for a lease that names no
    /// estimate (`auth.quota.default_reservation`).
    pub default_reservation: u64,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            max_attempts: config.proxy.max_attempts,
            strategy: config.auth.selection_strategy,
            default_reservation: config.auth.quota.default_reservation,
        }
    }
}

/// What the request path is built from.
pub struct Parts {
    pub store: Store,
    /// The client for upstream calls (connection pools shared by all requests).
    pub upstream: Upstream,
    pub auth_log: Arc<AuthLog>,
    pub registry: Arc<Registry>,
    pub clock: Clock,
    pub settings: Settings,
    /// Where marks and rotations are told to the webhooks.
    pub notifier: Notifier,
    /// Refreshes an OAuth credential whose token a provider rejected (none: it is marked
    /// invalid at once).
    pub refresher: Option<Refresher>,
}

/// What a rejected OAuth token came to, for the credential that held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenRenewal {
    /// Refreshed: it holds a new token, is not marked, and may be tried again.
    Renewed,
    /// Not marked, and not tried again by this request: the refresh was refused (it is
    /// `expired` already), or is still under way.
    Unmarked,
    /// Not refreshed (no refresh service, automatic refresh off, no refresh flow or token, a
    /// failure worth retrying later, or refreshed a moment ago and rejected again): marked
    /// invalid as any rejected credential.
    Not,
}

/// The request path; clones share it.
#[derive(Clone)]
pub struct RequestPath(Arc<Shared>);

struct Shared {
    store: Store,
    upstream: Upstream,
    auth_log: Arc<AuthLog>,
    registry: Arc<Registry>,
    clock: Clock,
    settings: Settings,
    notifier: Notifier,
    refresher: Option<Refresher>,
    classify: Classify,
}

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
    /// Headers of the client's request passed on (never its key):
    /// [`crate::providers::exchange::pass_headers`].
    pub pass_headers: Vec<(HeaderName, HeaderValue)>,
}

/// The provider's answer to a forwarded call: a success, or its error answer passed on as it
/// came (the client's own mistake, a second overload, the last of the failed attempts).
pub struct Forwarded {
    pub status: StatusCode,
    /// The answer's headers that pass back to the client
    /// ([`crate::providers::exchange::answer_headers`]).
    pub headers: HeaderMap,
    pub body: AnswerBody,
}

/// A forwarded answer's body.
pub enum AnswerBody {
    /// Read whole (not streamed, or an error answer), its usage already settled.
    Whole(Bytes),
    /// Streamed as it arrives, settled when it ends or is dropped.
    Stream(Tapped),
}

impl RequestPath {
    pub fn new(parts: Parts) -> RequestPath {
        Self::build(parts, crate::providers::classify::classify_at)
    }

    /// A request path reading error answers with `classify`: tests drive the loop through
    /// each verdict, whatever the real tables make of an answer.
    #[cfg(test)]
    fn classifying_with(parts: Parts, classify: Classify) -> RequestPath {
        Self::build(parts, classify)
    }

    fn build(parts: Parts, classify: Classify) -> RequestPath {
        RequestPath(Arc::new(Shared {
            store: parts.store,
            upstream: parts.upstream,
            auth_log: parts.auth_log,
            registry: parts.registry,
            clock: parts.clock,
            settings: parts.settings,
            notifier: parts.notifier,
            refresher: parts.refresher,
            classify,
        }))
    }

    /// The providers the request path serves, for routing.
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    fn now(&self) -> DateTime<Utc> {
        (self.0.clock)()
    }

    /// Forward a call, rotating across credentials as the README says. The exchange runs in
    /// a task of its own, so a client that goes away does not cancel it half-way: the
    /// provider's answer is still read and settled exactly (a stream is then charged as cut
    /// short).
    pub async fn forward(self, call: Call) -> Result<Forwarded, PathError> {
        let span = request_span(call.provider.name.as_str());
        // Boxed: the exchange is a large future, and spawning it unboxed copies it twice. The
        // box is instrumented, not the future, which would be copied once more.
        let exchange = Box::pin(exchange::exchange(self, call)).instrument(span);
        match tokio::spawn(exchange).await {
            Ok(result) => result,
            Err(e) => Err(PathError::Task(e.to_string())),
        }
    }

    /// A provider answered `status` with `verdict` to `rejected`, a token of `credential`:
    /// when that is a 401 that rejects the token, have the refresh service renew it (see
    /// [`TokenRenewal`]); any other failure is [`TokenRenewal::Not`].
    async fn renew_rejected(
        &self,
        status: StatusCode,
        verdict: &Verdict,
        credential: &CredentialId,
        provider: &ProviderName,
        rejected: crate::refresh::Rejected<'_>,
    ) -> TokenRenewal {
        let token_rejected =
            status == StatusCode::UNAUTHORIZED && matches!(verdict, Verdict::Invalid(_));
        let Some(refresher) = self.0.refresher.as_ref().filter(|_| token_rejected) else {
            return TokenRenewal::Not;
        };
        use crate::refresh::Renewed;
        match refresher
            .renew_rejected(credential, provider, rejected)
            .await
        {
            Renewed::Yes => TokenRenewal::Renewed,
            Renewed::Expired | Renewed::Pending => TokenRenewal::Unmarked,
            Renewed::No => TokenRenewal::Not,
        }
    }

    /// Release a reservation, marking its credential when the failure was its own; a mark is
    /// also written to the auth log (`context` says how it was learnt, if not from a proxied
    /// request) and sent to the webhooks that want it. `false` when the reservation was
    /// already settled or released.
    async fn release(
        &self,
        reservation: &ReservationId,
        credential: &CredentialId,
        provider: &ProviderName,
        mark: Option<Mark>,
        context: &str,
    ) -> Result<bool, StoreError> {
        if let Some(m) = &mark {
            let reason = m.describe();
            self.0.auth_log.record(&format!(
                "credential {credential} ({provider}) marked{context}: {reason}"
            ));
            let kind = match m {
                Mark::Invalid(_) => EventKind::CredentialInvalid,
                Mark::Exhausted { .. } => EventKind::CredentialExhausted,
                Mark::Cooldown { .. } => EventKind::CredentialCooldown,
            };
            let (provider, id) = (provider.as_str(), Some(credential.as_str()));
            self.0
                .notifier
                .send(Event::new(kind, provider, id, reason, self.now()));
        }
        self.0
            .store
            .release(reservation, mark.as_ref(), self.now())
            .await
    }
}
