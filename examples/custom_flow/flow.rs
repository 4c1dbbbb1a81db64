//! `AcmeFlow`: the login and refresh of a made-up provider, Acme, whose authorization server
//! speaks the OAuth 2.0 device flow (RFC 8628) and the refresh grant (RFC 6749 §6) at
//! `{auth_url}/device/code` and `{auth_url}/token`. DEV.md walks through it.
//!
//! It uses only the crate's public API, and the helpers the built-in flows share: the bounded
//! HTTP client and answer readers of `cliproxyapi::oauth::client` and the device-flow readers
//! of `cliproxyapi::oauth::device`, so an answer from Acme is read to at most 64 KiB, its
//! numbers and tokens are bounded, and no secret we sent can come back in an error message.
//! The integration tests include this file (tests/api/custom_flow.rs) and run it against a
//! mock of Acme.

use chrono::{DateTime, Utc};
use cliproxyapi::crypto::Secret;
use cliproxyapi::domain::login::{
    DeviceAuthorization, LoginRequest, LoginTokens, Poll, PollMaterial,
};
use cliproxyapi::domain::refresh::{FlowError, RefreshMaterial, Refreshed};
use cliproxyapi::oauth::client::{self, Http};
use cliproxyapi::oauth::device::{self, Fields};
use cliproxyapi::oauth::{BoxFuture, OauthFlow};

/// Acme's device authorization answer uses RFC 8628's field names.
const FIELDS: Fields = device::RFC8628_FIELDS;

/// Acme's device flow and refresh grant for one public client.
pub struct AcmeFlow {
    http: Http,
    /// `{auth_url}/device/code`.
    device_url: String,
    /// `{auth_url}/token`: the device-code poll and the refresh grant.
    token_url: String,
    client_id: String,
}

impl AcmeFlow {
    /// The flow against the authorization server at `auth_url` (e.g.
    /// `https://auth.acme.example`), as the public client `client_id`.
    pub fn new(auth_url: &str, client_id: &str) -> AcmeFlow {
        let base = auth_url.trim_end_matches('/');
        AcmeFlow {
            http: Http::new(),
            device_url: format!("{base}/device/code"),
            token_url: format!("{base}/token"),
            client_id: client_id.to_string(),
        }
    }

    /// Step 1 of a login: ask for a device code and the user code to show.
    async fn start(&self, request: &LoginRequest) -> Result<DeviceAuthorization, FlowError> {
        // The start body's fields are Kiro's; Acme takes none.
        if *request != LoginRequest::default() {
            return Err(FlowError::Unrefreshable(
                "an acme login takes no method, start URL or region".into(),
            ));
        }
        let form = [("client_id", self.client_id.as_str())];
        let answer = self.http.post_form(&self.device_url, &form, &[]).await?;
        if let Some(failure) = device::start_failure(&answer, &[]) {
            return Err(failure);
        }
        device::read_codes(&client::json_object(&answer, &[])?, &FIELDS, &[])
    }

    /// Step 2, repeated by the server at the interval: has the user approved yet?
    async fn poll(&self, material: PollMaterial<'_>, now: DateTime<Utc>) -> Poll {
        let device_code = material.device_code.expose();
        let secrets = [device_code];
        let form = [
            ("grant_type", device::GRANT_TYPE),
            ("device_code", device_code),
            ("client_id", self.client_id.as_str()),
        ];
        let answer = self.http.post_form(&self.token_url, &form, &secrets).await;
        // authorization_pending, slow_down, access_denied, expired_token, a 5xx...
        let map = match device::poll_answer(answer, "interval", &secrets) {
            Ok(map) => map,
            Err(poll) => return poll,
        };
        // ...or approval: the tokens.
        match read_tokens(&map, now, &secrets) {
            Ok((access_token, refresh_token, expires_at)) => Poll::Success(LoginTokens {
                access_token: Some(access_token),
                // Without a refresh token (an empty one is stored as none) the credential
                // lasts until its access token expires.
                refresh_token: refresh_token.unwrap_or_else(|| Secret::new("")),
                expires_at: Some(expires_at),
                // Acme names no account: a second login is recognised by its refresh token.
                account: None,
                label: None,
            }),
            Err(e) => Poll::Failed(e.reason().to_string()),
        }
    }

    /// The refresh grant: the stored refresh token for a new access token (and perhaps a new
    /// refresh token, which then replaces the stored one).
    async fn run_refresh(
        &self,
        material: &RefreshMaterial,
        now: DateTime<Utc>,
    ) -> Result<Refreshed, FlowError> {
        let Some(refresh_token) = material.refresh_token.as_ref().map(|t| t.expose()) else {
            return Err(FlowError::Unrefreshable(
                "the credential has no refresh token".into(),
            ));
        };
        let secrets = [refresh_token];
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", self.client_id.as_str()),
        ];
        let answer = self
            .http
            .post_form(&self.token_url, &form, &secrets)
            .await?;
        if !answer.status.is_success() {
            // invalid_grant or a 401: Rejected (the credential is expired); else Transient.
            return Err(client::failure(&answer, &secrets, false));
        }
        let map = client::json_object(&answer, &secrets)?;
        let (access_token, rotated, expires_at) = read_tokens(&map, now, &secrets)?;
        Ok(Refreshed {
            access_token,
            expires_at,
            refresh_token: rotated,
            client: None,
            refresh_after: None,
            api_base: None,
        })
    }
}

/// `{access_token, refresh_token?, expires_in?}`, bounded: tokens at most 32 KiB of visible
/// ASCII, the lifetime within 60 s and a year (an hour when Acme names none).
fn read_tokens(
    map: &serde_json::Map<String, serde_json::Value>,
    now: DateTime<Utc>,
    secrets: &[&str],
) -> Result<(Secret, Option<Secret>, DateTime<Utc>), FlowError> {
    let access_token = client::token(map, "access_token", secrets)?;
    let refresh_token = client::optional_token(map, "refresh_token", secrets)?;
    let expires_at = client::expiry_from(map, "expires_in", now, secrets)?;
    Ok((access_token, refresh_token, expires_at))
}

/// The trait's methods return boxed futures (the trait is object-safe: the server holds
/// `Arc<dyn OauthFlow>`); each one hands over to an `async fn` above.
impl OauthFlow for AcmeFlow {
    fn refresh<'a>(
        &'a self,
        material: &'a RefreshMaterial,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Refreshed, FlowError>> {
        Box::pin(self.run_refresh(material, now))
    }

    fn has_login(&self) -> bool {
        true
    }

    fn start_login<'a>(
        &'a self,
        request: &'a LoginRequest,
        _now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<DeviceAuthorization, FlowError>> {
        Box::pin(self.start(request))
    }

    fn poll_login<'a>(
        &'a self,
        material: PollMaterial<'a>,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Poll> {
        Box::pin(self.poll(material, now))
    }
}
