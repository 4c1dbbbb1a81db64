//! The token refresh worker, manual refreshes and the refresh status (README, "Token
//! refresh"), against a local mock of the token endpoints: Kiro's AWS SSO OIDC (`/token`,
//! `/client/register`), the Copilot token exchange, and an RFC 6749 provider of the config's
//! own (`myoauth`) whose chat endpoint accepts only the latest access token it issued.

use crate::common::{Api, Home, eventually};
use crate::notify::{Receiver, SECRET, SECRET_VAR, expected_signature, webhook};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use cliproxyapi::jobs;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) const KEY: &str = "refresh-client-key";
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// How the mock answers the refresh grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Issue a new access token and rotate the refresh token; an old refresh token is
    /// `invalid_grant`, as with a real rotating server.
    Rotate,
    InvalidGrant,
    ServerError,
}

pub(crate) struct Tokens {
    mode: Mutex<Mode>,
    /// The body of every refresh grant (Kiro's JSON, or the RFC 6749 form as an object).
    pub(crate) grants: Mutex<Vec<Value>>,
    registers: AtomicUsize,
    /// The `authorization` header of every Copilot token exchange.
    exchanges: Mutex<Vec<String>>,
    /// Answer each grant after this long.
    pub(crate) delay: Mutex<Duration>,
    issued: AtomicUsize,
    /// The refresh tokens presented so far (each is good once).
    used_refresh: Mutex<std::collections::HashSet<String>>,
    /// The access token the chat endpoint accepts (none before the first grant).
    accepted: Mutex<Option<String>>,
    /// The test's clock, in unix seconds (Copilot's answer names an absolute expiry).
    clock: Arc<AtomicI64>,
}

impl Tokens {
    pub(crate) fn grants(&self) -> Vec<Value> {
        self.grants.lock().unwrap().clone()
    }

    pub(crate) fn refresh_tokens_sent(&self) -> Vec<String> {
        self.grants()
            .iter()
            .map(|g| {
                g.get("refreshToken")
                    .or(g.get("refresh_token"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }
}

pub(crate) struct Mock {
    pub(crate) base: String,
    pub(crate) tokens: Arc<Tokens>,
}

impl Mock {
    pub(crate) async fn start(clock: Arc<AtomicI64>) -> Mock {
        let tokens = Arc::new(Tokens {
            mode: Mutex::new(Mode::Rotate),
            grants: Mutex::default(),
            registers: AtomicUsize::new(0),
            exchanges: Mutex::default(),
            delay: Mutex::new(Duration::ZERO),
            issued: AtomicUsize::new(0),
            used_refresh: Mutex::default(),
            accepted: Mutex::new(None),
            clock,
        });
        let app = axum::Router::new()
            .route("/token", post(grant))
            .route("/client/register", post(register))
            .route("/copilot_internal/v2/token", get(exchange))
            .route("/v1/chat/completions", post(chat))
            .with_state(tokens.clone());
        let base = crate::common::serve(app).await;
        Mock { base, tokens }
    }

    /// [`Mock::start`] with its clock fixed at `now`.
    pub(crate) async fn start_at(now: DateTime<Utc>) -> Mock {
        Mock::start(Arc::new(AtomicI64::new(now.timestamp()))).await
    }

    pub(crate) fn mode(&self, mode: Mode) {
        *self.tokens.mode.lock().unwrap() = mode;
    }

    /// The config lines naming the mock for every token endpoint and the `myoauth` provider.
    pub(crate) fn yaml(&self) -> String {
        let b = &self.base;
        format!(
            "oauth:\n  kiro: {{oidc_base_url: \"{b}\", region: us-east-1}}\n  copilot: {{github_base_url: \"{b}\", api_base_url: \"{b}\"}}\n\
             providers:\n  myoauth: {{format: openai, base_url: \"{b}/v1\", models: [\"my-*\"], token_url: \"{b}/token\", client_id: my-client}}\n"
        )
    }
}

/// A refresh grant: Kiro's JSON body or an RFC 6749 form.
async fn grant(
    State(t): State<Arc<Tokens>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let json_body = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("json"));
    let body: Value = if json_body {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    } else {
        let pairs: serde_json::Map<String, Value> = form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        Value::Object(pairs)
    };
    t.grants.lock().unwrap().push(body.clone());
    let delay = *t.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match *t.mode.lock().unwrap() {
        Mode::ServerError => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": "server_error"})),
            );
        }
        Mode::InvalidGrant => {
            return (
                StatusCode::BAD_REQUEST,
                Json(
                    json!({"error": "invalid_grant", "error_description": "Refresh token revoked by the test"}),
                ),
            );
        }
        Mode::Rotate => {}
    }
    let (prefix, presented) = match body.get("refreshToken") {
        Some(rt) => ("kiro", rt.as_str().unwrap_or_default().to_string()),
        None => (
            "my",
            body["refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
    };
    // A refresh token is good once: after it the server rotated it away.
    if !t.used_refresh.lock().unwrap().insert(presented) {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "invalid_grant", "error_description": "refresh token already used"}),
            ),
        );
    }
    let n = t.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("{prefix}-at-new-{n}");
    let refresh = format!("{prefix}-rt-new-{n}");
    *t.accepted.lock().unwrap() = Some(access.clone());
    if prefix == "kiro" {
        (
            StatusCode::OK,
            Json(
                json!({"accessToken": access, "refreshToken": refresh, "expiresIn": 3600, "tokenType": "Bearer"}),
            ),
        )
    } else {
        (
            StatusCode::OK,
            Json(
                json!({"access_token": access, "refresh_token": refresh, "expires_in": 3600, "token_type": "Bearer"}),
            ),
        )
    }
}

