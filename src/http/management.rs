//! The management API under `/v0/management` (README, "Management API"): credentials, quotas and
//! bulk import. Handlers parse and check input, call one store method, and shape the answer.

use super::error::ApiError;
use super::extract::{Json, JsonValue, Path, Query};
use super::view;
use crate::crypto::Secret;
use crate::domain::{CredentialId, ProviderName, Status};
use crate::import::{self, CredentialInput, check_label, check_priority, check_secret, nullable};
use crate::quota::CounterTokens;
use crate::state::AppState;
use crate::store::{CredentialPatch, DEFAULT_PAGE, ImportMode, ListFilter, MAX_PAGE, QuotaPatch};
use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

type AppResult<T> = Result<T, ApiError>;

/// Who made a management call, for the audit log: the client's IP address (behind a trusted
/// proxy, the client it names; see [`super::caller`]).
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl Actor {
    pub fn from_caller(caller: &super::caller::Caller) -> Actor {
        Actor(caller.actor())
    }
}

pub(super) fn known_provider(state: &AppState, provider: &str) -> AppResult<()> {
    if state.registry.contains(provider) {
        Ok(())
    } else {
        Err(ApiError::unknown_provider(provider))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    provider: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

/// Paging alone, for the lists of one provider.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<u32>,
    after: Option<String>,
}

/// Set the page of `filter` (whose provider and status are set already: a cursor is bound to
/// them) from `?limit=` (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]) and `?after=`.
fn paged(state: &AppState, filter: &mut ListFilter, page: PageQuery) -> AppResult<()> {
    filter.limit = match page.limit {
        None => DEFAULT_PAGE,
        Some(l) if (1..=MAX_PAGE).contains(&l) => l,
        Some(l) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("Invalid query parameter `limit`: {l} is not between 1 and {MAX_PAGE}"),
            ));
        }
    };
    filter.after = match page.after {
        None => None,
        Some(text) => Some(state.store.parse_cursor(&text, filter).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "Invalid query parameter `after`: not a `next` cursor of this list",
            )
        })?),
    };
    Ok(())
}

/// The response of a list: one page, and the cursor of the next when more rows follow.
async fn list_page(
    state: &AppState,
    filter: &ListFilter,
    provider: Option<&str>,
) -> AppResult<axum::response::Response> {
    let page = state.store.list(filter, state.now()).await?;
    let next = page.next.map(|c| state.store.cursor_text(&c, filter));
    Ok(axum::Json(view::credentials(
        &state.config.config.auth.quota,
        provider,
        &page.rows,
        next,
    ))
    .into_response())
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> AppResult<impl IntoResponse> {
    if let Some(p) = &q.provider {
        known_provider(&state, p)?;
    }
    let status = match &q.status {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!(
                    "Invalid query parameter `status`: `{s}` is not one of active, cooldown, exhausted, expired, invalid, disabled"
                ),
            )
        })?),
    };
    let mut filter = ListFilter {
        provider: q.provider,
        status,
        ..Default::default()
    };
    let page = PageQuery {
        limit: q.limit,
        after: q.after,
    };
    paged(&state, &mut filter, page)?;
    list_page(&state, &filter, None).await
}

pub async fn list_provider(
    State(state): State<Arc<AppState>>,
    Path(provider): Path<String>,
    Query(page): Query<PageQuery>,
) -> AppResult<impl IntoResponse> {
    known_provider(&state, &provider)?;
    let mut filter = ListFilter {
        provider: Some(provider.clone()),
        ..Default::default()
    };
    paged(&state, &mut filter, page)?;
    list_page(&state, &filter, Some(&provider)).await
}

