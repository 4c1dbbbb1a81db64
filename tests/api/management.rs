//! The management API beyond the seed's examples: filters, paging, updates, quotas, bulk
//! import, tombstones, and the loopback policy.

use crate::common::{Api, Home, by_label};
use serde_json::{Value, json};

async fn add(app: &impl Api, body: Value) -> Value {
    let r = app.post("/v0/management/auths", &body.to_string()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()
}

#[tokio::test]
async fn filters_paging_and_status() {
    let home = Home::new("");
    let app = home.start().await;
    for i in 0..12 {
        add(&app, json!({"provider": "openai", "token": format!("sk-o{i}"), "label": format!("o{i}"), "priority": 12 - i})).await;
    }
    add(
        &app,
        json!({"provider": "claude", "token": "sk-ant-1", "label": "c1", "disabled": true}),
    )
    .await;
    add(&app, json!({"provider": "claude", "token": "sk-ant-2", "label": "c2", "quota": {"limit": 10, "used": 10}})).await;
    add(
        &app,
        json!({"provider": "copilot", "type": "oauth", "access_token": "tid_1", "label": "p1",
                     "expires_at": "2020-01-01T00:00:00Z"}),
    )
    .await;
    add(&app, json!({"provider": "copilot", "type": "oauth", "access_token": "tid_2", "refresh_token": "gho_2",
                     "label": "p2", "expires_at": "2020-01-01T00:00:00Z"})).await;

    let page = |q: &str| {
        let path = format!("/v0/management/auths?{q}");
        let app = &app;
        async move {
            let r = app.get(&path).await;
            assert_eq!(r.status, 200, "{}", r.text);
            r.json()["auths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["label"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let openai = page("provider=openai").await;
    assert_eq!(openai.len(), 12);
    assert_eq!(openai[0], "o11", "lowest priority number first");
    assert_eq!(page("provider=openai&limit=5").await, openai[..5]);
    // The third page of five: after the `next` cursors of the first two.
    let mut after = String::new();
    for _ in 0..2 {
        let path = format!("/v0/management/auths?provider=openai&limit=5{after}");
        let next = app.get(&path).await.json()["next"]
            .as_str()
            .unwrap()
            .to_string();
        after = format!("&after={next}");
    }
    assert_eq!(
        page(&format!("provider=openai&limit=5{after}")).await,
        openai[10..]
    );
    assert_eq!(page("status=disabled").await, ["c1"]);
    assert_eq!(page("status=exhausted").await, ["c2"]);
    assert_eq!(
        page("status=expired").await,
        ["p1", "p2"],
        "past expires_at: expired, refreshable or not"
    );
    assert!(page("status=active&provider=copilot").await.is_empty());
    assert_eq!(page("status=active&limit=3").await.len(), 3);
    let all = app.auths().await;
    assert_eq!(all.len(), 16);
    let c2 = by_label(&all, "c2");
    assert_eq!(c2["status"], "exhausted");
    assert!(c2["status_reason"].as_str().unwrap().contains("10"));
    assert_eq!(c2["quota"]["remaining"], 0);
    assert_eq!(by_label(&all, "p1")["status_reason"], "token expired");
    assert_eq!(by_label(&all, "p2")["status_reason"], "awaiting refresh");
    assert_eq!(by_label(&all, "o0")["quota"]["limit"], Value::Null);
    assert_eq!(by_label(&all, "o0")["quota"]["remaining"], Value::Null);
    app.stop().await;
}

#[tokio::test]
async fn updates_quota_and_import_rules() {
    let home = Home::new("");
    let app = home.start().await;
    let a = add(
        &app,
        json!({"provider": "claude", "token": "sk-ant-u1", "label": "u1"}),
    )
    .await;
    let id = a["id"].as_str().unwrap();
    // Update: label cleared, disabled, expires_at set, token changed.
    let r = app
        .put(&format!("/v0/management/auths/claude?id={id}"),
             r#"{"label": null, "disabled": true, "expires_at": "2031-05-01T10:00:00Z", "token": "sk-ant-u1-new"}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["label"], Value::Null);
    assert_eq!(v["status"], "disabled");
    assert_eq!(v["disabled"], true);
    assert_eq!(v["expires_at"], "2031-05-01T10:00:00Z");
    // The new token finds it, the old one does not.
    let r = app
        .put(
            "/v0/management/auths/claude?id=sk-ant-u1-new",
            r#"{"disabled": false}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "active");
    assert_eq!(
        app.put(
            "/v0/management/auths/claude?id=sk-ant-u1",
            r#"{"disabled": false}"#
        )
        .await
        .status,
        404
    );

    // Quota: used, limit, reset, unlimited.
    let q = app
        .put(
            &format!("/v0/management/auths/claude/quota?id={id}"),
            r#"{"limit": 100, "used": 100}"#,
        )
        .await
        .json();
    assert_eq!(q["credentials"][0]["remaining"], 0);
    assert_eq!(app.auths().await[0]["status"], "exhausted");
    let q = app
        .put("/v0/management/auths/claude/quota", r#"{"reset": true}"#)
        .await
        .json();
    assert_eq!(q["credentials"][0]["used"], 0);
    assert_eq!(app.auths().await[0]["status"], "active");
    let q = app
        .put("/v0/management/auths/claude/quota", r#"{"limit": null}"#)
        .await
        .json();
    assert_eq!(q["total"]["limit"], Value::Null);
    assert_eq!(q["total"]["remaining"], Value::Null);

    // Bulk import through the body: any file shape; re-posting is idempotent.
    let body = json!([{"provider": "gemini", "token": "AIza-b1"}, {"provider": "gemini", "token": "AIza-b2", "quota": {"used": 5}}]).to_string();
    let r = app.post("/v0/management/auths/import", &body).await.json();
    assert_eq!(
        (r["imported"].as_u64(), r["skipped"].as_u64()),
        (Some(2), Some(0))
    );
    let r = app.post("/v0/management/auths/import", &body).await.json();
    assert_eq!(
        (r["imported"].as_u64(), r["skipped"].as_u64()),
        (Some(0), Some(2))
    );
    // A deleted credential: a file import skips it, a body import (an explicit add) restores it.
    let r = app.delete("/v0/management/auths/gemini?id=AIza-b1").await;
    assert_eq!(r.status, 200);
    home.auth_file("gemini.json", r#"{"token": "AIza-b1"}"#);
    let r = app
        .post("/v0/management/auths/import", r#"{"rescan": true}"#)
        .await
        .json();
    assert_eq!(
        (r["imported"].as_u64(), r["skipped"].as_u64()),
        (Some(0), Some(1)),
        "{r}"
    );
    assert!(
        r["notices"][0]["notice"]
            .as_str()
            .unwrap()
            .contains("deleted through the management API")
    );
    let r = app.post("/v0/management/auths/import", &body).await.json();
    assert_eq!(
        (r["imported"].as_u64(), r["skipped"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    // Export imports again: the list response is accepted as a body (tokens are never in it,
    // so every entry reports its missing token, and nothing changes).
    let export = app.get("/v0/management/auths").await.text;
    let r = app
        .post("/v0/management/auths/import", &export)
        .await
        .json();
    assert_eq!(r["imported"], 0);
    assert!(
        r["errors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["error"] == "token is required"),
        "{r}"
    );
    app.stop().await;
}
