//! Proxying Copilot with the exchanged token (README, "Token
//! refresh"): against a local mock of the Copilot token exchange and of Copilot's chat API,
//! a chat completion carries the exchanged token and the configured editor headers, and the
//! token answer's `endpoints.api` is stored only when it is https on an allowed host.

use crate::common::{Api, Home, TestApp, eventually};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use cliproxyapi::domain::CredentialId;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "copilot-client-key";
const WAIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Seen {
    /// The `endpoints.api` the next token answers name.
    api: Mutex<String>,
    exchanges: Mutex<Vec<HeaderMap>>,
    chats: Mutex<Vec<(HeaderMap, Value)>>,
    issued: AtomicUsize,
}

struct Mock {
    base: String,
    seen: Arc<Seen>,
}

impl Mock {
    async fn start(api: &str) -> Mock {
        let seen = Arc::new(Seen::default());
        *seen.api.lock().unwrap() = api.to_string();
        let app = axum::Router::new()
            .route("/copilot_internal/v2/token", get(exchange))
            .route("/chat/completions", post(chat))
            .with_state(seen.clone());
        let base = crate::common::serve(app).await;
        Mock { base, seen }
    }

    fn answer_api(&self, api: &str) {
        *self.seen.api.lock().unwrap() = api.to_string();
    }
}

async fn exchange(State(s): State<Arc<Seen>>, headers: HeaderMap) -> Json<Value> {
    s.exchanges.lock().unwrap().push(headers);
    let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let now = chrono::Utc::now().timestamp();
    let api = s.api.lock().unwrap().clone();
    Json(json!({
        "token": format!("tid=copilot-{n}"),
        "expires_at": now + 1800,
        "refresh_in": 1500,
        "endpoints": {"api": api, "proxy": "https://proxy.example"}
    }))
}

async fn chat(
    State(s): State<Arc<Seen>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Json<Value> {
    s.chats.lock().unwrap().push((headers, body));
    Json(crate::common::chat_completion("gpt-4o"))
}

/// A server whose copilot credential (a GitHub token alone) gets its first Copilot token at
/// the refresh worker's first check, that check over; `extra` adds config lines.
async fn start(mock: &Mock, extra: &str) -> (Home, TestApp, CredentialId) {
    let b = &mock.base;
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  refresh:\n    check_interval: 1h\n\
         oauth:\n  copilot:\n    github_base_url: \"{b}\"\n    api_base_url: \"{b}\"\n{extra}"
    ));
    home.auth_file(
        "copilot.json",
        json!({"type": "oauth", "refresh_token": "gho-github-token"}).to_string(),
    );
    let app = home.start().await;
    let id = eventually(WAIT, || async {
        let r = app.get("/v0/management/auths/copilot").await;
        let c = r.json()["auths"][0].clone();
        (c["status"] == "active").then(|| CredentialId::from(c["id"].as_str().unwrap()))
    })
    .await;
    // Active once the token is stored, but the check's refresh is shared until it ends: a
    // manual refresh before then joins it rather than calling the exchange again.
    crate::refresh::first_check(&app).await;
    (home, app, id)
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name}: {headers:?}"))
}

