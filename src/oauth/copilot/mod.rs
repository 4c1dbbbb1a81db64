//! Copilot's login and token exchange. The login is GitHub's device flow (RFC 8628) at
//! `oauth.copilot.github_base_url` with `oauth.copilot.client_id` and `scope`: its GitHub token
//! becomes the credential's refresh token, with no access token until the first exchange.
//! The token exchange: the stored GitHub token (the credential's refresh token) buys a
//! short-lived Copilot token at `{oauth.copilot.api_base_url}/copilot_internal/v2/token`,
//! answered by `{token, expires_at (unix s), refresh_in (s)}`. The worker exchanges it again
//! `refresh_in - 60 s` later, as the editors do. A 401 or 403 (a revoked GitHub token, no
//! Copilot seat) is final, with the message GitHub gave. The answer's `endpoints.api` comes
//! back as the credential's API base only when `oauth.copilot.allowed_api_hosts` allows it
//! (https, an allowed host: [`ApiHosts::check`]); a refused one is logged by host and
//! dropped, so the chat calls go to the default host.
//! After a login, `GET {oauth.copilot.api_base_url}/user` names the GitHub account the token
//! belongs to: its `id` becomes the login's account (`github:<id>`), so logging in again as the
//! same GitHub user updates that credential, and its `login` the new credential's label. A
//! login whose `/user` fails still succeeds, without an account.

use super::client::{self, Http};
use super::device::{self, Fields};
use super::{BoxFuture, OauthFlow};
use crate::config::CopilotOAuthConfig;
use crate::crypto::Secret;
use crate::domain::login::{DeviceAuthorization, LoginRequest, LoginTokens, Poll, PollMaterial};
use crate::domain::refresh::{FlowError, RefreshMaterial, Refreshed};
use crate::providers::copilot::{self as headers, ApiHosts, HeaderList};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

/// How much before `refresh_in` (and before expiry) the token is exchanged again.
const MARGIN: TimeDelta = TimeDelta::seconds(60);
/// The soonest the token is exchanged again, whatever `refresh_in` says.
const SOONEST: TimeDelta = TimeDelta::seconds(30);
/// The lifetime assumed when the answer names no `expires_at` (Copilot tokens live about
/// 25 minutes).
const DEFAULT_LIFETIME: i64 = 25 * 60;

/// The longest GitHub login: GitHub's own limit.
const MAX_LOGIN: usize = 39;
/// The `user-agent` of `/user` when `oauth.copilot.headers` removes the editor's (GitHub's
/// REST API refuses a request without one).
const USER_AGENT: &str = concat!("cliproxyapi/", env!("CARGO_PKG_VERSION"));

/// GitHub's device authorization answer (RFC 8628's names).
const FIELDS: Fields = device::RFC8628_FIELDS;

#[derive(Debug)]
pub struct CopilotFlow {
    http: Http,
    url: String,
    /// `{github_base_url}/login/device/code`.
    device_url: String,
    /// `{github_base_url}/login/oauth/access_token`.
    poll_url: String,
    /// `{api_base_url}/user`: who a GitHub token belongs to.
    user_url: String,
    /// The `user-agent` of `/user`: the editor's of `oauth.copilot.headers`, else ours.
    user_agent: reqwest::header::HeaderValue,
    client_id: String,
    scope: String,
    /// The editor the exchange presents itself as (the endpoint is private and expects one):
    /// the editor headers of `oauth.copilot.headers`, built once.
    headers: HeaderList,
    api_hosts: ApiHosts,
}

