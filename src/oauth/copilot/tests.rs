//! The Copilot token exchange (the refresh half) against a scripted mock of GitHub's API.

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
