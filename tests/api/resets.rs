//! Scheduled quota resets (`cliproxyapi::jobs::resets`): the job is called with the times the
//! tests choose, the server's own clock stays where the test set it, and one test lets the
//! real scheduler fire a cron expression with seconds.

use crate::common::{Api, Home, TestApp, by_label, eventually};
use chrono::{DateTime, Utc};
use cliproxyapi::jobs::resets;
use cliproxyapi::state::Clock;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLIENT_KEY: &str = "sk-client-resets";

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A home whose providers reset on `schedules` (YAML lines under `reset_schedule:`).
fn home(schedules: &[(&str, &str)]) -> Home {
    let mut yaml = format!("api_keys: [\"{CLIENT_KEY}\"]\nauth:\n  quota:\n    reset_schedule:\n");
    for (provider, schedule) in schedules {
        yaml.push_str(&format!("      {provider}: \"{schedule}\"\n"));
    }
    Home::new(&yaml)
}

/// A clock fixed at `at`, and the handle to move it.
fn clock(at: &str) -> (Clock, Arc<Mutex<DateTime<Utc>>>) {
    let now = Arc::new(Mutex::new(t(at)));
    let read = now.clone();
    (Arc::new(move || *read.lock().unwrap()), now)
}

/// Add a credential limited to 1000 tokens with `used` already spent; returns its id.
async fn add(app: &TestApp, provider: &str, label: &str, used: u64) -> String {
    let body = json!({"provider": provider, "token": format!("sk-{label}"), "label": label,
                      "quota": {"limit": 1000}});
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = app
        .put(
            &format!("/v0/management/auths/{provider}/quota?id={id}"),
            &json!({"used": used}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    id
}

async fn client(app: &TestApp, path: &str, body: Value) -> crate::common::Resp {
    app.post_as(CLIENT_KEY, path, &body).await
}

/// Take a lease of `tokens` on `provider`; returns its id.
async fn lease(app: &TestApp, provider: &str, tokens: u64) -> String {
    let r = client(
        app,
        "/v1/credentials/lease",
        json!({"provider": provider, "estimated_tokens": tokens}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["lease_id"].as_str().unwrap().to_string()
}

/// Mark `provider`'s credential exhausted as a client's report of a 402 does.
async fn exhaust(app: &TestApp, provider: &str) {
    let id = lease(app, provider, 10).await;
    let r = client(
        app,
        &format!("/v1/credentials/lease/{id}/report"),
        json!({"error_status": 402}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// The credential labelled `label` as the management API shows it.
async fn view(app: &TestApp, label: &str) -> Value {
    by_label(&app.auths().await, label).clone()
}

async fn used(app: &TestApp, label: &str) -> u64 {
    view(app, label).await["quota"]["used"].as_u64().unwrap()
}

fn database(home: &Home) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(home.path().join("data/cliproxy.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db
}

/// The stored state (not the effective status, which a date can end by itself).
fn stored_state(home: &Home, id: &str) -> String {
    database(home)
        .query_row("SELECT state FROM credentials WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap()
}

/// The audit rows of scheduled resets of `provider`: (actor, detail).
fn reset_audits(home: &Home, provider: &str) -> Vec<(String, Value)> {
    let db = database(home);
    let mut q = db
        .prepare(
            "SELECT actor, detail FROM audit_log
             WHERE action = 'quota.reset' AND provider = ?1 ORDER BY id",
        )
        .unwrap();
    q.query_map([provider], |r| {
        let detail: String = r.get(1)?;
        Ok((r.get(0)?, serde_json::from_str(&detail).unwrap()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The auth log's reset lines for `provider`.
fn reset_lines(home: &Home, provider: &str) -> Vec<String> {
    let needle = format!("quota reset for {provider} ");
    home.auth_log()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

fn providers(done: &[resets::ProviderReset]) -> Vec<&str> {
    done.iter().map(|r| r.provider.as_str()).collect()
}

#[tokio::test]
async fn daily_and_monthly_boundaries_reset_counters_and_revive_exhausted() {
    let home = home(&[("openai", "daily"), ("claude", "monthly")]);
    let (clock, _) = clock("2026-11-27T10:00:00Z");
    let app = home.start_with(&[], clock).await;
    let oa = add(&app, "openai", "oa", 500).await;
    let cl = add(&app, "claude", "cl", 700).await;
    exhaust(&app, "openai").await;
    exhaust(&app, "claude").await;
    assert_eq!(view(&app, "oa").await["status"], "exhausted");
    assert_eq!(view(&app, "cl").await["status"], "exhausted");
    let state = app.state.clone();

    // The last second of the day: nothing.
    assert!(
        resets::run(&state, t("2026-11-27T23:59:59Z"))
            .await
            .is_empty()
    );
    assert_eq!(used(&app, "oa").await, 500);
    // Midnight: the daily provider only.
    let done = resets::run(&state, t("2026-11-28T00:00:00Z")).await;
    assert_eq!(providers(&done), ["openai"]);
    assert_eq!(done[0].period_start, t("2026-11-28T00:00:00Z"));
    assert_eq!((done[0].reset.credentials, done[0].reset.revived), (1, 1));
    let v = view(&app, "oa").await;
    assert_eq!(
        (v["quota"]["used"].as_u64(), &v["status"]),
        (Some(0), &json!("active"))
    );
    assert_eq!(v["exhausted_until"], Value::Null);
    assert_eq!(stored_state(&home, &oa), "active");
    assert_eq!(used(&app, "cl").await, 700);
    assert_eq!(stored_state(&home, &cl), "exhausted");
    // Run again within the same day: applied once.
    assert!(
        resets::run(&state, t("2026-11-28T00:00:30Z"))
            .await
            .is_empty()
    );

    // The last second of November, then the first of December.
    assert!(
        resets::run(&state, t("2026-11-28T23:59:59Z"))
            .await
            .is_empty()
    );
    let r = app
        .put(
            "/v0/management/auths/openai/quota",
            &json!({"used": 300}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        resets::run(&state, t("2026-11-30T23:59:59Z"))
            .await
            .iter()
            .all(|r| r.provider == "openai")
    );
    assert_eq!(used(&app, "cl").await, 700);
    let done = resets::run(&state, t("2026-12-01T00:00:00Z")).await;
    assert_eq!(providers(&done), ["claude", "openai"]);
    assert_eq!(done[0].period_start, t("2026-12-01T00:00:00Z"));
    assert_eq!(used(&app, "cl").await, 0);
    assert_eq!(view(&app, "cl").await["status"], "active");
    assert_eq!(stored_state(&home, &cl), "active");
    // The revived credentials serve again.
    lease(&app, "claude", 100).await;

    // One auth log line and one audit row per provider per reset, naming the count.
    let lines = reset_lines(&home, "claude");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("(monthly) by scheduler: 1 credential(s)"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("2026-12-01T00:00:00Z"), "{}", lines[0]);
    assert_eq!(reset_lines(&home, "openai").len(), 3);
    let audits = reset_audits(&home, "claude");
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0].0, "scheduler");
    assert_eq!(
        audits[0].1,
        json!({"credentials": 1, "revived": 1, "period_start": "2026-12-01T00:00:00Z"})
    );
    assert_eq!(reset_audits(&home, "openai").len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn a_cron_expression_resets_when_it_says() {
    // At 12:30:15 each day.
    let home = home(&[("openai", "15 30 12 * * *")]);
    let (clock, _) = clock("2026-11-27T10:00:00Z");
    let app = home.start_with(&[], clock).await;
    add(&app, "openai", "oa", 400).await;
    let state = app.state.clone();
    assert!(
        resets::run(&state, t("2026-11-27T12:30:14Z"))
            .await
            .is_empty()
    );
    assert_eq!(used(&app, "oa").await, 400);
    let done = resets::run(&state, t("2026-11-27T12:30:15Z")).await;
    assert_eq!(providers(&done), ["openai"]);
    assert_eq!(done[0].period_start, t("2026-11-27T12:30:15Z"));
    assert_eq!(used(&app, "oa").await, 0);
    assert_eq!(reset_lines(&home, "openai").len(), 1);
    app.stop().await;

    // The scheduler itself fires it at its seconds (every second second here), with the
    // server's own clock: within a few seconds, without any call from the test.
    let home = self::home(&[("openai", "*/2 * * * * *")]);
    let app = home.start_with(&[], Arc::new(Utc::now)).await;
    add(&app, "openai", "oa", 400).await;
    // The log line follows the reset's commit: wait for both.
    let lines = eventually(Duration::from_secs(10), || async {
        let lines = reset_lines(&home, "openai");
        (used(&app, "oa").await == 0 && !lines.is_empty()).then_some(lines)
    })
    .await;
    assert!(
        lines[0].contains("(*/2 * * * * *) by scheduler: 1 credential(s)"),
        "{}",
        lines[0]
    );
    app.stop().await;
}

#[tokio::test]
async fn never_never_resets() {
    let home = home(&[("openai", "never")]);
    let (clock, _) = clock("2026-11-27T10:00:00Z");
    let app = home.start_with(&[], clock).await;
    add(&app, "openai", "oa", 900).await;
    exhaust(&app, "openai").await;
    for at in [
        "2026-11-28T00:00:00Z",
        "2026-12-01T00:00:00Z",
        "2027-01-01T00:00:00Z",
        "2099-01-01T00:00:00Z",
    ] {
        assert!(resets::run(&app.state, t(at)).await.is_empty(), "{at}");
    }
    let v = view(&app, "oa").await;
    assert_eq!(v["quota"]["used"], 900);
    assert_eq!(v["status"], "exhausted");
    assert!(reset_lines(&home, "openai").is_empty());
    assert!(reset_audits(&home, "openai").is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_boundary_passed_while_down_is_applied_once_at_start() {
    let home = home(&[("openai", "daily"), ("claude", "monthly")]);
    let (clock, now) = clock("2026-11-27T10:00:00Z");
    let app = home.start_with(&[], clock.clone()).await;
    let oa = add(&app, "openai", "oa", 500).await;
    add(&app, "claude", "cl", 600).await;
    exhaust(&app, "openai").await;
    app.stop().await;

    // Down for three days, across several daily boundaries and no monthly one.
    *now.lock().unwrap() = t("2026-11-30T08:00:00Z");
    let app = home.start_with(&[], clock.clone()).await;
    assert_eq!(used(&app, "oa").await, 0);
    assert_eq!(stored_state(&home, &oa), "active");
    assert_eq!(used(&app, "cl").await, 600);
    assert_eq!(
        reset_lines(&home, "openai").len(),
        1,
        "one reset, not one per day"
    );
    // The scheduler's next runs on the same day find nothing more to do.
    assert!(
        resets::run(&app.state, t("2026-11-30T08:01:00Z"))
            .await
            .is_empty()
    );
    let r = app
        .put(
            "/v0/management/auths/openai/quota",
            &json!({"used": 50}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.stop().await;

    // A restart within the same period applies nothing again.
    *now.lock().unwrap() = t("2026-11-30T20:00:00Z");
    let app = home.start_with(&[], clock).await;
    assert_eq!(used(&app, "oa").await, 50);
    assert_eq!(reset_lines(&home, "openai").len(), 1);
    assert_eq!(reset_audits(&home, "openai").len(), 1);
    assert!(reset_lines(&home, "claude").is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_request_in_flight_across_a_reset_is_charged_once() {
    let home = home(&[("openai", "daily")]);
    let (clock, _) = clock("2026-11-27T23:59:00Z");
    let app = home.start_with(&[], clock).await;
    add(&app, "openai", "oa", 600).await;
    // Held before midnight, reported after the reset.
    let id = lease(&app, "openai", 300).await;
    let q = view(&app, "oa").await["quota"].clone();
    assert_eq!(
        (q["used"].as_u64(), q["reserved"].as_u64()),
        (Some(600), Some(300))
    );
    let done = resets::run(&app.state, t("2026-11-28T00:00:00Z")).await;
    assert_eq!(providers(&done), ["openai"]);
    let q = view(&app, "oa").await["quota"].clone();
    assert_eq!(
        (q["used"].as_u64(), q["reserved"].as_u64()),
        (Some(0), Some(300)),
        "the reservation survives the reset"
    );
    let r = client(
        &app,
        &format!("/v1/credentials/lease/{id}/report"),
        json!({"tokens_used": 123}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let q = view(&app, "oa").await["quota"].clone();
    assert_eq!(
        (q["used"].as_u64(), q["reserved"].as_u64()),
        (Some(123), Some(0)),
        "charged to the new period, once"
    );
    // The report cannot be applied twice.
    let r = client(
        &app,
        &format!("/v1/credentials/lease/{id}/report"),
        json!({"tokens_used": 123}),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(used(&app, "oa").await, 123);
    app.stop().await;
}