impl CopilotFlow {
    pub fn new(http: Http, config: &CopilotOAuthConfig) -> CopilotFlow {
        let github = config.github_base_url.trim_end_matches('/');
        let api = config.api_base_url.trim_end_matches('/');
        let headers = headers::exchange_headers(&config.header_list());
        let user_agent = headers
            .iter()
            .find(|(name, _)| *name == reqwest::header::USER_AGENT)
            .map(|(_, value)| value.clone())
            .unwrap_or(reqwest::header::HeaderValue::from_static(USER_AGENT));
        CopilotFlow {
            http,
            url: format!("{api}/copilot_internal/v2/token"),
            device_url: format!("{github}/login/device/code"),
            poll_url: format!("{github}/login/oauth/access_token"),
            user_url: format!("{api}/user"),
            user_agent,
            client_id: config.client_id.clone(),
            scope: config.scope.clone(),
            headers,
            api_hosts: config.api_hosts(),
        }
    }

    /// `POST /login/device/code` with the client id and scope.
    async fn start(&self, request: &LoginRequest) -> Result<DeviceAuthorization, FlowError> {
        if *request != LoginRequest::default() {
            return Err(FlowError::Unrefreshable(
                "a copilot login takes no method, start URL or region".into(),
            ));
        }
        let form = [
            ("client_id", self.client_id.as_str()),
            ("scope", self.scope.as_str()),
        ];
        let answer = self.http.post_form(&self.device_url, &form, &[]).await?;
        if let Some(failure) = device::start_failure(&answer, &[]) {
            return Err(failure);
        }
        device::read_codes(&client::json_object(&answer, &[])?, &FIELDS, &[])
    }

    /// `POST /login/oauth/access_token` with the device code.
    async fn poll(&self, material: PollMaterial<'_>) -> Poll {
        let device_code = material.device_code.expose();
        let secrets = [device_code];
        let form = [
            ("client_id", self.client_id.as_str()),
            ("device_code", device_code),
            ("grant_type", device::GRANT_TYPE),
        ];
        let answer = self.http.post_form(&self.poll_url, &form, &secrets).await;
        let map = match device::poll_answer(answer, "interval", &secrets) {
            Ok(map) => map,
            Err(poll) => return poll,
        };
        match client::optional_token(&map, "access_token", &secrets) {
            Ok(Some(github_token)) => {
                let user = match self.user(&github_token).await {
                    Ok(user) => Some(user),
                    Err(reason) => {
                        tracing::warn!(%reason, "the GitHub account of a copilot login is unknown; logging in again as the same user will add another credential");
                        None
                    }
                };
                Poll::Success(LoginTokens {
                    access_token: None,
                    refresh_token: github_token,
                    expires_at: None,
                    account: user.as_ref().map(|u| format!("github:{}", u.id)),
                    label: user.map(|u| u.login),
                })
            }
            // A 2xx without a token is taken as pending, as ericc-ch/copilot-api does.
            Ok(None) => Poll::Pending,
            Err(e) => Poll::Failed(e.reason().to_string()),
        }
    }

    /// `GET /user` with the GitHub token: who it belongs to, or why that is unknown (never
    /// the token).
    async fn user(&self, github_token: &Secret) -> Result<GithubUser, String> {
        let token = github_token.expose();
        let secrets = [token];
        let request = self
            .http
            .client()
            .map_err(|e| e.reason().to_string())?
            .get(&self.user_url)
            .header(reqwest::header::AUTHORIZATION, format!("token {token}"))
            .header(reqwest::header::ACCEPT, "application/vnd.github+json")
            .header(reqwest::header::USER_AGENT, self.user_agent.clone());
        let answer = client::send(request, &secrets)
            .await
            .map_err(|e| e.reason().to_string())?;
        read_user(&answer, &secrets)
    }

