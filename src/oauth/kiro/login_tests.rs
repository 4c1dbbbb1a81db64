//! Kiro's login half: client registration, device authorization and token polls for Builder
//! ID and Identity Center, against a scripted mock.

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
        json(
            200,
            j!({"accessToken": "at-x", "refreshToken": "rt-x", "expiresIn": 1e300}),
        ),
        json(
            200,
            j!({"accessToken": "at-x", "refreshToken": "rt-x", "expiresIn": -9}),
        ),
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
    assert!(matches!(next().await, Poll::Failed(m) if m == "answer unreadable: no `refreshToken`"));
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