async fn register(State(t): State<Arc<Tokens>>) -> Json<Value> {
    let n = t.registers.fetch_add(1, Ordering::SeqCst) + 1;
    let expires = t.clock.load(Ordering::SeqCst) + 90 * 86400;
    Json(json!({
        "clientId": format!("kiro-client-{n}"), "clientSecret": format!("kiro-client-secret-{n}"),
        "clientIdIssuedAt": t.clock.load(Ordering::SeqCst), "clientSecretExpiresAt": expires
    }))
}

async fn exchange(State(t): State<Arc<Tokens>>, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    t.exchanges.lock().unwrap().push(auth.clone());
    if auth != "token gho-refresh-test" {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"message": "Bad credentials"})),
        );
    }
    let n = t.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let now = t.clock.load(Ordering::SeqCst);
    (
        StatusCode::OK,
        Json(
            json!({"token": format!("copilot-token-{n}"), "expires_at": now + 1800, "refresh_in": 1500}),
        ),
    )
}

/// The provider's chat endpoint: only the latest access token issued is accepted.
async fn chat(State(t): State<Arc<Tokens>>, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let accepted = t.accepted.lock().unwrap().clone();
    if bearer.is_none() || bearer != accepted {
        return (
            StatusCode::UNAUTHORIZED,
            Json(
                json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}),
            ),
        );
    }
    (
        StatusCode::OK,
        Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "my-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        })),
    )
}

pub(crate) fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A `myoauth` credential file whose token expires at `expires_at`.
pub(crate) fn myoauth_file(home: &Home, expires_at: DateTime<Utc>) {
    let file = json!({"provider": "myoauth", "type": "oauth", "access_token": "my-at-old",
        "refresh_token": "my-rt-first", "expires_at": rfc(expires_at), "label": "mine"});
    home.auth_file("myoauth.json", file.to_string());
}

fn clock_at(t: &Arc<AtomicI64>) -> cliproxyapi::state::Clock {
    let t = t.clone();
    Arc::new(move || DateTime::from_timestamp(t.load(Ordering::SeqCst), 0).unwrap())
}

