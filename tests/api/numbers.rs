//! Numbers from outside (README, "Token bounds" and "Limits"): token counts past their
//! bounds in bodies, files, reports and provider answers; counters at their extremes; huge
//! waits; and a credential held by leases answered as busy, not broken.

use crate::common::{Api, Home, Resp, TestApp, eventually};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "numbers-client-key";
const MAX_REQUEST: u64 = 1_000_000_000;
const MAX_COUNTER: u64 = 1_000_000_000_000_000;

/// Values that are not a token count within the request bound, the extremes first.
const TOO_MANY: &[&str] = &[
    "18446744073709551615",
    "9223372036854775807",
    "9223372036854775808",
    "100000000000000000000",
    "1e300",
    "1000000001",
    "-1",
    "-9223372036854775808",
    "0.5",
];

/// A provider that answers every call with the same status, headers and body, set by the test.
type Answer = (u16, Vec<(String, String)>, String);

#[derive(Default)]
struct Canned {
    answer: Mutex<Answer>,
    calls: AtomicU64,
}

impl Canned {
    fn set(&self, status: u16, headers: &[(&str, &str)], body: Value) {
        *self.answer.lock().unwrap() = (
            status,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body.to_string(),
        );
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn answer(State(canned): State<Arc<Canned>>, _body: Bytes) -> Response {
    canned.calls.fetch_add(1, Ordering::SeqCst);
    let (status, headers, body) = canned.answer.lock().unwrap().clone();
    let mut r = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (k, v) in headers {
        r.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(&v).unwrap(),
        );
    }
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// The canned provider behind openai, mistral, claude and gemini, and a server with a client key.
async fn setup(extra: &str) -> (Arc<Canned>, Home, TestApp) {
    let canned = Arc::new(Canned::default());
    canned.set(200, &[], openai_answer(5, 5));
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(canned.clone());
    let base = crate::common::serve(app).await;
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nproviders:\n  openai: {{ base_url: \"{base}/v1\" }}\n  mistral: {{ base_url: \"{base}/v1\" }}\n  claude: {{ base_url: \"{base}\" }}\n  gemini: {{ base_url: \"{base}/v1beta\" }}\n{extra}"
    ));
    let server = home.start().await;
    (canned, home, server)
}

fn openai_answer(input: u64, output: u64) -> Value {
    json!({"id": "x", "object": "chat.completion", "choices": [],
           "usage": {"prompt_tokens": input, "completion_tokens": output}})
}

async fn add(app: &TestApp, provider: &str, token: &str, quota: Value) -> String {
    let body = json!({"provider": provider, "token": token, "label": token, "quota": quota});
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().unwrap().to_string()
}

/// POST a raw body to the proxy API with the client key.
async fn v1(app: &TestApp, path: &str, body: &str) -> Resp {
    app.call_with(
        "POST",
        path,
        Some(body),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await
}

/// Lease `tokens` of `provider`; returns the path to report it.
async fn lease(app: &TestApp, provider: &str, tokens: u64) -> String {
    let body = json!({"provider": provider, "estimated_tokens": tokens}).to_string();
    let r = v1(app, "/v1/credentials/lease", &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let lease = r.json()["lease_id"].as_str().unwrap().to_string();
    format!("/v1/credentials/lease/{lease}/report")
}

async fn credential(app: &TestApp, id: &str) -> Value {
    app.auths()
        .await
        .into_iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("no credential {id}"))
}

/// The credential once nothing is reserved on it any more.
async fn settled(app: &TestApp, id: &str) -> Value {
    eventually(Duration::from_secs(10), || async {
        let c = credential(app, id).await;
        (c["quota"]["reserved"] == 0).then_some(c)
    })
    .await
}

fn used(c: &Value) -> u64 {
    c["quota"]["used"].as_u64().unwrap()
}

#[tokio::test]
async fn sizes_past_the_bounds_are_refused_before_anything_is_reserved() {
    let (canned, _home, app) = setup("").await;
    let openai = add(&app, "openai", "sk-full", json!({"limit": 100})).await;
    let claude = add(&app, "claude", "sk-ant-full", json!({"limit": 100})).await;
    let gemini = add(&app, "gemini", "AIza-full", json!({"limit": 100})).await;
    for provider in ["openai", "claude", "gemini"] {
        let r = app
            .put(
                &format!("/v0/management/auths/{provider}/quota"),
                r#"{"used": 100}"#,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    for v in TOO_MANY {
        for (path, body, field) in [
            (
                "/v1/chat/completions",
                format!(r#"{{"model": "gpt-4o", "max_tokens": {v}, "messages": []}}"#),
                "max_tokens",
            ),
            (
                "/v1/chat/completions",
                format!(r#"{{"model": "gpt-4o", "max_completion_tokens": {v}, "messages": []}}"#),
                "max_completion_tokens",
            ),
            (
                "/v1/chat/completions",
                format!(
                    r#"{{"model": "gpt-4o", "stream": true, "max_tokens": {v}, "messages": []}}"#
                ),
                "max_tokens",
            ),
            (
                "/v1/messages",
                format!(r#"{{"model": "claude-x", "max_tokens": {v}, "messages": []}}"#),
                "max_tokens",
            ),
            (
                "/v1beta/models/gemini-x:generateContent",
                format!(r#"{{"contents": [], "generationConfig": {{"maxOutputTokens": {v}}}}}"#),
                "maxOutputTokens",
            ),
        ] {
            let r = v1(&app, path, &body).await;
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (400, "invalid_body"),
                "{body}"
            );
            assert!(r.text.contains(field), "{body}: {}", r.text);
        }
        for provider in ["openai", "claude", "gemini"] {
            let body = format!(r#"{{"provider": "{provider}", "estimated_tokens": {v}}}"#);
            let r = v1(&app, "/v1/credentials/lease", &body).await;
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (400, "invalid_body"),
                "{body}"
            );
            assert!(r.text.contains("estimated_tokens"), "{}", r.text);
        }
    }
    assert_eq!(canned.calls(), 0, "nothing reached the provider");
    // The largest size allowed is not admitted on a full credential either, and neither is a
    // lease that estimates nothing.
    for (path, body) in [
        (
            "/v1/chat/completions",
            r#"{"model": "gpt-4o", "max_tokens": 1000000000, "messages": []}"#,
        ),
        (
            "/v1/messages",
            r#"{"model": "claude-x", "max_tokens": 0, "messages": []}"#,
        ),
        (
            "/v1/credentials/lease",
            r#"{"provider": "openai", "estimated_tokens": 0}"#,
        ),
        (
            "/v1/credentials/lease",
            r#"{"provider": "gemini", "estimated_tokens": 1}"#,
        ),
    ] {
        let r = v1(&app, path, body).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (429, "credentials_busy"),
            "{body}"
        );
    }
    assert_eq!(canned.calls(), 0);
    for id in [&openai, &claude, &gemini] {
        let c = settled(&app, id).await;
        assert_eq!(used(&c), 100, "{c}");
    }

    // A fresh credential with room for 100: a refused huge lease leaves it whole, and ordinary
    // requests then stop at the limit.
    let fresh = add(&app, "mistral", "mistral-key", json!({"limit": 100})).await;
    for v in TOO_MANY {
        let body = format!(r#"{{"provider": "mistral", "estimated_tokens": {v}}}"#);
        assert_eq!(v1(&app, "/v1/credentials/lease", &body).await.status, 400);
    }
    let body = r#"{"model": "mistral-large", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}"#;
    let mut served = 0;
    for _ in 0..20 {
        let r = v1(&app, "/v1/chat/completions", body).await;
        match r.status {
            200 => served += 1,
            429 => {}
            other => panic!("{other}: {}", r.text),
        }
        let c = settled(&app, &fresh).await;
        assert!(used(&c) <= 100, "{c}");
    }
    assert!((1..20).contains(&served), "{served} served");
}

#[tokio::test]
async fn counters_at_their_extremes_hand_out_nothing() {
    let (_canned, home, app) = setup("").await;
    let id = add(&app, "claude", "sk-ant-extreme", json!({"limit": 100})).await;
    // Limits and counters past the counter bound are refused, through the API and in files.
    for (body, field) in [
        (r#"{"used": 18446744073709551615}"#, "used"),
        (r#"{"used": 1000000000000001}"#, "used"),
        (r#"{"used": -1}"#, "used"),
        (r#"{"limit": 18446744073709551615}"#, "limit"),
        (r#"{"limit": 9223372036854775807}"#, "limit"),
        (r#"{"limit": 1e300}"#, "limit"),
    ] {
        let r = app
            .put(&format!("/v0/management/auths/claude/quota?id={id}"), body)
            .await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "invalid_body"),
            "{body}"
        );
        assert!(r.text.contains(field), "{}", r.text);
    }
    for quota in [
        r#"{"limit": 18446744073709551615}"#,
        r#"{"used": 9223372036854775807}"#,
        r#"{"limit": 1000000000000001}"#,
    ] {
        let body =
            format!(r#"{{"provider": "claude", "token": "sk-ant-file-x", "quota": {quota}}}"#);
        let r = app.post("/v0/management/auths/import", &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let report = r.json();
        assert_eq!(report["imported"], 0, "{report}");
        assert!(
            report["errors"][0]["error"]
                .as_str()
                .unwrap()
                .contains("quota"),
            "{report}"
        );
    }
    let r = app
        .put(
            &format!("/v0/management/auths/claude/quota?id={id}"),
            r#"{"limit": 1000000000000000, "used": 1000000000000000}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.stop().await;

    // Counters edited in the database past every bound: read as full, never as room.
    let db = rusqlite::Connection::open(home.path().join("data/cliproxy.db")).unwrap();
    for (limit, used) in [
        (Some(100i64), i64::MAX),
        (Some(i64::MAX), i64::MAX),
        (Some(100), 100),
        (Some(i64::MAX), i64::MAX - 1),
        (Some(0), 0),
        (Some(0), i64::MAX),
    ] {
        db.execute(
            "UPDATE quotas SET limit_tokens = ?1, used = ?2 WHERE credential_id = ?3",
            rusqlite::params![limit, used, id],
        )
        .unwrap();
        let app = home.start().await;
        for tokens in [0u64, 1, 2, 1000] {
            let body = format!(r#"{{"provider": "claude", "estimated_tokens": {tokens}}}"#);
            let r = v1(&app, "/v1/credentials/lease", &body).await;
            assert_eq!(r.status, 429, "limit {limit:?} used {used}: {}", r.text);
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn usage_past_the_bounds_is_clamped_and_sums_saturate() {
    let (canned, home, app) = setup("").await;
    let max = u64::MAX;
    let cases = [
        (
            "claude",
            "/v1/messages",
            r#"{"model": "claude-x", "max_tokens": 5, "messages": []}"#,
            json!({"content": [], "usage": {"input_tokens": max, "cache_read_input_tokens": 2, "output_tokens": 1}}),
            MAX_REQUEST + 1,
        ),
        (
            "claude",
            "/v1/messages",
            r#"{"model": "claude-x", "max_tokens": 5, "messages": []}"#,
            json!({"content": [], "usage": {"input_tokens": max, "cache_creation_input_tokens": max, "cache_read_input_tokens": max, "output_tokens": max}}),
            2 * MAX_REQUEST,
        ),
        (
            "gemini",
            "/v1beta/models/gemini-x:generateContent",
            r#"{"contents": [], "generationConfig": {"maxOutputTokens": 5}}"#,
            json!({"candidates": [], "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": max, "thoughtsTokenCount": 2}}),
            3 + MAX_REQUEST,
        ),
        (
            "gemini",
            "/v1beta/models/gemini-x:generateContent",
            r#"{"contents": [], "generationConfig": {"maxOutputTokens": 5}}"#,
            json!({"candidates": [], "usageMetadata": {"promptTokenCount": max, "totalTokenCount": max}}),
            MAX_REQUEST,
        ),
        (
            "openai",
            "/v1/chat/completions",
            r#"{"model": "gpt-4o", "max_tokens": 5, "messages": []}"#,
            json!({"choices": [], "usage": {"prompt_tokens": max, "completion_tokens": 9223372036854775807u64}}),
            2 * MAX_REQUEST,
        ),
    ];
    for (i, (provider, path, body, answer, charged)) in cases.into_iter().enumerate() {
        let id = add(&app, provider, &format!("key-usage-{i}"), json!({})).await;
        canned.set(200, &[], answer.clone());
        let r = v1(&app, path, body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let c = settled(&app, &id).await;
        assert_eq!(used(&c), charged, "{answer}");
        // Near the counter bound, a charge saturates there instead of wrapping.
        let r = app
            .put(
                &format!("/v0/management/auths/{provider}/quota?id={id}"),
                &json!({"used": MAX_COUNTER - 5}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        for _ in 0..3 {
            assert_eq!(v1(&app, path, body).await.status, 200);
        }
        let c = settled(&app, &id).await;
        assert_eq!(used(&c), MAX_COUNTER, "{answer}");
        app.delete(&format!("/v0/management/auths/{provider}?id={id}"))
            .await;
    }
    // Fifteen credentials at the bound: the provider's total does not wrap.
    for i in 0..15 {
        add(
            &app,
            "mistral",
            &format!("mistral-{i}"),
            json!({"limit": MAX_COUNTER}),
        )
        .await;
    }
    let r = app
        .put(
            "/v0/management/auths/mistral/quota",
            &json!({"used": MAX_COUNTER}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let total = &r.json()["total"];
    assert_eq!(total["used"], 15 * MAX_COUNTER, "{total}");
    assert_eq!(total["limit"], 15 * MAX_COUNTER, "{total}");
    assert_eq!(total["remaining"], 0, "{total}");
    app.stop().await;
    // Every counter and every hour of history is still an integer in SQLite.
    let db = rusqlite::Connection::open(home.path().join("data/cliproxy.db")).unwrap();
    let reals: i64 = db
        .query_row(
            "SELECT (SELECT COUNT(*) FROM quotas WHERE typeof(used) <> 'integer')
                  + (SELECT COUNT(*) FROM usage_hourly WHERE typeof(input_tokens) <> 'integer'
                        OR typeof(output_tokens) <> 'integer'
                        OR typeof(unreported_tokens) <> 'integer')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reals, 0);
}

#[tokio::test]
async fn huge_waits_are_clamped_and_release_their_reservation() {
    let (canned, _home, app) = setup("proxy:\n  max_attempts: 1\n").await;
    let day = 24 * 60 * 60;
    for (i, value) in [
        "1e300",
        "100000000000000",
        "18446744073709551615",
        "340282366920938463463374607431768211456",
        "inf",
        "86401",
        "NaN",
        "-1",
        "1.5",
    ]
    .into_iter()
    .enumerate()
    {
        for status in [429u16, 503] {
            let id = add(&app, "openai", &format!("sk-wait-{i}-{status}"), json!({})).await;
            canned.set(
                status,
                &[("retry-after", value)],
                json!({"error": {"message": "slow down"}}),
            );
            let before = chrono::Utc::now();
            let r = v1(
                &app,
                "/v1/chat/completions",
                r#"{"model": "gpt-4o", "max_tokens": 5, "messages": []}"#,
            )
            .await;
            assert_eq!(r.status, status, "{value}: {}", r.text);
            let c = settled(&app, &id).await;
            assert_eq!(used(&c), 0, "{value}: nothing charged");
            // A 503 is the provider's state, not the key's: nothing cools.
            if status == 503 {
                assert_eq!(c["cooldown_until"], Value::Null, "{value}: {c}");
            } else {
                let until =
                    chrono::DateTime::parse_from_rfc3339(c["cooldown_until"].as_str().unwrap())
                        .unwrap();
                let wait = (until.with_timezone(&chrono::Utc) - before).num_seconds();
                assert!(wait <= day + 5, "{value}: cooling {wait} s");
            }
            app.delete(&format!("/v0/management/auths/openai?id={id}"))
                .await;
        }
    }
    // A lease reported with a huge wait is released, and the wait is at most a day.
    canned.set(200, &[], openai_answer(1, 1));
    let id = add(&app, "claude", "sk-ant-lease", json!({"limit": 1000})).await;
    for report in [
        r#"{"error_status": 429, "retry_after": 1e300}"#,
        r#"{"error_status": 429, "retry_after": -1}"#,
        r#"{"error_status": 429, "retry_after": 18446744073709551616}"#,
        r#"{"error_status": 70000}"#,
        r#"{"error_status": 42}"#,
        r#"{"tokens_used": 18446744073709551615}"#,
        r#"{"input_tokens": 1, "output_tokens": 1000000001}"#,
    ] {
        let path = lease(&app, "claude", 10).await;
        let r = v1(&app, &path, report).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "invalid_body"),
            "{report}"
        );
        // The refused report changed nothing: the lease is still there to report properly.
        let r = v1(&app, &path, r#"{"tokens_used": 3}"#).await;
        assert_eq!(r.status, 200, "{report}: {}", r.text);
    }
    assert_eq!(used(&settled(&app, &id).await), 3 * 7);
    for (i, wait) in ["18446744073709551615", "9223372036854775807", "86401", "0"]
        .into_iter()
        .enumerate()
    {
        let id = add(&app, "gemini", &format!("AIza-lease-{i}"), json!({})).await;
        let path = lease(&app, "gemini", 10).await;
        let before = chrono::Utc::now();
        let body = format!(r#"{{"error_status": 429, "retry_after": {wait}}}"#);
        let r = v1(&app, &path, &body).await;
        assert_eq!(r.status, 200, "{wait}: {}", r.text);
        assert_eq!(r.json()["released"], true);
        assert_eq!(v1(&app, &path, r#"{"tokens_used": 1}"#).await.status, 404);
        let c = settled(&app, &id).await;
        let until =
            chrono::DateTime::parse_from_rfc3339(c["cooldown_until"].as_str().unwrap()).unwrap();
        assert!((until.with_timezone(&chrono::Utc) - before).num_seconds() <= day + 5);
        assert_eq!(used(&c), 0);
        app.delete(&format!("/v0/management/auths/gemini?id={id}"))
            .await;
    }
}

#[tokio::test]
async fn room_held_by_leases_is_busy_not_broken() {
    // mistral has no reset schedule by default: its quota never resets.
    let (_canned, _home, app) = setup("").await;
    let id = add(&app, "mistral", "mistral-held", json!({"limit": 100})).await;
    let report = lease(&app, "mistral", 100).await;
    for (path, body) in [
        (
            "/v1/credentials/lease",
            r#"{"provider": "mistral", "estimated_tokens": 1}"#,
        ),
        (
            "/v1/credentials/lease",
            r#"{"provider": "mistral", "estimated_tokens": 50}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "mistral-large", "max_tokens": 1, "messages": []}"#,
        ),
    ] {
        let r = v1(&app, path, body).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (429, "credentials_busy"),
            "{body}"
        );
        let wait: u64 = r.retry_after.as_deref().unwrap().parse().unwrap();
        assert!(
            (1..=600).contains(&wait),
            "Retry-After {wait}: the lease's end"
        );
    }
    // Reported, the lease frees its room; used up for good, the quota says so.
    assert_eq!(
        v1(&app, &report, r#"{"tokens_used": 100}"#).await.status,
        200
    );
    assert_eq!(used(&settled(&app, &id).await), 100);
    for body in [
        r#"{"provider": "mistral", "estimated_tokens": 1}"#,
        r#"{"provider": "mistral", "estimated_tokens": 1000000000}"#,
    ] {
        let r = v1(&app, "/v1/credentials/lease", body).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (429, "credentials_exhausted"),
            "{}",
            r.text
        );
        assert!(r.text.contains("never resets"), "{}", r.text);
    }
    // Disabled, the only credential is unusable: that is the 503.
    let r = app
        .put(
            &format!("/v0/management/auths/mistral?id={id}"),
            r#"{"disabled": true}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let r = v1(
        &app,
        "/v1/credentials/lease",
        r#"{"provider": "mistral", "estimated_tokens": 1}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "no_usable_credentials")
    );
}
