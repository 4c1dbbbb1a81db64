//! The cleanup of device-flow logins, every minute: pending sessions past their time end
//! `expired`, and sessions ended more than an hour ago are deleted
//! ([`crate::login::Logins::cleanup`]). A failed run is logged; the next one still runs.

use crate::state::AppState;
use chrono::{DateTime, Utc};

/// Run the cleanup at `now`.
pub async fn run(state: &AppState, now: DateTime<Utc>) {
    if let Err(e) = state.logins.cleanup(now).await {
        tracing::error!(error = %e, "the cleanup of logins failed");
    }
}
