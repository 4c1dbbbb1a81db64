//! The quota reset job: every provider whose schedule has turned over since its credentials'
//! periods began gets its counters reset (`Store::reset_period`), with a line in the auth log
//! per provider and a `quota.reset` event for the webhooks. A plain function of the state and
//! `now`: the scheduler calls it, tests call it with the clock they set.

use crate::notify::{Event, EventKind};
use crate::state::AppState;
use crate::store::PeriodReset;
use chrono::{DateTime, SecondsFormat, Utc};

/// Who the audit log names for scheduled resets.
pub const ACTOR: &str = "scheduler";

/// One provider's reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderReset {
    pub provider: String,
    /// The new period's start.
    pub period_start: DateTime<Utc>,
    pub reset: PeriodReset,
}

/// Reset every provider that is due at `now` (see `ResetSchedule::reset_due`); providers
/// whose schedule is `never` are left alone. A provider whose reset fails is logged and the
/// others go on; the next run tries it again. Returns the providers reset.
#[tracing::instrument(skip_all, fields(now = %now))]
pub async fn run(state: &AppState, now: DateTime<Utc>) -> Vec<ProviderReset> {
    let mut done = Vec::new();
    for (provider, schedule) in &state.config.config.auth.quota.reset_schedule {
        let Some(start) = schedule.current_start(now) else {
            continue;
        };
        match state.store.reset_period(provider, start, ACTOR, now).await {
            Ok(reset) if reset.credentials == 0 => {}
            Ok(reset) => {
                let at = start.to_rfc3339_opts(SecondsFormat::Secs, true);
                let reason = format!(
                    "{} credential(s) to 0 for the period from {at}, {} exhausted revived \
                     ({schedule})",
                    reset.credentials, reset.revived
                );
                state.auth_log.record(&format!(
                    "quota reset for {provider} ({schedule}) by {ACTOR}: {} credential(s) to 0 \
                     for the period from {at}, {} exhausted revived",
                    reset.credentials, reset.revived
                ));
                let event = Event::new(EventKind::QuotaReset, provider, None, reason, now);
                state.notifier.send(event);
                done.push(ProviderReset {
                    provider: provider.clone(),
                    period_start: start,
                    reset,
                });
            }
            Err(e) => {
                tracing::error!(provider = %provider, error = %e, "cannot reset the quota period");
            }
        }
    }
    done
}
