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

/// A region goes into a host name: nothing but `^[a-z0-9-]{1,32}$`.
fn valid_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
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

    /// The method, start URL and region a login asks for, or `Unrefreshable` without a call:
    /// Builder ID takes the config's (and nothing from the request); Identity Center needs
    /// an https start URL and takes a region of `^[a-z0-9-]{1,32}$` (the config's when none).
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
        if !valid_region(&region) {
            return Err(FlowError::Unrefreshable(client::scrub(
                &format!("`{region}` is not an AWS region"),
                &[],
            )));
        }
        Ok((method, start_url, region))
    }

    /// Register a client, then `POST /device_authorization` with it.
    async fn start(
        &self,
        request: &LoginRequest,
        now: DateTime<Utc>,
    ) -> Result<DeviceAuthorization, FlowError> {
        let (method, start_url, region) = self.target(request)?;
        let base = self.base_url.replace("{region}", &region);
        let new = self.register(&base, now, &[]).await?;
        let secret = new.client_secret.expose();
        let secrets = [secret];
        let body = json!({
            "clientId": new.client_id,
            "clientSecret": secret,
            "startUrl": start_url,
        });
        let request = self
            .http
            .client()?
            .post(format!("{base}/device_authorization"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_string());
        let answer = client::send(request, &secrets).await?;
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
        if !valid_region(region) {
            return Poll::Failed(client::scrub(
                &format!("`{region}` is not an AWS region"),
                &[],
            ));
        }
        let base = self.base_url.replace("{region}", region);
        let device_code = material.device_code.expose();
        let client_secret = new.client_secret.expose();
        let secrets = [device_code, client_secret];
        let body = json!({
            "clientId": new.client_id,
            "clientSecret": client_secret,
            "grantType": device::GRANT_TYPE,
            "deviceCode": device_code,
        });
        let http = match self.http.client() {
            Ok(c) => c,
            Err(e) => return Poll::Retry(e.reason().to_string()),
        };
        let request = http
            .post(format!("{base}/token"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_string());
        let answer = client::send(request, &secrets).await;
        let map = match device::poll_answer(answer, "interval", &secrets) {
            Ok(map) => map,
            Err(poll) => return poll,
        };
        let tokens = (|| {
            let access_token = client::token(&map, "accessToken", &secrets)?;
            let refresh_token = client::token(&map, "refreshToken", &secrets)?;
            let lifetime = client::seconds(&map, "expiresIn", &secrets)?
                .unwrap_or(client::DEFAULT_LIFETIME.num_seconds());
            Ok::<_, FlowError>(LoginTokens {
                access_token: Some(access_token),
                refresh_token,
                expires_at: Some(client::expiry_in(now, lifetime)),
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
        if !valid_region(region) {
            return Err(FlowError::Unrefreshable(client::scrub(
                &format!("`{region}` is not an AWS region"),
                &[],
            )));
        }
        let base = self.base_url.replace("{region}", region);
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

        let (answer, registered) = match stored.filter(|_| fresh) {
            Some((id, secret)) => {
                let answer = self
                    .token(&base, Client { id, secret }, refresh_token, &secrets)
                    .await?;
                let refused = !answer.status.is_success()
                    && ErrorBody::read(&answer).error.as_deref() == Some("invalid_client");
                if refused {
                    let new = self.register(&base, now, &secrets).await?;
                    let answer = self
                        .token_with(&base, &new, refresh_token, &secrets)
                        .await?;
                    (answer, Some(new))
                } else {
                    (answer, None)
                }
            }
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
        let lifetime = client::seconds(&map, "expiresIn", &secrets)?
            .unwrap_or(client::DEFAULT_LIFETIME.num_seconds());
        let rotated = client::optional_token(&map, "refreshToken", &secrets)?
            .filter(|t| t.expose() != refresh_token);
        Ok(Refreshed {
            access_token,
            expires_at: client::expiry_in(now, lifetime),
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
        let request = self
            .http
            .client()?
            .post(format!("{base}/token"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_string());
        client::send(request, secrets).await
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
        let request = self
            .http
            .client()?
            .post(format!("{base}/client/register"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_string());
        let answer = client::send(request, secrets).await?;
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
mod tests {
    use super::super::testing::{self, Mock, json, now};
    use super::*;
    use serde_json::json as j;

    pub(super) fn flow(base: &str) -> KiroFlow {
        KiroFlow::new(
            Http::new(),
            &KiroOAuthConfig {
                oidc_base_url: format!("{base}/{{region}}/"),
                ..Default::default()
            },
        )
    }

    /// A kiro credential with a registered client whose secret expires at `secret_expires`.
    fn material(secret_expires: Option<DateTime<Utc>>) -> RefreshMaterial {
        let mut m = testing::material("kiro", Some("rt-kiro-1"));
        m.client_secret = Some(Secret::new("cs-old"));
        m.extra.client_id = Some("client-old".into());
        m.extra.client_secret_expires_at = secret_expires;
        m.extra.region = Some("eu-west-1".into());
        m
    }

    fn registered(n: u32) -> testing::Scripted {
        json(
            200,
            j!({"clientId": format!("client-{n}"), "clientSecret": format!("cs-{n}"),
                      "clientSecretExpiresAt": now().timestamp() + 90 * 86400,
                      "clientIdIssuedAt": now().timestamp()}),
        )
    }

    #[tokio::test]
    async fn refreshes_with_the_stored_client() {
        let (mock, base) = Mock::start(vec![
            json(
                200,
                j!({"accessToken": "at-k", "expiresIn": 28800, "refreshToken": "rt-kiro-2",
                          "tokenType": "Bearer"}),
            ),
            json(200, j!({"accessToken": "at-k2", "expiresIn": 3600})),
        ])
        .await;
        let flow = flow(&base);
        let m = material(Some(now() + TimeDelta::days(30)));
        let got = flow.refresh(&m, now()).await.unwrap();
        assert_eq!(got.access_token.expose(), "at-k");
        assert_eq!(got.expires_at, now() + TimeDelta::seconds(28800));
        assert_eq!(got.refresh_token.as_ref().unwrap().expose(), "rt-kiro-2");
        assert!(got.client.is_none());
        testing::assert_no_secret(&got, &["at-k", "rt-kiro-2"]);
        let sent = mock.requests();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].path, "/eu-west-1/token");
        assert_eq!(
            sent[0].json(),
            j!({"clientId": "client-old", "clientSecret": "cs-old",
                "grantType": "refresh_token", "refreshToken": "rt-kiro-1"})
        );
        // No rotation.
        let got = flow.refresh(&m, now()).await.unwrap();
        assert!(got.refresh_token.is_none());
    }

    #[tokio::test]
    async fn an_expiring_or_missing_client_is_registered_again_first() {
        for m in [
            material(Some(now() + TimeDelta::minutes(4))),
            material(Some(now() - TimeDelta::days(1))),
            {
                let mut m = material(None);
                m.client_secret = None;
                m.extra.region = None;
                m
            },
        ] {
            let (mock, base) = Mock::start(vec![
                registered(7),
                json(200, j!({"accessToken": "at-new", "expiresIn": 3600})),
            ])
            .await;
            let got = flow(&base).refresh(&m, now()).await.unwrap();
            let client = got.client.as_ref().unwrap();
            assert_eq!(client.client_id, "client-7");
            assert_eq!(client.client_secret.expose(), "cs-7");
            assert_eq!(
                client.client_secret_expires_at,
                Some(now() + TimeDelta::days(90))
            );
            testing::assert_no_secret(&got, &["cs-7", "at-new"]);
            let sent = mock.requests();
            let region = m.extra.region.as_deref().unwrap_or("us-east-1");
            assert_eq!(sent[0].path, format!("/{region}/client/register"));
            assert_eq!(
                sent[0].json(),
                j!({"clientName": "Kiro IDE", "clientType": "public", "scopes": SCOPES,
                    "grantTypes": GRANT_TYPES})
            );
            assert_eq!(sent[1].json()["clientId"], "client-7");
            assert_eq!(sent[1].json()["clientSecret"], "cs-7");
        }
    }

    #[tokio::test]
    async fn invalid_client_registers_once_and_retries_once() {
        let invalid = || {
            json(
                401,
                j!({"error": "invalid_client", "error_description": "bad secret cs-old"}),
            )
        };
        let (mock, base) = Mock::start(vec![
            invalid(),
            registered(8),
            json(200, j!({"accessToken": "at-8", "expiresIn": 3600})),
        ])
        .await;
        let flow = flow(&base);
        let m = material(Some(now() + TimeDelta::days(30)));
        let got = flow.refresh(&m, now()).await.unwrap();
        assert_eq!(got.client.as_ref().unwrap().client_id, "client-8");
        let paths: Vec<String> = mock.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(
            paths,
            [
                "/eu-west-1/token",
                "/eu-west-1/client/register",
                "/eu-west-1/token"
            ]
        );

        // Refused again with the new client: final, and not a third try.
        let (mock, base) =
            Mock::start(vec![invalid(), registered(9), invalid(), registered(10)]).await;
        let e = self::flow(&base).refresh(&m, now()).await.unwrap_err();
        assert_eq!(
            e,
            FlowError::Rejected("invalid_client: bad secret *** (HTTP 401)".into())
        );
        assert_eq!(mock.requests().len(), 3);

        // A client registered just now and refused is not registered again.
        let (mock, base) = Mock::start(vec![registered(11), invalid(), registered(12)]).await;
        let mut none = material(None);
        none.client_secret = None;
        let e = self::flow(&base).refresh(&none, now()).await.unwrap_err();
        assert!(matches!(e, FlowError::Rejected(_)), "{e:?}");
        assert_eq!(mock.requests().len(), 2);
    }

    #[tokio::test]
    async fn failures() {
        let (mock, base) = Mock::start(vec![
            json(400, j!({"error": "invalid_grant", "error_description": "Invalid refresh token rt-kiro-1"})),
            json(500, j!({"error": "server_error"})),
            (429, vec![("retry-after", "30".into())], vec![]),
            (200, vec![], b"<html>".to_vec()),
            testing::huge(10 << 20),
            json(200, j!({"accessToken": "a", "expiresIn": 1e300})),
            json(200, j!({"accessToken": "a", "expiresIn": -1})),
        ])
        .await;
        let flow = flow(&base);
        let m = material(None);
        let next = async || flow.refresh(&m, now()).await;
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected("invalid_grant: Invalid refresh token *** (HTTP 400)".into())
        );
        assert!(matches!(
            next().await.unwrap_err(),
            FlowError::Transient {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            next().await.unwrap_err(),
            FlowError::Transient { retry_after: Some(d), .. } if d.as_secs() == 30
        ));
        for _ in 0..2 {
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
        assert_eq!(mock.requests().len(), 7);
    }

    #[tokio::test]
    async fn a_refused_registration_is_final_and_a_failing_one_transient() {
        let mut m = material(None);
        m.client_secret = None;
        let (_mock, base) = Mock::start(vec![
            json(
                400,
                j!({"error": "invalid_request", "error_description": "no"}),
            ),
            json(500, j!({})),
            json(200, j!({"clientId": "c"})),
        ])
        .await;
        let flow = flow(&base);
        assert_eq!(
            flow.refresh(&m, now()).await.unwrap_err(),
            FlowError::Rejected("client registration: invalid_request: no (HTTP 400)".into())
        );
        assert!(matches!(
            flow.refresh(&m, now()).await.unwrap_err(),
            FlowError::Transient { .. }
        ));
        assert!(matches!(
            flow.refresh(&m, now()).await.unwrap_err(),
            FlowError::Transient { .. }
        ));
    }

    #[tokio::test]
    async fn bad_regions_and_missing_tokens_send_nothing() {
        let (mock, base) = Mock::start(vec![]).await;
        let flow = flow(&base);
        for region in ["", "EU-WEST-1", "a/b", "x.evil.example", &"a".repeat(33)] {
            let mut m = material(None);
            m.extra.region = Some(region.to_string());
            assert!(
                matches!(
                    flow.refresh(&m, now()).await.unwrap_err(),
                    FlowError::Unrefreshable(_)
                ),
                "{region}"
            );
        }
        let mut m = material(None);
        m.refresh_token = None;
        assert!(matches!(
            flow.refresh(&m, now()).await.unwrap_err(),
            FlowError::Unrefreshable(_)
        ));
        assert!(mock.requests().is_empty());
        testing::assert_no_secret(&m, &["cs-old", "rt-kiro-1", "old-access-token"]);
        testing::assert_no_secret(&flow, &["cs-old"]);
    }
}

#[cfg(test)]
mod login_tests {
    use super::super::testing::{self, Mock, json, now};
    use super::tests::flow;
    use super::*;
    use serde_json::json as j;
    use std::time::Duration;

    fn registered() -> testing::Scripted {
        json(
            200,
            j!({"clientId": "client-login", "clientSecret": "cs-login-secret",
                "clientSecretExpiresAt": now().timestamp() + 90 * 86400,
                "clientIdIssuedAt": now().timestamp()}),
        )
    }

    fn authorized() -> testing::Scripted {
        json(
            200,
            j!({"deviceCode": "dc-aws-secret", "userCode": "WXYZ-9876",
                "verificationUri": "https://device.sso.us-east-1.amazonaws.com/",
                "verificationUriComplete": "https://device.sso.us-east-1.amazonaws.com/?user_code=WXYZ-9876",
                "expiresIn": 600, "interval": 1}),
        )
    }

    fn idc(start_url: Option<&str>, region: Option<&str>) -> LoginRequest {
        LoginRequest {
            method: Some(AuthMethod::Idc),
            start_url: start_url.map(str::to_string),
            region: region.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn builder_id_registers_a_client_then_asks_for_a_device_code() {
        for method in [None, Some(AuthMethod::BuilderId)] {
            let (mock, base) = Mock::start(vec![registered(), authorized()]).await;
            let flow = flow(&base);
            assert!(flow.has_login());
            let request = LoginRequest {
                method,
                ..Default::default()
            };
            let got = flow.start_login(&request, now()).await.unwrap();
            assert_eq!(got.device_code.expose(), "dc-aws-secret");
            assert_eq!(got.user_code, "WXYZ-9876");
            assert_eq!(
                got.verification_uri,
                "https://device.sso.us-east-1.amazonaws.com/"
            );
            assert_eq!(
                got.verification_uri_complete.as_deref(),
                Some("https://device.sso.us-east-1.amazonaws.com/?user_code=WXYZ-9876")
            );
            assert_eq!(got.expires_in, Duration::from_secs(600));
            assert_eq!(got.interval, Duration::from_secs(1));
            let client = got.client.as_ref().unwrap();
            assert_eq!(client.client_id, "client-login");
            assert_eq!(client.client_secret.expose(), "cs-login-secret");
            assert_eq!(
                got.extra,
                OauthExtra {
                    client_id: Some("client-login".into()),
                    client_secret_expires_at: Some(now() + TimeDelta::days(90)),
                    region: Some("us-east-1".into()),
                    start_url: Some("https://view.awsapps.com/start".into()),
                    auth_method: Some(AuthMethod::BuilderId),
                    api_base: None,
                    account: None,
                }
            );
            testing::assert_no_secret(&got, &["dc-aws-secret", "cs-login-secret"]);
            let sent = mock.requests();
            assert_eq!(sent.len(), 2);
            assert_eq!(sent[0].path, "/us-east-1/client/register");
            // The refresh flow's registration, the same body.
            assert_eq!(
                sent[0].json(),
                j!({"clientName": "Kiro IDE", "clientType": "public", "scopes": SCOPES,
                    "grantTypes": GRANT_TYPES})
            );
            assert_eq!(sent[1].method, "POST");
            assert_eq!(sent[1].path, "/us-east-1/device_authorization");
            assert_eq!(sent[1].header("content-type"), "application/json");
            assert_eq!(
                sent[1].json(),
                j!({"clientId": "client-login", "clientSecret": "cs-login-secret",
                    "startUrl": "https://view.awsapps.com/start"})
            );
        }
    }

    #[tokio::test]
    async fn identity_center_uses_its_start_url_and_region() {
        for (region, expected) in [(Some("eu-central-1"), "eu-central-1"), (None, "us-east-1")] {
            let (mock, base) = Mock::start(vec![registered(), authorized()]).await;
            let request = idc(Some("https://my-org.awsapps.com/start"), region);
            let got = flow(&base).start_login(&request, now()).await.unwrap();
            assert_eq!(got.extra.region.as_deref(), Some(expected));
            assert_eq!(
                got.extra.start_url.as_deref(),
                Some("https://my-org.awsapps.com/start")
            );
            assert_eq!(got.extra.auth_method, Some(AuthMethod::Idc));
            let sent = mock.requests();
            assert_eq!(sent[0].path, format!("/{expected}/client/register"));
            assert_eq!(sent[1].path, format!("/{expected}/device_authorization"));
            assert_eq!(
                sent[1].json()["startUrl"],
                "https://my-org.awsapps.com/start"
            );
        }
    }

    #[tokio::test]
    async fn bad_start_urls_and_regions_are_refused_without_a_call() {
        let (mock, base) = Mock::start(vec![]).await;
        let flow = flow(&base);
        let long = format!("https://x.example/{}", "a".repeat(2048));
        let requests = [
            idc(None, None),
            idc(Some(""), Some("eu-west-1")),
            idc(Some("http://my-org.awsapps.com/start"), None),
            idc(Some("javascript:alert(1)"), None),
            idc(Some("https://"), None),
            idc(Some("not a url"), None),
            idc(Some(&long), None),
            idc(Some("https://ok.example/start"), Some("")),
            idc(Some("https://ok.example/start"), Some("EU-WEST-1")),
            idc(Some("https://ok.example/start"), Some("x.evil.example")),
            idc(Some("https://ok.example/start"), Some("a/b")),
            idc(Some("https://ok.example/start"), Some(&"a".repeat(33))),
            LoginRequest {
                method: Some(AuthMethod::BuilderId),
                start_url: Some("https://ok.example/start".into()),
                region: None,
            },
            LoginRequest {
                method: None,
                start_url: None,
                region: Some("eu-west-1".into()),
            },
        ];
        for request in &requests {
            let e = flow.start_login(request, now()).await.unwrap_err();
            assert!(
                matches!(e, FlowError::Unrefreshable(_)),
                "{request:?}: {e:?}"
            );
        }
        assert!(mock.requests().is_empty());
    }

    #[tokio::test]
    async fn start_failures() {
        let (_mock, base) = Mock::start(vec![
            // The registration refused.
            json(
                400,
                j!({"error": "invalid_request", "error_description": "no"}),
            ),
            // The device authorization refused, echoing the client secret.
            registered(),
            json(
                400,
                j!({"error": "invalid_request", "error_description": "bad client cs-login-secret"}),
            ),
            registered(),
            json(500, j!({"error": "server_error"})),
            registered(),
            (200, vec![], b"garbage".to_vec()),
            registered(),
            testing::huge(1 << 20),
            registered(),
            json(
                200,
                j!({"deviceCode": "dc", "userCode": "U", "verificationUri": "https://x.example/",
                    "verificationUriComplete": "file:///etc/passwd"}),
            ),
            registered(),
            json(
                200,
                j!({"deviceCode": "dc", "userCode": "U", "verificationUri": "https://x.example/",
                    "expiresIn": -1, "interval": 1e300}),
            ),
        ])
        .await;
        let flow = flow(&base);
        let next = async || flow.start_login(&LoginRequest::default(), now()).await;
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected("client registration: invalid_request: no (HTTP 400)".into())
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Rejected(
                "device authorization: invalid_request: bad client *** (HTTP 400)".into()
            )
        );
        assert_eq!(
            next().await.unwrap_err(),
            FlowError::Transient {
                reason: "device authorization: server_error (HTTP 500)".into(),
                retry_after: None
            }
        );
        for _ in 0..3 {
            let e = next().await.unwrap_err();
            assert!(
                matches!(&e, FlowError::Transient { reason, .. } if reason.starts_with("answer unreadable")),
                "{e:?}"
            );
        }
        let got = next().await.unwrap();
        assert_eq!(got.expires_in, device::MIN_EXPIRES_IN);
        assert_eq!(got.interval, device::MAX_INTERVAL);
    }

    fn client() -> NewClient {
        NewClient {
            client_id: "client-login".into(),
            client_secret: Secret::new("cs-login-secret"),
            client_secret_expires_at: None,
        }
    }

    fn extra(region: &str) -> OauthExtra {
        OauthExtra {
            client_id: Some("client-login".into()),
            region: Some(region.into()),
            auth_method: Some(AuthMethod::Idc),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn polls_until_aws_answers_the_tokens() {
        let e = |error: &str| json(400, j!({"error": error, "error_description": "words"}));
        let (mock, base) = Mock::start(vec![
            e("authorization_pending"),
            e("slow_down"),
            e("access_denied"),
            e("expired_token"),
            json(
                401,
                j!({"error": "invalid_client", "error_description": "secret cs-login-secret expired"}),
            ),
            e("invalid_grant"),
            json(500, j!({"error": "server_error"})),
            (429, vec![], vec![]),
            (200, vec![], b"<html>".to_vec()),
            testing::huge(10 << 20),
            json(200, j!({"accessToken": "at-x", "expiresIn": 3600})),
            json(200, j!({"accessToken": "at-x", "refreshToken": "rt-x", "expiresIn": 1e300})),
            json(200, j!({"accessToken": "at-x", "refreshToken": "rt-x", "expiresIn": -9})),
            json(
                200,
                j!({"accessToken": "at-login", "refreshToken": "rt-login", "expiresIn": 28800,
                    "tokenType": "Bearer", "idToken": "id"}),
            ),
        ])
        .await;
        let flow = flow(&base);
        let device_code = Secret::new("dc-aws-secret");
        let client = client();
        let extra = extra("ap-southeast-2");
        let next = async || {
            let material = PollMaterial {
                device_code: &device_code,
                client: Some(&client),
                extra: &extra,
            };
            flow.poll_login(material, now()).await
        };
        assert!(matches!(next().await, Poll::Pending));
        assert!(matches!(next().await, Poll::SlowDown(None)));
        assert!(matches!(next().await, Poll::Denied));
        assert!(matches!(next().await, Poll::Expired));
        assert!(
            matches!(next().await, Poll::Failed(m) if m == "invalid_client: secret *** expired (HTTP 401)")
        );
        assert!(matches!(next().await, Poll::Failed(m) if m == "invalid_grant: words (HTTP 400)"));
        assert!(matches!(next().await, Poll::Retry(_)));
        assert!(matches!(next().await, Poll::Retry(_)));
        for _ in 0..2 {
            assert!(matches!(next().await, Poll::Retry(m) if m.starts_with("answer unreadable")));
        }
        assert!(
            matches!(next().await, Poll::Failed(m) if m == "answer unreadable: no `refreshToken`")
        );
        let Poll::Success(big) = next().await else {
            panic!("no success")
        };
        assert_eq!(big.expires_at, Some(now() + client::MAX_LIFETIME));
        let Poll::Success(small) = next().await else {
            panic!("no success")
        };
        assert_eq!(small.expires_at, Some(now() + client::MIN_LIFETIME));
        let Poll::Success(tokens) = next().await else {
            panic!("no success")
        };
        assert_eq!(tokens.access_token.as_ref().unwrap().expose(), "at-login");
        assert_eq!(tokens.refresh_token.expose(), "rt-login");
        assert_eq!(tokens.expires_at, Some(now() + TimeDelta::seconds(28800)));
        testing::assert_no_secret(&tokens, &["at-login", "rt-login"]);

        let sent = mock.requests();
        assert_eq!(sent.len(), 14);
        assert!(sent.iter().all(|r| r.path == "/ap-southeast-2/token"));
        assert_eq!(
            sent[0].json(),
            j!({"clientId": "client-login", "clientSecret": "cs-login-secret",
                "grantType": "urn:ietf:params:oauth:grant-type:device_code",
                "deviceCode": "dc-aws-secret"})
        );
    }

    #[tokio::test]
    async fn a_poll_without_a_client_or_with_a_bad_region_sends_nothing() {
        let (mock, base) = Mock::start(vec![]).await;
        let flow = flow(&base);
        let device_code = Secret::new("dc-aws-secret");
        let good = extra("eu-west-1");
        let material = PollMaterial {
            device_code: &device_code,
            client: None,
            extra: &good,
        };
        assert!(matches!(
            flow.poll_login(material, now()).await,
            Poll::Failed(_)
        ));
        let client = client();
        let bad = extra("x.evil.example");
        let material = PollMaterial {
            device_code: &device_code,
            client: Some(&client),
            extra: &bad,
        };
        testing::assert_no_secret(&material, &["dc-aws-secret", "cs-login-secret"]);
        assert!(matches!(
            flow.poll_login(material, now()).await,
            Poll::Failed(_)
        ));
        assert!(mock.requests().is_empty());
    }
}
