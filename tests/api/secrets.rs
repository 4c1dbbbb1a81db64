//! No token appears in clear in any API response or in `logs/auth.log`: a whole scenario runs,
//! every response is kept, and all of them and the log are searched for every token.

use crate::common::{Api, Home, Resp};
use serde_json::json;

const TOKENS: &[&str] = &[
    "sk-ant-api03-SECRETfileAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "sk-proj-SECRETfileBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
    "sk-ant-api03-SECRETpostCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
    "sk-ant-api03-SECRETputDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD",
    "AIzaSECRETbulkEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE",
    "gho_SECRETrefreshFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF",
    "tid_SECRETaccessGGGGGGGGGGGGGGGGGGGGGGGGGGGGGGG",
    "kiro-SECRETclientHHHHHHHHHHHHHHHHHHHHHHHHHHHHHH",
    "short1",
];

/// The distinctive middle of a token: a response must not hold even that.
fn core(token: &str) -> &str {
    if token.len() > 20 {
        &token[8..token.len() - 6]
    } else {
        token
    }
}

#[tokio::test]
async fn no_token_in_any_response_or_the_log() {
    let home = Home::new("");
    home.auth_file(
        "claude.json",
        json!({"token": TOKENS[0], "label": "file"}).to_string(),
    );
    home.auth_file("openai.json", json!([{"token": TOKENS[1]}]).to_string());
    let app = home.start().await;
    let mut seen: Vec<Resp> = Vec::new();
    let r = app
        .post(
            "/v0/management/auths",
            &json!({"provider": "claude", "type": "api_key", "token": TOKENS[2], "priority": 1})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    seen.push(r);
    // Duplicate: the error names the id, not the token.
    seen.push(
        app.post(
            "/v0/management/auths",
            &json!({"provider": "claude", "token": TOKENS[2]}).to_string(),
        )
        .await,
    );
    seen.push(
        app.put(
            &format!("/v0/management/auths/claude?id={id}"),
            &json!({"token": TOKENS[3]}).to_string(),
        )
        .await,
    );
    // A bad token value in a body: the error names the field, not the value.
    seen.push(
        app.put(
            &format!("/v0/management/auths/claude?id={id}"),
            &json!({"token": format!("{} x", TOKENS[3])}).to_string(),
        )
        .await,
    );
    seen.push(
        app.post(
            "/v0/management/auths",
            &json!({"provider": "claude", "token": TOKENS[3], "colour": TOKENS[3]}).to_string(),
        )
        .await,
    );
    seen.push(
        app.post(
            "/v0/management/auths/import",
            &json!({"auths": [
                {"provider": "gemini", "token": TOKENS[4]},
                {"provider": "copilot", "type": "oauth", "refresh_token": TOKENS[5], "access_token": TOKENS[6],
                 "expires_at": "2030-01-01T00:00:00Z"},
                {"provider": "kiro", "type": "oauth", "refresh_token": TOKENS[8], "client_id": "cid",
                 "client_secret": TOKENS[7], "region": "us-east-1", "auth_method": "builder_id"},
                {"provider": "nope", "token": TOKENS[4]}
            ]})
            .to_string(),
        )
        .await,
    );
    seen.push(app.get("/v0/management/auths").await);
    for p in ["claude", "openai", "gemini", "copilot", "kiro"] {
        seen.push(app.get(&format!("/v0/management/auths/{p}")).await);
        seen.push(app.get(&format!("/v0/management/auths/{p}/quota")).await);
    }
    seen.push(
        app.put(
            "/v0/management/auths/claude/quota",
            r#"{"limit": 5, "used": 9}"#,
        )
        .await,
    );
    seen.push(app.get("/v0/management/auths?status=exhausted").await);
    // Delete by token: the token is in the request, never in the answer or the log.
    seen.push(
        app.delete(&format!("/v0/management/auths/openai?id={}", TOKENS[1]))
            .await,
    );
    seen.push(
        app.delete(&format!("/v0/management/auths/openai?id={}", TOKENS[1]))
            .await,
    );
    seen.push(
        app.post("/v0/management/auths/import", r#"{"rescan": true}"#)
            .await,
    );
    app.stop().await;

    let log = home.auth_log();
    assert!(log.lines().count() >= 8, "the scenario was logged:\n{log}");
    for token in TOKENS {
        for r in &seen {
            assert!(
                !r.text.contains(core(token)),
                "token {token} in a response: {}",
                r.text
            );
        }
        assert!(!log.contains(core(token)), "token {token} in auth.log");
    }
    // The audit log in the database names actions, never secrets.
    let app = home.start().await;
    let audit = app.state.store.audit_dump().await.unwrap();
    assert!(audit.len() >= 8);
    for token in TOKENS {
        assert!(
            !audit.iter().any(|l| l.contains(core(token))),
            "token {token} in the audit log"
        );
    }
    app.stop().await;
}
