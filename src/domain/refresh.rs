//! The vocabulary of a token refresh, shared by the store (which reads what a refresh needs
//! and writes what it brought) and the refresh flows (which talk to the token endpoints):
//! [`RefreshMaterial`] in, [`Refreshed`] or [`FlowError`] out. Neither side knows the other.

use super::{CredentialId, OauthExtra, ProviderName};
use crate::crypto::Secret;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// What a refresh of one credential starts from: its secrets opened, and its non-secret
/// provider fields. Its `Debug` shows no secret (`Secret`'s prints nothing).
#[derive(Debug)]
pub struct RefreshMaterial {
    pub credential_id: CredentialId,
    pub provider: ProviderName,
    /// The current access token (copilot: the short-lived Copilot token), if any.
    pub access_token: Option<Secret>,
    /// The long-lived secret a refresh presents: the refresh token (copilot: the GitHub token).
    pub refresh_token: Option<Secret>,
    /// kiro: the registered OIDC client's secret.
    pub client_secret: Option<Secret>,
    /// kiro: client id and its secret's expiry, region, start URL, method.
    pub extra: OauthExtra,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A client registered again because the stored one's secret had expired (kiro): stored with
/// the new tokens, in the same transaction.
#[derive(Debug)]
pub struct NewClient {
    pub client_id: String,
    pub client_secret: Secret,
    pub client_secret_expires_at: Option<DateTime<Utc>>,
}

/// What a successful refresh brought.
#[derive(Debug)]
pub struct Refreshed {
    pub access_token: Secret,
    /// When the new access token expires.
    pub expires_at: DateTime<Utc>,
    /// A rotated refresh token: when present it replaces the stored one, and the old one is
    /// never sent again.
    pub refresh_token: Option<Secret>,
    /// A client registered again on the way (kiro).
    pub client: Option<NewClient>,
    /// When to refresh again even though the token has not expired (copilot's `refresh_in`).
    pub refresh_after: Option<DateTime<Utc>>,
    /// copilot: the API base the token answer named (`endpoints.api`), already checked
    /// against `oauth.copilot.allowed_api_hosts`. Stored in the credential's `extra` as
    /// `api_base`; `None` removes a stale one.
    pub api_base: Option<String>,
}

/// Why a refresh (or the start of a login) did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowError {
    /// The provider refused the grant for good (`invalid_grant`, a 401, a client that cannot
    /// be registered again): the credential is `expired` with this reason, and is not tried
    /// again until its tokens are replaced.
    Rejected(String),
    /// Worth trying again later (the endpoint unreachable or timing out, a 429, a 5xx, an
    /// answer that does not read): `retry_after` when the provider named a wait.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The credential lacks what its flow needs (no refresh token, no client), or a login's
    /// request is not one the flow takes: nothing was sent. Like `Rejected` it needs new
    /// tokens, but it says so without asking the provider.
    Unrefreshable(String),
}

impl FlowError {
    /// The reason, for the status, the history and the auth log (never a secret).
    pub fn reason(&self) -> &str {
        match self {
            FlowError::Rejected(r) | FlowError::Unrefreshable(r) => r,
            FlowError::Transient { reason, .. } => reason,
        }
    }
}

/// What started a refresh, as the history records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshTrigger {
    /// The worker's check every `auth.refresh.check_interval`.
    Schedule,
    /// `POST /v0/management/auths/{provider}/refresh`.
    Manual,
    /// A provider answered 401 to a proxied request (or a lease report) with the credential.
    Request,
}

impl RefreshTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshTrigger::Schedule => "schedule",
            RefreshTrigger::Manual => "manual",
            RefreshTrigger::Request => "request",
        }
    }

    pub fn parse(s: &str) -> Option<RefreshTrigger> {
        match s {
            "schedule" => Some(RefreshTrigger::Schedule),
            "manual" => Some(RefreshTrigger::Manual),
            "request" => Some(RefreshTrigger::Request),
            _ => None,
        }
    }
}
