//! The management endpoints that list and lift bans (`/v0/management/bans`). The bans
//! themselves are kept by the guards, in [`super::guard::ban_table`]; these endpoints sit
//! behind [`super::guard::recovery_guard`], which lets the operator at the console in while
//! loopback is banned.

use super::HttpState;
use super::error::ApiError;
use super::extract::Query;
use super::guard::ban_table::{Ban, BanKey};
use super::management::Actor;
use crate::domain::rfc3339;
use axum::Extension;
use axum::extract::State;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

/// `GET /v0/management/bans`: `{"bans": [{"address", "kind", "until"}]}`.
pub async fn list(State(state): State<HttpState>) -> impl IntoResponse {
    let now = state.app.now();
    let bans: Vec<_> = state
        .guards
        .management
        .bans()
        .list(now)
        .into_iter()
        .chain(state.guards.clients.bans().list(now))
        .map(|b| b.view())
        .collect();
    axum::Json(json!({ "bans": bans }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiftQuery {
    address: Option<String>,
}

/// `DELETE /v0/management/bans[?address=]`: lift the bans (both kinds) on one address and on
/// the block holding it, or on one block, or all.
pub async fn lift(
    State(state): State<HttpState>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<LiftQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let key = match q.address.as_deref() {
        None => None,
        Some(text) => Some(BanKey::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "Invalid query parameter `address`: give `loopback`, an IP address, or a block as the list shows it (an IPv6 /64 or /48, an IPv4 /24)",
            )
        })?),
    };
    let actor = actor.0;
    let now = state.app.now();
    let mut lifted = state.guards.management.bans().lift(key, now);
    lifted.extend(state.guards.clients.bans().lift(key, now));
    let lines: Vec<String> = if lifted.is_empty() {
        vec![format!(
            "no ban to lift for {} (asked by {actor})",
            key.map_or("any address".into(), |k| k.to_string())
        )]
    } else {
        lifted
            .iter()
            .map(|b| {
                format!(
                    "lifted the {} ban on {} (until {}) by {actor}",
                    b.kind.as_str(),
                    b.key,
                    rfc3339(b.until)
                )
            })
            .collect()
    };
    state
        .app
        .auth_log
        .record_all(lines.iter().map(String::as_str));
    if lifted.is_empty()
        && let Some(k) = key
    {
        return Err(ApiError::not_found(
            "ban_not_found",
            format!("No ban is in force on {k}"),
        ));
    }
    let lifted: Vec<_> = lifted.iter().map(Ban::view).collect();
    Ok(axum::Json(json!({ "lifted": lifted })))
}
