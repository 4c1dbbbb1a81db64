//! The RFC 6749 §6 refresh grant, for the `oauth` credentials of a provider whose config block
//! names a `token_url` (README, "Token refresh grants"): a form POST of `grant_type=
//! refresh_token`, the refresh token, the client id (and secret, and scope, when configured),
//! answered by `{access_token, expires_in?, refresh_token?}`.

use super::client::{self, Http};
use super::{BoxFuture, OauthFlow};
use crate::domain::refresh::{FlowError, RefreshMaterial, Refreshed};
use crate::providers::GrantSettings;
use chrono::{DateTime, Utc};

/// The refresh grant against one token endpoint.
#[derive(Debug)]
pub struct GrantFlow {
    http: Http,
    settings: GrantSettings,
}

impl GrantFlow {
    pub fn new(http: Http, settings: GrantSettings) -> GrantFlow {
        GrantFlow { http, settings }
    }

    async fn run(
        &self,
        material: &RefreshMaterial,
        now: DateTime<Utc>,
    ) -> Result<Refreshed, FlowError> {
        let refresh_token = super::refresh_token(material, "refresh token")?;
        let client_secret = self.settings.client_secret.as_deref().map(|s| s.expose());
        let access = material.access_token.as_ref().map(|s| s.expose());
        let secrets: Vec<&str> = [Some(refresh_token), client_secret, access]
            .into_iter()
            .flatten()
            .collect();
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", self.settings.client_id.as_str()),
        ];
        if let Some(secret) = client_secret {
            form.push(("client_secret", secret));
        }
        if let Some(scope) = &self.settings.scope {
            form.push(("scope", scope));
        }
        let answer = self
            .http
            .post_form(&self.settings.token_url, &form, &secrets)
            .await?;
        if !answer.status.is_success() {
            return Err(client::failure(&answer, &secrets, false));
        }
        let map = client::json_object(&answer, &secrets)?;
        let access_token = client::token(&map, "access_token", &secrets)?;
        let expires_at = client::expiry_from(&map, "expires_in", now, &secrets)?;
        let rotated = client::optional_token(&map, "refresh_token", &secrets)?
            .filter(|t| t.expose() != refresh_token);
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

impl OauthFlow for GrantFlow {
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
    use super::super::testing::{self, Mock, json, now};
    use super::*;
    use crate::crypto::Secret;
    use chrono::TimeDelta;
    use serde_json::json as j;
    use std::sync::Arc;

    fn flow(base: &str, secret: Option<&str>, scope: Option<&str>) -> GrantFlow {
        GrantFlow::new(
            Http::new(),
            GrantSettings {
                token_url: format!("{base}/oauth/token"),
                client_id: "my-client".into(),
                client_secret: secret.map(|s| Arc::new(Secret::new(s))),
                scope: scope.map(str::to_string),
            },
        )
    }

    #[tokio::test]
    async fn refreshes_with_and_without_rotation() {
        let (mock, base) = Mock::start(vec![
            json(
                200,
                j!({"access_token": "at-new", "expires_in": 7200, "refresh_token": "rt-2"}),
            ),
            json(200, j!({"access_token": "at-3", "token_type": "bearer"})),
        ])
        .await;
        let flow = flow(&base, Some("client-secret-1"), Some("read write"));
        let material = testing::material("my-llm", Some("rt-1"));
        let got = flow.refresh(&material, now()).await.unwrap();
        assert_eq!(got.access_token.expose(), "at-new");
        assert_eq!(got.expires_at, now() + TimeDelta::seconds(7200));
        assert_eq!(got.refresh_token.as_ref().unwrap().expose(), "rt-2");
        testing::assert_no_secret(&got, &["at-new", "rt-2"]);
        let sent = &mock.requests()[0];
        assert_eq!(sent.path, "/oauth/token");
        assert_eq!(
            sent.header("content-type"),
            "application/x-www-form-urlencoded"
        );
        assert_eq!(
            sent.form(),
            [
                ("grant_type", "refresh_token"),
                ("refresh_token", "rt-1"),
                ("client_id", "my-client"),
                ("client_secret", "client-secret-1"),
                ("scope", "read write"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        // No rotation, no lifetime: the refresh token stays, the token lives an hour.
        let got = flow.refresh(&material, now()).await.unwrap();
        assert!(got.refresh_token.is_none());
        assert_eq!(got.expires_at, now() + TimeDelta::seconds(3600));
        testing::assert_no_secret(&flow, &["client-secret-1"]);
    }

    #[tokio::test]
    async fn a_public_client_sends_no_secret() {
        let (mock, base) =
            Mock::start(vec![json(200, j!({"access_token": "a", "expires_in": 60}))]).await;
        flow(&base, None, None)
            .refresh(&testing::material("p", Some("rt")), now())
            .await
            .unwrap();
        let form = mock.requests()[0].form();
        assert!(
            form.iter()
                .all(|(k, _)| k != "client_secret" && k != "scope"),
            "{form:?}"
        );
    }

    #[tokio::test]
    async fn failures() {
        let (_mock, base) = Mock::start(vec![
            json(
                400,
                j!({"error": "invalid_grant", "error_description": "refresh token rt-1 revoked"}),
            ),
            json(500, j!({"error": "server_error"})),
            (
                429,
                vec![("retry-after", "120".into())],
                b"slow down".to_vec(),
            ),
            (429, vec![("retry-after", "999999".into())], vec![]),
            (200, vec![], b"{not json".to_vec()),
            json(200, j!({"token_type": "bearer"})),
            testing::huge(10 << 20),
            json(200, j!({"access_token": "a", "expires_in": 1e300})),
            json(200, j!({"access_token": "a", "expires_in": -30})),
            json(401, j!({"error": "invalid_client"})),
        ])
        .await;
        let flow = flow(&base, Some("cs"), None);
        let material = testing::material("p", Some("rt-1"));
        let next = async || flow.refresh(&material, now()).await;
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected("invalid_grant: refresh token *** revoked (HTTP 400)".into())
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Transient {
                reason: "server_error (HTTP 500)".into(),
                retry_after: None
            }
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Transient {
                reason: "the token endpoint answered 429".into(),
                retry_after: Some(std::time::Duration::from_secs(120))
            }
        );
        assert!(matches!(
            next().await.unwrap_err(),
            FlowError::Transient { retry_after: Some(d), .. } if d == client::MAX_RETRY_AFTER
        ));
        for _ in 0..3 {
            let e = next().await.unwrap_err();
            assert!(
                matches!(&e, FlowError::Transient { reason, .. } if reason.starts_with("answer unreadable")),
                "{e:?}"
            );
        }
        assert_eq!(
            next().await.unwrap().expires_at,
            now() + client::MAX_LIFETIME
        );
        assert_eq!(
            next().await.unwrap().expires_at,
            now() + client::MIN_LIFETIME
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected("invalid_client (HTTP 401)".into())
        );
    }

    #[tokio::test]
    async fn without_a_refresh_token_nothing_is_sent() {
        let (mock, base) = Mock::start(vec![]).await;
        let e = flow(&base, None, None)
            .refresh(&testing::material("p", None), now())
            .await
            .unwrap_err();
        assert!(matches!(e, FlowError::Unrefreshable(_)));
        assert!(mock.requests().is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_transient() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let e = flow(&base, None, None)
            .refresh(&testing::material("p", Some("rt")), now())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FlowError::Transient { reason, .. } if reason.contains("unreachable")),
            "{e:?}"
        );
    }
}
