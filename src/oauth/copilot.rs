//! Copilot's token exchange: the stored GitHub token (the credential's refresh token) buys a
//! short-lived Copilot token at `{oauth.copilot.api_base_url}/copilot_internal/v2/token`,
//! answered by `{token, expires_at (unix s), refresh_in (s)}`. The worker exchanges it again
//! `refresh_in - 60 s` later, as the editors do. A 401 or 403 (a revoked GitHub token, no
//! Copilot seat) is final, with the message GitHub gave. The answer's `endpoints.api` comes
//! back as the credential's API base only when `oauth.copilot.allowed_api_hosts` allows it
//! (https, an allowed host: [`ApiHosts::check`]); a refused one is logged by host and
//! dropped, so the chat calls go to the default host.

use super::client::{self, Http};
use super::{BoxFuture, OauthFlow};
use crate::config::CopilotOAuthConfig;
use crate::domain::refresh::{FlowError, RefreshMaterial, Refreshed};
use crate::providers::copilot::{self as headers, ApiHosts, HeaderList};
use chrono::{DateTime, TimeDelta, Utc};

/// How much before `refresh_in` (and before expiry) the token is exchanged again.
const MARGIN: TimeDelta = TimeDelta::seconds(60);
/// The soonest the token is exchanged again, whatever `refresh_in` says.
const SOONEST: TimeDelta = TimeDelta::seconds(30);
/// The lifetime assumed when the answer names no `expires_at` (Copilot tokens live about
/// 25 minutes).
const DEFAULT_LIFETIME: i64 = 25 * 60;

#[derive(Debug)]
pub struct CopilotFlow {
    http: Http,
    url: String,
    /// The editor the exchange presents itself as (the endpoint is private and expects one):
    /// the editor headers of `oauth.copilot.headers`, built once.
    headers: HeaderList,
    api_hosts: ApiHosts,
}

impl CopilotFlow {
    pub fn new(http: Http, config: &CopilotOAuthConfig) -> CopilotFlow {
        CopilotFlow {
            http,
            url: format!(
                "{}/copilot_internal/v2/token",
                config.api_base_url.trim_end_matches('/')
            ),
            headers: headers::exchange_headers(&config.header_list()),
            api_hosts: config.api_hosts(),
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
