//! One refresh of one credential, from its claim to its stored result: the calls to the
//! provider's token endpoint with their retries, what their result does to the credential,
//! and the auth-log lines and events that tell of it.

use super::{CLAIM_TTL, Outcome, Refresher};
use crate::domain::refresh::{FlowError, RefreshTrigger, Refreshed};
use crate::domain::{CredentialId, ProviderName, rfc3339};
use crate::notify::{Event, EventKind};
use std::time::Duration;

/// How many times storing a refresh's result is tried: the token endpoint may have rotated the
/// refresh token, and the old one no longer works, so a failed write is worth a second go.
const STORE_TRIES: u32 = 3;

/// Refresh `id` under its claim (see the module's doc of [`super`]).
pub(super) async fn refresh(
    this: &Refresher,
    id: &CredentialId,
    provider: &ProviderName,
    trigger: RefreshTrigger,
    tries: u32,
) -> Outcome {
    let inner = &this.0;
    let Some(flow) = inner.flows.get(provider.as_str()) else {
        return Outcome::Failed {
            reason: format!("provider {provider} has no refresh flow"),
            rejected: false,
        };
    };
    if let Err(outcome) = claim(this, id).await {
        return outcome;
    }
    let material = match inner.store.refresh_material(id).await {
        Ok(m) => m,
        Err(crate::store::StoreError::NotFound) => {
            release(this, id).await;
            return deleted();
        }
        Err(e) => {
            release(this, id).await;
            return store_failure(id, "reading it", &e);
        }
    };
    let mut wait = inner.settings.backoff;
    let mut tried = 0;
    let result = loop {
        tried += 1;
        // The claim is taken afresh before every try after the first: a refresh with long
        // retries outlasts no claim, and one whose claim was taken over stops here, before
        // it sends a refresh token the other may have rotated.
        if tried > 1
            && let Err(outcome) = claim(this, id).await
        {
            return outcome;
        }
        match flow.refresh(&material, this.now()).await {
            Err(FlowError::Transient {
                reason,
                retry_after,
            }) if tried < tries.max(1) && !this.closing() => {
                let pause = retry_after
                    .unwrap_or(wait)
                    .min(crate::config::MAX_RETRY_BACKOFF);
                tracing::info!(
                    credential = %id, %provider, tried, error = %reason,
                    "token refresh failed; trying again"
                );
                tokio::time::sleep(pause).await;
                wait = wait.saturating_mul(2).min(crate::config::MAX_RETRY_BACKOFF);
            }
            other => break other,
        }
    };
    drop(material);
    match result {
        Ok(refreshed) => stored(this, id, provider, trigger, &refreshed).await,
        Err(FlowError::Transient { reason, .. }) => {
            release(this, id).await;
            let reason = format!("{reason} (after {tried} tries)");
            failed(this, id, provider, trigger, &reason, false);
            Outcome::Failed {
                reason,
                rejected: false,
            }
        }
        Err(FlowError::Rejected(reason) | FlowError::Unrefreshable(reason)) => {
            rejected(this, id, provider, trigger, reason).await
        }
    }
}

