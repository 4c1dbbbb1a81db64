//! The refresh worker's check: every `auth.refresh.check_interval` (and once when the server
//! starts), refresh the OAuth credentials whose tokens expire within the lead time
//! ([`crate::refresh::Refresher::check`]). A failed check is logged; the next one still runs.

use crate::state::AppState;
use chrono::{DateTime, Utc};

/// Run one check at `now`.
pub async fn run(state: &AppState, now: DateTime<Utc>) {
    if let Err(e) = state.refresher.check(now).await {
        tracing::error!(error = %e, "the refresh check failed");
    }
}
