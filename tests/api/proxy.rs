//! The request path against local mock providers: formats, exact usage, concurrency within
//! limits, strategies, rotation, leases.

use crate::common::{Api, Home, Resp, TestApp};
use crate::mock::Mock;
use chrono::Utc;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

const CLIENT_KEY: &str = "client-key-for-tests";

async fn setup(mock: &Mock, extra: &str) -> (Home, TestApp) {
    let home = Home::new(&format!(
        "api_keys: [\"{CLIENT_KEY}\"]\n{}{extra}",
        mock.providers_yaml()
    ));
    let app = home.start().await;
    (home, app)
}

/// Add a credential; returns its id.
async fn add(app: &TestApp, provider: &str, token: &str, extra: Value) -> String {
    let mut body = json!({"provider": provider, "token": token, "label": token});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_str().unwrap().to_string()
}

async fn v1(app: &TestApp, path: &str, body: Value) -> Resp {
    app.post_as(CLIENT_KEY, path, &body).await
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 20, "stream": stream,
           "messages": [{"role": "user", "content": "Say hello to the mock provider, please."}]})
}

/// A non-streamed chat completion that must fail with `status` and error `code`.
async fn chat_fails(app: &TestApp, status: u16, code: &str) -> Resp {
    let r = v1(app, "/v1/chat/completions", chat("gpt-4o", false)).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (status, code),
        "{}",
        r.text
    );
    r
}

fn claude_msg(stream: bool) -> Value {
    json!({"model": "claude-sonnet-4", "max_tokens": 20, "stream": stream,
           "messages": [{"role": "user", "content": "Say hello to the mock provider, please."}]})
}

fn gemini_req() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "Say hello to the mock provider, please."}]}],
           "generationConfig": {"maxOutputTokens": 20}})
}

/// A mock answering after `delay_ms`, and a server with an OpenAI credential per token, each
/// limited to `limit` tokens.
async fn limited(tokens: &[&str], limit: u64, delay_ms: u64) -> (Mock, Home, Arc<TestApp>) {
    let mock = Mock::start().await;
    mock.state
        .delay_ms
        .store(delay_ms, std::sync::atomic::Ordering::Relaxed);
    let (home, app) = setup(&mock, "").await;
    for t in tokens {
        add(&app, "openai", t, json!({"quota": {"limit": limit}})).await;
    }
    (mock, home, Arc::new(app))
}

/// Credentials by label once every reservation has settled (settlements may land just after
/// the answer).
async fn settled(app: &TestApp) -> HashMap<String, Value> {
    crate::common::eventually(std::time::Duration::from_secs(10), || async {
        let a = by_label(app).await;
        a.values().all(|c| c["quota"]["reserved"] == 0).then_some(a)
    })
    .await
}

async fn by_label(app: &TestApp) -> HashMap<String, Value> {
    app.auths()
        .await
        .into_iter()
        .map(|a| (a["label"].as_str().unwrap().to_string(), a))
        .collect()
}

