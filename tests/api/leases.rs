//! Leases (`POST /v1/credentials/lease`, `.../renew`, `.../report`): the token's own expiry in
//! the answer, renewal by the lease's length with the credential's current token, the answers
//! for a lease that is gone or whose credential is out of use, and renewals racing reports and
//! the expiry sweep, with the quota's totals right after.

use crate::common::{Api, Home, Resp, TestApp, by_label};
use chrono::{DateTime, Duration, Utc};
use cliproxyapi::state::Clock;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

const CLIENT_KEY: &str = "sk-client-leases";
/// 2030-01-01 00:00:00 UTC, where the tests' clocks start.
const T0: &str = "2030-01-01T00:00:00Z";
/// A lease's length (README: 10 minutes).
const LENGTH: i64 = 600;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A clock at T0 and the handle to move it.
fn clock() -> (Clock, Arc<Mutex<DateTime<Utc>>>) {
    let now = Arc::new(Mutex::new(t(T0)));
    let read = now.clone();
    (Arc::new(move || *read.lock().unwrap()), now)
}

async fn start() -> (Home, TestApp, Arc<Mutex<DateTime<Utc>>>) {
    let home = Home::new(&format!("api_keys: [\"{CLIENT_KEY}\"]\n"));
    let (clock, now) = clock();
    let app = home.start_with(&[], clock).await;
    (home, app, now)
}

/// Add a credential from `body`; returns its id.
async fn add(app: &TestApp, body: Value) -> String {
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().unwrap().to_string()
}

async fn lease(app: &TestApp, provider: &str, tokens: u64) -> Value {
    let body = json!({"provider": provider, "estimated_tokens": tokens});
    let r = app
        .post_as(CLIENT_KEY, "/v1/credentials/lease", &body)
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()
}

async fn renew(app: &TestApp, id: &str) -> Resp {
    let path = format!("/v1/credentials/lease/{id}/renew");
    app.post_as(CLIENT_KEY, &path, &json!({})).await
}

async fn report(app: &TestApp, id: &str, tokens_used: u64) -> Resp {
    let path = format!("/v1/credentials/lease/{id}/report");
    app.post_as(CLIENT_KEY, &path, &json!({"tokens_used": tokens_used}))
        .await
}

/// The credential labelled `label`'s (used, reserved).
async fn quota(app: &TestApp, label: &str) -> (u64, u64) {
    let auths = app.auths().await;
    let q = &by_label(&auths, label)["quota"];
    (q["used"].as_u64().unwrap(), q["reserved"].as_u64().unwrap())
}

fn set(now: &Mutex<DateTime<Utc>>, at: DateTime<Utc>) {
    *now.lock().unwrap() = at;
}

/// An OAuth credential's lease names its access token's expiry; an API key's names none.
#[tokio::test]
async fn a_lease_names_its_tokens_expiry() {
    let (_home, app, _now) = start().await;
    add(
        &app,
        json!({"provider": "claude", "type": "oauth", "access_token": "tok-oauth-1",
               "expires_at": "2030-01-02T03:04:05Z", "label": "oauth"}),
    )
    .await;
    add(
        &app,
        json!({"provider": "openai", "token": "sk-api-key-1", "label": "key"}),
    )
    .await;
    let oauth = lease(&app, "claude", 10).await;
    assert_eq!(oauth["token"], "tok-oauth-1");
    assert_eq!(oauth["token_expires_at"], "2030-01-02T03:04:05Z", "{oauth}");
    let key = lease(&app, "openai", 10).await;
    assert_eq!(key["token"], "sk-api-key-1");
    assert!(key["token_expires_at"].is_null(), "{key}");
    assert!(key.as_object().unwrap().contains_key("token_expires_at"));
    app.stop().await;
}

