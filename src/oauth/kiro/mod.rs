//! Kiro's login and refresh. The login is AWS SSO OIDC's device flow, with Builder ID (the
//! config's `start_url` and `region`) or Identity Center (the organisation's start URL and
//! region): a client is registered (`POST /client/register`, the same registration the
//! refresh makes), then `POST /device_authorization`, then `POST /token` with the device code
//! until the user approves; the client comes back with the authorization and is stored with
//! the credential, which every refresh needs.
//!
//! The refresh: the AWS SSO OIDC refresh grant (JSON, camelCase) at
//! `oauth.kiro.oidc_base_url` with `{region}` the credential's region. It needs the registered
//! OIDC client: when the stored one is missing or its secret expires within 5 minutes, the
//! client is registered again first (`POST /client/register`) and the new one comes back in
//! [`Refreshed::client`] to be stored with the tokens. A token call refused with
//! `invalid_client` by a client we did not just register gets one registration and one more
//! token call.

use super::client::{self, Answer, ErrorBody, Http};
use super::device::{self, Fields};
use super::{BoxFuture, OauthFlow};
use crate::config::KiroOAuthConfig;
use crate::crypto::Secret;
use crate::domain::login::{DeviceAuthorization, LoginRequest, LoginTokens, Poll, PollMaterial};
use crate::domain::refresh::{FlowError, NewClient, RefreshMaterial, Refreshed};
use crate::domain::{AuthMethod, OauthExtra};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;

/// The name Kiro registers its client under, and the scopes it asks for.
const CLIENT_NAME: &str = "Kiro IDE";
const SCOPES: &[&str] = &[
    "codewhisperer:completions",
    "codewhisperer:analysis",
    "codewhisperer:conversations",
    "codewhisperer:transformations",
    "codewhisperer:taskassist",
];
const GRANT_TYPES: &[&str] = &[
    "urn:ietf:params:oauth:grant-type:device_code",
    "refresh_token",
];
/// AWS SSO OIDC's device authorization answer (camelCase).
const FIELDS: Fields = Fields {
    device_code: "deviceCode",
    user_code: "userCode",
    verification_uri: "verificationUri",
    verification_uri_complete: "verificationUriComplete",
    expires_in: "expiresIn",
    interval: "interval",
};
/// A client whose secret expires within this is registered again before it is used.
const SECRET_MARGIN: TimeDelta = TimeDelta::minutes(5);
/// The longest client id taken from an answer.
const MAX_CLIENT_ID: usize = 1024;

#[derive(Debug)]
pub struct KiroFlow {
    http: Http,
    /// `oidc_base_url`, with `{region}` still in it.
    base_url: String,
    /// The region of a credential that names none, and of a Builder ID login.
    region: String,
    /// Builder ID's start URL.
    start_url: String,
}

/// The client a token call presents: the stored one, or one just registered.
struct Client<'m> {
    id: &'m str,
    secret: &'m str,
}

impl KiroFlow {
    pub fn new(http: Http, config: &KiroOAuthConfig) -> KiroFlow {
        KiroFlow {
            http,
            base_url: config.oidc_base_url.trim_end_matches('/').to_string(),
            region: config.region.clone(),
            start_url: config.start_url.clone(),
        }
    }

