//! Device-flow logins through HTTP: start, the background polling with its RFC 8628
//! answers (pending, slow_down, denied, expired, other errors, approval), the credential
//! stored and sealed, the status route and its errors, the limit on pending logins, and a
//! restart while a login is pending. The provider is a fake flow the test drives, registered
//! over copilot's with `Application::build_with_flows`.

use crate::common::{Api, Home, TestApp, eventually};
use chrono::{DateTime, Utc};
use cliproxyapi::crypto::{EncryptionKey, Secret};
use cliproxyapi::domain::login::{
    DeviceAuthorization, LoginRequest, LoginTokens, Poll, PollMaterial,
};
use cliproxyapi::domain::refresh::NewClient;
use cliproxyapi::domain::refresh::{FlowError, RefreshMaterial, Refreshed};
use cliproxyapi::domain::{AuthMethod, OauthExtra, ProviderName};
use cliproxyapi::oauth::{BoxFuture, Flows, OauthFlow};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the fake answers to a poll.
#[derive(Debug, Clone)]
enum Step {
    Pending,
    SlowDown(Option<u64>),
    Denied,
    Expired,
    Failed(&'static str),
    Retry,
    Success,
}

/// A provider the test drives: each start hands out a numbered device code; each poll takes
/// the next scripted answer, else the standing one.
struct Fake {
    interval: u64,
    tag: String,
    script: Mutex<VecDeque<Step>>,
    standing: Mutex<Step>,
    start_error: Mutex<Option<FlowError>>,
    starts: AtomicUsize,
    /// When each poll came, with the device code it presented.
    polls: Mutex<Vec<(Instant, String)>>,
    refreshes: AtomicUsize,
    /// Like kiro: a client registered per login, an access token with the refresh token, and
    /// the start request recorded (else like copilot: a start takes no body).
    kiro: bool,
    requests: Mutex<Vec<LoginRequest>>,
    /// Refuse every refresh for good (as GitHub does a token without a Copilot seat).
    refuse_refresh: std::sync::atomic::AtomicBool,
    /// How long a start takes at the provider.
    start_delay: Mutex<Duration>,
    /// The user code and verification link a start answers.
    shown: Mutex<(String, String)>,
    /// The device code a start answers, instead of the numbered one.
    device_code_override: Mutex<Option<String>>,
}

impl Fake {
    fn new(interval: u64, tag: &str) -> Arc<Fake> {
        Arc::new(Fake {
            interval,
            tag: tag.to_string(),
            script: Mutex::new(VecDeque::new()),
            standing: Mutex::new(Step::Pending),
            start_error: Mutex::new(None),
            starts: AtomicUsize::new(0),
            polls: Mutex::new(Vec::new()),
            refreshes: AtomicUsize::new(0),
            kiro: false,
            requests: Mutex::new(Vec::new()),
            refuse_refresh: std::sync::atomic::AtomicBool::new(false),
            start_delay: Mutex::new(Duration::ZERO),
            shown: Mutex::new((String::new(), "https://github.example/login/device".into())),
            device_code_override: Mutex::new(None),
        })
    }

    fn kiro(interval: u64, tag: &str) -> Arc<Fake> {
        let mut fake = Arc::try_unwrap(Fake::new(interval, tag)).ok().unwrap();
        fake.kiro = true;
        Arc::new(fake)
    }

    fn provider(&self) -> &'static str {
        if self.kiro { "kiro" } else { "copilot" }
    }

    fn client_secret(&self) -> String {
        format!("client-secret-{}", self.tag)
    }

    fn answer(&self, step: Step) {
        *self.standing.lock().unwrap() = step;
    }

    fn then(&self, steps: &[Step]) {
        self.script.lock().unwrap().extend(steps.iter().cloned());
    }

    fn polls(&self) -> Vec<(Instant, String)> {
        self.polls.lock().unwrap().clone()
    }

    fn device_code(&self, n: usize) -> String {
        format!("device-code-{}-{n}", self.tag)
    }