/// (a) A chat completion for `copilot/gpt-4o` reaches the configured `base_url` with the
/// exchanged token and every configured header; `providers.copilot.base_url` wins over the
/// allowed `endpoints.api` the token answer named (which is stored all the same).
#[tokio::test]
async fn chat_reaches_copilot_with_the_exchanged_token_and_its_headers() {
    let mock = Mock::start("https://api.business.githubcopilot.com").await;
    let b = mock.base.clone();
    let (_home, app, id) = start(
        &mock,
        &format!(
            "    headers:\n      editor-version: vscode/1.100.0\n      openai-intent: conversation-agent\n      X-Interaction-Type: conversation-agent\n      copilot-integration-id: \"\"\n\
             providers:\n  copilot:\n    base_url: \"{b}\"\n"
        ),
    )
    .await;
    // The exchange presented the configured editor.
    {
        let exchanges = mock.seen.exchanges.lock().unwrap();
        let sent = &exchanges[0];
        assert_eq!(header(sent, "authorization"), "token gho-github-token");
        assert_eq!(header(sent, "editor-version"), "vscode/1.100.0");
        assert_eq!(header(sent, "editor-plugin-version"), "copilot-chat/0.26.7");
        assert_eq!(header(sent, "user-agent"), "GitHubCopilotChat/0.26.7");
        assert_eq!(header(sent, "x-github-api-version"), "2025-04-01");
        assert!(
            sent.get("openai-intent").is_none(),
            "chat headers only on chats"
        );
    }
    assert_eq!(
        app.state.store.api_base(&id).as_deref(),
        Some("https://api.business.githubcopilot.com")
    );

    let text = json!({"model": "copilot/gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let image = json!({"model": "copilot/gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    ]}]});
    for body in [&text, &image] {
        let r = app.post_as(KEY, "/v1/chat/completions", body).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let chats = mock.seen.chats.lock().unwrap().clone();
    assert_eq!(chats.len(), 2);
    for (sent, body) in chats.iter() {
        assert_eq!(header(sent, "authorization"), "Bearer tid=copilot-1");
        assert_eq!(header(sent, "editor-version"), "vscode/1.100.0");
        assert_eq!(header(sent, "editor-plugin-version"), "copilot-chat/0.26.7");
        assert_eq!(header(sent, "openai-intent"), "conversation-agent");
        assert_eq!(header(sent, "x-interaction-type"), "conversation-agent");
        assert_eq!(header(sent, "x-github-api-version"), "2025-04-01");
        assert_eq!(header(sent, "user-agent"), "GitHubCopilotChat/0.26.7");
        assert!(
            sent.get("copilot-integration-id").is_none(),
            "\"\" removed it"
        );
        assert_eq!(header(sent, "x-request-id").len(), 36);
        assert_eq!(body["model"], "gpt-4o");
    }
    assert_ne!(
        header(&chats[0].0, "x-request-id"),
        header(&chats[1].0, "x-request-id"),
        "a fresh id per request"
    );
    assert!(chats[0].0.get("copilot-vision-request").is_none());
    assert_eq!(header(&chats[1].0, "copilot-vision-request"), "true");
    app.stop().await;
}

/// (b) An `endpoints.api` that is not https on an allowed host is not stored (so not
/// followed); an allowed one is, and an answer that no longer names an allowed one removes it.
#[tokio::test]
async fn only_allowed_https_api_endpoints_are_stored() {
    let mock = Mock::start("https://evil.example").await;
    let (_home, app, id) = start(&mock, "").await;
    assert_eq!(app.state.store.api_base(&id), None);
    let refresh = || async {
        let r = app.post("/v0/management/auths/copilot/refresh", "").await;
        assert_eq!(r.status, 200, "{}", r.text);
    };
    let stored = || async {
        let m = app.state.store.refresh_material(&id).await.unwrap();
        let base = app.state.store.api_base(&id);
        assert_eq!(
            m.extra.api_base.as_deref(),
            base.as_deref(),
            "mirror and row agree"
        );
        m.extra.api_base
    };
    for refused in [
        "http://api.githubcopilot.com",
        "https://api.githubcopilot.com.evil.com",
        "https://user@api.githubcopilot.com",
        &mock.base,
    ] {
        mock.answer_api(refused);
        refresh().await;
        assert_eq!(stored().await, None, "{refused}");
    }
    mock.answer_api("https://api.individual.githubcopilot.com/");
    refresh().await;
    assert_eq!(
        stored().await.as_deref(),
        Some("https://api.individual.githubcopilot.com")
    );
    // A lease names the base its holder is to call.
    let lease = || async {
        let r = app
            .post_as(
                KEY,
                "/v1/credentials/lease",
                &json!({"provider": "copilot"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let v = r.json();
        let path = format!(
            "/v1/credentials/lease/{}/report",
            v["lease_id"].as_str().unwrap()
        );
        let done = app.post_as(KEY, &path, &json!({"tokens_used": 1})).await;
        assert!(done.status < 300, "{}", done.text);
        v["base_url"].as_str().unwrap().to_string()
    };
    assert_eq!(lease().await, "https://api.individual.githubcopilot.com");
    mock.answer_api("https://evil.example");
    refresh().await;
    assert_eq!(stored().await, None, "the stale one is removed");
    assert_eq!(lease().await, "https://api.githubcopilot.com");
    assert_eq!(mock.seen.issued.load(Ordering::SeqCst), 7);
    app.stop().await;
}
