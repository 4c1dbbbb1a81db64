//! Background jobs, run by tokio-cron-scheduler inside `serve`. Each job is a plain function of
//! the state and `now` in a module of its own, which tests call with the clock they set; the
//! scheduler here only calls it, with the application's clock.
//!
//! - [`resets`]: quota resets. The job runs once when the server starts (before it listens,
//!   from [`crate::app`]: a boundary passed while the server was down is applied then), at
//!   second 0 of every minute (every `daily`, `weekly` and `monthly` boundary is one), and at
//!   each occurrence of every provider's cron expression, so one with seconds resets when it
//!   says. A run with nothing due only reads.

pub mod resets;

use crate::quota::ResetSchedule;
use crate::state::AppState;
use std::sync::Arc;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

/// Every minute, at second 0.
const EVERY_MINUTE: &str = "0 * * * * *";

/// The running scheduler. [`Jobs::stop`] stops it and waits for a run in progress, so no job
/// writes after the store closes.
pub struct Jobs {
    scheduler: JobScheduler,
    /// Held by a run while it runs (so runs take turns) and by `stop`, which then marks the
    /// jobs closed.
    closed: Arc<tokio::sync::Mutex<bool>>,
}

impl Jobs {
    /// Start the scheduler with the reset job at its times (see the module's doc).
    pub async fn start(state: Arc<AppState>) -> Result<Jobs, JobSchedulerError> {
        let scheduler = JobScheduler::new().await?;
        let closed = Arc::new(tokio::sync::Mutex::new(false));
        scheduler
            .add(reset_job(EVERY_MINUTE, &state, &closed)?)
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
            match reset_job(text, &state, &closed) {
                Ok(job) => {
                    scheduler.add(job).await?;
                }
                Err(e) => tracing::warn!(
                    provider = %provider, schedule = %text, error = %e,
                    "the scheduler cannot run this reset schedule at its own times; it is checked every minute"
                ),
            }
        }
        scheduler.start().await?;
        Ok(Jobs { scheduler, closed })
    }

    /// Stop the scheduler, then wait for a run in progress to end.
    pub async fn stop(mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "the job scheduler did not stop cleanly");
        }
        *self.closed.lock().await = true;
    }
}

/// A job that runs the resets at the times of `cron`, with the application's clock.
fn reset_job(
    cron: &str,
    state: &Arc<AppState>,
    closed: &Arc<tokio::sync::Mutex<bool>>,
) -> Result<Job, JobSchedulerError> {
    let (state, closed) = (state.clone(), closed.clone());
    Job::new_async(cron, move |_, _| {
        let (state, closed) = (state.clone(), closed.clone());
        Box::pin(async move {
            let closed = closed.lock().await;
            if !*closed {
                resets::run(&state, state.now()).await;
            }
        })
    })
}