pub(crate) async fn status(api: &impl Api) -> Value {
    let r = api.get("/v0/management/auths/refresh/status").await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

/// Wait for the worker's first check to end; the status then.
pub(crate) async fn first_check(api: &impl Api) -> Value {
    eventually(WAIT, || async {
        let st = status(api).await;
        st["last_check"].is_string().then_some(st)
    })
    .await
}

pub(crate) async fn only(api: &impl Api, provider: &str) -> Value {
    let r = api.get(&format!("/v0/management/auths/{provider}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["auths"][0].clone()
}

pub(crate) async fn chat_as_client(api: &impl Api) -> crate::common::Resp {
    let body = json!({"model": "my-model", "messages": [{"role": "user", "content": "hi"}]});
    api.post_as(KEY, "/v1/chat/completions", &body).await
}

/// Acceptance 1: a Kiro credential expiring in 5 minutes, with a 10-minute lead, is refreshed
/// by the next check with its stored client; the one expiring in 2 hours is not; the rotated
/// refresh token is the one stored (sealed) and the only one sent next; the status is right;
/// the history survives `kill -9`.
#[tokio::test]
async fn kiro_is_refreshed_with_its_stored_client_and_the_history_survives_kill_9() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  selection_strategy: priority\n  refresh:\n    check_interval: 1h\n    refresh_lead_time: 10m\n  encryption:\n    enabled: true\n    key: \"{key}\"\n{}",
        mock.yaml()
    ));
    let kiro = |label: &str, rt: &str, expires: DateTime<Utc>, priority: u32| {
        json!({"type": "oauth", "label": label, "priority": priority, "access_token": format!("kiro-at-{label}"),
            "refresh_token": rt, "expires_at": rfc(expires), "client_id": "kiro-client-stored",
            "client_secret": "kiro-client-secret-stored", "client_secret_expires_at": rfc(now + chrono::TimeDelta::days(60)),
            "region": "us-east-1", "start_url": "https://view.awsapps.com/start", "auth_method": "builder_id"})
    };
    home.auth_file(
        "kiro.json",
        json!([
            kiro(
                "soon",
                "kiro-rt-first",
                now + chrono::TimeDelta::minutes(5),
                1
            ),
            kiro("late", "kiro-rt-late", now + chrono::TimeDelta::hours(2), 2)
        ])
        .to_string(),
    );
    let server = home.spawn_binary();

    // The check at start refreshes the one that expires within the lead time.
    let st = first_check(&server).await;
    assert_eq!(st["credentials_checked"], 2, "{st}");
    assert_eq!(st["refreshed"], 1, "{st}");
    assert_eq!(st["failed"], 0, "{st}");
    assert_eq!(st["enabled"], true, "{st}");
    assert_eq!(st["check_interval"], "1h", "{st}");
    assert_eq!(st["refresh_lead_time"], "10m", "{st}");
    let last: DateTime<Utc> = st["last_check"].as_str().unwrap().parse().unwrap();
    let next: DateTime<Utc> = st["next_check"].as_str().unwrap().parse().unwrap();
    assert_eq!(next - last, chrono::TimeDelta::hours(1), "{st}");
    let grants = mock.tokens.grants();
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0]["clientId"], "kiro-client-stored");
    assert_eq!(grants[0]["clientSecret"], "kiro-client-secret-stored");
    assert_eq!(grants[0]["grantType"], "refresh_token");
    assert_eq!(grants[0]["refreshToken"], "kiro-rt-first");
    assert_eq!(mock.tokens.registers.load(Ordering::SeqCst), 0);

    let auths = server.auths().await;
    let soon = crate::common::by_label(&auths, "soon");
    let late = crate::common::by_label(&auths, "late");
    assert_eq!(soon["status"], "active", "{soon}");
    let expires: DateTime<Utc> = soon["expires_at"].as_str().unwrap().parse().unwrap();
    assert!(expires > now + chrono::TimeDelta::minutes(50), "{soon}");
    assert!(soon["last_refresh_at"].is_string(), "{soon}");
    assert!(late["last_refresh_at"].is_null(), "{late}");
    let soon_id = soon["id"].as_str().unwrap().to_string();
    let recent = &st["recent"];
    assert_eq!(recent[0]["credential_id"], soon_id.as_str(), "{st}");
    assert_eq!(recent[0]["trigger"], "schedule", "{st}");
    assert_eq!(recent[0]["ok"], true, "{st}");

    // A lease hands out the new access token.
    let lease = server
        .post_as(KEY, "/v1/credentials/lease", &json!({"provider": "kiro"}))
        .await;
    assert_eq!(lease.status, 201, "{}", lease.text);
    assert_eq!(lease.json()["token"], "kiro-at-new-1", "{}", lease.text);

    // The rotated refresh token is the one sent next; the first is never sent again.
    let r = server
        .post(
            &format!("/v0/management/auths/kiro/refresh?id={soon_id}"),
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["results"][0]["status"], "refreshed", "{}", r.text);
    assert_eq!(
        mock.tokens.refresh_tokens_sent(),
        ["kiro-rt-first", "kiro-rt-new-1"]
    );
    // The lease holder learns of the refresh by renewing: the new token and its expiry.
    let first = lease.json();
    let lease_id = first["lease_id"].as_str().unwrap();
    let renewed = server
        .post_as(
            KEY,
            &format!("/v1/credentials/lease/{lease_id}/renew"),
            &json!({}),
        )
        .await;
    assert_eq!(renewed.status, 200, "{}", renewed.text);
    let renewed = renewed.json();
    assert_eq!(renewed["token"], "kiro-at-new-2", "{renewed}");
    assert!(renewed["token_expires_at"].is_string(), "{renewed}");
    assert!(first["token_expires_at"].is_string(), "{first}");

    // Sealed on disk: no new token in clear in the database or its WAL.
    home.assert_sealed(&["kiro-rt-new-1", "kiro-rt-new-2", "kiro-at-new-2"]);

    // The history survives a kill -9 and a restart.
    server.kill9();
    let server = home.spawn_binary();
    let st = eventually(WAIT, || async {
        let st = status(&server).await;
        let ours = st["recent"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["credential_id"] == soon_id.as_str())
            .count();
        (ours >= 2).then_some(st)
    })
    .await;
    let triggers: Vec<&str> = st["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["credential_id"] == soon_id.as_str())
        .map(|o| o["trigger"].as_str().unwrap())
        .collect();
    assert_eq!(triggers, ["manual", "schedule"], "{st}");
    // And the refreshed token still opens after the restart (the key and the sealed value).
    let lease = server
        .post_as(KEY, "/v1/credentials/lease", &json!({"provider": "kiro"}))
        .await;
    assert_eq!(lease.json()["token"], "kiro-at-new-2", "{}", lease.text);
}

