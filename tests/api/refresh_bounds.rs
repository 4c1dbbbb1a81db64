//! What bounds the token refresh when something pushes on it (README, "Token refresh"): a
//! provider that rejects every token, a client reporting 401 on every lease, an operator's
//! `PUT` or a changed file arriving while a rotating refresh is under way. The mock is
//! tests/api/refresh.rs's.

use crate::common::{Api, Home, eventually};
use crate::refresh::{KEY, Mock, WAIT, chat_as_client, first_check, myoauth_file, only, rfc};
use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use chrono::Utc;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A provider whose chat endpoint answers 401 to every token while its token endpoint issues
/// new ones: one refresh, then the credential is marked invalid; no request costs more.
#[tokio::test]
async fn a_provider_rejecting_every_token_costs_one_refresh() {
    let grants = Arc::new(AtomicUsize::new(0));
    let g = grants.clone();
    let mock = axum::Router::new()
        .route(
            "/token",
            post(move || {
                let g = g.clone();
                async move {
                    let n = g.fetch_add(1, Ordering::SeqCst) + 1;
                    Json(json!({"access_token": format!("at-{n}"), "refresh_token": format!("rt-{n}"), "expires_in": 3600}))
                }
            }),
        )
        .route(
            "/v1/chat/completions",
            post(|| async {
                (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})),
                )
            }),
        );
    let b = crate::common::serve(mock).await;
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  refresh:\n    check_interval: 1h\nproviders:\n  myoauth: {{format: openai, base_url: \"{b}/v1\", models: [\"my-*\"], token_url: \"{b}/token\", client_id: my-client}}\n"
    ));
    myoauth_file(&home, Utc::now() + chrono::TimeDelta::hours(2));
    let app = home.start().await;
    first_check(&app).await;
    for _ in 0..4 {
        let r = chat_as_client(&app).await;
        assert!(r.status == 401 || r.status == 503, "{}", r.text);
    }
    assert_eq!(grants.load(Ordering::SeqCst), 1);
    assert_eq!(only(&app, "myoauth").await["status"], "invalid");
    app.stop().await;
}

/// A client reporting 401 on lease after lease: one refresh, not one per report.
#[tokio::test]
async fn lease_reports_of_401_cost_one_refresh() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  refresh:\n    check_interval: 1h\n{}",
        mock.yaml()
    ));
    myoauth_file(&home, now + chrono::TimeDelta::hours(2));
    let app = home.start().await;
    first_check(&app).await;
    for _ in 0..5 {
        let lease = app
            .post_as(
                KEY,
                "/v1/credentials/lease",
                &json!({"provider": "myoauth"}),
            )
            .await;
        if lease.status != 201 {
            break;
        }
        let id = lease.json()["lease_id"].as_str().unwrap().to_string();
        let r = app
            .post_as(
                KEY,
                &format!("/v1/credentials/lease/{id}/report"),
                &json!({"error_status": 401}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(mock.tokens.grants().len(), 1);
    app.stop().await;
}

/// An operator's `PUT` of a new access token while a rotating refresh is at the token
/// endpoint: the rotated refresh token is still stored, and the used one never sent again.
#[tokio::test]
async fn a_new_access_token_during_a_refresh_keeps_the_rotated_refresh_token() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    let home = Home::new(&format!(
        "auth:\n  refresh:\n    check_interval: 1h\n{}",
        mock.yaml()
    ));
    myoauth_file(&home, now + chrono::TimeDelta::hours(2));
    let app = home.start().await;
    first_check(&app).await;
    let id = only(&app, "myoauth").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    *mock.tokens.delay.lock().unwrap() = Duration::from_millis(1500);
    let put = async {
        eventually(WAIT, || async {
            (!mock.tokens.grants().is_empty()).then_some(())
        })
        .await;
        app.put(
            &format!("/v0/management/auths/myoauth?id={id}"),
            &json!({"token": "my-at-operator"}).to_string(),
        )
        .await
    };
    let (manual, put) = tokio::join!(app.post("/v0/management/auths/myoauth/refresh", ""), put);
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(
        manual.json()["results"][0]["status"],
        "refreshed",
        "{}",
        manual.text
    );
    *mock.tokens.delay.lock().unwrap() = Duration::ZERO;
    let r = app.post("/v0/management/auths/myoauth/refresh", "").await;
    assert_eq!(r.json()["results"][0]["status"], "refreshed", "{}", r.text);
    assert_eq!(
        mock.tokens.refresh_tokens_sent(),
        ["my-rt-first", "my-rt-new-1"]
    );
    app.stop().await;
}

/// A changed credential file re-imported after its credential was refreshed changes its
/// settings, not its tokens: the rotated refresh token stays.
#[tokio::test]
async fn a_changed_file_after_a_refresh_keeps_the_refreshed_tokens() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    let home = Home::new(&format!(
        "auth:\n  refresh:\n    check_interval: 1h\n{}",
        mock.yaml()
    ));
    let exp = now + chrono::TimeDelta::hours(2);
    myoauth_file(&home, exp);
    let app = home.start().await;
    let r = app.post("/v0/management/auths/myoauth/refresh", "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let file = json!({"provider": "myoauth", "type": "oauth", "access_token": "my-at-old",
        "refresh_token": "my-rt-first", "expires_at": rfc(exp), "label": "renamed"});
    home.auth_file("myoauth.json", file.to_string());
    let r = app
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await;
    assert_eq!(r.json()["updated"], 1, "{}", r.text);
    let cred = only(&app, "myoauth").await;
    assert_eq!(cred["label"], "renamed", "{cred}");
    assert_eq!(cred["status"], "active", "{cred}");
    let r = app.post("/v0/management/auths/myoauth/refresh", "").await;
    assert_eq!(r.json()["results"][0]["status"], "refreshed", "{}", r.text);
    assert_eq!(
        mock.tokens.refresh_tokens_sent(),
        ["my-rt-first", "my-rt-new-1"]
    );
    app.stop().await;
}