    async fn run(
        &self,
        material: &RefreshMaterial,
        now: DateTime<Utc>,
    ) -> Result<Refreshed, FlowError> {
        let github_token = super::refresh_token(material, "GitHub token")?;
        let access = material.access_token.as_ref().map(|s| s.expose());
        let secrets: Vec<&str> = [Some(github_token), access].into_iter().flatten().collect();
        let mut request = self
            .http
            .client()?
            .get(&self.url)
            .header(
                reqwest::header::AUTHORIZATION,
                format!("token {github_token}"),
            )
            .header(reqwest::header::ACCEPT, "application/json");
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let answer = client::send(request, &secrets).await?;
        if !answer.status.is_success() {
            return Err(client::failure(&answer, &secrets, true));
        }
        let map = client::json_object(&answer, &secrets)?;
        let token = client::token(&map, "token", &secrets)?;
        let expires_at = match client::seconds(&map, "expires_at", &secrets)? {
            Some(at) => client::expiry_at(now, at),
            None => client::expiry_in(now, DEFAULT_LIFETIME),
        };
        let refresh_after = client::seconds(&map, "refresh_in", &secrets)?
            .map(|secs| refresh_after(now, secs, expires_at));
        let api_base = self.api_base(&map, material);
        Ok(Refreshed {
            access_token: token,
            expires_at,
            refresh_token: None,
            client: None,
            refresh_after,
            api_base,
        })
    }

    /// The answer's `endpoints.api` when the allowlist allows it; a refused one is logged by
    /// its host only.
    fn api_base(
        &self,
        map: &serde_json::Map<String, serde_json::Value>,
        material: &RefreshMaterial,
    ) -> Option<String> {
        let api = map.get("endpoints")?.get("api")?.as_str()?;
        if api.len() > MAX_API_URL {
            tracing::warn!(credential = %material.credential_id, "endpoints.api refused: too long");
            return None;
        }
        match self.api_hosts.check(api) {
            Ok(base) => Some(base),
            Err(why) => {
                let host = ApiHosts::host_of(api);
                let why = if why.starts_with("host") {
                    "host not allowed"
                } else {
                    why.as_str()
                };
                tracing::warn!(
                    credential = %material.credential_id,
                    %host,
                    "endpoints.api not followed: {why}"
                );
                None
            }
        }
    }
}

/// A GitHub user as `/user` names them.
#[derive(Debug, PartialEq, Eq)]
struct GithubUser {
    /// GitHub's number for the user, which a rename does not change.
    id: u64,
    login: String,
}

/// `/user`'s answer: a 200 with a positive integer `id` and a `login` GitHub could have given
/// (at most 39 letters, digits and hyphens); anything else is not read.
fn read_user(answer: &client::Answer, secrets: &[&str]) -> Result<GithubUser, String> {
    if answer.status != reqwest::StatusCode::OK {
        return Err(format!("GET /user answered {}", answer.status.as_u16()));
    }
    let map = client::json_object(answer, secrets).map_err(|e| e.reason().to_string())?;
    let id = map
        .get("id")
        .and_then(Value::as_u64)
        .filter(|id| *id > 0)
        .ok_or("GET /user: `id` is not a positive integer")?;
    let login = map
        .get("login")
        .and_then(Value::as_str)
        .filter(|login| {
            !login.is_empty()
                && login.len() <= MAX_LOGIN
                && login
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        .ok_or("GET /user: `login` is not a GitHub login")?;
    Ok(GithubUser {
        id,
        login: login.to_string(),
    })
}

/// The longest `endpoints.api` read (a base URL; anything longer is not one).
const MAX_API_URL: usize = 2048;

/// `now + refresh_in - 60 s`, never later than `expires_at - 60 s`, never earlier than
/// `now + 30 s`.
fn refresh_after(now: DateTime<Utc>, refresh_in: i64, expires_at: DateTime<Utc>) -> DateTime<Utc> {
    // Within the lifetime bounds first, so the sum cannot overflow.
    let asked = client::expiry_in(now, refresh_in) - MARGIN;
    asked.min(expires_at - MARGIN).max(now + SOONEST)
}

impl OauthFlow for CopilotFlow {
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
        _now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<DeviceAuthorization, FlowError>> {
        Box::pin(self.start(request))
    }

    fn poll_login<'a>(
        &'a self,
        material: PollMaterial<'a>,
        _now: DateTime<Utc>,
    ) -> BoxFuture<'a, Poll> {
        Box::pin(self.poll(material))
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod login_tests;
