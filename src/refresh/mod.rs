//! The token refresh service ([`Refresher`]): refreshing OAuth credentials before their access
//! tokens expire, when a provider rejects one (a 401 on a proxied request), and when an
//! operator asks; with a history of every check that survives restarts.
//!
//! - One refresh per credential at a time. Inside the process, a refresh under way is shared:
//!   the worker, a manual refresh and a 401 that meet on one credential all wait for the same
//!   call to the token endpoint and get its result ([`Refresher::refresh`]). Across processes
//!   sharing a database, a claim in the database with an expiry does the same (the store's
//!   `claim_refresh`): a process that finds another's claim leaves the credential to it.
//! - The call itself is the provider's [`crate::oauth::OauthFlow`]; this module decides what
//!   its result does ([`one`]): a success is stored (the rotated refresh token in the same
//!   transaction as the new access token); a rejection (`invalid_grant`, a 401) leaves the
//!   credential `expired` with the provider's reason, and the worker leaves it alone until its
//!   tokens are replaced; a failure worth retrying (network, 429, 5xx) is retried with backoff
//!   and, when the tries run out, counted as failed.
//! - The work runs in a task of its own, so a caller that goes away (an HTTP client hanging up)
//!   never stops a refresh between the token endpoint's answer and the store: a rotated
//!   refresh token is never lost that way.
//! - Checks ([`check`]): the worker's, every `auth.refresh.check_interval`; a manual one per
//!   provider; each stored with its per-credential outcomes, which the status endpoint reads.

mod check;
mod one;

pub use check::{Manual, ManualError, ManualResult, Status, tally};

use crate::config::Config;
use crate::crypto::Secret;
use crate::domain::refresh::RefreshTrigger;
use crate::domain::{Clock, CredentialId, ProviderName};
use crate::events::AuthLog;
use crate::notify::Notifier;
use crate::oauth::Flows;
use crate::store::Store;
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a claim on a credential lasts from each try of a refresh (it is taken afresh
/// before every try): far longer than one try with its backoff (each call is bounded by the
/// flows' own timeout), so a claim only expires when its process died.
const CLAIM_TTL: Duration = Duration::from_secs(15 * 60);

/// The settings the service reads (`auth.refresh`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub enabled: bool,
    pub check_interval: Duration,
    pub lead: Duration,
    pub max_tries: u32,
    pub backoff: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        let r = &config.auth.refresh;
        Settings {
            enabled: r.enabled,
            check_interval: r.check_interval.0,
            lead: r.refresh_lead_time.0,
            max_tries: r.max_tries,
            backoff: r.retry_backoff.0,
        }
    }
}

/// What one refresh of one credential came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new access token is stored, expiring then.
    Refreshed { expires_at: DateTime<Utc> },
    /// Not refreshed. `rejected`: for good (the credential is now `expired`), else worth
    /// trying again later.
    Failed { reason: String, rejected: bool },
    /// Another process holds the credential's claim: it refreshes it.
    Elsewhere,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        matches!(self, Outcome::Refreshed { .. })
    }
}

/// What [`Refresher::renew_rejected`] found, for the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    /// The credential holds a token other than the rejected one now.
    Yes,
    /// The provider refused the refresh for good: the credential is `expired` already.
    Expired,
    /// The refresh is still under way after [`REJECTED_PATIENCE`]: the request moves on
    /// without marking the credential; the refresh goes on in its own task.
    Pending,
    /// It could not be refreshed: the refresh failed in a way worth retrying (the worker will,
    /// at its next check), the credential has no refresh flow, automatic refresh is off, or it
    /// was refreshed within [`REJECTED_GAP`] and its new token is rejected too. The request
    /// path marks the credential as it would without a refresh.
    No,
}

/// Which token a provider rejected.
#[derive(Debug, Clone, Copy)]
pub enum Rejected<'a> {
    /// This token (a proxied request knows the one it sent).
    Token(&'a Secret),
    /// The token the credential held at this time (a lease knows when it handed its token
    /// out, at its grant or last renewal).
    HeldAt(DateTime<Utc>),
}

/// A rejected token refreshes its credential at most once in this long: a provider that
/// rejects every token, or a client that reports 401 on every lease, costs the token endpoint
/// one call a minute per credential, not one per request.
pub const REJECTED_GAP: Duration = Duration::from_secs(60);
/// How long a request whose token was rejected waits for the refresh before it moves on (it
/// holds its reservation meanwhile).
pub const REJECTED_PATIENCE: Duration = Duration::from_secs(10);

/// Removes a flight's entry when its task ends.
struct Landed<'a>(&'a Refresher, &'a CredentialId);

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        lock(&self.0.0.flights).remove(self.1);
    }
}

/// What the service is built from.
pub struct Parts {
    pub store: Store,
    pub flows: Flows,
    pub auth_log: Arc<AuthLog>,
    pub notifier: Notifier,
    pub clock: Clock,
    pub settings: Settings,
}