/// A renewal extends the lease by its length from the renewal's time, answers the lease's
/// fields, and the expiry sweep keeps to the new expiry: not at the first one, at the new one.
#[tokio::test]
async fn renewal_extends_by_the_leases_length_and_the_sweep_keeps_to_it() {
    let (_home, app, now) = start().await;
    let t0 = t(T0);
    add(
        &app,
        json!({"provider": "claude", "token": "sk-ant-renew", "label": "c",
               "quota": {"limit": 1000}}),
    )
    .await;
    let first = lease(&app, "claude", 100).await;
    let id = first["lease_id"].as_str().unwrap();
    assert_eq!(first["expires_at"], rfc3339(t0 + Duration::seconds(LENGTH)));

    set(&now, t0 + Duration::seconds(250));
    let r = renew(&app, id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let renewed = r.json();
    let until = t0 + Duration::seconds(250 + LENGTH);
    assert_eq!(renewed["expires_at"], rfc3339(until));
    for field in ["lease_id", "credential_id", "provider", "token", "base_url"] {
        assert_eq!(renewed[field], first[field], "{field}");
    }
    assert!(renewed["token_expires_at"].is_null());

    // Past the first expiry, before the new one: the sweep leaves it.
    set(&now, t0 + Duration::seconds(LENGTH + 1));
    let swept = app
        .state
        .store
        .expire_leases(app.state.now())
        .await
        .unwrap();
    assert_eq!(swept, 0);
    assert_eq!(quota(&app, "c").await, (0, 100));
    // Renewed again, its length is still the first one.
    let r = renew(&app, id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let until = t0 + Duration::seconds(2 * LENGTH + 1);
    assert_eq!(r.json()["expires_at"], rfc3339(until));

    // At the new expiry the sweep settles it at its reservation, and it is gone.
    set(&now, until);
    let swept = app
        .state
        .store
        .expire_leases(app.state.now())
        .await
        .unwrap();
    assert_eq!(swept, 1);
    assert_eq!(quota(&app, "c").await, (100, 0));
    let r = renew(&app, id).await;
    assert_eq!((r.status, r.error_code()), (404, "lease_not_found".into()));
    let r = report(&app, id, 10).await;
    assert_eq!((r.status, r.error_code()), (404, "lease_not_found".into()));
    app.stop().await;
}

/// After the credential's token was replaced, a renewal hands out the new token and its
/// expiry; neither token is ever logged.
#[tokio::test]
async fn renewal_hands_out_the_current_token() {
    let (home, app, _now) = start().await;
    let cred = add(
        &app,
        json!({"provider": "claude", "type": "oauth", "access_token": "tok-before-renewal",
               "expires_at": "2030-01-01T01:00:00Z", "label": "oauth"}),
    )
    .await;
    let leased = lease(&app, "claude", 10).await;
    let id = leased["lease_id"].as_str().unwrap();
    assert_eq!(leased["token"], "tok-before-renewal");
    let r = app
        .put(
            &format!("/v0/management/auths/claude?id={cred}"),
            &json!({"token": "tok-after-renewal", "expires_at": "2030-01-01T02:00:00Z"})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = renew(&app, id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let renewed = r.json();
    assert_eq!(renewed["token"], "tok-after-renewal");
    assert_eq!(renewed["token_expires_at"], "2030-01-01T02:00:00Z");
    assert_eq!(renewed["credential_id"], cred.as_str());
    assert_eq!(report(&app, id, 5).await.status, 200);
    app.stop().await;
    let mut logs = String::new();
    for entry in std::fs::read_dir(home.path().join("logs")).unwrap() {
        logs.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default());
    }
    assert!(logs.contains(&cred), "the auth log was read: {logs}");
    for token in ["tok-before-renewal", "tok-after-renewal"] {
        assert!(!logs.contains(token), "{token} logged");
    }
}

/// An unknown lease, a reported one and an expired one are not found, with our error shape,
/// as a report of them is; a renewal needs a client key like the other lease routes.
#[tokio::test]
async fn renewal_of_a_lease_that_is_gone_is_not_found() {
    let (_home, app, now) = start().await;
    add(
        &app,
        json!({"provider": "claude", "token": "sk-ant-gone", "label": "c"}),
    )
    .await;
    let r = renew(&app, "res_unknownunknownunknown").await;
    assert_eq!((r.status, r.error_code()), (404, "lease_not_found".into()));

    let reported = lease(&app, "claude", 10).await;
    let reported = reported["lease_id"].as_str().unwrap();
    assert_eq!(report(&app, reported, 3).await.status, 200);
    let r = renew(&app, reported).await;
    assert_eq!((r.status, r.error_code()), (404, "lease_not_found".into()));

    // Past its expiry, even before the sweep came by.
    let expired = lease(&app, "claude", 10).await;
    let expired = expired["lease_id"].as_str().unwrap();
    set(&now, t(T0) + Duration::seconds(LENGTH));
    let r = renew(&app, expired).await;
    assert_eq!((r.status, r.error_code()), (404, "lease_not_found".into()));
    // Its report, until the sweep comes by, still settles it (as before renewals existed).
    assert_eq!(report(&app, expired, 3).await.status, 200);

    let path = format!("/v1/credentials/lease/{reported}/renew");
    let r = app.post(&path, "{}").await;
    assert_eq!(r.status, 401, "{}", r.text);
    app.stop().await;
}

/// A lease whose credential was disabled or deleted since is not renewed: 409 naming why, and
/// a disabled one's lease stays as it was (settled at its first expiry).
#[tokio::test]
async fn renewal_after_the_credential_went_out_of_use_is_refused() {
    let (_home, app, _now) = start().await;
    let cred = add(
        &app,
        json!({"provider": "claude", "token": "sk-ant-disable", "label": "c",
               "quota": {"limit": 1000}}),
    )
    .await;
    let leased = lease(&app, "claude", 100).await;
    let id = leased["lease_id"].as_str().unwrap();
    let r = app
        .put(
            &format!("/v0/management/auths/claude?id={cred}"),
            &json!({"disabled": true}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = renew(&app, id).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.error_code(), "lease_credential_unusable");
    assert_eq!(r.json()["error"]["status"], "disabled");
    assert!(!r.text.contains("sk-ant-disable"));
    // Not extended: the sweep settles it at its first expiry.
    let swept = app
        .state
        .store
        .expire_leases(t(T0) + Duration::seconds(LENGTH));
    assert_eq!(swept.await.unwrap(), 1);
    assert_eq!(quota(&app, "c").await, (100, 0));

    // Deleted: the lease went with it, and the renewal says why.
    let r = app
        .put(
            &format!("/v0/management/auths/claude?id={cred}"),
            &json!({"disabled": false}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let leased = lease(&app, "claude", 100).await;
    let id = leased["lease_id"].as_str().unwrap();
    let r = app
        .delete(&format!("/v0/management/auths/claude?id={cred}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = renew(&app, id).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.json()["error"]["status"], "deleted");
    assert_eq!(report(&app, id, 40).await.status, 404);
    app.stop().await;
}

/// Renewals and a report of the same lease from many tasks at once: the report settles it
/// once, each renewal either extended it before or found it gone, and the totals are right.
#[tokio::test]
async fn renewals_racing_a_report_settle_once() {
    let (_home, app, _now) = start().await;
    add(
        &app,
        json!({"provider": "claude", "token": "sk-ant-race", "label": "c",
               "quota": {"limit": 1000000}}),
    )
    .await;
    let app = Arc::new(app);
    let mut ids = Vec::new();
    for _ in 0..20 {
        let leased = lease(&app, "claude", 100).await;
        ids.push(leased["lease_id"].as_str().unwrap().to_string());
    }
    let mut tasks = Vec::new();
    for id in &ids {
        for k in 0..6 {
            let (app, id) = (app.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                let r = if k == 3 {
                    report(&app, &id, 30).await
                } else {
                    renew(&app, &id).await
                };
                (k == 3, r.status)
            }));
        }
    }
    let mut settled = 0;
    for task in tasks {
        match task.await.unwrap() {
            (true, status) => {
                assert_eq!(status, 200);
                settled += 1;
            }
            (false, status) => assert!(status == 200 || status == 404, "{status}"),
        }
    }
    assert_eq!(settled, ids.len());
    assert_eq!(quota(&app, "c").await, (30 * ids.len() as u64, 0));
    for id in &ids {
        assert_eq!(report(&app, id, 30).await.status, 404);
    }
}

/// Renewals racing the expiry sweep, as the clock passes the leases' expiry: each lease is
/// either renewed (and kept) or swept (charged its reservation), never both, never neither.
#[tokio::test]
async fn renewals_racing_the_sweep_take_effect_once() {
    let (_home, app, now) = start().await;
    add(
        &app,
        json!({"provider": "claude", "token": "sk-ant-sweep", "label": "c",
               "quota": {"limit": 1000000}}),
    )
    .await;
    let app = Arc::new(app);
    let mut ids = Vec::new();
    for _ in 0..30 {
        let leased = lease(&app, "claude", 100).await;
        ids.push(leased["lease_id"].as_str().unwrap().to_string());
    }
    let due = t(T0) + Duration::seconds(LENGTH);
    set(&now, due - Duration::seconds(1));
    let mut renewals = Vec::new();
    for id in &ids {
        let (app, id) = (app.clone(), id.clone());
        renewals.push(tokio::spawn(async move { renew(&app, &id).await.status }));
    }
    let sweeper = {
        let (app, now) = (app.clone(), now.clone());
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            set(&now, due);
            app.state.store.expire_leases(due).await.unwrap()
        })
    };
    let mut renewed = 0u64;
    for r in renewals {
        match r.await.unwrap() {
            200 => renewed += 1,
            status => assert_eq!(status, 404),
        }
    }
    let mut swept = sweeper.await.unwrap() as u64;
    // A renewal refused at the expiry may have come after the sweep's read.
    swept += app.state.store.expire_leases(due).await.unwrap() as u64;
    assert_eq!(renewed + swept, ids.len() as u64);
    assert_eq!(quota(&app, "c").await, (100 * swept, 100 * renewed));
}
