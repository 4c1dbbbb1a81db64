//! The vocabulary of a device-flow login (RFC 8628), shared by the flows (which talk to the
//! provider's device and token endpoints) and the login service (which stores sessions and
//! polls in the background): what a login asks for ([`LoginRequest`]), the authorization the
//! user completes ([`DeviceAuthorization`]), what one poll came to ([`Poll`]), and the tokens
//! of a finished login ([`LoginTokens`]).

use super::OauthExtra;
use super::refresh::NewClient;
use crate::crypto::Secret;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// The interval RFC 8628 §3.5 prescribes when the provider names none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// What `slow_down` adds to the interval when the provider names no new one.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// What a login asks for: the body of `POST /v0/oauth/{provider}/start`, validated. Copilot
/// needs nothing; Kiro takes Builder ID (the default) or Identity Center with its start URL
/// and region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginRequest {
    pub method: Option<super::AuthMethod>,
    pub start_url: Option<String>,
    pub region: Option<String>,
}

/// A device authorization the user completes at the provider.
#[derive(Debug)]
pub struct DeviceAuthorization {
    /// Sealed with the session; never shown.
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    /// How long the codes are good for (bounded by the flow).
    pub expires_in: Duration,
    /// How long to wait between polls (`DEFAULT_INTERVAL` when the provider names none).
    pub interval: Duration,
    /// A client registered for this login (kiro): polling and every later refresh use it.
    pub client: Option<NewClient>,
    /// The non-secret fields the credential will carry (kiro: region, start URL, method,
    /// client id and its secret's expiry).
    pub extra: OauthExtra,
}

/// What a poll is given: the session's stored device code, client and fields.
#[derive(Debug)]
pub struct PollMaterial<'a> {
    pub device_code: &'a Secret,
    pub client: Option<&'a NewClient>,
    pub extra: &'a OauthExtra,
}

/// What one poll of the token endpoint came to (RFC 8628 §3.5).
#[derive(Debug)]
pub enum Poll {
    /// `authorization_pending` (or a 2xx without a token, as GitHub sometimes answers).
    Pending,
    /// `slow_down`: wait this long from now on (the provider's new `interval`, else the old
    /// interval plus `SLOW_DOWN_STEP`, which the caller adds when this is `None`).
    SlowDown(Option<Duration>),
    /// `access_denied`: the user refused.
    Denied,
    /// `expired_token`: the codes ran out.
    Expired,
    /// Any other error ends the session with this message (never a secret).
    Failed(String),
    /// A network error, a 429 or a 5xx: poll again at the next interval.
    Retry(String),
    /// The user approved: the tokens.
    Success(LoginTokens),
}

/// The tokens of a finished login.
#[derive(Debug)]
pub struct LoginTokens {
    /// kiro: the access token; copilot: none (the refresh worker exchanges the GitHub token).
    pub access_token: Option<Secret>,
    /// kiro: the refresh token; copilot: the GitHub token.
    pub refresh_token: Secret,
    pub expires_at: Option<DateTime<Utc>>,
    /// Who logged in, as the provider names them for good (copilot: `github:<user id>`), when
    /// the flow knows: a later login with the same account updates that credential instead of
    /// adding one. `None`: only the same refresh token is recognised.
    pub account: Option<String>,
    /// A name to show for a new credential (copilot: the GitHub login); an existing
    /// credential keeps its label.
    pub label: Option<String>,
}