#[tokio::test]
async fn three_formats_streaming_and_not_charge_exactly_what_was_reported() {
    let mock = Mock::start().await;
    let (_home, app) = setup(&mock, "").await;
    let tokens = [
        "sk-oa-1", "sk-oa-2", "sk-ant-1", "sk-ant-2", "AIza-g1", "AIza-g2",
    ];
    for t in tokens {
        let provider = if t.starts_with("sk-oa") {
            "openai"
        } else if t.starts_with("sk-ant") {
            "claude"
        } else {
            "gemini"
        };
        add(&app, provider, t, json!({})).await;
    }
    for round in 0..4 {
        let stream = round % 2 == 1;
        // OpenAI, with and without the client asking for usage.
        let r = v1(&app, "/v1/chat/completions", chat("gpt-4o-mini", stream)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if stream {
            assert!(r.text.contains("tok4"), "{}", r.text);
            assert!(
                !r.text.contains("prompt_tokens"),
                "the usage chunk is hidden: {}",
                r.text
            );
            assert!(r.text.trim_end().ends_with("data: [DONE]"));
            let mut asked = chat("openai/gpt-4o-mini", true);
            asked["stream_options"] = json!({"include_usage": true});
            let r = v1(&app, "/v1/chat/completions", asked).await;
            assert!(
                r.text.contains("prompt_tokens"),
                "asked for: shown: {}",
                r.text
            );
        } else {
            assert_eq!(
                r.json()["choices"][0]["message"]["content"],
                "hello from the mock"
            );
        }
        let r = v1(&app, "/v1/messages", claude_msg(stream)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if stream {
            assert!(r.text.contains("message_stop"));
        }
        let path = if stream {
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        } else {
            "/v1beta/models/gemini-2.5-flash:generateContent"
        };
        let r = v1(&app, path, gemini_req()).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // Settlements of streams happen as they end; poll until nothing is reserved.
    let auths = settled(&app).await;
    let mut total = 0;
    for t in tokens {
        let served = mock.served(t);
        assert!(served.requests > 0, "{t} was used");
        assert_eq!(
            auths[t]["quota"]["used"].as_u64().unwrap(),
            served.reported,
            "{t}"
        );
        total += served.reported;
    }
    assert!(total > 0);
    // The client key never reached a provider; each provider got its credential its way.
    assert!(!mock.saw(CLIENT_KEY));
    // History matches the counters.
    for (id, used, history) in app.state.store.usage_totals().await.unwrap() {
        assert_eq!(used, history, "{id}");
    }
    app.stop().await;
}

#[tokio::test]
async fn client_keys_are_required_and_models_listed() {
    let mock = Mock::start().await;
    let (_home, app) = setup(&mock, "").await;
    add(&app, "openai", "sk-oa-1", json!({})).await;
    let r = app
        .post("/v1/chat/completions", &chat("gpt-4o", false).to_string())
        .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "missing_api_key")
    );
    let r = app
        .call_with(
            "POST",
            "/v1/chat/completions",
            Some(&chat("gpt-4o", false).to_string()),
            &[("x-api-key", "nope")],
        )
        .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "invalid_api_key")
    );
    for (h, v) in [("x-api-key", CLIENT_KEY), ("x-goog-api-key", CLIENT_KEY)] {
        let r = app
            .call_with(
                "POST",
                "/v1/chat/completions",
                Some(&chat("gpt-4o", false).to_string()),
                &[(h, v)],
            )
            .await;
        assert_eq!(r.status, 200, "{h}: {}", r.text);
    }
    let r = app
        .call(
            "POST",
            &format!("/v1beta/models/gemini-x:generateContent?key={CLIENT_KEY}"),
            Some(&gemini_req().to_string()),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "no_credentials"),
        "{}",
        r.text
    );
    assert_eq!(
        r.json()["error"]["message"],
        "No credentials for provider gemini"
    );
    let r = v1(&app, "/v1/chat/completions", chat("no-such-model", false)).await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "unknown_model"));
    let r = app
        .call_with(
            "GET",
            "/v1/models",
            None,
            &[("authorization", &format!("Bearer {CLIENT_KEY}"))],
        )
        .await;
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ids.contains(&"gpt-*".to_string()) && ids.contains(&"deepseek/*".to_string()),
        "{ids:?}"
    );
    assert!(!mock.saw(CLIENT_KEY));
    app.stop().await;
}

#[tokio::test]
async fn disabled_provider_answers_503() {
    let mock = Mock::start().await;
    let home = Home::new(&format!(
        "providers:\n  openai: {{ base_url: \"{}/v1\", enabled: false }}\n",
        mock.base
    ));
    let app = home.start().await;
    add(&app, "openai", "sk-oa-1", json!({})).await;
    let r = app
        .post("/v1/chat/completions", &chat("gpt-4o", false).to_string())
        .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "provider_disabled")
    );
    assert_eq!(mock.served("sk-oa-1").requests, 0);
    assert_eq!(
        app.auths().await[0]["status"],
        "active",
        "its credentials are left alone"
    );
    app.stop().await;
}

