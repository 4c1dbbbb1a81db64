//! Webhook notifications (README, "Notifications"): a working receiver gets each event it
//! subscribed to once, signed; events it did not subscribe to never come; a receiver that is
//! down, or one that answers only after 10 s, neither fails nor holds up proxied requests; a
//! failed delivery is retried with the same id; bad webhook settings stop the start with
//! exit code 2 naming the key. Every wait is for a condition, with a generous deadline.

use crate::common::{Api, Home, Resp, TestApp, eventually};
use crate::provider_mock::{ProviderMock, Reply};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use cliproxyapi::jobs::resets;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "notify-client-key";
pub(crate) const SECRET_VAR: &str = "NOTIFY_TEST_WEBHOOK_SECRET";
pub(crate) const SECRET: &str = "whsec-notify-test-0123456789";

/// What a receiver got: the signature header, the event header, and the body's bytes.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) signature: String,
    pub(crate) event: String,
    pub(crate) body: Bytes,
}

impl Received {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Default)]
struct Inbox {
    got: Mutex<Vec<Received>>,
    /// How long to wait before answering.
    delay: Mutex<Duration>,
    /// Answer this many deliveries 503 first.
    fail_first: AtomicUsize,
    /// Set once the receiver answered anything (after its delay).
    answered: AtomicBool,
}

/// A webhook receiver on port 0.
pub(crate) struct Receiver {
    pub(crate) url: String,
    inbox: Arc<Inbox>,
}

impl Receiver {
    pub(crate) async fn start() -> Receiver {
        let inbox = Arc::new(Inbox::default());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(inbox.clone());
        let url = format!("{}/hook", crate::common::serve(app).await);
        Receiver { url, inbox }
    }

    pub(crate) fn got(&self) -> Vec<Received> {
        self.inbox.got.lock().unwrap().clone()
    }

    /// Wait until `n` deliveries came.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        eventually(Duration::from_secs(60), || async {
            let got = self.got();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

async fn receive(State(inbox): State<Arc<Inbox>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let delay = *inbox.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    inbox.answered.store(true, Ordering::SeqCst);
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    inbox.got.lock().unwrap().push(Received {
        signature: header("x-cliproxy-signature"),
        event: header("x-cliproxy-event"),
        body,
    });
    let failing = inbox
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    }
}

/// The signature a receiver computes from the body it got and the shared secret.
pub(crate) fn expected_signature(body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// A webhook entry of the config.
pub(crate) fn webhook(url: &str, events: &[&str]) -> String {
    format!(
        "      - {{url: \"{url}\", events: [{}], secret_env: {SECRET_VAR}}}\n",
        events.join(", ")
    )
}

async fn start(mock: &ProviderMock, webhooks: &str, extra: &str) -> (Home, TestApp) {
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\n{}auth:\n  selection_strategy: priority\n  notifications:\n    webhooks:\n{webhooks}{extra}",
        mock.providers_yaml()
    ));
    let app = home
        .start_with(&[(SECRET_VAR, SECRET)], Arc::new(Utc::now))
        .await;
    (home, app)
}

/// Add an openai credential (`label`, `token`), `priority` first; returns its id.
async fn add(app: &TestApp, label: &str, token: &str, priority: u64) -> String {
    let body = json!({"provider": "openai", "token": token, "label": label, "priority": priority});
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().unwrap().to_string()
}

async fn chat(app: &TestApp) -> Resp {
    let body = json!({"model": "gpt-4o", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]});
    app.call_with(
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await
}

/// Check each delivery's signature and headers, and that no token is in it.
fn check_signed(got: &[Received], tokens: &[&str]) {
    for r in got {
        assert_eq!(r.signature, expected_signature(&r.body), "{r:?}");
        let body = r.json();
        assert_eq!(body["event"], r.event.as_str(), "{body}");
        let text = String::from_utf8_lossy(&r.body);
        for token in tokens.iter().chain([&SECRET]) {
            assert!(!text.contains(token), "{text}");
        }
        chrono::DateTime::parse_from_rfc3339(body["at"].as_str().unwrap()).unwrap();
        assert!(
            body["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{body}"
        );
        assert!(body["reason"].as_str().is_some(), "{body}");
    }
}

#[tokio::test]
async fn a_working_receiver_gets_each_event_once_signed() {
    let mock = ProviderMock::start().await;
    let receiver = Receiver::start().await;
    let hooks = webhook(
        &receiver.url,
        &[
            "credential.cooldown",
            "credential.invalid",
            "credential.rotated",
            "quota.reset",
        ],
    );
    let (home, app) = start(&mock, &hooks, "proxy:\n  max_attempts: 4\n").await;
    let tokens = [
        "sk-notify-broke-0001",
        "sk-notify-cool-0002",
        "sk-notify-bad-0003",
        "sk-notify-ok-0004",
    ];
    // Out of credit (exhausted: not subscribed), rate limited (cooldown), a bad key (invalid),
    // then one that answers.
    mock.reply(tokens[0], Reply::openai_insufficient_quota());
    mock.reply(
        tokens[1],
        Reply::openai_rate_limited("requests", &[("retry-after", "45")]),
    );
    mock.reply(tokens[2], Reply::openai_invalid_key());
    let broke = add(&app, "broke", tokens[0], 1).await;
    let cool = add(&app, "cool", tokens[1], 2).await;
    let bad = add(&app, "bad", tokens[2], 3).await;
    let ok = add(&app, "ok", tokens[3], 4).await;

    let r = chat(&app).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A reset one period ahead: one quota.reset for openai.
    let later = Utc::now() + chrono::TimeDelta::days(40);
    let done = resets::run(&app.state, later).await;
    assert!(done.iter().any(|d| d.provider == "openai"), "{done:?}");

    // One webhook's events arrive in order: once quota.reset came, everything sent before it
    // did.
    let got = eventually(Duration::from_secs(60), || async {
        let got = receiver.got();
        got.iter()
            .any(|r| r.json()["event"] == "quota.reset")
            .then_some(got)
    })
    .await;
    check_signed(&got, &tokens);
    let seen: Vec<(String, Value)> = got
        .iter()
        .map(|r| {
            let b = r.json();
            (
                b["event"].as_str().unwrap().to_string(),
                b["credential_id"].clone(),
            )
        })
        .collect();
    let want: Vec<(String, Value)> = [
        ("credential.rotated", json!(cool)),
        ("credential.cooldown", json!(cool)),
        ("credential.rotated", json!(bad)),
        ("credential.invalid", json!(bad)),
        ("credential.rotated", json!(ok)),
        ("quota.reset", Value::Null),
    ]
    .into_iter()
    .map(|(e, c)| (e.to_string(), c))
    .collect();
    assert_eq!(seen, want, "{got:?}");
    assert!(seen.iter().all(|(_, c)| *c != json!(broke)), "{seen:?}");
    for r in &got {
        assert_eq!(r.json()["provider"], "openai");
    }
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "ids are unique: {got:?}");

    // One auth log line per event, the unsubscribed ones too.
    let log = home.auth_log();
    for (id, what) in [
        (&broke, "marked: exhausted"),
        (&cool, "marked: cooling down"),
        (&bad, "marked: invalid"),
        (&cool, "rotated to"),
        (&bad, "rotated to"),
        (&ok, "rotated to"),
    ] {
        let needle = format!("credential {id} (openai) {what}");
        assert_eq!(log.matches(&needle).count(), 1, "{needle}:\n{log}");
    }
    assert_eq!(log.matches("quota reset for openai").count(), 1, "{log}");
    assert_eq!(app.state.notifier.dropped(), 0);
    app.stop().await;
}

