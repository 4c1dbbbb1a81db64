//! Provider default limits (README, "Management API"): the limit a new credential takes when
//! it names none, from `auth.quota.default_limit` or a `PUT .../quota` without `id` (stored,
//! and winning over the config's from then on).

use crate::common::{Api, Home, TestApp};
use serde_json::{Value, json};

/// Add a credential through the API; returns it as answered.
async fn add(app: &impl Api, body: Value) -> Value {
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()
}

/// The limit of the credential whose label is `label`.
async fn limit_of(app: &impl Api, label: &str) -> Value {
    let auths = app.auths().await;
    let a = auths
        .iter()
        .find(|a| a["label"] == label)
        .unwrap_or_else(|| panic!("no credential labelled {label}"));
    a["quota"]["limit"].clone()
}

/// The provider's effective default limit, as the quota view shows it.
async fn default_of(app: &impl Api, provider: &str) -> Value {
    let r = app
        .get(&format!("/v0/management/auths/{provider}/quota"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["default_limit"].clone()
}

async fn lease_status(app: &TestApp, provider: &str, tokens: u64) -> u16 {
    let body = json!({"provider": provider, "estimated_tokens": tokens}).to_string();
    let auth = format!("Bearer {KEY}");
    let headers = [("authorization", auth.as_str())];
    app.call_with("POST", "/v1/credentials/lease", Some(&body), &headers)
        .await
        .status
}

/// The client key the lease is asked with.
const KEY: &str = "default-limits-key";
const OPENAI_500: &str =
    "api_keys: [default-limits-key]\nauth:\n  quota:\n    default_limit:\n      openai: 500\n";

#[tokio::test]
async fn config_default_applies_to_added_and_imported_credentials() {
    let home = Home::new(OPENAI_500);
    home.auth_file(
        "openai.json",
        json!([
            {"token": "sk-file-plain", "label": "file-plain"},
            {"token": "sk-file-own", "label": "file-own", "quota": {"limit": 7}},
            {"token": "sk-file-null", "label": "file-null", "quota": {"limit": null, "used": 3}},
        ])
        .to_string(),
    );
    let app = home.start().await;
    assert_eq!(default_of(&app, "openai").await, 500);
    assert_eq!(default_of(&app, "claude").await, Value::Null);
    // Imported at start: the default unless the entry names its own (null: unlimited).
    assert_eq!(limit_of(&app, "file-plain").await, 500);
    assert_eq!(limit_of(&app, "file-own").await, 7);
    assert_eq!(limit_of(&app, "file-null").await, Value::Null);
    // Added through the API, and imported from a body.
    let a = add(
        &app,
        json!({"provider": "openai", "token": "sk-api", "label": "api"}),
    )
    .await;
    assert_eq!(a["quota"]["limit"], 500);
    assert_eq!(a["quota"]["remaining"], 500);
    let own = json!({"provider": "openai", "token": "sk-api-own", "label": "api-own", "quota": {"limit": 9}});
    assert_eq!(add(&app, own).await["quota"]["limit"], 9);
    let null = json!({"provider": "openai", "token": "sk-api-null", "label": "api-null", "quota": {"limit": null}});
    assert_eq!(add(&app, null).await["quota"]["limit"], Value::Null);
    let c = add(
        &app,
        json!({"provider": "claude", "token": "sk-ant-x", "label": "claude"}),
    )
    .await;
    assert_eq!(c["quota"]["limit"], Value::Null, "no default for claude");
    let body = json!([{"provider": "openai", "token": "sk-body", "label": "body"}]).to_string();
    let r = app.post("/v0/management/auths/import", &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(limit_of(&app, "body").await, 500);
    // The request path holds the new credential to its limit: room for 500, not for 501.
    let r = app
        .delete("/v0/management/auths/openai?id=sk-api-null")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = app
        .delete("/v0/management/auths/openai?id=sk-file-null")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for own in ["sk-file-own", "sk-api-own", "sk-file-plain", "sk-body"] {
        let r = app
            .delete(&format!("/v0/management/auths/openai?id={own}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(lease_status(&app, "openai", 501).await, 429);
    assert_eq!(lease_status(&app, "openai", 500).await, 201);
    app.stop().await;

    // A changed config default changes no credential that exists, only the new ones.
    std::fs::write(
        home.config_path(),
        "host: 127.0.0.1\nport: 0\napi_keys: [default-limits-key]\nauth:\n  quota:\n    default_limit:\n      openai: 600\n",
    )
    .unwrap();
    let app = home.start().await;
    assert_eq!(default_of(&app, "openai").await, 600);
    assert_eq!(limit_of(&app, "api").await, 500);
    let a = add(
        &app,
        json!({"provider": "openai", "token": "sk-later", "label": "later"}),
    )
    .await;
    assert_eq!(a["quota"]["limit"], 600);
    app.stop().await;
}

#[tokio::test]
async fn put_without_id_sets_the_default_and_it_outlives_restarts() {
    let home = Home::new(OPENAI_500);
    let app = home.start().await;
    add(
        &app,
        json!({"provider": "openai", "token": "sk-a", "label": "a"}),
    )
    .await;
    let r = app
        .put("/v0/management/auths/openai/quota", r#"{"limit": 1000}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let q = r.json();
    assert_eq!(q["default_limit"], 1000, "{q}");
    assert_eq!(q["credentials"][0]["limit"], 1000, "{q}");
    assert_eq!(default_of(&app, "openai").await, 1000);
    // Added after: the new default; deleted and added again: the same.
    let b = add(
        &app,
        json!({"provider": "openai", "token": "sk-b", "label": "b"}),
    )
    .await;
    assert_eq!(b["quota"]["limit"], 1000);
    let r = app.delete("/v0/management/auths/openai?id=sk-a").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = add(
        &app,
        json!({"provider": "openai", "token": "sk-a", "label": "a"}),
    )
    .await;
    assert_eq!(a["quota"]["limit"], 1000);
    // One naming its own keeps it; a limit for one credential (`?id=`) is no default.
    let own =
        json!({"provider": "openai", "token": "sk-own", "label": "own", "quota": {"limit": 5}});
    assert_eq!(add(&app, own).await["quota"]["limit"], 5);
    let r = app
        .put(
            "/v0/management/auths/openai/quota?id=sk-own",
            r#"{"limit": 6}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["default_limit"], 1000);
    // `used` or `reset` alone leave the default as it is.
    let r = app
        .put("/v0/management/auths/openai/quota", r#"{"reset": true}"#)
        .await;
    assert_eq!(r.json()["default_limit"], 1000);
    // A provider without credentials takes a default too.
    let r = app
        .put("/v0/management/auths/gemini/quota", r#"{"limit": 42}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["default_limit"], 42);
    // The audit log and the auth log record the change of the default.
    let audit = app.state.store.audit_dump().await.unwrap();
    assert!(
        audit
            .iter()
            .any(|l| l.contains("quota.update") && l.contains("\"default_limit\":1000")),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("quota.update") && l.contains("\"default_limit\":42")),
        "{audit:?}"
    );
    let log = home.auth_log();
    assert!(
        log.contains("the default limit of new credentials 1000"),
        "{log}"
    );
    app.stop().await;

    // The stored default wins over the config's after a restart.
    let app = home.start().await;
    assert_eq!(default_of(&app, "openai").await, 1000);
    assert_eq!(default_of(&app, "gemini").await, 42);
    let c = add(
        &app,
        json!({"provider": "openai", "token": "sk-c", "label": "c"}),
    )
    .await;
    assert_eq!(c["quota"]["limit"], 1000);
    assert_eq!(limit_of(&app, "own").await, 6);
    // `limit: null` without an id: every credential and the default unlimited, stored so, over
    // the config's 500.
    let r = app
        .put("/v0/management/auths/openai/quota", r#"{"limit": null}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let q = r.json();
    assert_eq!(q["default_limit"], Value::Null, "{q}");
    assert_eq!(q["total"]["limit"], Value::Null, "{q}");
    let audit = app.state.store.audit_dump().await.unwrap();
    assert!(
        audit.iter().any(|l| l.contains("\"default_limit\":null")),
        "{audit:?}"
    );
    assert!(
        home.auth_log()
            .contains("the default limit of new credentials unlimited")
    );
    app.stop().await;
    let app = home.start().await;
    assert_eq!(default_of(&app, "openai").await, Value::Null);
    let d = add(
        &app,
        json!({"provider": "openai", "token": "sk-d", "label": "d"}),
    )
    .await;
    assert_eq!(d["quota"]["limit"], Value::Null);
    app.stop().await;
}

#[tokio::test]
async fn a_changed_import_file_without_a_limit_takes_the_default() {
    let home = Home::new(OPENAI_500);
    home.auth_file("openai.json", r#"{"token": "sk-f", "label": "f1"}"#);
    let app = home.start().await;
    assert_eq!(limit_of(&app, "f1").await, 500);
    let r = app
        .put("/v0/management/auths/openai/quota", r#"{"limit": 800}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The file changes (its label): its credential is updated, with the default limit as it
    // names none.
    home.auth_file("openai.json", r#"{"token": "sk-f", "label": "f2"}"#);
    let r = app
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await;
    assert_eq!(r.json()["updated"], 1, "{}", r.text);
    assert_eq!(limit_of(&app, "f2").await, 800);
    home.auth_file(
        "openai.json",
        r#"{"token": "sk-f", "label": "f3", "quota": {"limit": null}}"#,
    );
    let r = app
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await;
    assert_eq!(r.json()["updated"], 1, "{}", r.text);
    assert_eq!(limit_of(&app, "f3").await, Value::Null);
    app.stop().await;
}

#[tokio::test]
async fn bad_default_limits_are_refused_at_start() {
    for (yaml, key) in [
        ("openai: -1", "auth.quota.default_limit.openai"),
        (
            "openai: 1000000000000001",
            "auth.quota.default_limit.openai",
        ),
        ("openai: lots", "auth.quota.default_limit.openai"),
        ("nope: 5", "auth.quota.default_limit.nope"),
    ] {
        let home = Home::new(&format!(
            "auth:\n  quota:\n    default_limit:\n      {yaml}\n"
        ));
        let out = home.run_binary(&["import"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {stderr}");
        assert!(stderr.contains(key), "{yaml}: {stderr}");
    }
    // The bound itself is accepted.
    let home = Home::new("auth:\n  quota:\n    default_limit:\n      openai: 1000000000000000\n");
    let out = home.run_binary(&["import"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