#[tokio::test]
async fn concurrent_requests_never_pass_a_limit() {
    let tokens = ["sk-c-1", "sk-c-2", "sk-c-3"];
    let (mock, _home, app) = limited(&tokens, 6000, 3).await;
    // A watcher checks the invariant while the load runs.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut checks = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for a in app.auths().await {
                    let q = &a["quota"];
                    let (used, reserved, limit) = (
                        q["used"].as_u64().unwrap(),
                        q["reserved"].as_u64().unwrap(),
                        q["limit"].as_u64().unwrap(),
                    );
                    assert!(used + reserved <= limit, "{a}");
                }
                checks += 1;
            }
            checks
        })
    };
    let mut tasks = Vec::new();
    for i in 0..200 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let r = v1(&app, "/v1/chat/completions", chat("gpt-4o", i % 3 == 0)).await;
            (r.status, r.text)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(
            status, 200,
            "no request fails while a credential has room: {text}"
        );
        ok += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(watcher.await.unwrap() > 0);
    assert_eq!(ok, 200);
    let auths = settled(&app).await;
    let mut used = 0;
    for t in tokens {
        let u = auths[t]["quota"]["used"].as_u64().unwrap();
        assert_eq!(u, mock.served(t).reported, "{t}");
        assert!(u <= 6000);
        used += u;
    }
    assert_eq!(
        mock.state
            .served
            .lock()
            .unwrap()
            .values()
            .map(|s| s.requests)
            .sum::<u64>(),
        200
    );
    assert!(used > 0);
}