/// Store a successful refresh, and tell of it.
async fn stored(
    this: &Refresher,
    id: &CredentialId,
    provider: &ProviderName,
    trigger: RefreshTrigger,
    refreshed: &Refreshed,
) -> Outcome {
    let inner = &this.0;
    let mut attempt = 0;
    let written = loop {
        attempt += 1;
        match inner.store.store_refreshed(id, refreshed, this.now()).await {
            Ok(written) => break Ok(written),
            Err(crate::store::StoreError::NotFound) => return deleted(),
            Err(e) if attempt < STORE_TRIES => {
                tracing::warn!(credential = %id, error = %e, "cannot store a refreshed token; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => break Err(e),
        }
    };
    let reason = match written {
        Ok(true) => {
            let expires_at = refreshed.expires_at;
            let rotated = if refreshed.refresh_token.is_some() {
                ", refresh token rotated"
            } else {
                ""
            };
            let reason = format!(
                "refreshed ({}); token expires at {}{rotated}",
                trigger.as_str(),
                rfc3339(expires_at)
            );
            tell(
                this,
                EventKind::CredentialRefreshed,
                id,
                provider,
                &reason,
                &reason,
            );
            return Outcome::Refreshed { expires_at };
        }
        // Its tokens were replaced through the API or an import while it was refreshed (or,
        // after 15 minutes, another server took the claim over): those stand.
        Ok(false) => {
            "its tokens were replaced while it was refreshed; the refreshed ones were dropped"
                .to_string()
        }
        // The claim is kept (it expires on its own): released, another refresh could start
        // from the refresh token this one may have rotated away.
        Err(e) => {
            tracing::error!(credential = %id, error = %e, "cannot store a refreshed token");
            "the new token could not be stored".to_string()
        }
    };
    failed(this, id, provider, trigger, &reason, false);
    Outcome::Failed {
        reason,
        rejected: false,
    }
}

/// The provider refused the refresh for good: the credential becomes `expired` with its reason.
async fn rejected(
    this: &Refresher,
    id: &CredentialId,
    provider: &ProviderName,
    trigger: RefreshTrigger,
    reason: String,
) -> Outcome {
    let inner = &this.0;
    match inner.store.reject_refresh(id, &reason, this.now()).await {
        Err(crate::store::StoreError::NotFound) => return deleted(),
        Ok(true) => {
            let refused = format!("refresh refused: {reason}");
            let line = format!("marked expired: {refused}");
            tell(
                this,
                EventKind::CredentialExpired,
                id,
                provider,
                &line,
                &refused,
            );
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(credential = %id, error = %e, "cannot mark a credential expired");
            release(this, id).await;
        }
    }
    failed(this, id, provider, trigger, &reason, true);
    Outcome::Failed {
        reason,
        rejected: true,
    }
}

/// A refresh that did not succeed: a line in the auth log and a `refresh.failed` event.
fn failed(
    this: &Refresher,
    id: &CredentialId,
    provider: &ProviderName,
    trigger: RefreshTrigger,
    reason: &str,
    rejected: bool,
) {
    let what = if rejected { "refused" } else { "failed" };
    let line = format!("refresh {what} ({}): {reason}", trigger.as_str());
    tell(this, EventKind::RefreshFailed, id, provider, &line, reason);
}

/// Tell of a refresh of `id`: `line` in the auth log after the credential's name, and a `kind`
/// event saying `reason` to the webhooks.
fn tell(
    this: &Refresher,
    kind: EventKind,
    id: &CredentialId,
    provider: &ProviderName,
    line: &str,
    reason: &str,
) {
    let inner = &this.0;
    inner
        .auth_log
        .record(&format!("credential {id} ({provider}) {line}"));
    let event = Event::new(
        kind,
        provider.as_str(),
        Some(id.as_str()),
        reason,
        this.now(),
    );
    inner.notifier.send(event);
}

/// Take (or take afresh) the claim on `id`; the outcome to return when it cannot be had.
async fn claim(this: &Refresher, id: &CredentialId) -> Result<(), Outcome> {
    match this.0.store.claim_refresh(id, this.now(), CLAIM_TTL).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Outcome::Elsewhere),
        Err(e) => Err(store_failure(id, "claiming it", &e)),
    }
}

async fn release(this: &Refresher, id: &CredentialId) {
    if let Err(e) = this.0.store.release_refresh_claim(id).await {
        tracing::warn!(credential = %id, error = %e, "cannot release a refresh claim; it expires on its own");
    }
}

/// The credential was deleted while it was refreshed: nothing to store, nobody to tell.
fn deleted() -> Outcome {
    Outcome::Failed {
        reason: "the credential was deleted".into(),
        rejected: false,
    }
}

fn store_failure(id: &CredentialId, doing: &str, e: &crate::store::StoreError) -> Outcome {
    tracing::error!(credential = %id, error = %e, "refresh: store failed {doing}");
    Outcome::Failed {
        reason: format!("the store failed {doing}"),
        rejected: false,
    }
}
