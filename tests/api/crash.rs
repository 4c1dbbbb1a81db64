//! `kill -9` under concurrent load, then a restart: no reservation is lost or counted twice.

use crate::common::{Api, Home};
use crate::mock::Mock;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[tokio::test]
async fn kill_9_under_load_loses_no_reservation() {
    let mock = Mock::start().await;
    mock.state.delay_ms.store(4, Ordering::Relaxed);
    let home = Home::new(&mock.providers_yaml());
    let server = home.spawn_binary();
    for (provider, token) in [
        ("openai", "sk-k-1"),
        ("openai", "sk-k-2"),
        ("openai", "sk-k-3"),
        ("claude", "sk-ant-k-4"),
    ] {
        let body = json!({"provider": provider, "token": token, "label": token, "quota": {"limit": 100000000}});
        let r = server.post("/v0/management/auths", &body.to_string()).await;
        assert_eq!(r.status, 201);
    }
    let base = server.base.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..48u64 {
        let (base, stop, done) = (base.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 500 {
                n += 1;
                let stream = (i + n).is_multiple_of(2);
                let (path, body) = if i % 4 == 3 {
                    ("/v1/messages", json!({"model": "claude-x", "max_tokens": 20, "stream": stream, "messages": [{"role": "user", "content": "hi there"}]}))
                } else {
                    ("/v1/chat/completions", json!({"model": "gpt-4o", "max_tokens": 20, "stream": stream, "messages": [{"role": "user", "content": "hi there"}]}))
                };
                let sent = client.post(format!("{base}{path}")).json(&body).send().await;
                let Ok(resp) = sent else { break };
                if resp.bytes().await.is_err() {
                    break;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Let the load build, then kill the server in the middle of it.
    crate::common::eventually(std::time::Duration::from_secs(30), || async {
        (done.load(Ordering::Relaxed) >= 150).then_some(())
    })
    .await;
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    // Restart: reservations of the dead process are charged, the database is sound.
    let app = home.start().await;
    let problems = app.state.store.integrity_check().await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let mut dead: HashMap<String, u64> = HashMap::new();
    let mut dead_count = 0;
    for line in app.state.store.audit_dump().await.unwrap() {
        let parts: Vec<&str> = line.splitn(6, ' ').collect();
        if parts[2] == "reservation.settle_dead" {
            let detail: Value = serde_json::from_str(parts[5]).unwrap();
            *dead.entry(parts[3].to_string()).or_default() += detail["tokens"].as_u64().unwrap();
            dead_count += 1;
        }
    }
    assert!(dead_count > 0, "the kill left requests in flight");
    let auths = app.auths().await;
    assert!(
        auths.iter().all(|a| a["quota"]["reserved"] == 0),
        "no reservation is left"
    );
    let totals = app.state.store.usage_totals().await.unwrap();
    for (id, used, history) in totals {
        assert_eq!(
            used,
            history + dead.get(&id).copied().unwrap_or(0),
            "{id}: used {used}, history {history}"
        );
    }
    // A second restart changes nothing: nothing is settled twice.
    let before = app.auths().await;
    app.stop().await;
    let app = home.start().await;
    assert_eq!(app.auths().await, before);
    app.stop().await;
}
