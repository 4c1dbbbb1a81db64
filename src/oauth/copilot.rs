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
        let request = self
            .http
            .client()?
            .post(&self.device_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form_body(&form));
        let answer = client::send(request, &[]).await?;
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
        let client = match self.http.client() {
            Ok(c) => c,
            Err(e) => return Poll::Retry(e.reason().to_string()),
        };
        let request = client
            .post(&self.poll_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form_body(&form));
        let map = match device::poll_answer(
            client::send(request, &secrets).await,
            "interval",
            &secrets,
        ) {
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

/// `pairs` as an `application/x-www-form-urlencoded` body.
fn form_body(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
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
mod tests {
    use super::super::testing::{self, Mock, json, now};
    use super::*;
    use serde_json::json as j;

    fn flow(base: &str) -> CopilotFlow {
        CopilotFlow::new(
            Http::new(),
            &CopilotOAuthConfig {
                api_base_url: format!("{base}/"),
                ..Default::default()
            },
        )
    }

    #[tokio::test]
    async fn exchanges_the_github_token() {
        let t = now().timestamp();
        let (mock, base) = Mock::start(vec![
            json(
                200,
                j!({"token": "tid=copilot-1", "expires_at": t + 1800, "refresh_in": 1500,
                          "endpoints": {"api": "https://api.githubcopilot.com"}}),
            ),
            json(200, j!({"token": "tid=copilot-2", "expires_at": t + 1800})),
        ])
        .await;
        let flow = flow(&base);
        let material = testing::material("copilot", Some("gho_github"));
        let got = flow.refresh(&material, now()).await.unwrap();
        assert_eq!(got.access_token.expose(), "tid=copilot-1");
        assert_eq!(got.expires_at, now() + TimeDelta::seconds(1800));
        assert_eq!(got.refresh_after, Some(now() + TimeDelta::seconds(1440)));
        assert!(got.refresh_token.is_none() && got.client.is_none());
        testing::assert_no_secret(&got, &["copilot-1"]);
        let sent = &mock.requests()[0];
        assert_eq!(sent.method, "GET");
        assert_eq!(sent.path, "/copilot_internal/v2/token");
        assert_eq!(sent.header("authorization"), "token gho_github");
        assert_eq!(sent.header("accept"), "application/json");
        for (name, value) in headers::DEFAULT_HEADERS {
            if headers::EXCHANGE_HEADERS.contains(name) {
                assert_eq!(sent.header(name), *value, "{name}");
            } else {
                assert_eq!(sent.header(name), "", "{name} is for the chat calls only");
            }
        }
        assert_eq!(
            got.api_base.as_deref(),
            Some("https://api.githubcopilot.com")
        );
        let got = flow.refresh(&material, now()).await.unwrap();
        assert_eq!(got.refresh_after, None);
        assert_eq!(got.api_base, None);
    }

    #[tokio::test]
    async fn only_allowed_api_endpoints_are_followed() {
        let answer = |api: &str| {
            json(
                200,
                j!({"token": "t", "expires_at": now().timestamp() + 1800,
                    "endpoints": {"api": api}}),
            )
        };
        let (mock, base) = Mock::start(vec![
            answer("https://evil.example"),
            answer("http://api.githubcopilot.com"),
            answer("https://api.githubcopilot.com.evil.com/x"),
            answer("https://api.business.githubcopilot.com/"),
            json(200, j!({"token": "t", "endpoints": {"api": 7}})),
        ])
        .await;
        let mut config = CopilotOAuthConfig {
            api_base_url: base.clone(),
            ..Default::default()
        };
        config
            .headers
            .insert("editor-version".into(), "vscode/9.9".into());
        config.headers.insert("user-agent".into(), "".into());
        let flow = CopilotFlow::new(Http::new(), &config);
        let material = testing::material("copilot", Some("gho_github"));
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(flow.refresh(&material, now()).await.unwrap().api_base);
        }
        assert_eq!(
            got,
            [
                None,
                None,
                None,
                Some("https://api.business.githubcopilot.com".into()),
                None
            ]
        );
        let sent = &mock.requests()[0];
        assert_eq!(sent.header("editor-version"), "vscode/9.9");
        assert_eq!(sent.header("user-agent"), "", "\"\" removes a default");
    }

    #[test]
    fn refresh_after_arithmetic() {
        let n = now();
        let s = TimeDelta::seconds;
        // refresh_in - 60 s.
        assert_eq!(refresh_after(n, 1500, n + s(1800)), n + s(1440));
        // Never later than expires_at - 60 s.
        assert_eq!(refresh_after(n, 5000, n + s(1800)), n + s(1740));
        // Never earlier than now + 30 s.
        assert_eq!(refresh_after(n, 10, n + s(1800)), n + s(30));
        assert_eq!(refresh_after(n, -99, n + s(60)), n + s(30));
        assert_eq!(
            refresh_after(n, i64::MAX, n + client::MAX_LIFETIME),
            n + client::MAX_LIFETIME - s(60)
        );
    }

    #[tokio::test]
    async fn rejections_carry_githubs_message() {
        let (_mock, base) = Mock::start(vec![
            json(
                401,
                j!({"message": "Bad credentials", "documentation_url": "https://docs"}),
            ),
            json(
                403,
                j!({"error_details": {"message": "No Copilot seat for gho_github"}}),
            ),
            (503, vec![("retry-after", "7".into())], vec![]),
            json(200, j!({"token": "", "expires_at": 1})),
            json(
                200,
                j!({"token": "t", "expires_at": i64::MIN, "refresh_in": u64::MAX}),
            ),
        ])
        .await;
        let flow = flow(&base);
        let material = testing::material("copilot", Some("gho_github"));
        let next = async || flow.refresh(&material, now()).await;
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected("Bad credentials (HTTP 401)".into())
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected("No Copilot seat for *** (HTTP 403)".into())
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Transient {
                reason: "the token endpoint answered 503".into(),
                retry_after: Some(std::time::Duration::from_secs(7))
            }
        );
        assert!(matches!(
            next().await.unwrap_err(),
            FlowError::Transient { .. }
        ));
        let got = next().await.unwrap();
        assert_eq!(got.expires_at, now() + client::MIN_LIFETIME);
        assert_eq!(got.refresh_after, Some(now() + SOONEST));
    }

    #[tokio::test]
    async fn without_a_github_token_nothing_is_sent() {
        let (mock, base) = Mock::start(vec![]).await;
        let e = flow(&base)
            .refresh(&testing::material("copilot", None), now())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            FlowError::Unrefreshable("the credential has no GitHub token".into())
        );
        assert!(mock.requests().is_empty());
    }
}