    fn refresh_token(&self) -> String {
        format!("gho-refresh-token-{}", self.tag)
    }

    fn access_token(&self) -> String {
        format!("copilot-access-token-{}", self.tag)
    }

    fn flows(self: &Arc<Self>) -> Flows {
        let mut flows = Flows::default();
        flows.register(ProviderName::from(self.provider()), self.clone());
        flows
    }
}

impl OauthFlow for Fake {
    fn refresh<'a>(
        &'a self,
        material: &'a RefreshMaterial,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Refreshed, FlowError>> {
        Box::pin(async move {
            self.refreshes.fetch_add(1, Ordering::SeqCst);
            if self.refuse_refresh.load(Ordering::SeqCst) {
                return Err(FlowError::Rejected("No Copilot seat (HTTP 403)".into()));
            }
            assert_eq!(
                material
                    .refresh_token
                    .as_ref()
                    .map(|t| t.expose().to_string()),
                Some(self.refresh_token())
            );
            Ok(Refreshed {
                access_token: Secret::new(self.access_token()),
                expires_at: now + chrono::TimeDelta::hours(1),
                refresh_token: None,
                client: None,
                refresh_after: None,
                api_base: None,
            })
        })
    }

    fn has_login(&self) -> bool {
        true
    }

    fn start_login<'a>(
        &'a self,
        request: &'a LoginRequest,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<DeviceAuthorization, FlowError>> {
        Box::pin(async move {
            if self.kiro {
                self.requests.lock().unwrap().push(request.clone());
            } else {
                assert_eq!(*request, LoginRequest::default());
            }
            if let Some(e) = self.start_error.lock().unwrap().clone() {
                return Err(e);
            }
            let n = self.starts.fetch_add(1, Ordering::SeqCst);
            let delay = *self.start_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            Ok(DeviceAuthorization {
                device_code: Secret::new(
                    self.device_code_override
                        .lock()
                        .unwrap()
                        .clone()
                        .unwrap_or_else(|| self.device_code(n)),
                ),
                user_code: {
                    let code = self.shown.lock().unwrap().0.clone();
                    if code.is_empty() {
                        format!("WDJB-{n:04}")
                    } else {
                        code
                    }
                },
                verification_uri: self.shown.lock().unwrap().1.clone(),
                verification_uri_complete: None,
                expires_in: Duration::from_secs(900),
                interval: Duration::from_secs(self.interval),
                client: self.kiro.then(|| NewClient {
                    client_id: format!("client-id-{}", self.tag),
                    client_secret: Secret::new(self.client_secret()),
                    client_secret_expires_at: Some(now + chrono::TimeDelta::days(90)),
                }),
                extra: OauthExtra {
                    region: request.region.clone(),
                    start_url: request.start_url.clone(),
                    auth_method: request.method,
                    ..Default::default()
                },
            })
        })
    }

    fn poll_login<'a>(
        &'a self,
        material: PollMaterial<'a>,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Poll> {
        Box::pin(async move {
            if self.kiro {
                let client = material.client.expect("kiro polls with its client");
                assert_eq!(client.client_secret.expose(), self.client_secret());
                assert_eq!(client.client_id, format!("client-id-{}", self.tag));
            }
            self.polls
                .lock()
                .unwrap()
                .push((Instant::now(), material.device_code.expose().to_string()));
            let step = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| self.standing.lock().unwrap().clone());
            match step {
                Step::Pending => Poll::Pending,
                Step::SlowDown(i) => Poll::SlowDown(i.map(Duration::from_secs)),
                Step::Denied => Poll::Denied,
                Step::Expired => Poll::Expired,
                Step::Failed(m) => Poll::Failed(m.into()),
                Step::Retry => Poll::Retry("the provider answered 503".into()),
                Step::Success => Poll::Success(LoginTokens {
                    access_token: self.kiro.then(|| Secret::new(self.access_token())),
                    refresh_token: Secret::new(self.refresh_token()),
                    expires_at: self.kiro.then(|| now + chrono::TimeDelta::hours(1)),
                    account: None,
                    label: None,
                }),
            }
        })
    }
}

