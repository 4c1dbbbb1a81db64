//! Every management example of the seed guide (`authentication-guide.txt`), as printed.

use crate::common::{Api, Home};
use serde_json::Value;

fn claude(auths: &[Value]) -> Vec<&Value> {
    auths.iter().filter(|a| a["provider"] == "claude").collect()
}

#[tokio::test]
async fn method_1_files_are_imported_at_start() {
    let home = Home::new("");
    home.auth_file(
        "claude.json",
        "{\n  \"type\": \"api_key\",\n  \"token\": \"sk-ant-xxxxx\",\n  \"priority\": 1\n}\n",
    );
    home.auth_file(
        "openai.json",
        "{\n  \"type\": \"api_key\",\n  \"token\": \"sk-xxxxx\",\n  \"priority\": 2\n}\n",
    );
    home.auth_file(
        "gemini.json",
        "{\n  \"type\": \"api_key\",\n  \"token\": \"AIzaSyxxxxx\",\n  \"priority\": 3\n}\n",
    );
    let app = home.start().await;
    assert_eq!(app.import_report.imported, 3);
    let auths = app.auths().await;
    let mut got: Vec<(String, i64)> = auths
        .iter()
        .map(|a| {
            assert_eq!(a["type"], "api_key");
            assert_eq!(a["status"], "active");
            assert_eq!(
                a["source"],
                format!(
                    "file:{}/auths/{}.json",
                    home.path().display(),
                    a["provider"].as_str().unwrap()
                )
            );
            (
                a["provider"].as_str().unwrap().to_string(),
                a["priority"].as_i64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("claude".into(), 1),
            ("gemini".into(), 3),
            ("openai".into(), 2)
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn understanding_quotas_file_shape() {
    let home = Home::new("");
    home.auth_file(
        "claude.json",
        r#"{
  "type": "api_key",
  "token": "sk-ant-xxxxx",
  "quota": {
    "limit": 1000000,
    "used": 50000,
    "remaining": 950000
  }
}"#,
    );
    let app = home.start().await;
    let auths = app.auths().await;
    assert_eq!(auths.len(), 1);
    let q = &auths[0]["quota"];
    assert_eq!(q["limit"], 1000000);
    assert_eq!(q["used"], 50000);
    assert_eq!(q["remaining"], 950000);
    app.stop().await;
}

#[tokio::test]
async fn method_3_and_multiple_credentials_and_monitoring() {
    let home = Home::new("");
    let app = home.start().await;
    // Method 3: add an API key, then add one with a priority.
    let r = app
        .post(
            "/v0/management/auths",
            r#"{
    "provider": "claude",
    "type": "api_key",
    "token": "sk-ant-xxxxx"
  }"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let first = r.json();
    assert_eq!(first["priority"], 100, "default priority");
    assert!(first["id"].as_str().unwrap().starts_with("cred_"));
    // The guide's second example re-posts the same token with a priority: the same credential.
    let r = app
        .post(
            "/v0/management/auths",
            r#"{
    "provider": "claude",
    "type": "api_key",
    "token": "sk-ant-xxxxx",
    "priority": 10
  }"#,
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.error_code(), "duplicate_credential");
    assert_eq!(r.json()["error"]["id"], first["id"]);

    // Adding Multiple Credentials.
    for (token, priority) in [("sk-ant-key1", 1), ("sk-ant-key2", 2)] {
        let r = app
            .post(
                "/v0/management/auths",
                &format!(
                    r#"{{
    "provider": "claude",
    "type": "api_key",
    "token": "{token}",
    "priority": {priority}
  }}"#
                ),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }

    // Setting Quotas: every claude credential gets the limit.
    let r = app
        .put(
            "/v0/management/auths/claude/quota",
            r#"{
    "limit": 1000000
  }"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let q = r.json();
    assert_eq!(q["provider"], "claude");
    assert_eq!(q["total"]["limit"], 3000000);
    assert_eq!(q["credentials"].as_array().unwrap().len(), 3);

    // Monitoring Credentials: the fields the guide shows.
    let auths = app.auths().await;
    let claude = claude(&auths);
    assert_eq!(claude.len(), 3);
    assert_eq!(claude[0]["priority"], 1, "listed by priority");
    assert_eq!(claude[1]["priority"], 2);
    for a in &claude {
        assert_eq!(a["provider"], "claude");
        assert_eq!(a["type"], "api_key");
        assert_eq!(a["status"], "active");
        assert_eq!(a["quota"]["limit"], 1000000);
        assert_eq!(a["quota"]["used"], 0);
        assert_eq!(a["quota"]["remaining"], 1000000);
    }
    app.stop().await;
}

#[tokio::test]
async fn manual_rotation_deletes_by_token() {
    let home = Home::new("");
    let app = home.start().await;
    for (token, priority) in [("sk-ant-key1", 1), ("sk-ant-key2", 2)] {
        let body = format!(
            r#"{{"provider": "claude", "type": "api_key", "token": "{token}", "priority": {priority}}}"#
        );
        assert_eq!(app.post("/v0/management/auths", &body).await.status, 201);
    }
    // Remove exhausted credential (by its token, as printed).
    let r = app
        .delete("/v0/management/auths/claude?id=sk-ant-key1")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Add new credential.
    let r = app
        .post(
            "/v0/management/auths",
            r#"{
    "provider": "claude",
    "type": "api_key",
    "token": "sk-ant-key3",
    "priority": 1
  }"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let auths = app.auths().await;
    let previews: Vec<&str> = auths
        .iter()
        .map(|a| a["token_preview"].as_str().unwrap())
        .collect();
    assert_eq!(auths.len(), 2);
    assert_eq!(auths[0]["priority"], 1);
    assert_eq!(auths[1]["priority"], 2);
    assert!(!previews.contains(&"sk-ant-key1"));
    // Deleting again: not found.
    let r = app
        .delete("/v0/management/auths/claude?id=sk-ant-key1")
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "credential_not_found");
    app.stop().await;
}

#[tokio::test]
async fn api_reference() {
    let home = Home::new("");
    let app = home.start().await;
    // Add Auth
    let r = app
        .post(
            "/v0/management/auths",
            r#"{
  "provider": "claude",
  "type": "api_key",
  "token": "sk-ant-xxxxx",
  "priority": 1
}"#,
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    // Get Auth for Provider
    let r = app.get("/v0/management/auths/claude").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["provider"], "claude");
    assert_eq!(v["auths"].as_array().unwrap().len(), 1);
    // Update Auth (the provider's only credential, no id needed)
    let r = app
        .put(
            "/v0/management/auths/claude",
            r#"{
  "token": "sk-ant-new-token",
  "priority": 2
}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["priority"], 2);
    assert_eq!(r.json()["id"], id.as_str());
    // Get Quota / Update Quota
    let r = app.get("/v0/management/auths/claude/quota").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["total"]["limit"], Value::Null);
    let r = app
        .put(
            "/v0/management/auths/claude/quota",
            r#"{
  "limit": 1000000
}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let r = app.get("/v0/management/auths/claude/quota").await;
    let q = r.json();
    assert_eq!(q["total"]["limit"], 1000000);
    assert_eq!(q["credentials"][0]["id"], id.as_str());
    assert_eq!(q["credentials"][0]["remaining"], 1000000);
    // List All Auths
    assert_eq!(app.auths().await.len(), 1);
    // Delete Auth by credential id
    let r = app
        .delete(&format!("/v0/management/auths/claude?id={id}"))
        .await;
    assert_eq!(r.status, 200);
    assert!(app.auths().await.is_empty());
    app.stop().await;
}
