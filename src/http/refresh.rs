//! The refresh routes of the management API: the worker's status
//! (`GET /v0/management/auths/refresh/status`) and a refresh now
//! (`POST /v0/management/auths/{provider}/refresh[?id=]`), over [`crate::refresh::Refresher`].

use super::error::ApiError;
use super::extract::{Path, Query};
use crate::domain::{ProviderName, rfc3339};
use crate::refresh::{Manual, ManualError, Outcome, tally};
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

type AppResult<T> = Result<T, ApiError>;

impl From<ManualError> for ApiError {
    fn from(e: ManualError) -> Self {
        let message = e.to_string();
        match e {
            ManualError::NoFlow(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_refreshable", message)
            }
            ManualError::NothingRefreshable(_) => {
                ApiError::new(StatusCode::CONFLICT, "nothing_to_refresh", message)
            }
            ManualError::NotRefreshable(id) => {
                ApiError::new(StatusCode::CONFLICT, "not_refreshable", message)
                    .with("id", id.as_str())
            }
            ManualError::Store(e) => e.into(),
        }
    }
}

/// A duration as the config writes it ("5m", "1h 30m").
fn duration_text(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub async fn status(State(state): State<Arc<AppState>>) -> AppResult<axum::Json<Value>> {
    let status = state.refresher.status().await?;
    let last = status.history.last_scheduled.as_ref();
    let recent: Vec<Value> = status
        .history
        .recent
        .iter()
        .map(|o| {
            json!({
                "credential_id": o.credential_id,
                "provider": o.provider,
                "trigger": o.trigger.as_str(),
                "at": rfc3339(o.at),
                "ok": o.ok,
                "error": o.error,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "last_check": last.map(|r| rfc3339(r.started_at)),
        "next_check": status.next_check.map(rfc3339),
        "credentials_checked": last.map_or(0, |r| r.checked),
        "refreshed": last.map_or(0, |r| r.refreshed),
        "failed": last.map_or(0, |r| r.failed),
        "enabled": status.enabled,
        "check_interval": duration_text(status.check_interval),
        "refresh_lead_time": duration_text(status.lead),
        "recent": recent,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshQuery {
    id: Option<String>,
}

/// Refresh the provider's refreshable credentials, or the one `?id=` names (its id or its
/// token); 200 with one result per credential, whatever each came to.
pub async fn refresh(
    State(state): State<Arc<AppState>>,
    Path(provider): Path<String>,
    Query(q): Query<RefreshQuery>,
) -> AppResult<axum::Json<Value>> {
    super::management::known_provider(&state, &provider)?;
    let provider = ProviderName::from(provider);
    let id = match q.id.filter(|k| !k.is_empty()) {
        Some(key) => Some(state.store.resolve(&provider, &key).await?),
        None => None,
    };
    let results = state
        .refresher
        .manual(Manual {
            provider: &provider,
            id: id.as_ref(),
        })
        .await?;
    let (refreshed, failed) = tally(results.iter().map(|r| &r.outcome));
    let results: Vec<Value> = results
        .iter()
        .map(|r| match &r.outcome {
            Outcome::Refreshed { expires_at } => {
                json!({"id": r.id, "status": "refreshed", "expires_at": rfc3339(*expires_at)})
            }
            Outcome::Failed { reason, rejected } => {
                json!({"id": r.id, "status": if *rejected { "expired" } else { "failed" }, "error": reason})
            }
            Outcome::Elsewhere => json!({
                "id": r.id, "status": "in_progress",
                "error": "another instance is refreshing this credential"
            }),
        })
        .collect();
    Ok(axum::Json(json!({
        "provider": provider,
        "refreshed": refreshed,
        "failed": failed,
        "results": results,
    })))
}
