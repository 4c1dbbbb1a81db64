//! Device-flow logins end to end (through the login routes):
//! the real copilot and kiro flows against local mocks of GitHub and the Copilot token
//! exchange, and of AWS SSO OIDC: start, the code shown, a `slow_down`, approval, the
//! credential stored sealed, status `success`, and the credential then serving. And kiro's
//! login, refresh and lease in one chain: a refresh whose stored client's secret is about to
//! expire registers a new client first, and the lease hands out the fresh token. And the real
//! binary killed while a login is pending: the next start resumes it. And copilot logins as
//! one GitHub user (GitHub's `/user`) updating one credential, whatever token each brings.

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
/// The client the kiro mock registers unless a test scripts others.
const KIRO_CLIENT: (&str, &str) = ("kiro-client-id-e2e", "kiro-client-secret-e2e");
/// The kiro mock's refresh grant: the only client it answers (with the refresh token its
/// device grant hands out), and the tokens it answers with.
const KIRO_RENEWED_CLIENT: (&str, &str) = ("kiro-client-id-renewed", "kiro-secret-renewed");
const KIRO_REFRESHED_ACCESS: &str = "kiro-access-token-refreshed";
const KIRO_ROTATED_REFRESH: &str = "kiro-refresh-token-rotated";

#[derive(Default)]
struct Seen {
    polls: Mutex<Vec<(Instant, String)>>,
    answers: AtomicUsize,
    exchanges: Mutex<Vec<String>>,
    chats: Mutex<Vec<String>>,
    /// What the kiro mock's token endpoint answers, in order, then a token.
    kiro_errors: Mutex<Vec<&'static str>>,
    /// The clients the kiro mock registers, in order (id, secret, seconds until the secret
    /// expires), then [`KIRO_CLIENT`] for 90 days.
    kiro_clients: Mutex<Vec<(&'static str, &'static str, i64)>>,
    /// How many clients the kiro mock registered.
    kiro_registrations: AtomicUsize,
    /// The body of every refresh grant the kiro mock's token endpoint saw.
    kiro_refreshes: Mutex<Vec<Value>>,
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

/// GitHub's `/user`: who the token belongs to.
async fn github_user() -> Json<Value> {
    Json(json!({"id": 12345, "login": "octo", "name": "The Octocat"}))
}

async fn chat(State(s): State<Arc<Seen>>, headers: HeaderMap) -> Json<Value> {
    s.chats.lock().unwrap().push(auth_header(&headers));
    Json(crate::common::chat_completion("gpt-4o"))
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
            .route("/user", get(github_user))
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
    assert_eq!(auths[0]["label"], "octo");

    let body = json!({"model": "copilot/gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let r = app.post_as(KEY, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        seen.chats.lock().unwrap().clone(),
        vec!["Bearer tid=copilot-e2e-token".to_string()]
    );
    app.stop().await;
    home.assert_sealed(&[
        "gh-device-code-e2e-0123456789",
        "gho-e2e-github-token",
        "tid=copilot-e2e-token",
    ]);
}

/// What a GitHub whose every login is approved at the first poll with a new token
/// (`gho-e2e-login-<n>`) saw; its token exchange refuses the tokens named in `refused`.
#[derive(Default)]
struct Relogins {
    logins: AtomicUsize,
    refused: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

async fn relogin_token(State(s): State<Arc<Relogins>>) -> Json<Value> {
    let n = s.logins.fetch_add(1, Ordering::SeqCst) + 1;
    Json(json!({"access_token": format!("gho-e2e-login-{n}"), "token_type": "bearer"}))
}

async fn relogin_exchange(
    State(s): State<Arc<Relogins>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let auth = auth_header(&headers);
    s.exchanges.lock().unwrap().push(auth.clone());
    if s.refused.lock().unwrap().contains(&auth) {
        let body = json!({"error_details": {"message": "No Copilot seat"}});
        return (StatusCode::FORBIDDEN, Json(body)).into_response();
    }
    let now = chrono::Utc::now().timestamp();
    Json(json!({"token": "tid=copilot-relogin", "expires_at": now + 1800, "refresh_in": 1500}))
        .into_response()
}

/// A home (encryption on) whose copilot login is a [`Relogins`] GitHub, with `/user` or
/// without.
async fn relogin_app(with_user: bool) -> (Arc<Relogins>, Home) {
    let seen = Arc::new(Relogins::default());
    let mut router = axum::Router::new()
        .route("/login/device/code", post(device_code))
        .route("/login/oauth/access_token", post(relogin_token))
        .route("/copilot_internal/v2/token", get(relogin_exchange));
    if with_user {
        router = router.route("/user", get(github_user));
    }
    let b = crate::common::serve(router.with_state(seen.clone())).await;
    let home = Home::new(&format!(
        "auth:\n{}oauth:\n  copilot:\n    github_base_url: \"{b}\"\n    api_base_url: \"{b}\"\n",
        enc(&EncryptionKey::generate_base64())
    ));
    (seen, home)
}

/// A copilot login run to its end: the final status.
async fn copilot_login(app: &crate::common::TestApp) -> Value {
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let session = r.json()["session"].as_str().unwrap().to_string();
    let path = format!("/v0/oauth/copilot/status?session={session}");
    eventually(WAIT, || async {
        let s = app.get(&path).await.json();
        (s["status"] != "pending").then_some(s)
    })
    .await
}

/// GitHub hands out a new token at each authorization: logins as the same GitHub user are
/// recognised by `/user`'s id, so they update one credential (its label the first login's,
/// an `expired` mark lifted) instead of adding one each.
#[tokio::test]
async fn copilot_logins_as_one_github_user_update_one_credential() {
    let (seen, home) = relogin_app(true).await;
    let app = home.start().await;
    let first = copilot_login(&app).await;
    assert_eq!(first["status"], "success", "{first}");
    let id = first["credential_id"].as_str().unwrap().to_string();
    // The second login's token has no Copilot seat: the login ends `error`, the credential
    // (the same one) `expired`.
    seen.refused
        .lock()
        .unwrap()
        .push("token gho-e2e-login-2".into());
    let second = copilot_login(&app).await;
    assert_eq!(second["status"], "error", "{second}");
    let auths = app.auths().await;
    assert_eq!(auths.len(), 1, "{auths:?}");
    assert_eq!(auths[0]["id"], id.as_str());
    assert_eq!(auths[0]["status"], "expired", "{}", auths[0]);
    // The third login replaces the tokens again and lifts the mark.
    let third = copilot_login(&app).await;
    assert_eq!(third["status"], "success", "{third}");
    assert_eq!(third["credential_id"], id.as_str());
    let auths = app.auths().await;
    assert_eq!(auths.len(), 1, "{auths:?}");
    assert_eq!(auths[0]["status"], "active", "{}", auths[0]);
    assert_eq!(auths[0]["label"], "octo");
    assert_eq!(auths[0]["source"], "oauth:copilot");
    let m = app
        .state
        .store
        .refresh_material(&id.as_str().into())
        .await
        .unwrap();
    assert_eq!(m.refresh_token.unwrap().expose(), "gho-e2e-login-3");
    assert_eq!(m.access_token.unwrap().expose(), "tid=copilot-relogin");
    assert_eq!(m.extra.account.as_deref(), Some("github:12345"));
    assert_eq!(
        seen.exchanges.lock().unwrap().clone(),
        [
            "token gho-e2e-login-1",
            "token gho-e2e-login-2",
            "token gho-e2e-login-3"
        ]
    );
    app.stop().await;
    let tokens: Vec<String> = (1..=3).map(|n| format!("gho-e2e-login-{n}")).collect();
    home.assert_sealed(&tokens);
    let log = home.auth_log();
    for token in &tokens {
        assert!(!log.contains(token), "{token} in the auth log");
    }
}

/// A GitHub whose `/user` is missing: each login still succeeds, and, with no account to
/// recognise, a new token is a new credential, without a label.
#[tokio::test]
async fn copilot_logins_without_github_user_add_a_credential_each() {
    let (_seen, home) = relogin_app(false).await;
    let app = home.start().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let s = copilot_login(&app).await;
        assert_eq!(s["status"], "success", "{s}");
        ids.push(s["credential_id"].as_str().unwrap().to_string());
    }
    assert_ne!(ids[0], ids[1]);
    let auths = app.auths().await;
    assert_eq!(auths.len(), 2, "{auths:?}");
    assert!(
        auths
            .iter()
            .all(|a| a["label"].is_null() && a["status"] == "active")
    );
    let m = app
        .state
        .store
        .refresh_material(&ids[1].as_str().into())
        .await
        .unwrap();
    assert_eq!(m.extra.account, None);
    app.stop().await;
}

/// AWS SSO OIDC: register, device authorization, token (errors first, in order).
async fn kiro_register(State(s): State<Arc<Seen>>) -> Json<Value> {
    s.kiro_registrations.fetch_add(1, Ordering::SeqCst);
    let (id, secret, lifetime) = {
        let mut clients = s.kiro_clients.lock().unwrap();
        if clients.is_empty() {
            (KIRO_CLIENT.0, KIRO_CLIENT.1, 90 * 86400)
        } else {
            clients.remove(0)
        }
    };
    let now = chrono::Utc::now().timestamp();
    Json(json!({
        "clientId": id, "clientSecret": secret,
        "clientIdIssuedAt": now, "clientSecretExpiresAt": now + lifetime
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
    let refused = |status: StatusCode, error: &str| {
        (
            status,
            Json(json!({"error": error, "error_description": format!("{error} from the mock")})),
        )
            .into_response()
    };
    let grant: Value = serde_json::from_str(&body).unwrap_or_default();
    if grant["grantType"] == "refresh_token" {
        // The refresh grant, JSON camelCase as AWS takes it: only the renewed client with the
        // login's refresh token gets new tokens.
        s.kiro_refreshes.lock().unwrap().push(grant.clone());
        if grant["clientId"] != KIRO_RENEWED_CLIENT.0
            || grant["clientSecret"] != KIRO_RENEWED_CLIENT.1
        {
            return refused(StatusCode::UNAUTHORIZED, "invalid_client");
        }
        if grant["refreshToken"] != "kiro-refresh-token-e2e" {
            return refused(StatusCode::BAD_REQUEST, "invalid_grant");
        }
        return Json(json!({
            "accessToken": KIRO_REFRESHED_ACCESS, "tokenType": "Bearer", "expiresIn": 7200,
            "refreshToken": KIRO_ROTATED_REFRESH
        }))
        .into_response();
    }
    s.polls.lock().unwrap().push((Instant::now(), body));
    let next = {
        let mut errors = s.kiro_errors.lock().unwrap();
        (!errors.is_empty()).then(|| errors.remove(0))
    };
    match next {
        Some(error) => refused(StatusCode::BAD_REQUEST, error),
        None => Json(json!({
            "accessToken": "kiro-access-token-e2e", "tokenType": "Bearer", "expiresIn": 3600,
            "refreshToken": "kiro-refresh-token-e2e"
        }))
        .into_response(),
    }
}

/// The kiro mock OIDC on a free port, `{region}` in its paths.
async fn kiro_mock(seen: &Arc<Seen>) -> String {
    crate::common::serve(
        axum::Router::new()
            .route("/{region}/client/register", post(kiro_register))
            .route("/{region}/device_authorization", post(kiro_device))
            .route("/{region}/token", post(kiro_token))
            .with_state(seen.clone()),
    )
    .await
}

#[tokio::test]
async fn kiro_logins_against_a_mock_oidc() {
    let seen = Arc::new(Seen::default());
    let b = kiro_mock(&seen).await;
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
    home.assert_sealed(&[
        "kiro-device-code-e2e",
        "kiro-client-secret-e2e",
        "kiro-access-token-e2e",
        "kiro-refresh-token-e2e",
    ]);
}

/// A kiro login, then a manual refresh: the stored client's secret expires within 5 minutes,
/// so the refresh registers a new client first and presents it with the login's refresh
/// token; the new client is stored with the new tokens, and a lease hands out the fresh
/// access token with its expiry.
#[tokio::test]
async fn kiro_refresh_registers_a_new_client_for_an_expiring_one_and_a_lease_gets_the_fresh_token()
{
    let seen = Arc::new(Seen::default());
    *seen.kiro_clients.lock().unwrap() = vec![
        ("kiro-client-id-short", "kiro-secret-short", 120),
        (KIRO_RENEWED_CLIENT.0, KIRO_RENEWED_CLIENT.1, 90 * 86400),
    ];
    let b = kiro_mock(&seen).await;
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n{}oauth:\n  kiro:\n    oidc_base_url: \"{b}/{{region}}\"\n",
        enc(&key)
    ));
    let app = home.start().await;

    // The login, with the short-lived client.
    let r = app.call("POST", "/v0/oauth/kiro/start", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let session = r.json()["session"].as_str().unwrap().to_string();
    let path = format!("/v0/oauth/kiro/status?session={session}");
    let s = eventually(WAIT, || async {
        let s = app.get(&path).await.json();
        (s["status"] != "pending").then_some(s)
    })
    .await;
    assert_eq!(s["status"], "success", "{s}");
    let id = s["credential_id"].as_str().unwrap().to_string();
    assert_eq!(seen.kiro_registrations.load(Ordering::SeqCst), 1);
    let m = app
        .state
        .store
        .refresh_material(&id.as_str().into())
        .await
        .unwrap();
    assert_eq!(m.extra.client_id.as_deref(), Some("kiro-client-id-short"));
    assert_eq!(m.client_secret.unwrap().expose(), "kiro-secret-short");

    // The refresh: a second registration, then one refresh grant, with the new client.
    let r = app.post("/v0/management/auths/kiro/refresh", "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let refreshed = r.json();
    assert_eq!(refreshed["refreshed"], 1, "{refreshed}");
    assert_eq!(refreshed["results"][0]["id"], id.as_str(), "{refreshed}");
    assert_eq!(seen.kiro_registrations.load(Ordering::SeqCst), 2);
    let grants = seen.kiro_refreshes.lock().unwrap().clone();
    assert_eq!(
        grants,
        vec![json!({
            "clientId": KIRO_RENEWED_CLIENT.0, "clientSecret": KIRO_RENEWED_CLIENT.1,
            "grantType": "refresh_token", "refreshToken": "kiro-refresh-token-e2e"
        })]
    );

    // The store holds the new client with the new tokens.
    let m = app
        .state
        .store
        .refresh_material(&id.as_str().into())
        .await
        .unwrap();
    assert_eq!(m.access_token.unwrap().expose(), KIRO_REFRESHED_ACCESS);
    assert_eq!(m.refresh_token.unwrap().expose(), KIRO_ROTATED_REFRESH);
    assert_eq!(m.client_secret.unwrap().expose(), KIRO_RENEWED_CLIENT.1);
    assert_eq!(m.extra.client_id.as_deref(), Some(KIRO_RENEWED_CLIENT.0));
    let secret_expiry = m
        .extra
        .client_secret_expires_at
        .expect("the new client's expiry");
    assert!(
        secret_expiry > chrono::Utc::now() + chrono::TimeDelta::days(89),
        "{secret_expiry}"
    );
    let expires_at = m.expires_at.expect("the fresh token's expiry");

    // A lease hands out the fresh access token and its expiry.
    let body = json!({"provider": "kiro", "estimated_tokens": 10});
    let r = app.post_as(KEY, "/v1/credentials/lease", &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let lease = r.json();
    assert_eq!(lease["credential_id"], id.as_str(), "{lease}");
    assert_eq!(lease["token"], KIRO_REFRESHED_ACCESS, "{lease}");
    assert_eq!(
        lease["token_expires_at"],
        cliproxyapi::domain::rfc3339(expires_at),
        "{lease}"
    );

    app.stop().await;
    home.assert_sealed(&[
        "kiro-device-code-e2e",
        "kiro-secret-short",
        "kiro-access-token-e2e",
        "kiro-refresh-token-e2e",
        KIRO_RENEWED_CLIENT.1,
        KIRO_REFRESHED_ACCESS,
        KIRO_ROTATED_REFRESH,
    ]);
}

/// What the GitHub mock of the crash test saw, and whether the user has approved yet.
#[derive(Default)]
struct Pending {
    approved: std::sync::atomic::AtomicBool,
    /// The `device_code` of every poll.
    polls: Mutex<Vec<String>>,
}

async fn pending_token(State(p): State<Arc<Pending>>, body: String) -> Json<Value> {
    let form: Vec<(String, String)> = serde_urlencoded::from_str(&body).unwrap_or_default();
    let code = form
        .iter()
        .find(|(k, _)| k == "device_code")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    p.polls.lock().unwrap().push(code);
    if p.approved.load(Ordering::SeqCst) {
        Json(json!({"access_token": "gho-crash-github-token", "token_type": "bearer"}))
    } else {
        Json(json!({"error": "authorization_pending"}))
    }
}

async fn crash_exchange() -> Json<Value> {
    let now = chrono::Utc::now().timestamp();
    Json(json!({"token": "tid=copilot-crash-token", "expires_at": now + 1800, "refresh_in": 1500}))
}

/// The server killed (`kill -9`) while a copilot login is pending: the next start polls the
/// same device code again, and the login completes when the user approves.
#[tokio::test]
async fn a_login_pending_across_kill_9_resumes_and_completes() {
    let pending = Arc::new(Pending::default());
    let b = crate::common::serve(
        axum::Router::new()
            .route("/login/device/code", post(device_code))
            .route("/login/oauth/access_token", post(pending_token))
            .route("/copilot_internal/v2/token", get(crash_exchange))
            .with_state(pending.clone()),
    )
    .await;
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&format!(
        "auth:\n{}oauth:\n  copilot:\n    github_base_url: \"{b}\"\n    api_base_url: \"{b}\"\n",
        enc(&key)
    ));
    let server = home.spawn_binary();
    let r = server.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let session = r.json()["session"].as_str().unwrap().to_string();
    // Polled at least once, then killed mid-wait.
    eventually(WAIT, || async {
        (!pending.polls.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    server.kill9();
    let before = pending.polls.lock().unwrap().len();

    // The user approves while the server is down; the next start resumes the poll.
    pending.approved.store(true, Ordering::SeqCst);
    let server = home.spawn_binary();
    let path = format!("/v0/oauth/copilot/status?session={session}");
    let status = eventually(WAIT, || async {
        let s = server.get(&path).await.json();
        (s["status"] != "pending").then_some(s)
    })
    .await;
    assert_eq!(status["status"], "success", "{status}");
    let polls = pending.polls.lock().unwrap().clone();
    assert!(polls.len() > before, "no poll after the restart: {polls:?}");
    assert!(
        polls.iter().all(|c| c == "gh-device-code-e2e-0123456789"),
        "{polls:?}"
    );
    let r = server.get("/v0/management/auths").await;
    let auths = r.json()["auths"].as_array().unwrap().clone();
    assert_eq!(auths.len(), 1, "{auths:?}");
    assert_eq!(auths[0]["id"], status["credential_id"]);
    assert_eq!(auths[0]["provider"], "copilot");
    assert!(
        home.auth_log()
            .contains("resumed polling 1 pending login(s)"),
        "{}",
        home.auth_log()
    );
    drop(server);
    home.assert_sealed(&["gh-device-code-e2e-0123456789", "gho-crash-github-token"]);
}
