//! Credentials as the program sees them: validated input ([`NewCredential`]), the stored row
//! without secrets ([`CredentialRow`]), the small enums between them, the one rule that
//! decides a credential's effective status ([`status`]), and the tokens a request used
//! ([`Usage`]).

mod ids;
pub mod login;
pub mod refresh;
pub mod status;
mod usage;

pub use ids::{CredentialId, ProviderName, ReservationId};
pub use status::Status;
pub use usage::Usage;

use crate::crypto::{Fingerprinter, Secret};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What the application reads as now: one clock for the state, the request path, the
/// refresher and the logins; tests replace it.
pub type Clock = std::sync::Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ApiKey,
    Oauth,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "api_key",
            CredentialKind::Oauth => "oauth",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "api_key" => Some(CredentialKind::ApiKey),
            "oauth" => Some(CredentialKind::Oauth),
            _ => None,
        }
    }
}

/// Kiro's login method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    BuilderId,
    Idc,
}

/// Non-secret provider-specific OAuth fields, stored as a JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OauthExtra {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<AuthMethod>,
    /// copilot: the API base its last token answer named, when the allowlist allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
    /// The account a login was made as (`LoginTokens::account`, copilot: `github:<user id>`):
    /// a later login as the same account updates this credential. Not a secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

impl OauthExtra {
    pub fn is_empty(&self) -> bool {
        *self == OauthExtra::default()
    }
}

/// A validated credential about to be stored: from a file, a bulk body, a POST, or an OAuth
/// login. Every check of its fields has been made; the store only de-duplicates.
#[derive(Debug)]
pub struct NewCredential {
    pub provider: String,
    pub kind: CredentialKind,
    /// The API key, or an OAuth access token (which copilot may lack until its first refresh).
    pub token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub client_secret: Option<Secret>,
    pub extra: OauthExtra,
    pub priority: i64,
    pub label: Option<String>,
    /// The quota limit it names: `Some(None)` is unlimited, and `None` (named none) takes the
    /// provider's default limit when stored (README, "Management API").
    pub limit: Option<Option<u64>>,
    /// Seeds the counter of a new credential only; never overwrites a live one.
    pub used: u64,
    pub disabled: bool,
    pub expires_at: Option<DateTime<Utc>>,
}

impl NewCredential {
    /// The secret that identifies the credential: the API key, or for OAuth the long-lived
    /// refresh token when there is one (the access token changes at every refresh).
    pub fn identity(&self) -> &Secret {
        match self.kind {
            CredentialKind::ApiKey => self.token.as_ref(),
            CredentialKind::Oauth => self.refresh_token.as_ref().or(self.token.as_ref()),
        }
        .expect("validation guarantees an identifying secret")
    }

    pub fn fingerprint(&self, fp: &Fingerprinter) -> Vec<u8> {
        fp.credential(&self.provider, self.identity())
    }

    /// A keyed digest of everything an import entry says, to tell an unchanged entry from a
    /// changed one without keeping the entry's secrets.
    pub fn content_digest(&self, fp: &Fingerprinter) -> Vec<u8> {
        let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_string());
        let canonical = serde_json::json!([
            self.provider,
            self.kind.as_str(),
            secret(&self.token),
            secret(&self.refresh_token),
            secret(&self.client_secret),
            self.extra,
            self.priority,
            self.label,
            // Absent and `null` read alike here, as before either meant unlimited, so the
            // digest of an unchanged file stays what it was.
            self.limit.flatten(),
            self.used,
            self.disabled,
            self.expires_at.map(|t| t.timestamp()),
        ]);
        fp.content(canonical.to_string().as_bytes())
    }
}

/// A stored credential without its secrets, with its counters and effective status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRow {
    pub id: CredentialId,
    pub provider: ProviderName,
    pub kind: CredentialKind,
    pub label: Option<String>,
    pub token_preview: String,
    pub priority: i64,
    pub status: Status,
    pub status_reason: Option<String>,
    pub limit: Option<u64>,
    pub used: u64,
    pub reserved: u64,
    pub period_start: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub cooldown_until: Option<DateTime<Utc>>,
    /// Until when an `exhausted` mark holds, when the provider named the date (as stored:
    /// past dates stay until the next mark).
    pub exhausted_until: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub last_refresh_at: Option<DateTime<Utc>>,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl CredentialRow {
    /// What is left of the limit this period: `limit - used` (in-flight reservations are
    /// shown apart, as `reserved`). `None` when unlimited.
    pub fn remaining(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.used))
    }
}

/// Unix seconds to a UTC time; out-of-range values (never written by us) clamp to the epoch.
pub fn from_unix(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// A UTC time as the API shows it: RFC 3339 to the second, with `Z`.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
