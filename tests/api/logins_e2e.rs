//! Device-flow logins end to end (issue 14, acceptance 1 and 2 through the login routes):
//! the real copilot and kiro flows against local mocks of GitHub and the Copilot token
//! exchange, and of AWS SSO OIDC: start, the code shown, a `slow_down`, approval, the
//! credential stored sealed, status `success`, and the credential then serving.

use crate::common::{Api, Home, eventually};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use cliproxyapi::crypto::EncryptionKey;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "logins-client-key";
const WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Seen {
    polls: Mutex<Vec<(Instant, String)>>,
    answers: AtomicUsize,
    exchanges: Mutex<Vec<String>>,
    chats: Mutex<Vec<String>>,
    /// What the kiro mock's token endpoint answers, in order, then a token.
    kiro_errors: Mutex<Vec<&'static str>>,
}

fn auth_header(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// GitHub's device code endpoint: one-second interval.
async fn device_code() -> Json<Value> {
    Json(json!({
        "device_code": "gh-device-code-e2e-0123456789",
        "user_code": "WDJB-MJHT",
        "verification_uri": "https://github.com/login/device",
        "expires_in": 900,
        "interval": 1
    }))
}

/// GitHub's token endpoint: pending, then slow_down naming a 2 s interval, then the token.
async fn access_token(State(s): State<Arc<Seen>>, body: String) -> Json<Value> {
    s.polls.lock().unwrap().push((Instant::now(), body));
    match s.answers.fetch_add(1, Ordering::SeqCst) {
        0 => Json(json!({"error": "authorization_pending"})),
        1 => Json(json!({"error": "slow_down", "interval": 2})),
        _ => Json(
            json!({"access_token": "gho-e2e-github-token", "token_type": "bearer", "scope": "read:user"}),
        ),
    }
}

async fn exchange(State(s): State<Arc<Seen>>, headers: HeaderMap) -> Json<Value> {
    s.exchanges.lock().unwrap().push(auth_header(&headers));
    let now = chrono::Utc::now().timestamp();
    Json(json!({"token": "tid=copilot-e2e-token", "expires_at": now + 1800, "refresh_in": 1500}))
}

async fn chat(State(s): State<Arc<Seen>>, headers: HeaderMap) -> Json<Value> {
    s.chats.lock().unwrap().push(auth_header(&headers));
    Json(json!({
        "id": "c1", "object": "chat.completion", "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    }))
}

fn raw_data(home: &Home) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(home.path().join("data")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn enc(key: &str) -> String {
    format!("  encryption:\n    enabled: true\n    key: \"{key}\"\n")
}

#[tokio::test]
async fn copilot_login_against_mocks_then_a_chat_with_the_exchanged_token() {
    let seen = Arc::new(Seen::default());
    let b = crate::common::serve(
        axum::Router::new()
            .route("/login/device/code", post(device_code))
            .route("/login/oauth/access_token", post(access_token))
            .route("/copilot_internal/v2/token", get(exchange))
            .route("/chat/completions", post(chat))
            .with_state(seen.clone()),
    )
    .await;
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n{}oauth:\n  copilot:\n    github_base_url: \"{b}\"\n    api_base_url: \"{b}\"\n\
         providers:\n  copilot:\n    base_url: \"{b}\"\n",
        enc(&key)
    ));
    let app = home.start().await;
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let started = r.json();
    assert_eq!(started["user_code"], "WDJB-MJHT");
    assert_eq!(
        started["verification_uri"],
        "https://github.com/login/device"
    );
    assert_eq!(started["interval"], 1);
    let session = started["session"].as_str().unwrap().to_string();
    let path = format!("/v0/oauth/copilot/status?session={session}");
    assert_eq!(app.get(&path).await.json()["status"], "pending");

    let s = eventually(WAIT, || async {
        let s = app.get(&path).await.json();
        (s["status"] != "pending").then_some(s)
    })
    .await;
    assert_eq!(s["status"], "success", "{s}");
    let polls = seen.polls.lock().unwrap().clone();
    assert_eq!(polls.len(), 3);
    assert!(
        polls
            .iter()
            .all(|(_, body)| body.contains("gh-device-code-e2e-0123456789"))
    );
    let gap = polls[2].0 - polls[1].0;
    assert!(gap >= Duration::from_secs(2), "{gap:?} after slow_down");
    // The GitHub token was exchanged at once.
    assert_eq!(
        seen.exchanges.lock().unwrap().clone(),
        vec!["token gho-e2e-github-token".to_string()]
    );
    let auths = app.auths().await;
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0]["id"], s["credential_id"]);
    assert_eq!(auths[0]["status"], "active", "{}", auths[0]);

    let body = json!({"model": "copilot/gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let r = app.post_as(KEY, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        seen.chats.lock().unwrap().clone(),
        vec!["Bearer tid=copilot-e2e-token".to_string()]
    );
    app.stop().await;
    let raw = raw_data(&home);
    for secret in [
        "gh-device-code-e2e-0123456789",
        "gho-e2e-github-token",
        "tid=copilot-e2e-token",
    ] {
        assert!(!contains(&raw, secret), "{secret} in clear on disk");
    }
}

/// AWS SSO OIDC: register, device authorization, token (errors first, in order).
async fn kiro_register() -> Json<Value> {
    let now = chrono::Utc::now().timestamp();
    Json(json!({
        "clientId": "kiro-client-id-e2e", "clientSecret": "kiro-client-secret-e2e",
        "clientIdIssuedAt": now, "clientSecretExpiresAt": now + 90 * 86400
    }))
}

async fn kiro_device() -> Json<Value> {
    Json(json!({
        "deviceCode": "kiro-device-code-e2e", "userCode": "KIRO-CODE",
        "verificationUri": "https://device.sso.us-east-1.amazonaws.com/",
        "verificationUriComplete": "https://device.sso.us-east-1.amazonaws.com/?user_code=KIRO-CODE",
        "expiresIn": 600, "interval": 1
    }))
}

async fn kiro_token(State(s): State<Arc<Seen>>, body: String) -> axum::response::Response {
    s.polls.lock().unwrap().push((Instant::now(), body));
    let next = {
        let mut errors = s.kiro_errors.lock().unwrap();
        (!errors.is_empty()).then(|| errors.remove(0))
    };
    match next {
        Some(error) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": error, "error_description": format!("{error} from the mock")})),
        )
            .into_response(),
        None => Json(json!({
            "accessToken": "kiro-access-token-e2e", "tokenType": "Bearer", "expiresIn": 3600,
            "refreshToken": "kiro-refresh-token-e2e"
        }))
        .into_response(),
    }
}

#[tokio::test]
async fn kiro_logins_against_a_mock_oidc() {
    let seen = Arc::new(Seen::default());
    let b = crate::common::serve(
        axum::Router::new()
            .route("/{region}/client/register", post(kiro_register))
            .route("/{region}/device_authorization", post(kiro_device))
            .route("/{region}/token", post(kiro_token))
            .with_state(seen.clone()),
    )
    .await;
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&format!(
        "auth:\n{}oauth:\n  kiro:\n    oidc_base_url: \"{b}/{{region}}\"\n",
        enc(&key)
    ));
    let app = home.start().await;
    let start = |body: &'static str| {
        let app = &app;
        async move {
            let r = app.call("POST", "/v0/oauth/kiro/start", Some(body)).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let s = r.json();
            assert_eq!(s["user_code"], "KIRO-CODE");
            s["session"].as_str().unwrap().to_string()
        }
    };
    let ended = |session: String| {
        let app = &app;
        async move {
            let path = format!("/v0/oauth/kiro/status?session={session}");
            eventually(WAIT, || async {
                let s = app.get(&path).await.json();
                (s["status"] != "pending").then_some(s)
            })
            .await
        }
    };
    // access_denied and expired_token end their sessions with those statuses.
    *seen.kiro_errors.lock().unwrap() = vec!["authorization_pending", "access_denied"];
    let s = ended(start(r#"{"method": "builder_id"}"#).await).await;
    assert_eq!(s["status"], "denied", "{s}");
    *seen.kiro_errors.lock().unwrap() = vec!["expired_token"];
    let s = ended(start("").await).await;
    assert_eq!(s["status"], "expired", "{s}");
    // Identity Center, with its start URL and region: approved after a slow_down.
    *seen.kiro_errors.lock().unwrap() = vec!["slow_down"];
    let s = ended(
        start(r#"{"method": "idc", "start_url": "https://my-org.awsapps.com/start", "region": "eu-west-1"}"#)
            .await,
    )
    .await;
    assert_eq!(s["status"], "success", "{s}");
    let id = s["credential_id"].as_str().unwrap().to_string();
    let polls = seen.polls.lock().unwrap().clone();
    let gap = polls[polls.len() - 1].0 - polls[polls.len() - 2].0;
    assert!(gap >= Duration::from_secs(6), "{gap:?} after slow_down");
    assert!(
        polls
            .iter()
            .all(|(_, body)| body.contains("kiro-client-secret-e2e"))
    );

    let auths = app.auths().await;
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0]["id"], id.as_str());
    assert_eq!(auths[0]["provider"], "kiro");
    assert_eq!(auths[0]["status"], "active", "{}", auths[0]);
    let m = app
        .state
        .store
        .refresh_material(&id.as_str().into())
        .await
        .unwrap();
    assert_eq!(m.access_token.unwrap().expose(), "kiro-access-token-e2e");
    assert_eq!(m.refresh_token.unwrap().expose(), "kiro-refresh-token-e2e");
    assert_eq!(m.client_secret.unwrap().expose(), "kiro-client-secret-e2e");
    assert_eq!(m.extra.client_id.as_deref(), Some("kiro-client-id-e2e"));
    assert_eq!(m.extra.region.as_deref(), Some("eu-west-1"));
    assert_eq!(
        m.extra.start_url.as_deref(),
        Some("https://my-org.awsapps.com/start")
    );
    app.stop().await;
    let raw = raw_data(&home);
    for secret in [
        "kiro-device-code-e2e",
        "kiro-client-secret-e2e",
        "kiro-access-token-e2e",
        "kiro-refresh-token-e2e",
    ] {
        assert!(!contains(&raw, secret), "{secret} in clear on disk");
    }
}