/// The refresh service; clones share it.
#[derive(Clone)]
pub struct Refresher(Arc<Inner>);

type Flight = Shared<BoxFuture<'static, Outcome>>;

struct Inner {
    store: Store,
    flows: Flows,
    auth_log: Arc<AuthLog>,
    notifier: Notifier,
    clock: Clock,
    settings: Settings,
    /// The refreshes under way in this process, by credential: a caller that finds one waits
    /// for it instead of starting another.
    flights: Mutex<HashMap<CredentialId, Flight>>,
    /// When this process last started, and last completed, a refresh of each credential (for
    /// the bounds on refreshes a rejected token makes).
    started: Mutex<Times>,
    refreshed: Mutex<Times>,
    /// Set when the server stops: checks start no more refreshes, and refreshes no more tries.
    closing: std::sync::atomic::AtomicBool,
}

/// How long a stopping server waits for refreshes under way to store what they got.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// Lock a map, whatever a panicking holder left (its entries stay valid).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a completed refresh is remembered: a lease (at most a day long) reporting a 401
/// asks whether its token was replaced since it was handed out.
const REFRESHED_KEPT: Duration = Duration::from_secs(86_400);
/// The size past which [`Times::remember`] first forgets the entries older than their use.
const PRUNE_PAST: usize = 1024;

/// A time per credential, forgotten once past its use: so credentials deleted long ago, or
/// refreshed once, do not stay for the life of the process.
#[derive(Default)]
struct Times {
    at: HashMap<CredentialId, DateTime<Utc>>,
    /// The size at which the next prune runs: [`PRUNE_PAST`], or twice what the last one
    /// kept (so a map of many times all in use is not scanned at every insert).
    prune_at: usize,
}

impl Times {
    fn get(&self, id: &CredentialId) -> Option<DateTime<Utc>> {
        self.at.get(id).copied()
    }

    /// Record `at` for `id`, first forgetting the times older than `kept` when the map has
    /// grown to its next prune.
    fn remember(&mut self, id: CredentialId, at: DateTime<Utc>, kept: Duration) {
        if self.at.len() >= self.prune_at.max(PRUNE_PAST) {
            let kept = chrono::TimeDelta::from_std(kept).unwrap_or(chrono::TimeDelta::MAX);
            self.at.retain(|_, t| at.signed_duration_since(*t) < kept);
            self.prune_at = self.at.len().saturating_mul(2);
        }
        self.at.insert(id, at);
    }
}