pub async fn add(
    State(state): State<Arc<AppState>>,
    Extension(actor): Extension<Actor>,
    Json(input): Json<CredentialInput>,
) -> AppResult<impl IntoResponse> {
    if let Some(p) = input
        .provider
        .as_ref()
        .filter(|p| !state.registry.contains(p))
    {
        return Err(ApiError::bad_request(
            "unknown_provider",
            format!("Unknown provider `{p}`"),
        ));
    }
    let new = input
        .validate(&state.registry, None)
        .map_err(|e| ApiError::bad_request("invalid_credential", e))?;
    let row = state.store.add(&new, "api", &actor.0, state.now()).await?;
    state.auth_log.record(&format!(
        "added credential {} ({}, {}) through the API from {}",
        row.id,
        row.provider,
        row.kind.as_str(),
        actor.0
    ));
    Ok((
        StatusCode::CREATED,
        axum::Json(view::credential(&state.config.config.auth.quota, &row)),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdQuery {
    id: Option<String>,
}

/// The credential a `?id=` names (its id or its token), or the provider's only credential.
async fn target(state: &AppState, provider: &str, id: Option<&str>) -> AppResult<CredentialId> {
    match id {
        Some(key) if !key.is_empty() => {
            let provider = ProviderName::from(provider);
            Ok(state.store.resolve(&provider, key).await?)
        }
        _ => {
            // The answer names at most this many of the ids (a provider may have 100,000).
            const NAMED: u32 = 20;
            let mut ids = state.store.ids_of_provider(provider, NAMED).await?;
            match ids.len() {
                0 => Err(ApiError::not_found(
                    "credential_not_found",
                    format!("No credentials for provider {provider}"),
                )),
                1 => Ok(ids.pop().unwrap_or_default()),
                _ => {
                    let count = state.store.count_of_provider(provider).await?;
                    let more = if count > ids.len() as u64 {
                        format!(", and {} more", count - ids.len() as u64)
                    } else {
                        String::new()
                    };
                    Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "ambiguous_credential",
                        format!(
                            "Provider {provider} has {count} credentials; name one with ?id= (one of {}{more})",
                            ids.join(", ")
                        ),
                    )
                    .with("ids", ids.iter().map(|i| i.as_str()).collect::<Vec<_>>())
                    .with("count", count))
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateInput {
    provider: Option<String>,
    token: Option<Secret>,
    refresh_token: Option<Secret>,
    priority: Option<i64>,
    #[serde(default, deserialize_with = "nullable")]
    label: Option<Option<String>>,
    disabled: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    expires_at: Option<Option<DateTime<Utc>>>,
}

pub async fn update(
    State(state): State<Arc<AppState>>,
    Extension(actor): Extension<Actor>,
    Path(provider): Path<String>,
    Query(q): Query<IdQuery>,
    Json(input): Json<UpdateInput>,
) -> AppResult<impl IntoResponse> {
    known_provider(&state, &provider)?;
    let invalid = |e: String| ApiError::bad_request("invalid_body", e);
    if let Some(p) = input.provider.as_ref().filter(|p| **p != provider) {
        return Err(invalid(format!(
            "The body names provider `{p}` but the path names `{provider}`"
        )));
    }
    if let Some(t) = &input.token {
        check_secret("token", t).map_err(invalid)?;
    }
    if let Some(t) = &input.refresh_token {
        check_secret("refresh_token", t).map_err(invalid)?;
    }
    if let Some(p) = input.priority {
        check_priority(p).map_err(invalid)?;
    }
    if let Some(Some(l)) = &input.label {
        check_label(l).map_err(invalid)?;
    }
    let patch = CredentialPatch {
        token: input.token,
        refresh_token: input.refresh_token,
        priority: input.priority,
        label: input.label,
        disabled: input.disabled,
        expires_at: input.expires_at,
    };
    if patch.token.is_none()
        && patch.refresh_token.is_none()
        && patch.priority.is_none()
        && patch.label.is_none()
        && patch.disabled.is_none()
        && patch.expires_at.is_none()
    {
        return Err(invalid(
            "Nothing to update: give token, refresh_token, priority, label, disabled or expires_at"
                .into(),
        ));
    }
    let id = target(&state, &provider, q.id.as_deref()).await?;
    let current = state.store.get(&id, state.now()).await?;
    if patch.refresh_token.is_some() && current.kind != crate::domain::CredentialKind::Oauth {
        return Err(invalid("refresh_token is only for type oauth".into()));
    }
    let row = state
        .store
        .update(&id, &patch, &actor.0, state.now())
        .await?;
    state.auth_log.record(&format!(
        "updated credential {} ({}) through the API from {}",
        row.id, row.provider, actor.0
    ));
    Ok(axum::Json(view::credential(&state.config.config.auth.quota, &row)).into_response())
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(actor): Extension<Actor>,
    Path(provider): Path<String>,
    Query(q): Query<IdQuery>,
) -> AppResult<impl IntoResponse> {
    known_provider(&state, &provider)?;
    let key = q.id.filter(|k| !k.is_empty()).ok_or_else(|| {
        ApiError::bad_request(
            "missing_id",
            "Name the credential to delete with ?id= (its id or its token)",
        )
    })?;
    let id = state
        .store
        .resolve(&ProviderName::from(provider), &key)
        .await?;
    let row = state.store.delete(&id, &actor.0, state.now()).await?;
    state.auth_log.record(&format!(
        "deleted credential {} ({}) through the API from {}",
        row.id, row.provider, actor.0
    ));
    Ok(axum::Json(json!({
        "deleted": view::credential(&state.config.config.auth.quota, &row)
    })))
}

pub async fn quota(
    State(state): State<Arc<AppState>>,
    Path(provider): Path<String>,
    Query(page): Query<PageQuery>,
) -> AppResult<impl IntoResponse> {
    known_provider(&state, &provider)?;
    quota_view(&state, &provider, page).await
}

/// The provider's total over all its credentials, and a page of them (paged as the lists are).
async fn quota_view(
    state: &AppState,
    provider: &str,
    page: PageQuery,
) -> AppResult<axum::response::Response> {
    let mut filter = ListFilter {
        provider: Some(provider.to_string()),
        ..Default::default()
    };
    paged(state, &mut filter, page)?;
    let total = state.store.quota_total(provider).await?;
    let default_limit = state.store.default_limit(provider).await?;
    let page = state.store.list(&filter, state.now()).await?;
    let next = page.next.map(|c| state.store.cursor_text(&c, &filter));
    Ok(axum::Json(view::quota(
        &state.config.config.auth.quota,
        provider,
        total,
        default_limit,
        &page.rows,
        next,
    ))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaInput {
    #[serde(default, deserialize_with = "nullable")]
    limit: Option<Option<CounterTokens>>,
    used: Option<CounterTokens>,
    reset: Option<bool>,
}

pub async fn set_quota(
    State(state): State<Arc<AppState>>,
    Extension(actor): Extension<Actor>,
    Path(provider): Path<String>,
    Query(q): Query<IdQuery>,
    Json(input): Json<QuotaInput>,
) -> AppResult<impl IntoResponse> {
    known_provider(&state, &provider)?;
    let patch = QuotaPatch {
        limit: input.limit.map(|l| l.map(CounterTokens::get)),
        used: input.used.map(CounterTokens::get),
        reset: input.reset.unwrap_or(false),
    };
    if patch.limit.is_none() && patch.used.is_none() && !patch.reset {
        return Err(ApiError::bad_request(
            "invalid_body",
            "Nothing to update: give limit (a number or null), used, or reset: true",
        ));
    }
    let provider = ProviderName::from(provider);
    let id = match q.id.as_deref().filter(|k| !k.is_empty()) {
        Some(key) => Some(state.store.resolve(&provider, key).await?),
        None => None,
    };
    let changed = state
        .store
        .set_quota(&provider, id.as_ref(), &patch, &actor.0, state.now())
        .await?;
    let limit = match patch.limit {
        None => "unchanged".to_string(),
        Some(None) => "unlimited".to_string(),
        Some(Some(l)) => l.to_string(),
    };
    let default = if patch.sets_default(id.as_ref()) {
        format!(", and the default limit of new credentials {limit}")
    } else {
        String::new()
    };
    state.auth_log.record(&format!(
        "quota of {} ({} credential(s){}) set through the API from {}: limit {limit}{}{}{default}",
        provider,
        changed,
        id.as_ref().map(|i| format!(": {i}")).unwrap_or_default(),
        actor.0,
        patch
            .used
            .map(|u| format!(", used {u}"))
            .unwrap_or_default(),
        if patch.reset { ", reset" } else { "" },
    ));
    quota_view(&state, provider.as_str(), PageQuery::default()).await
}

pub async fn import(
    State(state): State<Arc<AppState>>,
    Extension(actor): Extension<Actor>,
    JsonValue(body, turn): JsonValue,
) -> AppResult<impl IntoResponse> {
    let rescan = match &body {
        Value::Object(map) if map.contains_key("rescan") => {
            if map.len() != 1 || map.get("rescan") != Some(&Value::Bool(true)) {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "A rescan body is exactly {\"rescan\": true}",
                ));
            }
            true
        }
        _ => false,
    };
    let (batch, mode) = if rescan {
        let batch = state.read_paths(vec![state.config.auth_dir.clone()]).await;
        (batch, ImportMode::Files)
    } else {
        (import::read_body(&state.registry, body), ImportMode::Body)
    };
    // The tree is gone (read into credentials): another bulk body may be built.
    drop(turn);
    let report = state.import(batch, mode, &actor.0, false).await?;
    Ok(axum::Json(report))
}
