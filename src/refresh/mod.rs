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

pub use check::{Manual, ManualError, ManualResult, Status};

use crate::config::Config;
use crate::crypto::Secret;
use crate::domain::refresh::RefreshTrigger;
use crate::domain::{CredentialId, ProviderName};
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

/// How long a claim on a credential lasts: longer than every try of one refresh with its
/// backoff (each call is bounded by the flows' own timeout), so a claim only ever expires
/// when its process died.
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
    /// It could not be refreshed: the refresh failed in a way worth retrying (the worker will,
    /// at its next check), or the credential has no refresh flow, or automatic refresh is off.
    /// The request path marks the credential as it would without a refresh.
    No,
}

/// What the application reads as now (the state's clock; tests set it).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

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
        }))
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
            let mut flights = self.0.flights.lock().unwrap_or_else(|p| p.into_inner());
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
        let this = self.clone();
        let task = tokio::spawn(async move {
            let outcome = one::refresh(&this, &id, &provider, trigger, tries).await;
            this.0
                .flights
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
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

    /// A provider answered 401 to a proxied request (or a lease report) made with `used`, the
    /// token of OAuth credential `id`: refresh it, unless another refresh already replaced
    /// that token, in which case the credential is ready as it is. One call to the token
    /// endpoint at most (the client is waiting); the refresh is recorded as a check of its own.
    pub async fn renew_rejected(
        &self,
        id: &CredentialId,
        provider: &ProviderName,
        used: &Secret,
    ) -> Renewed {
        if !self.0.settings.enabled || self.0.flows.get(provider.as_str()).is_none() {
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
        if let Ok(Ok(current)) = self.0.store.open_token(id).await
            && !current.ct_eq(used.expose())
        {
            return Renewed::Yes;
        }
        let now = self.now();
        let outcome = self.refresh(id, provider, RefreshTrigger::Request, 1).await;
        check::record_single(self, id, provider, RefreshTrigger::Request, &outcome, now).await;
        match outcome {
            Outcome::Refreshed { .. } => Renewed::Yes,
            Outcome::Failed { rejected: true, .. } => Renewed::Expired,
            Outcome::Failed { .. } | Outcome::Elsewhere => Renewed::No,
        }
    }
}