/// Acceptance 2: the worker, a manual refresh and a proxied request answered 401 meet on one
/// credential: one call to the token endpoint, and the old refresh token is never sent again.
#[tokio::test]
async fn worker_manual_and_401_share_one_call_to_the_token_endpoint() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    *mock.tokens.delay.lock().unwrap() = Duration::from_millis(1500);
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  refresh:\n    check_interval: 1h\n{}",
        mock.yaml()
    ));
    myoauth_file(&home, now + chrono::TimeDelta::minutes(5));
    let app = home.start().await;
    // The check at start is at the token endpoint (held there 1.5 s) ...
    eventually(WAIT, || async {
        (!mock.tokens.grants().is_empty()).then_some(())
    })
    .await;
    // ... when a manual refresh and a proxied request (answered 401: the old token) arrive.
    let (manual, chat) = tokio::join!(
        app.post("/v0/management/auths/myoauth/refresh", ""),
        chat_as_client(&app)
    );
    assert_eq!(manual.status, 200, "{}", manual.text);
    let results = &manual.json()["results"];
    assert_eq!(results[0]["status"], "refreshed", "{}", manual.text);
    assert_eq!(chat.status, 200, "{}", chat.text);
    assert_eq!(mock.tokens.grants().len(), 1, "{:?}", mock.tokens.grants());
    let cred = only(&app, "myoauth").await;
    assert_eq!(cred["status"], "active", "{cred}");

    // The next refresh presents the rotated token, never the first one again.
    *mock.tokens.delay.lock().unwrap() = Duration::ZERO;
    let r = app.post("/v0/management/auths/myoauth/refresh", "").await;
    assert_eq!(r.json()["results"][0]["status"], "refreshed", "{}", r.text);
    assert_eq!(
        mock.tokens.refresh_tokens_sent(),
        ["my-rt-first", "my-rt-new-1"]
    );
    // A 401 on a token another refresh already replaced costs no call: the request gets the
    // new token.
    let chat = chat_as_client(&app).await;
    assert_eq!(chat.status, 200, "{}", chat.text);
    assert_eq!(mock.tokens.grants().len(), 2);
    app.stop().await;
}