impl Refresher {
    pub fn new(parts: Parts) -> Refresher {
        Refresher(Arc::new(Inner {
            store: parts.store,
            flows: parts.flows,
            auth_log: parts.auth_log,
            notifier: parts.notifier,
            clock: parts.clock,
            settings: parts.settings,
            flights: Mutex::new(HashMap::new()),
            started: Mutex::new(Times::default()),
            refreshed: Mutex::new(Times::default()),
            closing: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn closing(&self) -> bool {
        self.0.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The server is stopping: start no more refreshes, try no more, and wait (up to `grace`)
    /// for those under way to store what they got.
    pub async fn close(&self, grace: Duration) {
        self.0
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        while !lock(&self.0.flights).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.0.settings
    }

    fn now(&self) -> DateTime<Utc> {
        (self.0.clock)()
    }

    /// Refresh one credential of `provider`, or wait for the refresh of it already under way
    /// in this process and take its result. `tries` bounds the calls to the token endpoint of
    /// a refresh this call starts (one that is joined keeps its own).
    pub async fn refresh(
        &self,
        id: &CredentialId,
        provider: &ProviderName,
        trigger: RefreshTrigger,
        tries: u32,
    ) -> Outcome {
        let flight = {
            let mut flights = lock(&self.0.flights);
            match flights.get(id) {
                Some(flight) => flight.clone(),
                None => {
                    let flight = self.start_flight(id.clone(), provider.clone(), trigger, tries);
                    flights.insert(id.clone(), flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    /// Start the refresh of `id` in a task of its own; the task takes its entry out of the
    /// flights when it ends, before its result is read, so a later caller starts afresh.
    fn start_flight(
        &self,
        id: CredentialId,
        provider: ProviderName,
        trigger: RefreshTrigger,
        tries: u32,
    ) -> Flight {
        lock(&self.0.started).remember(id.clone(), self.now(), REJECTED_GAP);
        let this = self.clone();
        let task = tokio::spawn(async move {
            // Takes the entry out of the flights however the task ends (a panic included),
            // so a later caller starts afresh rather than reading a dead flight forever.
            let _landed = Landed(&this, &id);
            let outcome = one::refresh(&this, &id, &provider, trigger, tries).await;
            if outcome.ok() {
                lock(&this.0.refreshed).remember(id.clone(), this.now(), REFRESHED_KEPT);
            }
            outcome
        });
        async move {
            task.await.unwrap_or_else(|e| Outcome::Failed {
                reason: format!("the refresh stopped: {e}"),
                rejected: false,
            })
        }
        .boxed()
        .shared()
    }

    /// A provider answered 401 to a proxied request (or a lease report) with `rejected`, a
    /// token of OAuth credential `id`: refresh it, unless another refresh already replaced
    /// that token (the credential is ready as it is). Joins a refresh under way; starts one
    /// (one call to the token endpoint: the client is waiting) only if none started in the
    /// last [`REJECTED_GAP`]; waits at most [`REJECTED_PATIENCE`]. A refresh it starts is
    /// recorded as a check of its own.
    pub async fn renew_rejected(
        &self,
        id: &CredentialId,
        provider: &ProviderName,
        rejected: Rejected<'_>,
    ) -> Renewed {
        if !self.0.settings.enabled
            || self.closing()
            || self.0.flows.get(provider.as_str()).is_none()
        {
            return Renewed::No;
        }
        match self.0.store.refresh_candidates(provider, Some(id)).await {
            Ok(c) if c.first().is_some_and(|c| c.rejected.is_none()) => {}
            Ok(c) if !c.is_empty() => return Renewed::Expired,
            // An API key, or no refresh token: nothing to refresh with.
            Ok(_) => return Renewed::No,
            Err(e) => {
                tracing::warn!(credential = %id, error = %e, "cannot read a rejected credential");
                return Renewed::No;
            }
        }
        let replaced = match rejected {
            Rejected::Token(used) => matches!(
                self.0.store.open_token(id).await,
                Ok(Ok(current)) if !current.ct_eq(used.expose())
            ),
            Rejected::HeldAt(at) => lock(&self.0.refreshed).get(id).is_some_and(|t| t > at),
        };
        if replaced {
            return Renewed::Yes;
        }
        let now = self.now();
        let gap = chrono::TimeDelta::from_std(REJECTED_GAP).unwrap_or_default();
        let in_flight = lock(&self.0.flights).contains_key(id);
        let started_lately = lock(&self.0.started)
            .get(id)
            .is_some_and(|t| now.signed_duration_since(t) < gap);
        if !in_flight && started_lately {
            return Renewed::No;
        }
        // A refresh joined is recorded by whoever started it.
        let record = !in_flight;
        let this = self.clone();
        let (id2, provider2) = (id.clone(), provider.clone());
        // Its own task: the request's patience running out does not stop the refresh, nor
        // its record.
        let refresh = tokio::spawn(async move {
            let outcome = this
                .refresh(&id2, &provider2, RefreshTrigger::Request, 1)
                .await;
            if record {
                let trigger = RefreshTrigger::Request;
                check::record_single(&this, &id2, &provider2, trigger, &outcome, now).await;
            }
            outcome
        });
        match tokio::time::timeout(REJECTED_PATIENCE, refresh).await {
            Err(_) => Renewed::Pending,
            Ok(Err(_)) => Renewed::No,
            Ok(Ok(Outcome::Refreshed { .. })) => Renewed::Yes,
            Ok(Ok(Outcome::Failed { rejected: true, .. })) => Renewed::Expired,
            Ok(Ok(Outcome::Failed { .. } | Outcome::Elsewhere)) => Renewed::No,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_times_are_forgotten_past_their_use_once_there_are_many() {
        let mut times = Times::default();
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let at = |s: i64| t0 + chrono::TimeDelta::seconds(s);
        let id = |s: String| CredentialId::from(s.as_str());
        let kept = Duration::from_secs(60);
        for n in 0..PRUNE_PAST {
            times.remember(id(format!("old-{n}")), t0, kept);
        }
        assert_eq!(times.at.len(), PRUNE_PAST);
        // Within their use: all kept, and the next prune waits for twice as many.
        times.remember(id("a".into()), at(59), kept);
        assert_eq!(times.at.len(), PRUNE_PAST + 1);
        times.remember(id("b".into()), at(60), kept);
        assert_eq!(times.at.len(), PRUNE_PAST + 2);
        for n in times.at.len()..2 * PRUNE_PAST {
            times.remember(id(format!("more-{n}")), at(60), kept);
        }
        // Past it for the first ones: they go (at the prune the doubled size ran), the recent
        // ones stay.
        times.remember(id("c".into()), at(61), kept);
        assert_eq!(times.at.len(), PRUNE_PAST + 1);
        assert!(!times.at.keys().any(|k| k.to_string().starts_with("old-")));
        assert_eq!(times.get(&id("a".into())), Some(at(59)));
        assert_eq!(times.get(&id("c".into())), Some(at(61)));
        // The largest wait still bounds (no overflow).
        let mut forever = Times::default();
        for n in 0..=PRUNE_PAST {
            forever.remember(id(format!("{n}")), t0, Duration::MAX);
        }
        assert_eq!(forever.at.len(), PRUNE_PAST + 1);
    }
}
