//! One status rule for the list and the request path: what the list calls `expired` is not
//! picked, and what it calls `active` is.

use crate::common::{Api, Home, TestApp, by_label};
use crate::mock::Mock;
use serde_json::{Value, json};

const CLIENT_KEY: &str = "client-key-for-tests";

async fn add(app: &TestApp, body: Value) -> String {
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().unwrap().to_string()
}

async fn chat(app: &TestApp) -> crate::common::Resp {
    let body = json!({"model": "gpt-4o", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "Say hello, please."}]});
    app.post_as(CLIENT_KEY, "/v1/chat/completions", &body).await
}

async fn labels(app: &TestApp, query: &str) -> Vec<String> {
    let r = app.get(&format!("/v0/management/auths?{query}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["auths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["label"].as_str().unwrap().to_string())
        .collect()
}

/// An OAuth credential past its `expires_at` with a refresh token is listed `expired`
/// ("awaiting refresh") and never picked: proxied requests go to the other credential, and
/// when no other is left the answer says none is usable. One that has no access token yet is
/// the same; one whose expiry is ahead is picked.
#[tokio::test]
async fn an_expired_oauth_credential_is_listed_expired_and_not_picked() {
    let mock = Mock::start().await;
    let home = Home::new(&format!(
        "api_keys: [\"{CLIENT_KEY}\"]\n{}",
        mock.providers_yaml()
    ));
    let app = home.start().await;
    // Created first, so round-robin would try them first.
    add(
        &app,
        json!({"provider": "openai", "type": "oauth", "access_token": "tok-expired",
               "refresh_token": "rt-expired", "expires_at": "2020-01-01T00:00:00Z",
               "label": "expired"}),
    )
    .await;
    add(
        &app,
        json!({"provider": "openai", "type": "oauth", "refresh_token": "rt-no-access",
               "label": "no-access"}),
    )
    .await;
    let fresh = add(
        &app,
        json!({"provider": "openai", "type": "oauth", "access_token": "tok-fresh",
               "refresh_token": "rt-fresh", "expires_at": "2099-01-01T00:00:00Z",
               "label": "fresh"}),
    )
    .await;

    let all = app.auths().await;
    for label in ["expired", "no-access"] {
        let a = by_label(&all, label);
        assert_eq!(a["status"], "expired", "{a}");
        assert_eq!(a["status_reason"], "awaiting refresh", "{a}");
    }
    let a = by_label(&all, "fresh");
    assert_eq!(
        (&a["status"], &a["status_reason"]),
        (&json!("active"), &Value::Null)
    );
    assert_eq!(
        labels(&app, "status=expired&provider=openai").await,
        ["expired", "no-access"]
    );
    assert_eq!(labels(&app, "status=active").await, ["fresh"]);

    for _ in 0..4 {
        let r = chat(&app).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(mock.served("tok-fresh").requests, 4);
    assert_eq!(mock.served("tok-expired").requests, 0);
    assert_eq!(mock.order(), ["tok-fresh"; 4]);

    // With the usable one gone, nothing is picked: the expired one is not tried either.
    let r = app
        .delete(&format!("/v0/management/auths/openai?id={fresh}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = chat(&app).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "no_usable_credentials"),
        "{}",
        r.text
    );
    assert_eq!(mock.served("tok-expired").requests, 0);
    app.stop().await;
}