#[tokio::test]
async fn strategies() {
    // round_robin: 300 requests spread within one of each other.
    let mock = Mock::start().await;
    let (_home, app) = setup(&mock, "auth:\n  selection_strategy: round_robin\n").await;
    for t in ["sk-r-1", "sk-r-2", "sk-r-3"] {
        add(&app, "openai", t, json!({})).await;
    }
    for _ in 0..300 {
        assert_eq!(
            v1(&app, "/v1/chat/completions", chat("gpt-4o", false))
                .await
                .status,
            200
        );
    }
    let counts: Vec<u64> = ["sk-r-1", "sk-r-2", "sk-r-3"]
        .iter()
        .map(|t| mock.served(t).requests)
        .collect();
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{counts:?}"
    );
    app.stop().await;

    // priority: the lowest number drains first; the next only when it is unusable.
    let mock = Mock::start().await;
    let (_home, app) = setup(&mock, "auth:\n  selection_strategy: priority\n").await;
    let p1 = add(
        &app,
        "openai",
        "sk-p-1",
        json!({"priority": 1, "quota": {"limit": 100}}),
    )
    .await;
    add(&app, "openai", "sk-p-2", json!({"priority": 2})).await;
    add(&app, "openai", "sk-p-3", json!({"priority": 3})).await;
    let small = json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let mut order = Vec::new();
    for _ in 0..12 {
        assert_eq!(
            v1(&app, "/v1/chat/completions", small.clone()).await.status,
            200
        );
        order.push(mock.order().last().unwrap().clone());
    }
    let first_p2 = order
        .iter()
        .position(|t| t == "sk-p-2")
        .expect("falls to p2 when p1 is full");
    assert!(
        first_p2 > 0 && order[..first_p2].iter().all(|t| t == "sk-p-1"),
        "{order:?}"
    );
    assert!(order[first_p2..].iter().all(|t| t == "sk-p-2"), "{order:?}");
    assert!(!order.contains(&"sk-p-3".to_string()));
    let auths = settled(&app).await;
    assert_eq!(
        auths["sk-p-1"]["status"], "active",
        "room left, but not for a whole request"
    );
    let _ = p1;
    app.stop().await;

    // quota_aware: always the most remaining.
    let mock = Mock::start().await;
    let (_home, app) = setup(&mock, "auth:\n  selection_strategy: quota_aware\n").await;
    for (t, limit) in [("sk-q-1", 1000), ("sk-q-2", 1500), ("sk-q-3", 1200)] {
        add(&app, "openai", t, json!({"quota": {"limit": limit}})).await;
    }
    for _ in 0..15 {
        let before = settled(&app).await;
        let best = ["sk-q-1", "sk-q-2", "sk-q-3"]
            .into_iter()
            .max_by_key(|t| before[*t]["quota"]["remaining"].as_u64().unwrap())
            .unwrap();
        assert_eq!(
            v1(&app, "/v1/chat/completions", small.clone()).await.status,
            200
        );
        let picked = mock.order().last().unwrap().clone();
        let best_room = before[best]["quota"]["remaining"].as_u64().unwrap();
        assert_eq!(
            before[&picked]["quota"]["remaining"].as_u64().unwrap(),
            best_room,
            "picked {picked}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn rotation_marks_and_moves_on() {
    let mock = Mock::start().await;
    let (_home, app) = setup(&mock, "auth:\n  selection_strategy: priority\n").await;
    add(&app, "openai", "sk-bad-1", json!({"priority": 1})).await;
    add(&app, "openai", "sk-good-1", json!({"priority": 2})).await;
    // 401 on the first: marked invalid, and the client still gets its answer.
    let r = v1(&app, "/v1/chat/completions", chat("gpt-4o", false)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = settled(&app).await;
    assert_eq!(a["sk-bad-1"]["status"], "invalid");
    assert!(
        a["sk-bad-1"]["status_reason"]
            .as_str()
            .unwrap()
            .contains("401")
    );
    assert_eq!(
        a["sk-good-1"]["quota"]["used"].as_u64().unwrap(),
        mock.served("sk-good-1").reported
    );
    assert_eq!(
        a["sk-bad-1"]["quota"]["used"], 0,
        "a rejected attempt costs nothing"
    );
    app.stop().await;

    // 429 with retry-after: 30 s of cooldown; insufficient_quota and 402: exhausted.
    let mock = Mock::start().await;
    let (_home, app) = setup(
        &mock,
        "auth:\n  selection_strategy: priority\nproxy:\n  max_attempts: 4\n",
    )
    .await;
    add(&app, "openai", "sk-slow-1", json!({"priority": 1})).await;
    add(&app, "openai", "sk-quota-1", json!({"priority": 2})).await;
    add(&app, "openai", "sk-broke-1", json!({"priority": 3})).await;
    add(&app, "openai", "sk-fine-1", json!({"priority": 4})).await;
    let before = Utc::now();
    let r = v1(&app, "/v1/chat/completions", chat("gpt-4o", true)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = settled(&app).await;
    assert_eq!(a["sk-slow-1"]["status"], "cooldown");
    let until =
        chrono::DateTime::parse_from_rfc3339(a["sk-slow-1"]["cooldown_until"].as_str().unwrap())
            .unwrap();
    let secs = (until.with_timezone(&Utc) - before).num_seconds();
    assert!((29..=31).contains(&secs), "cooldown of {secs} s");
    assert_eq!(a["sk-quota-1"]["status"], "exhausted");
    assert_eq!(a["sk-broke-1"]["status"], "exhausted");
    assert_eq!(a["sk-fine-1"]["status"], "active");
    // When all are cooling down: 429 with a correct Retry-After.
    let r = app
        .put(
            "/v0/management/auths/openai?id=sk-fine-1",
            r#"{"disabled": true}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let r = chat_fails(&app, 429, "credentials_busy").await;
    let retry: i64 = r.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((28..=30).contains(&retry), "Retry-After {retry}");
    app.stop().await;

    // Every attempt fails: the client gets the provider's last answer.
    let mock = Mock::start().await;
    let (_home, app) = setup(&mock, "").await;
    add(&app, "claude", "sk-ant-down-1", json!({})).await;
    add(&app, "claude", "sk-ant-bad-2", json!({})).await;
    let r = v1(&app, "/v1/messages", claude_msg(false)).await;
    assert!(
        r.status == 503 || r.status == 401,
        "{} {}",
        r.status,
        r.text
    );
    app.stop().await;
}

#[tokio::test]
async fn leases_share_counters_and_settle() {
    let mock = Mock::start().await;
    let home = Home::new(&format!(
        "api_keys: [\"{CLIENT_KEY}\"]\n{}",
        mock.providers_yaml()
    ));
    let (clock, now) = {
        let now = Arc::new(std::sync::Mutex::new(Utc::now()));
        let read = now.clone();
        (
            Arc::new(move || *read.lock().unwrap()) as cliproxyapi::state::Clock,
            now,
        )
    };
    let app = home.start_with(&[], clock).await;
    let id = add(
        &app,
        "openai",
        "sk-lease-1",
        json!({"quota": {"limit": 3000}}),
    )
    .await;
    let lease = |tokens: u64| {
        let app = &app;
        async move {
            v1(
                app,
                "/v1/credentials/lease",
                json!({"provider": "openai", "estimated_tokens": tokens}),
            )
            .await
        }
    };
    let r = lease(2000).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let l = r.json();
    assert_eq!(l["token"], "sk-lease-1");
    assert_eq!(l["credential_id"], id.as_str());
    assert_eq!(l["base_url"], format!("{}/v1", mock.base));
    let q = &by_label(&app).await["sk-lease-1"]["quota"];
    assert_eq!(
        (q["reserved"].as_u64(), q["used"].as_u64()),
        (Some(2000), Some(0))
    );
    // The proxy sees the same counters: a 4096-token request does not fit beside the lease.
    let fits_alone = json!({"model": "gpt-4o", "max_tokens": 1000, "messages": []});
    let r = v1(&app, "/v1/chat/completions", fits_alone.clone()).await;
    assert_eq!(r.status, 429, "{}", r.text);
    // The report settles.
    let lease_id = l["lease_id"].as_str().unwrap();
    let r = v1(
        &app,
        &format!("/v1/credentials/lease/{lease_id}/report"),
        json!({"tokens_used": 1830}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let q = &by_label(&app).await["sk-lease-1"]["quota"];
    assert_eq!(
        (q["reserved"].as_u64(), q["used"].as_u64()),
        (Some(0), Some(1830))
    );
    let r = v1(
        &app,
        &format!("/v1/credentials/lease/{lease_id}/report"),
        json!({"tokens_used": 5}),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "lease_not_found"),
        "settles once"
    );
    let r = v1(&app, "/v1/chat/completions", fits_alone).await;
    assert_eq!(r.status, 200, "fits once the lease is settled: {}", r.text);
    let used_after_proxy = settled(&app).await["sk-lease-1"]["quota"]["used"]
        .as_u64()
        .unwrap();
    assert_eq!(used_after_proxy, 1830 + mock.served("sk-lease-1").reported);
    // An error report marks the credential as the proxy would.
    let l = lease(100).await.json();
    let r = v1(
        &app,
        &format!(
            "/v1/credentials/lease/{}/report",
            l["lease_id"].as_str().unwrap()
        ),
        json!({"error_status": 429, "retry_after": 30}),
    )
    .await;
    assert_eq!(r.status, 200);
    let a = &by_label(&app).await["sk-lease-1"];
    assert_eq!(a["status"], "cooldown");
    assert_eq!(a["quota"]["used"].as_u64().unwrap(), used_after_proxy);
    // An unreported lease is settled at its reservation when it expires.
    *now.lock().unwrap() += chrono::Duration::seconds(31);
    let l = lease(500).await;
    assert_eq!(l.status, 201, "{}", l.text);
    *now.lock().unwrap() += chrono::Duration::minutes(11);
    let used = crate::common::eventually(std::time::Duration::from_secs(15), || async {
        let q = by_label(&app).await["sk-lease-1"]["quota"].clone();
        (q["reserved"] == 0).then(|| q["used"].as_u64().unwrap())
    })
    .await;
    assert_eq!(used, used_after_proxy + 500);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_requests_fill_small_limits_exactly() {
    let tokens = ["sk-s-1", "sk-s-2", "sk-s-3"];
    let (mock, _home, app) = limited(&tokens, 1000, 2).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            v1(&app, "/v1/chat/completions", chat("gpt-4o", i % 4 == 0)).await
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.error_code(), "credentials_busy");
                busy += 1;
            }
            s => panic!("unexpected {s}: {}", r.text),
        }
    }
    assert_eq!(ok + busy, 200);
    assert!(busy > 0, "the limits were reached");
    let auths = settled(&app).await;
    let mut served = 0;
    for t in tokens {
        let q = &auths[t]["quota"];
        let used = q["used"].as_u64().unwrap();
        assert_eq!(used, mock.served(t).reported, "{t}");
        assert!(used <= 1000, "{t} passed its limit: {used}");
        // Full: what is left would not hold many more requests (each reserves about 50).
        assert!(
            1000 - used < 150,
            "{t} still had room for several requests: used {used}"
        );
        served += mock.served(t).requests;
    }
    assert_eq!(
        served, ok,
        "every success was served once, nothing else was"
    );
}

/// One chat completion, answered 200; then the `used` of the credential labelled `label` once
/// it has settled (the usage of one such request, when it is the first).
async fn one_request_used(app: &TestApp, label: &str) -> i64 {
    let r = v1(app, "/v1/chat/completions", chat("gpt-4o-mini", false)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    settled(app).await[label]["quota"]["used"].as_i64().unwrap()
}

/// The server's database, opened beside it as another process would.
fn open_database(home: &Home) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(home.path().join("data/cliproxy.db")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    db
}

fn reservation_rows(db: &rusqlite::Connection) -> i64 {
    db.query_row("SELECT count(*) FROM reservations", [], |r| r.get(0))
        .unwrap()
}

/// Wait until the one request in flight has its reservation row.
async fn until_one_reservation(db: &rusqlite::Connection) {
    crate::common::eventually(std::time::Duration::from_secs(10), || {
        let n = reservation_rows(db);
        async move { (n == 1).then_some(()) }
    })
    .await;
}

/// A group the database refuses (here a trigger injected behind the server's back) answers its
/// requests with our 500, rolls back whole, and leaves the ledger's mirror matching the
/// database (reloaded): the server goes on serving and charges exactly what was served.
#[tokio::test]
async fn a_refused_commit_answers_500_and_loses_nothing() {
    let mock = Mock::start().await;
    let (home, app) = setup(&mock, "").await;
    add(
        &app,
        "openai",
        "sk-refused-1",
        json!({"quota": {"limit": 1000000}}),
    )
    .await;
    let per_request = one_request_used(&app, "sk-refused-1").await;
    assert!(per_request > 0);
    // Room for one more reservation: a reservation the mirror kept from the refused group
    // would leave none for the request after it.
    let reservation = 20 + chat("gpt-4o-mini", false).to_string().len().div_ceil(4) as i64;
    let limit = json!({"limit": per_request + reservation}).to_string();
    let r = app.put("/v0/management/auths/openai/quota", &limit).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let db = open_database(&home);
    db.execute_batch(
        "CREATE TRIGGER injected_failure BEFORE INSERT ON reservations
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .unwrap();
    let refused = v1(&app, "/v1/chat/completions", chat("gpt-4o-mini", false)).await;
    assert_eq!(refused.status, 500, "{}", refused.text);
    assert_eq!(refused.error_code(), "internal_error");
    assert_eq!(
        mock.state.order.lock().unwrap().len(),
        1,
        "nothing reached the provider"
    );

    db.execute_batch("DROP TRIGGER injected_failure").unwrap();
    let again = v1(&app, "/v1/chat/completions", chat("gpt-4o-mini", false)).await;
    assert_eq!(again.status, 200, "{}", again.text);
    let cred = &settled(&app).await["sk-refused-1"];
    assert_eq!(cred["quota"]["used"].as_i64().unwrap(), 2 * per_request);
    assert_eq!(reservation_rows(&db), 0);
}

/// A reservation another process took away while its request was in flight (what a CLI
/// command's start-up does to reservations it takes for a dead process's: delete and charge
/// in full) is not charged a second time when the request settles.
#[tokio::test]
async fn a_settlement_whose_reservation_is_gone_charges_nothing_more() {
    let (mock, home, app) = limited(&["sk-gone-1"], 1_000_000, 0).await;
    let one = |app: Arc<TestApp>| async move {
        let r = v1(&app, "/v1/chat/completions", chat("gpt-4o-mini", false)).await;
        assert_eq!(r.status, 200, "{}", r.text);
    };
    let per_request = one_request_used(&app, "sk-gone-1").await;

    mock.state
        .delay_ms
        .store(300, std::sync::atomic::Ordering::Relaxed);
    let in_flight = tokio::spawn(one(app.clone()));
    let db = open_database(&home);
    until_one_reservation(&db).await;
    let taken: i64 = db
        .query_row("DELETE FROM reservations RETURNING tokens", [], |r| {
            r.get(0)
        })
        .unwrap();
    db.execute("UPDATE quotas SET used = used + ?1", [taken])
        .unwrap();
    in_flight.await.unwrap();
    // The settlement was queued before the answer; the next request's reservation commits
    // after it, and once that request has settled too, every charge is in.
    mock.state
        .delay_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    one(app.clone()).await;
    let cred = &settled(&app).await["sk-gone-1"];
    assert_eq!(
        cred["quota"]["used"].as_i64().unwrap(),
        per_request + taken + per_request
    );
    assert_eq!(reservation_rows(&db), 0);
}

/// A CLI command run beside a live server (here `import`) leaves the server's reservations in
/// flight alone: only a starting server settles what a stopped one left.
#[tokio::test]
async fn a_cli_command_beside_a_live_server_leaves_its_reservations_alone() {
    let (mock, home, app) = limited(&["sk-beside-1"], 1_000_000, 0).await;
    let per_request = one_request_used(&app, "sk-beside-1").await;

    mock.state
        .delay_ms
        .store(3000, std::sync::atomic::Ordering::Relaxed);
    let in_flight = tokio::spawn({
        let app = app.clone();
        async move { v1(&app, "/v1/chat/completions", chat("gpt-4o-mini", false)).await }
    });
    let db = open_database(&home);
    until_one_reservation(&db).await;
    let out = home.run_binary(&["import"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        reservation_rows(&db),
        1,
        "the live reservation is still there"
    );

    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text);
    let cred = &settled(&app).await["sk-beside-1"];
    assert_eq!(cred["quota"]["used"].as_i64().unwrap(), 2 * per_request);
    assert_eq!(reservation_rows(&db), 0);
}

/// A provider that cannot be reached, or that answers after `proxy.request_timeout`: the
/// client gets 502 naming the cause, the credential is not marked (the provider's state is
/// not the key's), and nothing is charged. A stream that runs past the deadline is cut there
/// and charged as cut short.
#[tokio::test]
async fn unreachable_and_late_providers_mark_nothing_and_charge_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let home = Home::new(&format!(
        "api_keys: [\"{CLIENT_KEY}\"]\nproviders:\n  openai: {{ base_url: \"http://127.0.0.1:{port}/v1\" }}\n"
    ));
    let app = home.start().await;
    add(&app, "openai", "sk-nowhere-1", json!({})).await;
    let r = chat_fails(&app, 502, "provider_unreachable").await;
    assert!(r.text.contains("connection refused"), "{}", r.text);
    let a = settled(&app).await;
    assert_eq!(a["sk-nowhere-1"]["status"], "active");
    assert_eq!(a["sk-nowhere-1"]["quota"]["used"], 0);
    app.stop().await;

    let mock = Mock::start().await;
    mock.state.delay_ms.store(3000, Relaxed);
    let (_home, app) = setup(&mock, "proxy:\n  request_timeout: 500ms\n").await;
    add(&app, "openai", "sk-late-1", json!({})).await;
    let started = std::time::Instant::now();
    let r = chat_fails(&app, 502, "provider_unreachable").await;
    assert!(r.text.contains("timed out"), "{}", r.text);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(2500),
        "the deadline ended the wait, not the answer"
    );
    let a = settled(&app).await;
    assert_eq!(a["sk-late-1"]["status"], "active");
    assert_eq!(a["sk-late-1"]["quota"]["used"], 0);

    // Headers and the first chunks in time (150 ms apart), the rest past the deadline.
    add(&app, "openai", "sk-late-2", json!({})).await;
    mock.state.delay_ms.store(150, Relaxed);
    let resp = app
        .client()
        .post(format!("{}/v1/chat/completions", app.base()))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .json(&chat("gpt-4o", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
    }
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("tok0"), "{body}");
    assert!(!body.contains("[DONE]"), "the stream was cut: {body}");
    let a = settled(&app).await;
    assert_eq!(mock.served("sk-late-2").requests, 1);
    let used = a["sk-late-2"]["quota"]["used"].as_u64().unwrap();
    assert!(
        used > 20,
        "a stream cut short is charged at least its reservation (20 + prompt), not {used}"
    );
    app.stop().await;
}

/// Bodies the proxy cannot use get our error JSON and reach no provider; a key given twice
/// reads its last value, as any JSON reader does.
#[tokio::test]
async fn bad_bodies_are_refused_before_any_provider() {
    let mock = Mock::start().await;
    let (_home, app) = setup(&mock, "").await;
    add(&app, "openai", "sk-body-1", json!({})).await;
    let send = |body: Vec<u8>| {
        app.client()
            .post(format!("{}/v1/chat/completions", app.base()))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"model\": ".to_vec(), "invalid_json"),
        (b"[1, 2]".to_vec(), "invalid_body"),
        (b"{\"messages\": []}".to_vec(), "invalid_body"),
        (
            b"{\"model\": \"gpt-4o\", \"messages\": [{\"content\": \"\xff\xfe\"}]}".to_vec(),
            "invalid_json",
        ),
        (
            br#"{"model": "gpt-4o", "stream": true, "messages": [{"content": "x"}]"#.to_vec(),
            "invalid_json",
        ),
        (
            br#"{"model": "gpt-4o", "stream": true} {}"#.to_vec(),
            "invalid_json",
        ),
    ];
    for (body, code) in cases {
        let r = send(body.clone()).await.unwrap();
        let status = r.status().as_u16();
        let json: Value = r.json().await.unwrap();
        assert_eq!(
            (status, json["error"]["code"].as_str().unwrap()),
            (400, code),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    // A Gemini model name that would leave /models/ on the provider's host, or add a query.
    add(&app, "gemini", "gm-body-1", json!({})).await;
    for model in ["..%2F..%2Ffiles", "x%3Falt=sse", "a%2Fb", "..", "%20"] {
        let r = app
            .client()
            .post(format!(
                "{}/v1beta/models/{model}:generateContent",
                app.base()
            ))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .json(&gemini_req())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let json: Value = r.json().await.unwrap();
        assert_eq!(
            (status, json["error"]["code"].as_str().unwrap()),
            (400, "invalid_model"),
            "{model}"
        );
    }
    assert!(mock.order().is_empty(), "nothing reached the provider");
    let r = send(br#"{"model": "nope", "model": "gpt-4o", "messages": []}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.order(), vec!["sk-body-1".to_string()]);
    let a = settled(&app).await;
    assert_eq!(
        a["sk-body-1"]["quota"]["used"].as_u64().unwrap(),
        mock.served("sk-body-1").reported
    );
    app.stop().await;
}