/// Acceptance 3: `invalid_grant` leaves the credential `expired` with the reason, sends
/// `credential.expired` and `refresh.failed` (signed, without a secret), and selection skips
/// it; the worker does not try it again until its tokens are replaced.
#[tokio::test]
async fn invalid_grant_expires_the_credential_and_tells_the_webhooks() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    mock.mode(Mode::InvalidGrant);
    let receiver = Receiver::start().await;
    let hooks = webhook(&receiver.url, &["credential.expired", "refresh.failed"]);
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  refresh:\n    check_interval: 1h\n  notifications:\n    webhooks:\n{hooks}{}",
        mock.yaml()
    ));
    myoauth_file(&home, now + chrono::TimeDelta::minutes(5));
    let app = home
        .start_with(&[(SECRET_VAR, SECRET)], Arc::new(Utc::now))
        .await;
    let cred = eventually(WAIT, || async {
        let c = only(&app, "myoauth").await;
        (c["status"] == "expired").then_some(c)
    })
    .await;
    let reason = cred["status_reason"].as_str().unwrap();
    assert!(reason.contains("invalid_grant"), "{cred}");
    let st = first_check(&app).await;
    assert_eq!(st["failed"], 1, "{st}");
    assert_eq!(st["refreshed"], 0, "{st}");
    assert!(
        st["recent"][0]["error"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "{st}"
    );

    let got = eventually(WAIT, || async {
        let got = receiver.got();
        (got.len() >= 2).then_some(got)
    })
    .await;
    let mut events: Vec<String> = got.iter().map(|r| r.event.clone()).collect();
    events.sort();
    assert_eq!(events, ["credential.expired", "refresh.failed"]);
    for r in &got {
        assert_eq!(r.signature, expected_signature(&r.body));
        let body = r.json();
        assert_eq!(body["provider"], "myoauth", "{body}");
        assert_eq!(body["credential_id"], cred["id"], "{body}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            !text.contains("my-rt-first") && !text.contains("my-at-old"),
            "{text}"
        );
    }
    let log = home.auth_log();
    assert!(log.contains("marked expired: refresh refused"), "{log}");
    assert!(!log.contains("my-rt-first"), "{log}");

    // Selection skips it.
    let r = chat_as_client(&app).await;
    assert_eq!(r.status, 503, "{}", r.text);
    // The worker leaves it alone from now on.
    jobs::refresh::run(&app.state, Utc::now() + chrono::TimeDelta::hours(1)).await;
    assert_eq!(mock.tokens.grants().len(), 1);
    // New tokens through the API give it a fresh chance.
    mock.mode(Mode::Rotate);
    let id = cred["id"].as_str().unwrap();
    let r = app
        .put(
            &format!("/v0/management/auths/myoauth?id={id}"),
            &json!({"refresh_token": "my-rt-replaced"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    jobs::refresh::run(&app.state, Utc::now()).await;
    assert_eq!(
        mock.tokens.refresh_tokens_sent(),
        ["my-rt-first", "my-rt-replaced"]
    );
    assert_eq!(only(&app, "myoauth").await["status"], "active");
    app.stop().await;
}

/// Acceptance 3: a 500 from the token endpoint is retried with backoff, then counted as
/// failed; the credential keeps its state and the next check tries again.
#[tokio::test]
async fn server_errors_are_retried_with_backoff_and_counted_as_failed() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    mock.mode(Mode::ServerError);
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  refresh:\n    check_interval: 1h\n    max_tries: 3\n    retry_backoff: 50ms\n{}",
        mock.yaml()
    ));
    myoauth_file(&home, now + chrono::TimeDelta::minutes(5));
    let app = home.start().await;
    let st = first_check(&app).await;
    assert_eq!(mock.tokens.grants().len(), 3, "three tries");
    assert_eq!(st["failed"], 1, "{st}");
    assert_eq!(st["refreshed"], 0, "{st}");
    let error = st["recent"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("500") && error.contains("3 tries"),
        "{error}"
    );
    // Not refused: the credential is as it was, and the next check tries it again.
    assert_eq!(only(&app, "myoauth").await["status"], "active");
    mock.mode(Mode::Rotate);
    jobs::refresh::run(&app.state, Utc::now()).await;
    assert_eq!(mock.tokens.grants().len(), 4);
    assert_eq!(status(&app).await["refreshed"], 1);
    app.stop().await;
}

