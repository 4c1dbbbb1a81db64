//! Background jobs, run by tokio-cron-scheduler inside `serve`. Each job is a plain function of
//! the state and `now` in a module of its own, which tests call with the clock they set; the
//! scheduler here only calls it, with the application's clock.
//!
//! - [`resets`]: quota resets. The job runs once when the server starts (before it listens,
//!   from [`crate::app`]: a boundary passed while the server was down is applied then), at
//!   second 0 of every minute (every `daily`, `weekly` and `monthly` boundary is one), and at
//!   each occurrence of every provider's cron expression, so one with seconds resets when it
//!   says. A run with nothing due only reads.
//! - [`refresh`]: the token refresh worker's check, when the server starts and every
//!   `auth.refresh.check_interval` after, while `auth.refresh.enabled`. It takes turns with
//!   itself, not with the resets: a slow token endpoint does not hold a reset back.
//! - [`logins`]: the cleanup of device-flow logins (expired pending ones, ended ones an hour
//!   old), every minute at second 30.

pub mod logins;
pub mod refresh;
pub mod resets;

use crate::quota::ResetSchedule;
use crate::state::AppState;
use std::sync::Arc;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

/// Every minute, at second 0.
const EVERY_MINUTE: &str = "0 * * * * *";
/// Every minute, at second 30 (away from the resets).
const EVERY_MINUTE_AT_30: &str = "30 * * * * *";

/// The running scheduler. [`Jobs::stop`] stops it and waits for a run in progress, so no job
/// writes after the store closes.
pub struct Jobs {
    scheduler: JobScheduler,
    /// Held by a reset run while it runs (so runs take turns) and by `stop`, which then marks
    /// the jobs closed.
    closed: Arc<tokio::sync::Mutex<bool>>,
    /// The same for the refresh checks.
    refresh_closed: Arc<tokio::sync::Mutex<bool>>,
    /// The same for the cleanup of logins.
    logins_closed: Arc<tokio::sync::Mutex<bool>>,
}

impl Jobs {
    /// Start the scheduler with the reset job at its times (see the module's doc).
    pub async fn start(state: Arc<AppState>) -> Result<Jobs, JobSchedulerError> {
        let scheduler = JobScheduler::new().await?;
        let closed = Arc::new(tokio::sync::Mutex::new(false));
        scheduler
            .add(cron_job(EVERY_MINUTE, Work::Resets, &state, &closed)?)
            .await?;
        let mut crons: Vec<&str> = Vec::new();
        for (provider, schedule) in &state.config.config.auth.quota.reset_schedule {
            let ResetSchedule::Cron(_, text) = schedule else {
                continue;
            };
            if crons.contains(&text.as_str()) {
                continue;
            }
            crons.push(text);
            // The config's parser accepted it; should the scheduler's refuse it, the minute's
            // run still applies the reset, up to a minute late.
            match cron_job(text, Work::Resets, &state, &closed) {
                Ok(job) => {
                    scheduler.add(job).await?;
                }
                Err(e) => tracing::warn!(
                    provider = %provider, schedule = %text, error = %e,
                    "the scheduler cannot run this reset schedule at its own times; it is checked every minute"
                ),
            }
        }
        let refresh_closed = Arc::new(tokio::sync::Mutex::new(false));
        if state.refresher.settings().enabled {
            let interval = state.refresher.settings().check_interval;
            scheduler
                .add(refresh_job(interval, &state, &refresh_closed)?)
                .await?;
            // The first check now, not one interval after the start: a token that expired
            // while the server was down is refreshed at once.
            let (state, closed) = (state.clone(), refresh_closed.clone());
            tokio::spawn(async move { refresh_run(&state, &closed).await });
        }
        let logins_closed = Arc::new(tokio::sync::Mutex::new(false));
        scheduler
            .add(cron_job(
                EVERY_MINUTE_AT_30,
                Work::Logins,
                &state,
                &logins_closed,
            )?)
            .await?;
        scheduler.start().await?;
        Ok(Jobs {
            scheduler,
            closed,
            refresh_closed,
            logins_closed,
        })
    }

    /// Stop the scheduler, then wait for a run in progress to end.
    pub async fn stop(mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "the job scheduler did not stop cleanly");
        }
        *self.closed.lock().await = true;
        *self.refresh_closed.lock().await = true;
        *self.logins_closed.lock().await = true;
    }
}

/// One refresh check, unless the jobs are closed or a check is still under way (a check
/// that outlasts its interval is not followed by a queue of others).
async fn refresh_run(state: &Arc<AppState>, closed: &tokio::sync::Mutex<bool>) {
    let Ok(closed) = closed.try_lock() else {
        tracing::debug!("a refresh check is still under way; this one is skipped");
        return;
    };
    if !*closed {
        refresh::run(state, state.now()).await;
    }
}

/// The refresh check every `interval`, with the application's clock.
fn refresh_job(
    interval: std::time::Duration,
    state: &Arc<AppState>,
    closed: &Arc<tokio::sync::Mutex<bool>>,
) -> Result<Job, JobSchedulerError> {
    let (state, closed) = (state.clone(), closed.clone());
    Job::new_repeated_async(interval, move |_, _| {
        let (state, closed) = (state.clone(), closed.clone());
        Box::pin(async move { refresh_run(&state, &closed).await })
    })
}

/// What a job at cron times runs.
#[derive(Debug, Clone, Copy)]
enum Work {
    Resets,
    Logins,
}

impl Work {
    async fn run(self, state: &AppState) {
        match self {
            Work::Resets => {
                resets::run(state, state.now()).await;
            }
            Work::Logins => logins::run(state, state.now()).await,
        }
    }
}

/// A job that runs `work` at the times of `cron`, with the application's clock, unless the
/// jobs are closed (`closed` is held while it runs, so runs of one kind take turns).
fn cron_job(
    cron: &str,
    work: Work,
    state: &Arc<AppState>,
    closed: &Arc<tokio::sync::Mutex<bool>>,
) -> Result<Job, JobSchedulerError> {
    let (state, closed) = (state.clone(), closed.clone());
    Job::new_async(cron, move |_, _| {
        let (state, closed) = (state.clone(), closed.clone());
        Box::pin(async move {
            let closed = closed.lock().await;
            if !*closed {
                work.run(&state).await;
            }
        })
    })
}
