//! The one attempt loop, shared by forwarding and leasing ([`Attempts`]): reserve tokens on a
//! credential not tried yet, open its token, and when the token does not open mark the
//! credential invalid and take the next, up to `proxy.max_attempts` reservations. And what
//! a failed call's verdict does to its credential and to the request ([`after_failure`]).

use super::settle::Held;
use super::{PathError, RequestPath};
use crate::crypto::Secret;
use crate::domain::{CredentialId, ProviderName};
use crate::notify::{Event, EventKind};
use crate::providers::classify::{MAX_RETRY_AFTER, Verdict};
use crate::store::{Mark, ReservationKind, ReserveRequest};
use chrono::{DateTime, Utc};
use std::sync::Arc;

/// The shortest an exhausted mark with the provider's date lasts: a date already past (our
/// clock ahead of the provider's) would otherwise leave the key to fail the next request too.
const MIN_EXHAUSTED: chrono::TimeDelta = chrono::TimeDelta::minutes(1);
/// The longest: a date further ahead (no provider names one; a misread one could) counts as
/// this far, so a mark always ends.
const MAX_EXHAUSTED: chrono::TimeDelta = chrono::TimeDelta::days(366);

/// A reserved credential with its token open.
pub(super) struct Granted {
    pub(super) held: Held,
    pub(super) token: Arc<Secret>,
}

/// The attempts of one request or lease on the credentials of one provider.
pub(super) struct Attempts<'a> {
    path: &'a RequestPath,
    provider: &'a ProviderName,
    tokens: u64,
    kind: ReservationKind,
    /// When an unreported lease is settled at its reservation.
    expires_at: Option<DateTime<Utc>>,
    /// Credentials reserved so far, not to be picked again.
    tried: Vec<CredentialId>,
    /// Reservations left (`proxy.max_attempts` at the start).
    left: u32,
    /// The request's span, which names the attempt under way and its credential.
    span: tracing::Span,
}

impl<'a> Attempts<'a> {
    /// The attempts of a proxied request reserving `tokens`.
    pub(super) fn request(path: &'a RequestPath, provider: &'a ProviderName, tokens: u64) -> Self {
        Self::new(path, provider, tokens, ReservationKind::Request, None)
    }

    /// The attempts of a lease reserving `tokens` until `expires_at`.
    pub(super) fn lease(
        path: &'a RequestPath,
        provider: &'a ProviderName,
        tokens: u64,
        expires_at: DateTime<Utc>,
    ) -> Self {
        let kind = ReservationKind::Lease;
        Self::new(path, provider, tokens, kind, Some(expires_at))
    }

    fn new(
        path: &'a RequestPath,
        provider: &'a ProviderName,
        tokens: u64,
        kind: ReservationKind,
        expires_at: Option<DateTime<Utc>>,
    ) -> Self {
        Attempts {
            path,
            provider,
            tokens,
            kind,
            expires_at,
            tried: Vec::new(),
            left: path.0.settings.max_attempts,
            span: tracing::Span::current(),
        }
    }

    /// What the auth log says of a mark made here, after "marked".
    fn context(&self) -> &'static str {
        match self.kind {
            ReservationKind::Request => "",
            ReservationKind::Lease => " for a lease",
        }
    }

    /// A request (or lease) moved on from `left`, which failed, to `to`: a line in the auth
    /// log and a `credential.rotated` event naming the credential moved to.
    fn rotated(&self, left: &CredentialId, to: &CredentialId) {
        let shared = &self.path.0;
        let provider = self.provider.as_str();
        let what = match self.kind {
            ReservationKind::Request => "a request",
            ReservationKind::Lease => "a lease",
        };
        let reason = format!("{what} moved on from credential {left} after it failed");
        shared.auth_log.record(&format!(
            "credential {to} ({provider}) rotated to: {reason}"
        ));
        let event = Event::new(
            EventKind::CredentialRotated,
            provider,
            Some(to.as_str()),
            reason,
            self.path.now(),
        );
        shared.notifier.send(event);
    }

    /// The next credential, reserved, with its token open; `Ok(None)` once every attempt is
    /// used. A token that does not open marks its credential invalid, and the next one is
    /// reserved. `Err(PathError::Unavailable)` when nothing could be reserved. (One function,
    /// not one per reservation: each async function between the loop and the store's
    /// futures copies them once more per request.)
    pub(super) async fn next(&mut self) -> Result<Option<Granted>, PathError> {
        let shared = &self.path.0;
        while self.left > 0 {
            self.left -= 1;
            self.span.record("attempt", self.tried.len() + 1);
            let req = ReserveRequest {
                provider: self.provider,
                tokens: self.tokens,
                strategy: shared.settings.strategy,
                exclude: &self.tried,
                kind: self.kind,
                expires_at: self.expires_at,
            };
            let path = self.path;
            let now = || path.now();
            let reservation = match shared
                .store
                .reserve_waiting(&req, now, super::ROOM_PATIENCE)
                .await?
            {
                Ok(r) => r,
                Err(why) => {
                    let provider = self.provider.clone();
                    return Err(PathError::Unavailable { provider, why });
                }
            };
            let credential = reservation.credential_id;
            self.span.record("credential", credential.as_str());
            if let Some(left) = self.tried.last() {
                self.rotated(left, &credential);
            }
            self.tried.push(credential.clone());
            let held = Held::new(self.path, reservation.id, credential, self.provider);
            match shared.store.open_token(held.credential()).await {
                Ok(Ok(token)) => return Ok(Some(Granted { held, token })),
                Ok(Err(reason)) => {
                    let context = self.context();
                    held.give_back(Some(Mark::Invalid(reason)), context).await;
                }
                Err(e) => {
                    held.give_back(None, "").await;
                    return Err(e.into());
                }
            }
        }
        Ok(None)
    }
}

/// What to do with a credential after an upstream verdict: only its own failures mark it.
pub(super) fn mark_for(verdict: &Verdict, now: DateTime<Utc>) -> Option<Mark> {
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

/// What follows a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Then {
    /// Try the next credential.
    TryAnother,
    /// The credential's rejected token was replaced by a refresh: it may be tried again.
    TryAgain(CredentialId),
    /// Answer the provider's error as it came.
    Answer,
    /// Answer [`PathError::LocationRefused`] with this reason.
    Refused(String),
}

impl Attempts<'_> {
    /// `credential` may be picked again: its token was rejected, and it has a new one now.
    /// Every pick still takes one of the request's attempts.
    pub(super) fn allow_again(&mut self, credential: &CredentialId) {
        self.tried.retain(|c| c != credential);
    }
}

/// What a failed call's verdict leads to: the mark on its credential, and what follows.
/// `overloaded` says whether an earlier attempt of the same request found the provider
/// overloaded, and is set here. Overload is the provider's state, not the key's: nothing is
/// marked (cooling the keys would turn a provider's brief outage into our own 429s for
/// longer), and one other key is tried, since an overload is often one busy machine behind
/// the provider's balancer and a second request may reach another; a second overload goes
/// back to the client as the provider's answer, so one request never adds more than one
/// call to an outage.
pub(super) fn after_failure(
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
