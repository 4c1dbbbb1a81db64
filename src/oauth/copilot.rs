//! Copilot's login and token exchange. The login is GitHub's device flow (RFC 8628) at
//! `oauth.copilot.github_base_url` with `oauth.copilot.client_id` and `scope`: its GitHub token
//! becomes the credential's refresh token, with no access token until the first exchange.
//! The token exchange: the stored GitHub token (the credential's refresh token) buys a
//! short-lived Copilot token at `{oauth.copilot.api_base_url}/copilot_internal/v2/token`,
//! answered by `{token, expires_at (unix s), refresh_in (s)}`. The worker exchanges it again
//! `refresh_in - 60 s` later, as the editors do. A 401 or 403 (a revoked GitHub token, no
//! Copilot seat) is final, with the message GitHub gave.

use super::client::{self, Http};
use super::device::{self, Fields};
use super::{BoxFuture, OauthFlow};
use crate::config::CopilotOAuthConfig;
use crate::domain::OauthExtra;
use crate::domain::login::{DeviceAuthorization, LoginRequest, LoginTokens, Poll, PollMaterial};
use crate::domain::refresh::{FlowError, RefreshMaterial, Refreshed};
use chrono::{DateTime, TimeDelta, Utc};

/// The editor the exchange presents itself as; the endpoint is private and expects one.
const HEADERS: &[(&str, &str)] = &[
    ("accept", "application/json"),
    ("editor-version", "vscode/1.99.3"),
    ("editor-plugin-version", "copilot-chat/0.26.7"),
    ("user-agent", "GitHubCopilotChat/0.26.7"),
    ("x-github-api-version", "2025-04-01"),
];

/// How much before `refresh_in` (and before expiry) the token is exchanged again.
const MARGIN: TimeDelta = TimeDelta::seconds(60);
/// The soonest the token is exchanged again, whatever `refresh_in` says.
const SOONEST: TimeDelta = TimeDelta::seconds(30);
/// The lifetime assumed when the answer names no `expires_at` (Copilot tokens live about
/// 25 minutes).
const DEFAULT_LIFETIME: i64 = 25 * 60;

/// GitHub's device authorization answer (RFC 8628's names).
const FIELDS: Fields = Fields {
    device_code: "device_code",
    user_code: "user_code",
    verification_uri: "verification_uri",
    verification_uri_complete: "verification_uri_complete",
    expires_in: "expires_in",
    interval: "interval",
};

#[derive(Debug)]
pub struct CopilotFlow {
    http: Http,
    url: String,
    /// `{github_base_url}/login/device/code`.
    device_url: String,
    /// `{github_base_url}/login/oauth/access_token`.
    poll_url: String,
    client_id: String,
    scope: String,
}

impl CopilotFlow {
    pub fn new(http: Http, config: &CopilotOAuthConfig) -> CopilotFlow {
        let github = config.github_base_url.trim_end_matches('/');
        CopilotFlow {
            http,
            url: format!(
                "{}/copilot_internal/v2/token",
                config.api_base_url.trim_end_matches('/')
            ),
            device_url: format!("{github}/login/device/code"),
            poll_url: format!("{github}/login/oauth/access_token"),
            client_id: config.client_id.clone(),
            scope: config.scope.clone(),
        }
    }

    /// `POST /login/device/code` with the client id and scope.
    async fn start(&self, request: &LoginRequest) -> Result<DeviceAuthorization, FlowError> {
        if *request != LoginRequest::default() {
            return Err(FlowError::Rejected(
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
        let codes = device::read_codes(&client::json_object(&answer, &[])?, &FIELDS, &[])?;
        Ok(DeviceAuthorization {
            device_code: codes.device_code,
            user_code: codes.user_code,
            verification_uri: codes.verification_uri,
            verification_uri_complete: codes.verification_uri_complete,
            expires_in: codes.expires_in,
            interval: codes.interval,
            client: None,
            extra: OauthExtra::default(),
        })
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
            Ok(Some(github_token)) => Poll::Success(LoginTokens {
                access_token: None,
                refresh_token: github_token,
                expires_at: None,
            }),
            // A 2xx without a token is taken as pending, as ericc-ch/copilot-api does.
            Ok(None) => Poll::Pending,
            Err(e) => Poll::Failed(e.reason().to_string()),
        }
    }

    async fn run(
        &self,
        material: &RefreshMaterial,
        now: DateTime<Utc>,
    ) -> Result<Refreshed, FlowError> {
        let github_token = super::refresh_token(material, "GitHub token")?;
        let access = material.access_token.as_ref().map(|s| s.expose());
        let secrets: Vec<&str> = [Some(github_token), access].into_iter().flatten().collect();
        let mut request = self.http.client()?.get(&self.url).header(
            reqwest::header::AUTHORIZATION,
            format!("token {github_token}"),
        );
        for (name, value) in HEADERS {
            request = request.header(*name, *value);
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
        Ok(Refreshed {
            access_token: token,
            expires_at,
            refresh_token: None,
            client: None,
            refresh_after,
        })
    }
}

/// `pairs` as an `application/x-www-form-urlencoded` body.
fn form_body(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

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
    use super::super::testing::{self, Mock, json};
    use super::*;
    use serde_json::json as j;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

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
        for (name, value) in HEADERS {
            assert_eq!(sent.header(name), *value, "{name}");
        }
        let got = flow.refresh(&material, now()).await.unwrap();
        assert_eq!(got.refresh_after, None);
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
