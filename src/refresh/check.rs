//! Checks: the worker's ([`Refresher::check`]), a manual one for a provider
//! ([`Refresher::manual`]), and one triggered by a rejected token; each stored as a run with
//! its per-credential outcomes, and the status the management API shows ([`Refresher::status`]).

use super::{Outcome, Refresher};
use crate::domain::refresh::RefreshTrigger;
use crate::domain::{CredentialId, ProviderName};
use crate::store::{RefreshCandidate, RefreshHistory, StoreError};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;

/// Credentials refreshed at once by one check: enough that a check over many credentials ends
/// in a few rounds of calls, few enough not to flood a token endpoint.
const PARALLEL: usize = 4;
/// Outcomes the status shows in `recent`.
const RECENT: u32 = 20;
/// How long the history is kept: each scheduled check deletes what is older.
pub const HISTORY_DAYS: i64 = 30;

/// What a manual refresh asked for.
pub struct Manual<'a> {
    pub provider: &'a ProviderName,
    pub id: Option<&'a CredentialId>,
}

/// One credential's result of a manual refresh.
#[derive(Debug, Clone)]
pub struct ManualResult {
    pub id: CredentialId,
    pub outcome: Outcome,
}

/// Why a manual refresh refreshed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("provider {0} has no refresh flow: its credentials cannot be refreshed")]
    NoFlow(ProviderName),
    #[error(
        "provider {0} has no credential that can be refreshed (OAuth with a refresh token, not disabled)"
    )]
    NothingRefreshable(ProviderName),
    #[error(
        "credential {0} cannot be refreshed: it is not an OAuth credential with a refresh token, or it is disabled"
    )]
    NotRefreshable(CredentialId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The refresh status, as the management API shows it.
#[derive(Debug)]
pub struct Status {
    pub enabled: bool,
    pub check_interval: std::time::Duration,
    pub lead: std::time::Duration,
    /// When the next scheduled check runs (`None` while the worker is off).
    pub next_check: Option<DateTime<Utc>>,
    pub history: RefreshHistory,
}

/// How many of `outcomes` count as refreshed and as failed (a credential another process
/// refreshes is neither).
pub fn tally<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> (u64, u64) {
    outcomes
        .into_iter()
        .fold((0, 0), |(ok, failed), o| match o {
            Outcome::Refreshed { .. } => (ok + 1, failed),
            Outcome::Failed { .. } => (ok, failed + 1),
            Outcome::Elsewhere => (ok, failed),
        })
}

/// Record `outcomes` of a run started at `now` and close it.
async fn record(
    this: &Refresher,
    trigger: RefreshTrigger,
    now: DateTime<Utc>,
    checked: u64,
    outcomes: &[(CredentialId, ProviderName, Outcome)],
) -> Result<(), StoreError> {
    let store = &this.0.store;
    let run = store.start_refresh_run(trigger, now).await?;
    for (id, provider, outcome) in outcomes {
        let error = match outcome {
            Outcome::Refreshed { .. } => None,
            Outcome::Failed { reason, .. } => Some(reason.as_str()),
            Outcome::Elsewhere => continue,
        };
        store
            .record_refresh_outcome(run, id, provider, outcome.ok(), error, this.now())
            .await?;
    }
    let (refreshed, failed) = tally(outcomes.iter().map(|(_, _, o)| o));
    store
        .finish_refresh_run(run, checked, refreshed, failed, this.now())
        .await
}

/// Record the outcome of a refresh made outside a check (a rejected token) as a run of one.
pub(super) async fn record_single(
    this: &Refresher,
    id: &CredentialId,
    provider: &ProviderName,
    trigger: RefreshTrigger,
    outcome: &Outcome,
    now: DateTime<Utc>,
) {
    let outcomes = [(id.clone(), provider.clone(), outcome.clone())];
    if let Err(e) = record(this, trigger, now, 1, &outcomes).await {
        tracing::error!(error = %e, "cannot record a refresh in the history");
    }
}

/// Refresh `due` a few at a time.
async fn refresh_all(
    this: &Refresher,
    due: Vec<RefreshCandidate>,
    trigger: RefreshTrigger,
) -> Vec<(CredentialId, ProviderName, Outcome)> {
    let tries = this.0.settings.max_tries;
    futures_util::stream::iter(due)
        .map(|c| async move {
            let outcome = match c.rejected {
                // The server is stopping: what is left waits for the next start.
                _ if this.closing() => Outcome::Elsewhere,
                Some(reason) => Outcome::Failed {
                    reason: format!(
                        "its refresh was refused earlier ({reason}); replace its tokens"
                    ),
                    rejected: true,
                },
                None => this.refresh(&c.id, &c.provider, trigger, tries).await,
            };
            (c.id, c.provider, outcome)
        })
        .buffered(PARALLEL)
        .collect()
        .await
}

impl Refresher {
    /// The worker's check at `now`: refresh every refreshable credential whose token expires
    /// within the lead time (or has expired, or asked to be refreshed by then), record the
    /// run, and delete history older than [`HISTORY_DAYS`].
    pub async fn check(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let store = &self.0.store;
        let providers = self.0.flows.providers();
        let scan = store
            .refresh_scan(&providers, now, self.0.settings.lead)
            .await?;
        let outcomes = refresh_all(self, scan.due, RefreshTrigger::Schedule).await;
        record(self, RefreshTrigger::Schedule, now, scan.checked, &outcomes).await?;
        self.prune(now).await;
        Ok(())
    }

    /// Delete history older than [`HISTORY_DAYS`] before `now`.
    async fn prune(&self, now: DateTime<Utc>) {
        let before = now - chrono::TimeDelta::days(HISTORY_DAYS);
        match self.0.store.prune_refresh_history(before).await {
            Ok(0) => {}
            Ok(pruned) => {
                tracing::info!(
                    pruned,
                    "refresh history older than {HISTORY_DAYS} days deleted"
                )
            }
            Err(e) => tracing::error!(error = %e, "cannot prune the refresh history"),
        }
    }

    /// Refresh the provider's refreshable credentials (or the one asked for) now, whatever
    /// their expiry; one answer per credential. A credential whose refresh was refused for
    /// good is answered so, without a call.
    pub async fn manual(&self, ask: Manual<'_>) -> Result<Vec<ManualResult>, ManualError> {
        if self.0.flows.get(ask.provider.as_str()).is_none() {
            return Err(ManualError::NoFlow(ask.provider.clone()));
        }
        let now = self.now();
        let candidates = self
            .0
            .store
            .refresh_candidates(ask.provider, ask.id)
            .await?;
        if candidates.is_empty() {
            return Err(match ask.id {
                Some(id) => ManualError::NotRefreshable(id.clone()),
                None => ManualError::NothingRefreshable(ask.provider.clone()),
            });
        }
        let checked = candidates.len() as u64;
        let outcomes = refresh_all(self, candidates, RefreshTrigger::Manual).await;
        if let Err(e) = record(self, RefreshTrigger::Manual, now, checked, &outcomes).await {
            tracing::error!(error = %e, "cannot record a refresh in the history");
        }
        // With the worker off, manual checks are the only ones: they prune too.
        if !self.0.settings.enabled {
            self.prune(now).await;
        }
        Ok(outcomes
            .into_iter()
            .map(|(id, _, outcome)| ManualResult { id, outcome })
            .collect())
    }

    /// The status: the latest scheduled check, when the next one runs, and the latest
    /// outcomes of every kind of check.
    pub async fn status(&self) -> Result<Status, StoreError> {
        let s = &self.0.settings;
        let history = self.0.store.refresh_history(RECENT).await?;
        let interval = chrono::TimeDelta::from_std(s.check_interval).unwrap_or_default();
        let next_check = match &history.last_scheduled {
            _ if !s.enabled => None,
            Some(run) => run.started_at.checked_add_signed(interval),
            // The worker checks when the server starts: none recorded yet means that one is
            // under way.
            None => Some(self.now()),
        };
        Ok(Status {
            enabled: s.enabled,
            check_interval: s.check_interval,
            lead: s.lead,
            next_check,
            history,
        })
    }
}