/// Acceptance 3: a Copilot token is exchanged again before its `refresh_in` runs out, with
/// the GitHub token as `Authorization: token …`.
#[tokio::test]
async fn copilot_token_is_exchanged_again_before_its_refresh_in() {
    let start = Utc::now().timestamp();
    let clock = Arc::new(AtomicI64::new(start));
    let mock = Mock::start(clock.clone()).await;
    let home = Home::new(&format!(
        "auth:\n  refresh:\n    check_interval: 1h\n    refresh_lead_time: 1m\n{}",
        mock.yaml()
    ));
    home.auth_file(
        "copilot.json",
        json!({"type": "oauth", "refresh_token": "gho-refresh-test"}).to_string(),
    );
    let app = home.start_with(&[], clock_at(&clock)).await;
    // No access token yet: exchanged at the first check.
    let cred = eventually(WAIT, || async {
        let c = only(&app, "copilot").await;
        (c["status"] == "active").then_some(c)
    })
    .await;
    let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
    assert_eq!(cred["expires_at"], rfc(at(start + 1800)), "{cred}");
    assert_eq!(
        *mock.tokens.exchanges.lock().unwrap(),
        ["token gho-refresh-test"]
    );
    // Before refresh_in (1500 s, less a minute): nothing to do.
    clock.store(start + 1000, Ordering::SeqCst);
    jobs::refresh::run(&app.state, at(start + 1000)).await;
    assert_eq!(mock.tokens.exchanges.lock().unwrap().len(), 1);
    // Within the last minute of refresh_in, though the lead time (1 m before expiry) is far.
    clock.store(start + 1445, Ordering::SeqCst);
    jobs::refresh::run(&app.state, at(start + 1445)).await;
    assert_eq!(mock.tokens.exchanges.lock().unwrap().len(), 2);
    let cred = only(&app, "copilot").await;
    assert_eq!(cred["expires_at"], rfc(at(start + 1445 + 1800)), "{cred}");
    app.stop().await;
}