#[tokio::test]
async fn receivers_down_or_slow_do_not_hold_up_requests() {
    let mock = ProviderMock::start().await;
    // Down: a port that was free a moment ago, with nothing listening.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let slow = Receiver::start().await;
    *slow.inbox.delay.lock().unwrap() = Duration::from_secs(10);
    let working = Receiver::start().await;
    let events = ["credential.cooldown", "credential.rotated"];
    let hooks = [&down, &slow.url, &working.url]
        .iter()
        .map(|url| webhook(url, &events))
        .collect::<String>();
    let (_home, app) = start(&mock, &hooks, "proxy:\n  max_attempts: 5\n").await;
    let mut tokens = Vec::new();
    for i in 0..3 {
        let token = format!("sk-notify-slow-cool-{i}");
        mock.reply(
            &token,
            Reply::openai_rate_limited("requests", &[("retry-after", "60")]),
        );
        add(&app, &format!("cool{i}"), &token, i).await;
        tokens.push(token);
    }
    add(&app, "ok", "sk-notify-slow-ok", 9).await;

    // The first request makes six events for each webhook; the others find the cooling keys
    // skipped and make none. Every one succeeds, and all are answered long before the slow
    // receiver answers its first delivery.
    for _ in 0..10 {
        let r = chat(&app).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert!(
        !slow.inbox.answered.load(Ordering::SeqCst),
        "the requests waited for the slow receiver"
    );
    // The working receiver is not held up by the others.
    let got = working.wait_for(6).await;
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    check_signed(&got, &tokens);
    assert_eq!(got.len(), 6, "{got:?}");
    // A stopping server does not wait for the slow or the dead one.
    tokio::time::timeout(Duration::from_secs(60), app.stop())
        .await
        .expect("the server stops");
}

#[tokio::test]
async fn a_failed_delivery_is_retried_with_the_same_id() {
    let mock = ProviderMock::start().await;
    let receiver = Receiver::start().await;
    receiver.inbox.fail_first.store(1, Ordering::SeqCst);
    let hooks = webhook(&receiver.url, &["quota.reset"]);
    let (_home, app) = start(&mock, &hooks, "").await;
    add(&app, "one", "sk-notify-retry-1", 1).await;
    let later = Utc::now() + chrono::TimeDelta::days(40);
    resets::run(&app.state, later).await;
    let got = receiver.wait_for(2).await;
    check_signed(&got, &["sk-notify-retry-1"]);
    assert_eq!(got[0].body, got[1].body, "a retry sends the same body");
    assert_eq!(got[0].json()["event"], "quota.reset");
    app.stop().await;
}

#[test]
fn bad_webhook_settings_stop_the_start() {
    for (hook, env, key) in [
        (
            "{url: \"https://h.example/\", events: [credential.nope], secret_env: S}",
            vec![("S", "x")],
            "auth.notifications.webhooks[0].events[0]",
        ),
        (
            "{url: \"h.example/hook\", events: [quota.reset], secret_env: S}",
            vec![("S", "x")],
            "auth.notifications.webhooks[0].url",
        ),
        (
            "{url: \"https://h.example/\", events: [quota.reset], secret_env: NOTIFY_UNSET_VAR_X}",
            vec![],
            "auth.notifications.webhooks[0].secret_env",
        ),
    ] {
        let home = Home::new(&format!(
            "auth:\n  notifications:\n    webhooks:\n      - {hook}\n"
        ));
        let out = home
            .command(&[], &env)
            .env_remove("NOTIFY_UNSET_VAR_X")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{hook}: {stderr}");
        assert!(stderr.contains(key), "{hook}: {stderr}");
    }
}