async fn start(home: &Home, fake: &Arc<Fake>) -> TestApp {
    home.start_with_flows(&[], Arc::new(Utc::now), fake.flows())
        .await
}

/// `POST /v0/oauth/copilot/start` that must succeed; its answer.
async fn login(app: &TestApp) -> Value {
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

async fn status(app: &TestApp, session: &str) -> Value {
    let r = app
        .get(&format!("/v0/oauth/copilot/status?session={session}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

/// Poll the status until it is no longer `pending`.
async fn ended(app: &TestApp, session: &str) -> Value {
    eventually(Duration::from_secs(30), || async {
        let s = status(app, session).await;
        (s["status"] != "pending").then_some(s)
    })
    .await
}

#[tokio::test]
async fn slow_down_then_approval_stores_a_sealed_credential() {
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&format!(
        "auth:\n  encryption:\n    enabled: true\n    key: \"{key}\"\n"
    ));
    let fake = Fake::new(1, "approve");
    fake.then(&[Step::SlowDown(None)]);
    fake.answer(Step::Success);
    let app = start(&home, &fake).await;

    let started = login(&app).await;
    let session = started["session"].as_str().unwrap().to_string();
    assert!(session.starts_with("oas_"), "{started}");
    assert_eq!(started["user_code"], "WDJB-0000");
    assert_eq!(
        started["verification_uri"],
        "https://github.example/login/device"
    );
    assert_eq!(started["verification_uri_complete"], Value::Null);
    assert_eq!(started["interval"], 1);
    let expires_in = started["expires_in"].as_i64().unwrap();
    assert!((898..=900).contains(&expires_in), "{started}");

    // Pending, with the code for the page, before the first poll is due.
    let s = status(&app, &session).await;
    assert_eq!(s["status"], "pending", "{s}");
    assert_eq!(s["user_code"], "WDJB-0000");
    assert_eq!(s["interval"], 1);
    assert!(
        s.get("credential_id").is_none() && s.get("message").is_none(),
        "{s}"
    );

    // slow_down raised the interval by 5 s, for the status too.
    eventually(Duration::from_secs(10), || async {
        (status(&app, &session).await["interval"] == 6).then_some(())
    })
    .await;
    let s = ended(&app, &session).await;
    assert_eq!(s["status"], "success", "{s}");
    let cred = s["credential_id"].as_str().unwrap().to_string();
    let polls = fake.polls();
    assert_eq!(polls.len(), 2, "{polls:?}");
    assert!(polls.iter().all(|(_, code)| *code == fake.device_code(0)));
    let gap = polls[1].0 - polls[0].0;
    assert!(
        gap >= Duration::from_secs(6),
        "polls {gap:?} apart after slow_down"
    );

    // An OAuth credential of copilot, refreshed once at once so it is usable now.
    assert_eq!(fake.refreshes.load(Ordering::SeqCst), 1);
    let r = app.get("/v0/management/auths/copilot").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let auths = r.json()["auths"].as_array().unwrap().clone();
    assert_eq!(auths.len(), 1, "{auths:?}");
    let a = &auths[0];
    assert_eq!(a["id"], cred.as_str());
    assert_eq!(a["type"], "oauth");
    assert_eq!(a["source"], "oauth:copilot");
    assert_eq!(a["status"], "active", "{a}");
    let material = app
        .state
        .store
        .refresh_material(&cred.as_str().into())
        .await
        .unwrap();
    assert_eq!(
        material.refresh_token.unwrap().expose(),
        fake.refresh_token()
    );
    assert_eq!(material.access_token.unwrap().expose(), fake.access_token());

    // The auth log tells of the start and the end, and of no code or token.
    let log = home.auth_log();
    assert!(
        log.contains(&format!("login {session} started for copilot")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "login {session} for copilot succeeded: credential {cred}"
        )),
        "{log}"
    );
    for secret in [
        fake.device_code(0),
        fake.refresh_token(),
        fake.access_token(),
        "WDJB-0000".to_string(),
    ] {
        assert!(!log.contains(&secret), "{secret} in the auth log");
    }
    app.stop().await;
    // Sealed on disk: no device code nor token in clear in any file of data/.
    home.assert_sealed(&[
        fake.device_code(0),
        fake.refresh_token(),
        fake.access_token(),
    ]);
}

#[tokio::test]
async fn denied_expired_and_other_errors_end_their_sessions() {
    let home = Home::new("");
    let fake = Fake::new(1, "ends");
    let app = start(&home, &fake).await;
    for (steps, status, message) in [
        (
            vec![Step::Pending, Step::Retry, Step::Denied],
            "denied",
            "the user denied the login",
        ),
        (
            vec![Step::Expired],
            "expired",
            "the code expired before the login was approved",
        ),
        (
            vec![Step::Failed(
                "incorrect_device_code: the device code is wrong",
            )],
            "error",
            "incorrect_device_code: the device code is wrong",
        ),
    ] {
        fake.then(&steps);
        let polls_before = fake.polls().len();
        let session = login(&app).await["session"].as_str().unwrap().to_string();
        let s = ended(&app, &session).await;
        assert_eq!(s["status"], status, "{s}");
        assert_eq!(s["message"], message, "{s}");
        assert!(s.get("credential_id").is_none(), "{s}");
        // Ended: no poll after the last answer.
        assert_eq!(fake.polls().len() - polls_before, steps.len());
        let log = home.auth_log();
        assert!(
            log.contains(&format!(
                "login {session} for copilot ended {status}: {message}"
            )),
            "{log}"
        );
    }
    assert!(app.auths().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn status_and_start_errors() {
    let home = Home::new("");
    let fake = Fake::new(60, "errors");
    let app = start(&home, &fake).await;
    let session = login(&app).await["session"].as_str().unwrap().to_string();

    for (path, code, want) in [
        (
            "/v0/oauth/copilot/status?session=oas_none",
            404,
            "session_not_found",
        ),
        // Another provider's session is not found under this one.
        (
            &*format!("/v0/oauth/kiro/status?session={session}"),
            404,
            "session_not_found",
        ),
        ("/v0/oauth/copilot/status", 400, "invalid_query"),
        (
            "/v0/oauth/copilot/status?session=x&other=1",
            400,
            "invalid_query",
        ),
        ("/v0/oauth/nope/status?session=x", 404, "unknown_provider"),
    ] {
        let r = app.get(path).await;
        assert_eq!(
            (r.status, r.error_code()),
            (code, want.to_string()),
            "{path}: {}",
            r.text
        );
    }
    for (provider, body, code, want) in [
        ("nope", None, 404, "unknown_provider"),
        // A provider without a device-flow login.
        ("openai", None, 404, "no_login_flow"),
        (
            "copilot",
            Some("{\"method\": \"idc\"}"),
            400,
            "invalid_body",
        ),
        ("copilot", Some("{\"other\": 1}"), 400, "invalid_body"),
        ("copilot", Some("[1]"), 400, "invalid_body"),
        ("copilot", Some("{not json"), 400, "invalid_body"),
        (
            "kiro",
            Some(
                "{\"method\": \"idc\", \"start_url\": \"http://x.example\", \"region\": \"us-east-1\"}",
            ),
            400,
            "invalid_body",
        ),
        (
            "kiro",
            Some(
                "{\"method\": \"idc\", \"start_url\": \"https://x.example\", \"region\": \"Us_East\"}",
            ),
            400,
            "invalid_body",
        ),
    ] {
        let r = app
            .call("POST", &format!("/v0/oauth/{provider}/start"), body)
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (code, want.to_string()),
            "{provider} {body:?}: {}",
            r.text
        );
    }
    // What the flow says of a start.
    // The provider refusing (its words) is its answer, passed on as 502; a request the flow
    // cannot serve (nothing sent) is the caller's, 400.
    *fake.start_error.lock().unwrap() = Some(FlowError::Rejected(
        "device_flow_disabled: Device flow is disabled (HTTP 200)".into(),
    ));
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(
        (r.status, r.error_code()),
        (502, "login_refused".to_string()),
        "{}",
        r.text
    );
    assert!(r.text.contains("device_flow_disabled"), "{}", r.text);
    *fake.start_error.lock().unwrap() = Some(FlowError::Unrefreshable("unknown start URL".into()));
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_login_request".to_string()),
        "{}",
        r.text
    );
    assert!(r.text.contains("unknown start URL"), "{}", r.text);
    *fake.start_error.lock().unwrap() = Some(FlowError::Transient {
        reason: "connection refused".into(),
        retry_after: None,
    });
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(
        (r.status, r.error_code()),
        (502, "provider_unreachable".to_string()),
        "{}",
        r.text
    );
    assert_eq!(r.retry_after, None);
    // A provider that named its wait (a 429's Retry-After): passed on.
    *fake.start_error.lock().unwrap() = Some(FlowError::Transient {
        reason: "slow down (HTTP 429)".into(),
        retry_after: Some(Duration::from_secs(42)),
    });
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(
        (r.status, r.error_code(), r.retry_after.as_deref()),
        (502, "provider_unreachable".to_string(), Some("42")),
        "{}",
        r.text
    );
    assert!(r.text.contains("HTTP 429"), "{}", r.text);
    // What a flow answers is checked before the user sees it: a code of printable ASCII,
    // links to https:// (or this machine) without a user or password.
    let shown = |code: &str, link: &str| {
        *fake.shown.lock().unwrap() = (code.to_string(), link.to_string());
    };
    *fake.start_error.lock().unwrap() = None;
    for (code, link) in [
        ("WDJB-MJHT", "javascript:alert(1)"),
        ("WDJB-MJHT", "http://github.example/login/device"),
        ("WDJB-MJHT", "https://user:pw@github.example/login/device"),
        ("WDJB-MJHT", "https://"),
        ("WDJB\u{202e}MJHT", "https://github.example/login/device"),
        ("WDJB\nMJHT", "https://github.example/login/device"),
        ("   ", "https://github.example/login/device"),
        (&"X".repeat(65), "https://github.example/login/device"),
    ] {
        shown(code, link);
        let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
        assert_eq!(
            (r.status, r.error_code()),
            (502, "login_refused".to_string()),
            "{code:?} {link}: {}",
            r.text
        );
    }
    for (code, link) in [
        (&"X".repeat(64)[..], "https://github.example/login/device"),
        ("WDJB MJHT", "http://127.0.0.1:9/device"),
    ] {
        shown(code, link);
        let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
        assert_eq!(r.status, 200, "{code:?} {link}: {}", r.text);
        assert_eq!(r.json()["verification_uri"], link);
    }
    shown("", "https://github.example/login/device");
    // What a session keeps is bounded whatever the flow: a device code up to 4 KiB.
    for (len, want) in [(0, 502), (4097, 502), (1 << 20, 502), (4096, 200), (1, 200)] {
        *fake.device_code_override.lock().unwrap() = Some("d".repeat(len));
        let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
        assert_eq!(r.status, want, "a device code of {len}: {}", r.text);
        if want != 200 {
            assert_eq!(r.error_code(), "login_refused");
        }
    }
    *fake.device_code_override.lock().unwrap() = None;
    // An empty object is no body.
    *fake.start_error.lock().unwrap() = None;
    let r = app
        .call("POST", "/v0/oauth/copilot/start", Some("{}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.stop().await;
}

#[tokio::test]
async fn the_routes_are_behind_the_management_guard() {
    let home = Home::new("management:\n  secret_key: the-management-key\n");
    let fake = Fake::new(60, "guard");
    let app = start(&home, &fake).await;
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(r.status, 401, "{}", r.text);
    let r = app.get("/v0/oauth/copilot/status?session=oas_x").await;
    assert_eq!(r.status, 401, "{}", r.text);
    let auth = [("authorization", "Bearer the-management-key")];
    let r = app
        .call_with("POST", "/v0/oauth/copilot/start", None, &auth)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(fake.starts.load(Ordering::SeqCst), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_101st_pending_login_is_refused() {
    let home = Home::new("");
    let fake = Fake::new(60, "limit");
    let app = start(&home, &fake).await;
    for _ in 0..100 {
        login(&app).await;
    }
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(
        (r.status, r.error_code()),
        (429, "too_many_logins".to_string()),
        "{}",
        r.text
    );
    // Refused before the provider was asked.
    assert_eq!(fake.starts.load(Ordering::SeqCst), 100);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_starts_past_the_limit_never_reach_the_provider() {
    let home = Home::new("");
    let fake = Fake::new(5, "race");
    let app = start(&home, &fake).await;
    for _ in 0..60 {
        login(&app).await;
    }
    // 80 starts at once, each held at the provider a while: the 40 slots left go to 40 of
    // them, the rest are refused without a call.
    *fake.start_delay.lock().unwrap() = Duration::from_millis(300);
    let calls = (0..80).map(|_| app.call("POST", "/v0/oauth/copilot/start", None));
    let answers = futures_util::future::join_all(calls).await;
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for r in &answers {
        *by_status.entry(r.status).or_default() += 1;
        if r.status != 200 {
            assert_eq!(r.error_code(), "too_many_logins", "{}", r.text);
        }
    }
    assert_eq!(by_status, [(200, 40), (429, 40)].into(), "{by_status:?}");
    assert_eq!(fake.starts.load(Ordering::SeqCst), 100);
    // The refused starts gave their slots back (and held no session): with one login ended,
    // exactly one more starts.
    *fake.start_delay.lock().unwrap() = Duration::ZERO;
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(r.status, 429, "{}", r.text);
    fake.then(&[Step::Denied]);
    eventually(Duration::from_secs(30), || async {
        let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
        (r.status == 200).then_some(())
    })
    .await;
    let r = app.call("POST", "/v0/oauth/copilot/start", None).await;
    assert_eq!(r.status, 429, "{}", r.text);
    app.stop().await;
}

#[tokio::test]
async fn a_restart_while_pending_resumes_polling_and_completes() {
    let home = Home::new("");
    let fake = Fake::new(1, "restart");
    let app = start(&home, &fake).await;
    let session = login(&app).await["session"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), || async {
        (!fake.polls().is_empty()).then_some(())
    })
    .await;
    app.stop().await;
    let polls_at_stop = fake.polls().len();

    // The user approves while the server is down; the next server polls again and stores it.
    fake.answer(Step::Success);
    let app = start(&home, &fake).await;
    let s = ended(&app, &session).await;
    assert_eq!(s["status"], "success", "{s}");
    let polls = fake.polls();
    assert!(polls.len() > polls_at_stop);
    assert!(polls.iter().all(|(_, code)| *code == fake.device_code(0)));
    let auths = app.auths().await;
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0]["id"], s["credential_id"]);
    assert!(
        home.auth_log()
            .contains("resumed polling 1 pending login(s)")
    );
    app.stop().await;
}

/// A clock the test moves: the real time plus an offset.
fn movable_clock() -> (Arc<std::sync::atomic::AtomicI64>, cliproxyapi::state::Clock) {
    let offset = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let o = offset.clone();
    let clock: cliproxyapi::state::Clock =
        Arc::new(move || Utc::now() + chrono::TimeDelta::seconds(o.load(Ordering::SeqCst)));
    (offset, clock)
}

#[tokio::test]
async fn a_login_past_its_time_expires_and_ended_ones_are_deleted_after_an_hour() {
    let home = Home::new("");
    let fake = Fake::new(1, "time");
    let (offset, clock) = movable_clock();
    let app = home.start_with_flows(&[], clock, fake.flows()).await;
    let session = login(&app).await["session"].as_str().unwrap().to_string();
    // The provider never ends it; its code's 900 s do.
    offset.store(901, Ordering::SeqCst);
    let s = ended(&app, &session).await;
    assert_eq!(s["status"], "expired", "{s}");
    assert_eq!(
        s["message"],
        "the code expired before the login was approved"
    );
    assert!(fake.polls().is_empty(), "polled past its time");

    // The cleanup keeps it an hour, then deletes it.
    let now = app.state.now();
    cliproxyapi::jobs::logins::run(&app.state, now + chrono::TimeDelta::minutes(59)).await;
    status(&app, &session).await;
    cliproxyapi::jobs::logins::run(&app.state, now + chrono::TimeDelta::minutes(61)).await;
    let r = app
        .get(&format!("/v0/oauth/copilot/status?session={session}"))
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    app.stop().await;
}

#[tokio::test]
async fn a_login_pending_when_encryption_is_turned_on_is_sealed_and_goes_on() {
    let home = Home::new("");
    let fake = Fake::new(1, "turnon");
    let app = start(&home, &fake).await;
    let session = login(&app).await["session"].as_str().unwrap().to_string();
    let broken = login(&app).await["session"].as_str().unwrap().to_string();
    app.stop().await;
    // A second pending login's code, stored in clear, no longer reads (not UTF-8): the start
    // goes on all the same, and that login ends `error`.
    let db = rusqlite::Connection::open(home.path().join("data/cliproxy.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE oauth_sessions SET device_code_sealed = ?1 WHERE id = ?2",
            rusqlite::params![vec![0u8, 0xff, 0xfe], broken],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    // Encryption turned on while the login was pending: its code, stored in clear, is sealed
    // at the start like every secret, and polling goes on with it.
    let key = EncryptionKey::generate_base64();
    std::fs::write(
        home.config_path(),
        format!("host: 127.0.0.1\nport: 0\nauth:\n  encryption:\n    enabled: true\n    key: \"{key}\"\n"),
    )
    .unwrap();
    let app = start(&home, &fake).await;
    let code = fake.device_code(0);
    home.assert_sealed(&[&code]);
    fake.answer(Step::Success);
    let s = ended(&app, &session).await;
    assert_eq!(s["status"], "success", "{s}");
    assert!(fake.polls().iter().all(|(_, c)| *c == code));
    assert_eq!(app.auths().await.len(), 1);
    let s = ended(&app, &broken).await;
    assert_eq!(s["status"], "error", "{s}");
    app.stop().await;
}

#[tokio::test]
async fn a_kiro_like_login_stores_its_client_and_a_second_login_updates_it() {
    let key = EncryptionKey::generate_base64();
    let home = Home::new(&format!(
        "auth:\n  encryption:\n    enabled: true\n    key: \"{key}\"\n"
    ));
    let fake = Fake::kiro(1, "kiro");
    fake.answer(Step::Success);
    let app = start(&home, &fake).await;
    let body = r#"{"method": "idc", "start_url": "https://my-org.awsapps.com/start", "region": "eu-west-1"}"#;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = app.call("POST", "/v0/oauth/kiro/start", Some(body)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let session = r.json()["session"].as_str().unwrap().to_string();
        let r = app
            .get(&format!("/v0/oauth/kiro/status?session={session}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let s = eventually(Duration::from_secs(30), || async {
            let r = app
                .get(&format!("/v0/oauth/kiro/status?session={session}"))
                .await;
            let s = r.json();
            (s["status"] != "pending").then_some(s)
        })
        .await;
        assert_eq!(s["status"], "success", "{s}");
        ids.push(s["credential_id"].as_str().unwrap().to_string());
    }
    // The same user again: the same credential, its tokens replaced.
    assert_eq!(ids[0], ids[1]);
    let requests = fake.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].method, Some(AuthMethod::Idc));
    assert_eq!(requests[0].region.as_deref(), Some("eu-west-1"));
    assert_eq!(
        requests[0].start_url.as_deref(),
        Some("https://my-org.awsapps.com/start")
    );
    // An access token came with the login: no refresh needed.
    assert_eq!(fake.refreshes.load(Ordering::SeqCst), 0);
    let auths = app.auths().await;
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0]["provider"], "kiro");
    assert_eq!(auths[0]["status"], "active", "{}", auths[0]);
    let material = app
        .state
        .store
        .refresh_material(&ids[0].as_str().into())
        .await
        .unwrap();
    assert_eq!(
        material.client_secret.unwrap().expose(),
        fake.client_secret()
    );
    assert_eq!(material.access_token.unwrap().expose(), fake.access_token());
    assert_eq!(material.extra.client_id.as_deref(), Some("client-id-kiro"));
    assert_eq!(material.extra.region.as_deref(), Some("eu-west-1"));
    assert_eq!(material.extra.auth_method, Some(AuthMethod::Idc));
    assert!(material.extra.client_secret_expires_at.is_some());
    app.stop().await;
    home.assert_sealed(&[
        fake.device_code(0),
        fake.device_code(1),
        fake.client_secret(),
        fake.refresh_token(),
        fake.access_token(),
    ]);
}

#[tokio::test]
async fn slow_down_with_the_providers_interval_is_taken_within_bounds() {
    let home = Home::new("");
    let fake = Fake::new(1, "github-interval");
    // GitHub's slow_down names the new interval; one past 60 s is held to 60 s.
    fake.then(&[Step::SlowDown(Some(2)), Step::SlowDown(Some(120))]);
    let app = start(&home, &fake).await;
    let session = login(&app).await["session"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(15), || async {
        (status(&app, &session).await["interval"] == 60).then_some(())
    })
    .await;
    let polls = fake.polls();
    assert_eq!(polls.len(), 2, "{polls:?}");
    let gap = polls[1].0 - polls[0].0;
    assert!(gap >= Duration::from_secs(2), "polls {gap:?} apart");
    assert_eq!(status(&app, &session).await["status"], "pending");
    app.stop().await;
}

/// An approved login whose first token exchange is refused for good (no Copilot seat) ends
/// `error` with the provider's reason, not a success that cannot serve.
#[tokio::test]
async fn an_approved_login_whose_token_is_refused_ends_in_error() {
    let home = Home::new("");
    let fake = Fake::new(1, "noseat");
    fake.refuse_refresh.store(true, Ordering::SeqCst);
    let app = start(&home, &fake).await;
    fake.then(&[Step::Success]);
    let session = login(&app).await["session"].as_str().unwrap().to_string();
    let s = ended(&app, &session).await;
    assert_eq!(s["status"], "error", "{s}");
    let message = s["message"].as_str().unwrap();
    assert!(message.contains("No Copilot seat"), "{s}");
    let auths = app.auths().await;
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0]["status"], "expired", "{}", auths[0]);
    app.stop().await;
}

/// Polls that fail in a way worth retrying (a timeout, a 429, a 5xx) back off: each wait
/// twice the last (RFC 8628 §3.5), and an answer resets it.
#[tokio::test]
async fn failed_polls_back_off() {
    let home = Home::new("");
    let fake = Fake::new(1, "backoff");
    let app = start(&home, &fake).await;
    fake.then(&[Step::Retry, Step::Retry, Step::Retry, Step::Denied]);
    let session = login(&app).await["session"].as_str().unwrap().to_string();
    let s = ended(&app, &session).await;
    assert_eq!(s["status"], "denied", "{s}");
    let polls = fake.polls();
    assert_eq!(polls.len(), 4);
    let gaps: Vec<Duration> = polls.windows(2).map(|w| w[1].0 - w[0].0).collect();
    // 1 s (the interval), then 2 s, then 4 s; a little less for the clock's rounding.
    for (gap, at_least) in gaps.iter().zip([900, 1900, 3900]) {
        assert!(*gap >= Duration::from_millis(at_least), "{gaps:?}");
    }
    app.stop().await;
}
