//! Copilot's login half: GitHub's device flow and the user lookup, against a scripted mock.

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
        token_answer(j!({"access_token": "gho_new", "token_type": "bearer", "scope": "read:user"})),
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