#[cfg(test)]
mod login_tests {
    use super::super::testing::{self, Mock, json, now};
    use super::*;
    use crate::crypto::Secret;
    use crate::domain::AuthMethod;
    use crate::domain::OauthExtra;
    use serde_json::json as j;
    use std::time::Duration;

    fn flow(base: &str) -> CopilotFlow {
        CopilotFlow::new(
            Http::new(),
            &CopilotOAuthConfig {
                github_base_url: format!("{base}/"),
                api_base_url: format!("{base}/"),
                client_id: "Iv1.test".into(),
                ..Default::default()
            },
        )
    }

    fn github_codes() -> testing::Scripted {
        json(
            200,
            j!({"device_code": "dc-github-secret", "user_code": "ABCD-1234",
                "verification_uri": "https://github.com/login/device",
                "expires_in": 900, "interval": 5}),
        )
    }

    #[tokio::test]
    async fn start_asks_github_for_a_device_code() {
        let (mock, base) = Mock::start(vec![github_codes()]).await;
        let flow = flow(&base);
        assert!(flow.has_login());
        let got = flow
            .start_login(&LoginRequest::default(), now())
            .await
            .unwrap();
        assert_eq!(got.device_code.expose(), "dc-github-secret");
        assert_eq!(got.user_code, "ABCD-1234");
        assert_eq!(got.verification_uri, "https://github.com/login/device");
        assert_eq!(got.verification_uri_complete, None);
        assert_eq!(got.expires_in, Duration::from_secs(900));
        assert_eq!(got.interval, Duration::from_secs(5));
        assert!(got.client.is_none() && got.extra.is_empty());
        testing::assert_no_secret(&got, &["dc-github-secret"]);
        let sent = mock.requests();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].method, "POST");
        assert_eq!(sent[0].path, "/login/device/code");
        assert_eq!(sent[0].header("accept"), "application/json");
        assert_eq!(
            sent[0].header("content-type"),
            "application/x-www-form-urlencoded"
        );
        let form = sent[0].form();
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("client_id", "Iv1.test"), ("scope", "read:user")]);
    }

    #[tokio::test]
    async fn start_refuses_a_kiro_request_without_a_call() {
        let (mock, base) = Mock::start(vec![]).await;
        let request = LoginRequest {
            method: Some(AuthMethod::Idc),
            start_url: Some("https://x.awsapps.com/start".into()),
            region: None,
        };
        let e = flow(&base).start_login(&request, now()).await.unwrap_err();
        assert!(matches!(e, FlowError::Unrefreshable(_)), "{e:?}");
        assert!(mock.requests().is_empty());
    }

    #[tokio::test]
    async fn start_failures() {
        let (_mock, base) = Mock::start(vec![
            // GitHub answers some errors with 200.
            json(
                200,
                j!({"error": "device_flow_disabled", "error_description": "Device flow is disabled"}),
            ),
            json(
                400,
                j!({"error": "unauthorized_client", "error_description": "no"}),
            ),
            (503, vec![("retry-after", "9".into())], vec![]),
            (429, vec![], vec![]),
            (200, vec![], b"garbage".to_vec()),
            testing::huge(1 << 20),
            json(
                200,
                j!({"device_code": "dc", "user_code": "A", "verification_uri": "javascript:alert(1)"}),
            ),
            json(
                200,
                j!({"device_code": "dc", "user_code": "ABCD", "verification_uri": "http://127.0.0.1/device",
                    "verification_uri_complete": "https://github.com/login/device?code=ABCD",
                    "expires_in": 1e300, "interval": -3}),
            ),
        ])
        .await;
        let flow = flow(&base);
        let next = async || flow.start_login(&LoginRequest::default(), now()).await;
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected("device_flow_disabled: Device flow is disabled (HTTP 200)".into())
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected("unauthorized_client: no (HTTP 400)".into())
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Transient {
                reason: "the token endpoint answered 503".into(),
                retry_after: Some(Duration::from_secs(9))
            }
        );
        assert!(matches!(
            next().await.unwrap_err(),
            FlowError::Transient { .. }
        ));
        for _ in 0..3 {
            let e = next().await.unwrap_err();
            assert!(
                matches!(&e, FlowError::Transient { reason, .. } if reason.starts_with("answer unreadable")),
                "{e:?}"
            );
        }
        let got = next().await.unwrap();
        assert_eq!(got.expires_in, device::MAX_EXPIRES_IN);
        assert_eq!(got.interval, device::MIN_INTERVAL);
        assert_eq!(
            got.verification_uri_complete.as_deref(),
            Some("https://github.com/login/device?code=ABCD")
        );
    }

    #[tokio::test]
    async fn polls_until_github_answers_a_token() {
        let token_answer = |body| json(200, body);
        let (mock, base) = Mock::start(vec![
            token_answer(j!({"error": "authorization_pending",
                             "error_description": "The authorization request is still pending."})),
            json(400, j!({"error": "authorization_pending"})),
            token_answer(j!({"error": "slow_down", "interval": 10})),
            token_answer(j!({"error": "slow_down"})),
            token_answer(j!({"error": "slow_down", "interval": u64::MAX})),
            // A 2xx without a token is pending (ericc-ch).
            token_answer(j!({})),
            token_answer(j!({"access_token": null, "token_type": "bearer"})),
            token_answer(j!({"error": "access_denied"})),
            token_answer(j!({"error": "expired_token"})),
            token_answer(j!({"error": "incorrect_device_code",
                             "error_description": "dc-github-secret is not a device code"})),
            token_answer(j!({"error": "incorrect_client_credentials"})),
            token_answer(j!({"error": "unsupported_grant_type"})),
            token_answer(j!({"error": "device_flow_disabled"})),
            token_answer(j!({"error": "something_new"})),
            json(500, j!({"error": "server_error"})),
            (429, vec![("retry-after", "60".into())], vec![]),
            (200, vec![], b"<html>".to_vec()),
            testing::huge(10 << 20),
            token_answer(j!({"access_token": "a b"})),
            token_answer(
                j!({"access_token": "gho_new", "token_type": "bearer", "scope": "read:user"}),
            ),
            json(200, j!({"id": 12345, "login": "octo-cat", "name": "Mona"})),
        ])
        .await;
        let flow = flow(&base);
        let device_code = Secret::new("dc-github-secret");
        let extra = OauthExtra::default();
        let next = async || {
            let material = PollMaterial {
                device_code: &device_code,
                client: None,
                extra: &extra,
            };
            flow.poll_login(material, now()).await
        };
        assert!(matches!(next().await, Poll::Pending));
        assert!(matches!(next().await, Poll::Pending));
        assert!(matches!(next().await, Poll::SlowDown(Some(d)) if d == Duration::from_secs(10)));
        assert!(matches!(next().await, Poll::SlowDown(None)));
        assert!(matches!(
            next().await,
            Poll::SlowDown(Some(device::MAX_INTERVAL))
        ));
        assert!(matches!(next().await, Poll::Pending));
        assert!(matches!(next().await, Poll::Pending));
        assert!(matches!(next().await, Poll::Denied));
        assert!(matches!(next().await, Poll::Expired));
        for expected in [
            "incorrect_device_code: *** is not a device code (HTTP 200)",
            "incorrect_client_credentials (HTTP 200)",
            "unsupported_grant_type (HTTP 200)",
            "device_flow_disabled (HTTP 200)",
            "something_new (HTTP 200)",
        ] {
            assert!(
                matches!(next().await, Poll::Failed(m) if m == expected),
                "{expected}"
            );
        }
        assert!(matches!(next().await, Poll::Retry(m) if m == "server_error (HTTP 500)"));
        assert!(matches!(next().await, Poll::Retry(_)));
        for _ in 0..2 {
            assert!(matches!(next().await, Poll::Retry(m) if m.starts_with("answer unreadable")));
        }
        assert!(matches!(next().await, Poll::Failed(m) if m.starts_with("answer unreadable")));
        let Poll::Success(tokens) = next().await else {
            panic!("no success")
        };
        assert_eq!(tokens.refresh_token.expose(), "gho_new");
        assert!(tokens.access_token.is_none() && tokens.expires_at.is_none());
        assert_eq!(tokens.account.as_deref(), Some("github:12345"));
        assert_eq!(tokens.label.as_deref(), Some("octo-cat"));
        testing::assert_no_secret(&tokens, &["gho_new"]);

        let mut sent = mock.requests();
        assert_eq!(sent.len(), 21);
        let user = sent.pop().unwrap();
        assert_eq!(user.method, "GET");
        assert_eq!(user.path, "/user");
        assert_eq!(user.header("authorization"), "token gho_new");
        assert_eq!(user.header("accept"), "application/vnd.github+json");
        assert_eq!(user.header("user-agent"), "GitHubCopilotChat/0.26.7");
        assert!(sent.iter().all(|r| r.path == "/login/oauth/access_token"));
        assert_eq!(sent[0].method, "POST");
        assert_eq!(sent[0].header("accept"), "application/json");
        let form = sent[0].form();
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("client_id", "Iv1.test"),
                ("device_code", "dc-github-secret"),
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ]
        );
    }

    /// Each `/user` answer after an approval: the login succeeds whatever it is, with an
    /// account only when the answer is a 200 with a positive integer `id` and a GitHub login.
    #[tokio::test]
    async fn the_github_user_is_read_within_bounds() {
        let approval = || json(200, j!({"access_token": "gho_user_secret"}));
        let user = |body| json(200, body);
        let long_login = "a".repeat(MAX_LOGIN);
        let answers: Vec<(testing::Scripted, Option<(&str, String)>)> = vec![
            (
                user(j!({"id": 1, "login": long_login.clone()})),
                Some(("github:1", long_login.clone())),
            ),
            (
                user(j!({"id": 1, "login": "A-9"})),
                Some(("github:1", "A-9".into())),
            ),
            (user(j!({"id": "12345", "login": "octo"})), None),
            (user(j!({"id": 12345.5, "login": "octo"})), None),
            (user(j!({"id": 1.0, "login": "octo"})), None),
            (user(j!({"id": 0, "login": "octo"})), None),
            (user(j!({"id": -7, "login": "octo"})), None),
            (
                user(j!({"id": u64::MAX as f64 * 2.0, "login": "octo"})),
                None,
            ),
            (user(j!({"login": "octo"})), None),
            (user(j!({"id": 5})), None),
            (user(j!({"id": 5, "login": ""})), None),
            (user(j!({"id": 5, "login": {"name": "octo"}})), None),
            (user(j!({"id": 5, "login": "octo cat"})), None),
            (user(j!({"id": 5, "login": "octo\n"})), None),
            (user(j!({"id": 5, "login": "ōcto"})), None),
            (user(j!({"id": 5, "login": long_login.clone() + "a"})), None),
            (user(j!([{"id": 5, "login": "octo"}])), None),
            (testing::huge(1 << 20), None),
            ((200, vec![], b"{\"id\": 5, \"login\"".to_vec()), None),
            (json(201, j!({"id": 5, "login": "octo"})), None),
            (
                json(401, j!({"message": "Bad credentials gho_user_secret"})),
                None,
            ),
            (json(500, j!({"id": 5, "login": "octo"})), None),
        ];
        let mut script = Vec::new();
        for (answer, _) in &answers {
            script.push(approval());
            script.push(answer.clone());
        }
        let (mock, base) = Mock::start(script).await;
        let flow = flow(&base);
        let device_code = Secret::new("dc-github-secret");
        let extra = OauthExtra::default();
        for (i, (_, expected)) in answers.iter().enumerate() {
            let material = PollMaterial {
                device_code: &device_code,
                client: None,
                extra: &extra,
            };
            let Poll::Success(tokens) = flow.poll_login(material, now()).await else {
                panic!("answer {i}: the login did not succeed")
            };
            assert_eq!(tokens.refresh_token.expose(), "gho_user_secret");
            let got = tokens.account.as_deref().zip(tokens.label.clone());
            let expected = expected.as_ref().map(|(a, l)| (*a, l.clone()));
            assert_eq!(got, expected, "answer {i}");
        }
        let paths: Vec<String> = mock.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(paths.len(), 2 * answers.len());
        assert!(
            paths
                .chunks(2)
                .all(|p| p == ["/login/oauth/access_token", "/user"])
        );
    }

    #[test]
    fn a_refused_user_answer_keeps_the_token_out_of_the_reason() {
        let answer = client::Answer {
            status: reqwest::StatusCode::OK,
            retry_after: None,
            body: Some(b"gho_user_secret".to_vec()),
            rate_limited: false,
        };
        let e = read_user(&answer, &["gho_user_secret"]).unwrap_err();
        assert!(
            e.starts_with("answer unreadable") && !e.contains("gho_"),
            "{e}"
        );
        let answer = client::Answer {
            body: None,
            ..answer
        };
        let e = read_user(&answer, &["gho_user_secret"]).unwrap_err();
        assert_eq!(e, "answer unreadable: longer than 64 KiB");
    }

    #[tokio::test]
    async fn an_unreachable_github_is_retried() {
        // A port nothing listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let flow = flow(&base);
        let device_code = Secret::new("dc-github-secret");
        let extra = OauthExtra::default();
        let material = PollMaterial {
            device_code: &device_code,
            client: None,
            extra: &extra,
        };
        assert!(matches!(
            flow.poll_login(material, now()).await,
            Poll::Retry(m) if m.starts_with("the token endpoint is unreachable") && !m.contains("dc-github")
        ));
        assert!(matches!(
            flow.start_login(&LoginRequest::default(), now()).await,
            Err(FlowError::Transient { .. })
        ));
    }
}