/// Acceptance 6: `auth.refresh.enabled: false` stops the worker, and the status says so; a
/// manual refresh still works.
#[tokio::test]
async fn disabled_refresh_stops_the_worker_and_the_status_says_so() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    let home = Home::new(&format!(
        "auth:\n  refresh:\n    enabled: false\n    check_interval: 1s\n{}",
        mock.yaml()
    ));
    myoauth_file(&home, now + chrono::TimeDelta::minutes(1));
    let app = home.start().await;
    let st = status(&app).await;
    assert_eq!(st["enabled"], false, "{st}");
    assert!(st["next_check"].is_null(), "{st}");
    assert!(st["last_check"].is_null(), "{st}");
    // Three intervals pass without a check (a negative can only be waited for).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(mock.tokens.grants().is_empty());
    assert!(status(&app).await["last_check"].is_null());
    let r = app.post("/v0/management/auths/myoauth/refresh", "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(mock.tokens.grants().len(), 1);
    app.stop().await;
}

/// Manual refreshes that cannot refresh anything get a clear 4xx in our error shape.
#[tokio::test]
async fn manual_refresh_errors_are_clear() {
    let mock = Mock::start_at(Utc::now()).await;
    let home = Home::new(&format!(
        "auth:\n  refresh:\n    check_interval: 1h\n{}",
        mock.yaml()
    ));
    let app = home.start().await;
    let cases = [
        ("/v0/management/auths/nope/refresh", 404, "unknown_provider"),
        (
            "/v0/management/auths/claude/refresh",
            409,
            "not_refreshable",
        ),
        (
            "/v0/management/auths/myoauth/refresh",
            409,
            "nothing_to_refresh",
        ),
        (
            "/v0/management/auths/myoauth/refresh?id=cred_missing",
            404,
            "credential_not_found",
        ),
    ];
    for (path, code, error) in cases {
        let r = app.post(path, "").await;
        assert_eq!(r.status, code, "{path}: {}", r.text);
        assert_eq!(r.error_code(), error, "{path}");
    }
    let r = app
        .post(
            "/v0/management/auths",
            &json!({"provider": "myoauth", "token": "my-api-key-not-oauth"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = app
        .post(&format!("/v0/management/auths/myoauth/refresh?id={id}"), "")
        .await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.error_code(), "not_refreshable");
    let r = app
        .post("/v0/management/auths/myoauth/refresh?bogus=1", "")
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(mock.tokens.grants().is_empty());
    app.stop().await;
}

/// A 401 reported on a lease of an OAuth credential refreshes it instead of marking it
/// invalid; the next lease hands out the new token.
#[tokio::test]
async fn a_401_reported_on_a_lease_refreshes_the_credential() {
    let now = Utc::now();
    let mock = Mock::start_at(now).await;
    let home = Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  refresh:\n    check_interval: 1h\n{}",
        mock.yaml()
    ));
    let file = json!({"type": "oauth", "access_token": "kiro-at-revoked", "refresh_token": "kiro-rt-lease",
        "expires_at": rfc(now + chrono::TimeDelta::hours(2)), "client_id": "kiro-client-stored",
        "client_secret": "kiro-client-secret-stored", "region": "us-east-1"});
    home.auth_file("kiro.json", file.to_string());
    let app = home.start().await;
    first_check(&app).await;
    assert!(mock.tokens.grants().is_empty(), "not due at start");
    let lease = app
        .post_as(KEY, "/v1/credentials/lease", &json!({"provider": "kiro"}))
        .await;
    assert_eq!(lease.status, 201, "{}", lease.text);
    let lease = lease.json();
    assert_eq!(lease["token"], "kiro-at-revoked");
    let id = lease["lease_id"].as_str().unwrap();
    let r = app
        .post_as(
            KEY,
            &format!("/v1/credentials/lease/{id}/report"),
            &json!({"error_status": 401}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(mock.tokens.refresh_tokens_sent(), ["kiro-rt-lease"]);
    let cred = only(&app, "kiro").await;
    assert_eq!(cred["status"], "active", "{cred}");
    let lease = app
        .post_as(KEY, "/v1/credentials/lease", &json!({"provider": "kiro"}))
        .await;
    assert_eq!(lease.json()["token"], "kiro-at-new-1", "{}", lease.text);
    let recent = status(&app).await["recent"].clone();
    assert_eq!(recent[0]["trigger"], "request", "{recent}");
    app.stop().await;
}