    /// `oidc_base_url` in `region`, or why not: a region goes into a host name, so nothing
    /// but `^[a-z0-9-]{1,32}$` is taken.
    fn base_for(&self, region: &str) -> Result<String, String> {
        let valid = (1..=32).contains(&region.len())
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(client::scrub(
                &format!("`{region}` is not an AWS region"),
                &[],
            ));
        }
        Ok(self.base_url.replace("{region}", region))
    }

    /// The method, start URL and region a login asks for, or `Unrefreshable` without a call:
    /// Builder ID takes the config's (and nothing from the request); Identity Center needs
    /// an https start URL and takes a region (the config's when none; [`KiroFlow::base_for`]
    /// checks it).
    fn target(&self, request: &LoginRequest) -> Result<(AuthMethod, String, String), FlowError> {
        let method = request.method.unwrap_or(AuthMethod::BuilderId);
        let (start_url, region) = match method {
            AuthMethod::BuilderId => {
                if request.start_url.is_some() || request.region.is_some() {
                    return Err(FlowError::Unrefreshable(
                        "a Builder ID login takes no start URL or region (Identity Center does: method `idc`)".into(),
                    ));
                }
                (self.start_url.clone(), self.region.clone())
            }
            AuthMethod::Idc => {
                let start_url = request
                    .start_url
                    .as_deref()
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .ok_or_else(|| {
                        FlowError::Unrefreshable(
                            "an Identity Center login needs its start URL".into(),
                        )
                    })?;
                if !(start_url.starts_with("https://") && device::web_url(start_url)) {
                    return Err(FlowError::Unrefreshable(
                        "the start URL is not an https:// URL (of at most 2 KiB)".into(),
                    ));
                }
                let region = request.region.as_deref().unwrap_or(&self.region);
                (start_url.to_string(), region.to_string())
            }
        };
        Ok((method, start_url, region))
    }

    /// Register a client, then `POST /device_authorization` with it.
    async fn start(
        &self,
        request: &LoginRequest,
        now: DateTime<Utc>,
    ) -> Result<DeviceAuthorization, FlowError> {
        let (method, start_url, region) = self.target(request)?;
        let base = self.base_for(&region).map_err(FlowError::Unrefreshable)?;
        let new = self.register(&base, now, &[]).await?;
        let secret = new.client_secret.expose();
        let secrets = [secret];
        let body = json!({
            "clientId": new.client_id,
            "clientSecret": secret,
            "startUrl": start_url,
        });
        let answer = self
            .http
            .post_json(&format!("{base}/device_authorization"), &body, &secrets)
            .await?;
        if let Some(failure) = device::start_failure(&answer, &secrets) {
            let reason = format!("device authorization: {}", failure.reason());
            return Err(match failure {
                FlowError::Transient { retry_after, .. } => {
                    client::transient(&reason, &secrets, retry_after)
                }
                _ => FlowError::Rejected(client::scrub(&reason, &secrets)),
            });
        }
        let codes =
            device::read_codes(&client::json_object(&answer, &secrets)?, &FIELDS, &secrets)?;
        let mut authorization = codes;
        let extra = OauthExtra {
            client_id: Some(new.client_id.clone()),
            client_secret_expires_at: new.client_secret_expires_at,
            region: Some(region),
            start_url: Some(start_url),
            auth_method: Some(method),
            api_base: None,
            account: None,
        };
        authorization.client = Some(new);
        authorization.extra = extra;
        Ok(authorization)
    }

    /// `POST /token` with the device grant and the login's client.
    async fn poll(&self, material: PollMaterial<'_>, now: DateTime<Utc>) -> Poll {
        let Some(new) = material.client else {
            return Poll::Failed("the login has no registered client".into());
        };
        let region = material.extra.region.as_deref().unwrap_or(&self.region);
        let base = match self.base_for(region) {
            Ok(base) => base,
            Err(reason) => return Poll::Failed(reason),
        };
        let device_code = material.device_code.expose();
        let client_secret = new.client_secret.expose();
        let secrets = [device_code, client_secret];
        let body = json!({
            "clientId": new.client_id,
            "clientSecret": client_secret,
            "grantType": device::GRANT_TYPE,
            "deviceCode": device_code,
        });
        let answer = self
            .http
            .post_json(&format!("{base}/token"), &body, &secrets)
            .await;
        let map = match device::poll_answer(answer, "interval", &secrets) {
            Ok(map) => map,
            Err(poll) => return poll,
        };
        let tokens = (|| {
            let access_token = client::token(&map, "accessToken", &secrets)?;
            let refresh_token = client::token(&map, "refreshToken", &secrets)?;
            let expires_at = client::expiry_from(&map, "expiresIn", now, &secrets)?;
            Ok::<_, FlowError>(LoginTokens {
                access_token: Some(access_token),
                refresh_token,
                expires_at: Some(expires_at),
                account: None,
                label: None,
            })
        })();
        match tokens {
            Ok(tokens) => Poll::Success(tokens),
            Err(e) => Poll::Failed(e.reason().to_string()),
        }
    }

    async fn run(
        &self,
        material: &RefreshMaterial,
        now: DateTime<Utc>,
    ) -> Result<Refreshed, FlowError> {
        let refresh_token = super::refresh_token(material, "refresh token")?;
        let region = material.extra.region.as_deref().unwrap_or(&self.region);
        let base = self.base_for(region).map_err(FlowError::Unrefreshable)?;
        let stored = material
            .extra
            .client_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .zip(
                material
                    .client_secret
                    .as_ref()
                    .map(|s| s.expose())
                    .filter(|s| !s.is_empty()),
            );
        let fresh = material
            .extra
            .client_secret_expires_at
            .is_none_or(|at| at > now + SECRET_MARGIN);
        let secrets: Vec<&str> = [Some(refresh_token), stored.map(|(_, s)| s)]
            .into_iter()
            .flatten()
            .chain(material.access_token.as_ref().map(|s| s.expose()))
            .collect();

        // The token call with the stored client when it is still good; without one, or when
        // it is refused with `invalid_client`, with a client registered now (once).
        let first = match stored.filter(|_| fresh) {
            Some((id, secret)) => Some(
                self.token(&base, Client { id, secret }, refresh_token, &secrets)
                    .await?,
            ),
            None => None,
        };
        let refused = |answer: &Answer| {
            !answer.status.is_success()
                && ErrorBody::read(answer).error.as_deref() == Some("invalid_client")
        };
        let (answer, registered) = match first.filter(|answer| !refused(answer)) {
            Some(answer) => (answer, None),
            None => {
                let new = self.register(&base, now, &secrets).await?;
                let answer = self
                    .token_with(&base, &new, refresh_token, &secrets)
                    .await?;
                (answer, Some(new))
            }
        };
        let secrets: Vec<&str> = secrets
            .into_iter()
            .chain(registered.as_ref().map(|c| c.client_secret.expose()))
            .collect();
        if !answer.status.is_success() {
            return Err(client::failure(&answer, &secrets, false));
        }
        let map = client::json_object(&answer, &secrets)?;
        let access_token = client::token(&map, "accessToken", &secrets)?;
        let expires_at = client::expiry_from(&map, "expiresIn", now, &secrets)?;
        let rotated = client::optional_token(&map, "refreshToken", &secrets)?
            .filter(|t| t.expose() != refresh_token);
        Ok(Refreshed {
            access_token,
            expires_at,
            refresh_token: rotated,
            client: registered,
            refresh_after: None,
            api_base: None,
        })
    }

    /// The token call with a client just registered.
    async fn token_with(
        &self,
        base: &str,
        new: &NewClient,
        refresh_token: &str,
        secrets: &[&str],
    ) -> Result<Answer, FlowError> {
        let secret = new.client_secret.expose();
        let secrets: Vec<&str> = secrets.iter().copied().chain([secret]).collect();
        let client = Client {
            id: &new.client_id,
            secret,
        };
        self.token(base, client, refresh_token, &secrets).await
    }

    /// `POST {base}/token` with the refresh grant; the answer as it came.
    async fn token(
        &self,
        base: &str,
        client: Client<'_>,
        refresh_token: &str,
        secrets: &[&str],
    ) -> Result<Answer, FlowError> {
        let body = json!({
            "clientId": client.id,
            "clientSecret": client.secret,
            "grantType": "refresh_token",
            "refreshToken": refresh_token,
        });
        self.http
            .post_json(&format!("{base}/token"), &body, secrets)
            .await
    }

    /// `POST {base}/client/register`: a new public client, or why not (a refusal is final:
    /// without a client the credential cannot be refreshed).
    async fn register(
        &self,
        base: &str,
        now: DateTime<Utc>,
        secrets: &[&str],
    ) -> Result<NewClient, FlowError> {
        let body = json!({
            "clientName": CLIENT_NAME,
            "clientType": "public",
            "scopes": SCOPES,
            "grantTypes": GRANT_TYPES,
        });
        let answer = self
            .http
            .post_json(&format!("{base}/client/register"), &body, secrets)
            .await?;
        if !answer.status.is_success() {
            // A refusal (a 4xx but a timeout or a rate limit) is final: without a client the
            // credential cannot be refreshed.
            let status = answer.status.as_u16();
            let failure = client::failure(&answer, secrets, true);
            let reason = format!("client registration: {}", failure.reason());
            return Err(match status {
                400..=499 if status != 408 && status != 429 => {
                    FlowError::Rejected(client::scrub(&reason, secrets))
                }
                _ => client::transient(&reason, secrets, answer.retry_after),
            });
        }
        let map = client::json_object(&answer, secrets)?;
        let client_id = match map.get("clientId").and_then(|v| v.as_str()) {
            Some(id)
                if !id.is_empty()
                    && id.len() <= MAX_CLIENT_ID
                    && id.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                id.to_string()
            }
            _ => return Err(client::unreadable("no usable `clientId`", secrets)),
        };
        let client_secret: Secret = client::token(&map, "clientSecret", secrets)?;
        let client_secret_expires_at = client::seconds(&map, "clientSecretExpiresAt", secrets)?
            .map(|at| client::expiry_at(now, at));
        Ok(NewClient {
            client_id,
            client_secret,
            client_secret_expires_at,
        })
    }
}

impl OauthFlow for KiroFlow {
    fn refresh<'a>(
        &'a self,
        material: &'a RefreshMaterial,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Refreshed, FlowError>> {
        Box::pin(self.run(material, now))
    }

    fn has_login(&self) -> bool {
        true
    }

    fn start_login<'a>(
        &'a self,
        request: &'a LoginRequest,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<DeviceAuthorization, FlowError>> {
        Box::pin(self.start(request, now))
    }

    fn poll_login<'a>(
        &'a self,
        material: PollMaterial<'a>,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Poll> {
        Box::pin(self.poll(material, now))
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod login_tests;
