//! The OAuth pages in a real browser (README, "OAuth pages"): headless
//! Chromium, driven through chromedriver over WebDriver, opens `/v0/oauth/copilot` and
//! `/v0/oauth/kiro` on the real server, whose GitHub, Copilot and AWS SSO OIDC endpoints are a
//! local mock. Each end state is kept as a screenshot under `target/page-screenshots/`.
//!
//! The harness, the pages, their headers and the key prompt stand alone. The flows (start,
//! code, approval, success; a denied flow and its retry) go through the JSON routes of
//! contract section 6 (`POST /v0/oauth/{provider}/start`, `GET .../status`).
//!
//! Needs `chromium` and `chromedriver` on the PATH (Debian: `chromium chromium-driver`;
//! `.ci/run` installs them, scripts/test.sh checks for them). The browser tests run one at a
//! time: each starts a browser, and the machine may be small.

use crate::common::{Api, Home, TestApp, eventually};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const MANAGEMENT_KEY: &str = "page-test-management-key";

/// One browser at a time across this module's tests.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// chromedriver on a free loopback port, in its own process group; the group (chromedriver
/// and the browsers it started) is killed when this is dropped, whatever the test did.
struct Chromedriver {
    child: Child,
    base: String,
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new("chromedriver");
        command
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .expect("chromedriver starts (Debian: apt-get install chromium chromium-driver)");
        let driver = Chromedriver {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let status = format!("{}/status", driver.base);
        let http = reqwest::Client::new();
        eventually(WAIT, || async {
            let r = http.get(&status).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            (v["value"]["ready"] == true).then_some(())
        })
        .await;
        driver
    }

    /// A headless Chromium session, phone-sized, keeping the console's messages.
    async fn browser(&self) -> Browser {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--no-first-run",
                            "--window-size=412,915"]}),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.base)
            .await
            .expect("a chromium session");
        let session = client.session_id().await.unwrap().expect("a session id");
        Browser {
            client,
            log_url: format!("{}/session/{session}/se/log", self.base),
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The group this test started: chromedriver and its browsers.
        let group = self.child.id() as libc::pid_t;
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

struct Browser {
    client: Client,
    log_url: String,
}

impl Browser {
    async fn open(&self, url: &str) {
        self.client.goto(url).await.expect("the page opens");
    }

    async fn find(&self, css: &str) -> Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    /// Wait until `css` is displayed; the element.
    async fn shown(&self, css: &str) -> Element {
        eventually(WAIT, || async {
            let e = self.client.find(Locator::Css(css)).await.ok()?;
            e.is_displayed().await.ok()?.then_some(e)
        })
        .await
    }

    async fn is_shown(&self, css: &str) -> bool {
        self.find(css).await.is_displayed().await.unwrap()
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    async fn click(&self, css: &str) {
        self.shown(css).await.click().await.unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.shown(css).await.send_keys(text).await.unwrap();
    }

    /// The console's messages since the last call (chromedriver's log endpoint).
    async fn console(&self) -> Vec<Value> {
        let r = reqwest::Client::new()
            .post(&self.log_url)
            .json(&json!({"type": "browser"}))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["value"].as_array().cloned().unwrap_or_default()
    }

    async fn assert_no_console_errors(&self) {
        self.assert_no_console_errors_but(&[]).await
    }

    /// No console error but those containing one of `expected` (Chromium reports every
    /// answer of 400 or more to a fetch as one).
    async fn assert_no_console_errors_but(&self, expected: &[&str]) {
        let errors: Vec<Value> = self
            .console()
            .await
            .into_iter()
            .filter(|m| m["level"] == "SEVERE")
            .filter(|m| {
                let text = m["message"].as_str().unwrap_or_default();
                !expected.iter().any(|e| text.contains(e))
            })
            .collect();
        assert!(errors.is_empty(), "console errors: {errors:#?}");
    }

    /// Keep what the page shows as `target/page-screenshots/<name>.png`.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
            .join("page-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// What the mock's token endpoints answer.
const PENDING: u8 = 0;
const APPROVED: u8 = 1;
const DENIED: u8 = 2;

/// GitHub (device code, token), Copilot's token exchange, and AWS SSO OIDC (register, device
/// authorization, token) under `/{region}/`.
struct Mock {
    base: String,
    answer: Arc<AtomicU8>,
    /// The paths called, in order.
    calls: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct MockState {
    answer: Arc<AtomicU8>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Mock {
    async fn start() -> Mock {
        let state = MockState {
            answer: Arc::new(AtomicU8::new(PENDING)),
            calls: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/login/device/code", post(github_code))
            .route("/login/oauth/access_token", post(github_token))
            .route("/copilot_internal/v2/token", get(copilot_token))
            .route("/{region}/client/register", post(kiro_register))
            .route("/{region}/device_authorization", post(kiro_authorize))
            .route("/{region}/token", post(kiro_token))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                |State(s): State<MockState>,
                 req: axum::extract::Request,
                 next: axum::middleware::Next| async move {
                    s.calls.lock().unwrap().push(req.uri().path().to_string());
                    next.run(req).await
                },
            ))
            .with_state(state.clone());
        let base = crate::common::serve(app).await;
        Mock {
            base,
            answer: state.answer,
            calls: state.calls,
        }
    }

    fn answer(&self, answer: u8) {
        self.answer.store(answer, Ordering::SeqCst);
    }

    fn config(&self) -> String {
        let b = &self.base;
        format!(
            "oauth:\n  copilot:\n    github_base_url: \"{b}\"\n    api_base_url: \"{b}\"\n  \
             kiro:\n    oidc_base_url: \"{b}/{{region}}\"\n"
        )
    }
}

async fn github_code() -> Json<Value> {
    Json(
        json!({"device_code": "dc-page-secret", "user_code": "PAGE-1234",
                "verification_uri": "https://github.com/login/device",
                "expires_in": 900, "interval": 1}),
    )
}

async fn github_token(State(s): State<MockState>) -> Json<Value> {
    Json(match s.answer.load(Ordering::SeqCst) {
        APPROVED => {
            json!({"access_token": "gho_page", "token_type": "bearer", "scope": "read:user"})
        }
        DENIED => json!({"error": "access_denied",
                         "error_description": "The user has denied your application access."}),
        _ => json!({"error": "authorization_pending"}),
    })
}

async fn copilot_token() -> Json<Value> {
    let now = chrono::Utc::now().timestamp();
    Json(
        json!({"token": "tid=copilot-page", "expires_at": now + 1800, "refresh_in": 1500,
                "endpoints": {"api": "https://api.githubcopilot.com"}}),
    )
}

async fn kiro_register() -> Json<Value> {
    let now = chrono::Utc::now().timestamp();
    Json(
        json!({"clientId": "client-page", "clientSecret": "cs-page-secret",
                "clientSecretExpiresAt": now + 90 * 86400, "clientIdIssuedAt": now}),
    )
}

async fn kiro_authorize() -> Json<Value> {
    Json(
        json!({"deviceCode": "dc-kiro-secret", "userCode": "KIRO-5678",
                "verificationUri": "https://device.sso.us-east-1.amazonaws.com/",
                "verificationUriComplete": "https://device.sso.us-east-1.amazonaws.com/?user_code=KIRO-5678",
                "expiresIn": 600, "interval": 1}),
    )
}

async fn kiro_token(State(s): State<MockState>) -> Response {
    match s.answer.load(Ordering::SeqCst) {
        APPROVED => Json(
            json!({"accessToken": "aoa-page", "refreshToken": "aor-page",
                                "expiresIn": 3600, "tokenType": "Bearer"}),
        )
        .into_response(),
        DENIED => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "access_denied"})),
        )
            .into_response(),
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "authorization_pending"})),
        )
            .into_response(),
    }
}

/// The page answers of `app`: status and the named headers.
async fn page_headers(app: &TestApp, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = app
        .client
        .get(format!("{}{path}", app.base))
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

/// Pages and assets: their types and the headers every one of them carries; served to
/// loopback without a key even with one configured (the page asks for it), and the JSON they
/// call is not served without it.
#[tokio::test]
async fn pages_and_assets_carry_their_headers() {
    let home = Home::new(&format!(
        "management:\n  secret_key: \"{MANAGEMENT_KEY}\"\n"
    ));
    let app = home.start().await;
    for (path, content_type) in [
        ("/v0/oauth/copilot", "text/html; charset=utf-8"),
        ("/v0/oauth/kiro", "text/html; charset=utf-8"),
        ("/v0/oauth/assets/page.js", "text/javascript; charset=utf-8"),
        ("/v0/oauth/assets/page.css", "text/css; charset=utf-8"),
    ] {
        let (status, h, body) = page_headers(&app, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        let header = |n: &str| h.get(n).unwrap().to_str().unwrap().to_string();
        assert_eq!(header("content-type"), content_type, "{path}");
        let csp = header("content-security-policy");
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "img-src data:",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("cache-control"), "no-store");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert!(!body.contains(MANAGEMENT_KEY));
    }
    let (_, _, html) = page_headers(&app, "/v0/oauth/kiro").await;
    assert!(html.contains("data-key=\"required\"") && html.contains("data-provider=\"kiro\""));
    // The management API itself still wants the key.
    let r = app.get("/v0/management/auths").await;
    assert_eq!(r.status, 401);
    app.stop().await;

    // Without a key configured the page does not ask for one.
    let home = Home::new("");
    let app = home.start().await;
    let (status, _, html) = page_headers(&app, "/v0/oauth/copilot").await;
    assert_eq!(status, 200);
    assert!(html.contains("data-key=\"none\""));
    app.stop().await;
}

/// Each page loads in Chromium with its start button and no console error (a CSP violation
/// would be one); Kiro's Identity Center choice shows its start URL and region fields.
#[tokio::test]
async fn pages_load_in_chromium_without_console_errors() {
    let _one = BROWSER.lock().await;
    let mock = Mock::start().await;
    let home = Home::new(&mock.config());
    let app = home.start().await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser().await;

    browser
        .open(&format!("{}/v0/oauth/copilot", app.base))
        .await;
    browser.shown("#start").await;
    assert!(!browser.is_shown("#key-form").await);
    assert!(!browser.is_shown("#flow").await);
    assert!(!browser.is_shown("#result").await);
    browser.screenshot("copilot-start").await;
    browser.assert_no_console_errors().await;

    browser.open(&format!("{}/v0/oauth/kiro", app.base)).await;
    browser.shown("#start").await;
    browser.shown("#method-builder-id").await;
    assert!(!browser.is_shown("#start-url").await);
    browser.click("#method-idc").await;
    browser.shown("#start-url").await;
    browser.shown("#region").await;
    browser.screenshot("kiro-start").await;
    browser.assert_no_console_errors().await;
    // The harness does see console errors: a probe is reported.
    browser
        .client
        .execute("console.error('console-probe');", vec![])
        .await
        .unwrap();
    let seen = browser.console().await;
    assert!(
        seen.iter()
            .any(|m| m["level"] == "SEVERE"
                && m["message"].as_str().unwrap().contains("console-probe")),
        "{seen:?}"
    );

    browser.close().await;
    app.stop().await;
}

/// With a management key configured the page loads, asks for the key before anything else,
/// and keeps it in sessionStorage for its calls.
#[tokio::test]
async fn the_page_asks_for_the_management_key() {
    let _one = BROWSER.lock().await;
    let home = Home::new(&format!(
        "management:\n  secret_key: \"{MANAGEMENT_KEY}\"\n"
    ));
    let app = home.start().await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser().await;

    browser
        .open(&format!("{}/v0/oauth/copilot", app.base))
        .await;
    browser.shown("#key-form").await;
    assert!(!browser.is_shown("#start").await);
    assert!(
        browser
            .text("#key-message")
            .await
            .contains("management key")
    );
    browser.screenshot("key-prompt").await;
    browser.type_into("#key", MANAGEMENT_KEY).await;
    browser.click("#key-save").await;
    browser.shown("#start").await;
    assert!(!browser.is_shown("#key-form").await);
    let stored = browser
        .client
        .execute(
            "return sessionStorage.getItem('cliproxyapi.management-key');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored, json!(MANAGEMENT_KEY));
    // Another page of the same tab does not ask again.
    browser.open(&format!("{}/v0/oauth/kiro", app.base)).await;
    browser.shown("#start").await;
    assert!(!browser.is_shown("#key-form").await);
    browser.assert_no_console_errors().await;

    browser.close().await;
    app.stop().await;
}

/// Wait until `css` is shown; a flow that ends first (the start refused, the JSON routes
/// missing) fails the test with what the page says.
async fn before_the_end(browser: &Browser, css: &str) {
    let shown = eventually(WAIT, || async {
        if browser.is_shown(css).await {
            return Some(Ok(()));
        }
        if browser.is_shown("#result").await {
            return Some(Err(browser.text("#result").await));
        }
        None
    })
    .await;
    shown.unwrap_or_else(|page| panic!("the flow ended before {css} was shown: {page}"))
}

/// The user code, once shown.
async fn code(browser: &Browser) -> String {
    before_the_end(browser, "#flow").await;
    browser.text("#user-code").await
}

/// Wait for the end state, then keep it as a screenshot.
async fn result(browser: &Browser, name: &str) -> String {
    browser.shown("#result").await;
    browser.screenshot(name).await;
    browser.text("#result").await
}

/// Copilot, with a management key: the page asks for it, a wrong one is refused and asked
/// again, then start, the code shown large with its link, the approval, and success with
/// the new credential's id and its management link.
#[tokio::test]
async fn copilot_flow_from_start_to_success() {
    let _one = BROWSER.lock().await;
    let mock = Mock::start().await;
    let home = Home::new(&format!(
        "{}management:\n  secret_key: \"{MANAGEMENT_KEY}\"\n",
        mock.config()
    ));
    let app = home.start().await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser().await;

    browser
        .open(&format!("{}/v0/oauth/copilot", app.base))
        .await;
    browser.type_into("#key", "a wrong key").await;
    browser.click("#key-save").await;
    browser.click("#start").await;
    // The start call answered 401: the page asks again, and starts once it has the key.
    before_the_end(&browser, "#key-form").await;
    assert!(browser.text("#key-message").await.contains("refused"));
    browser.type_into("#key", MANAGEMENT_KEY).await;
    browser.click("#key-save").await;

    assert_eq!(code(&browser).await, "PAGE-1234");
    let link = browser.find("#verify-link").await;
    assert_eq!(
        link.attr("href").await.unwrap().as_deref(),
        Some("https://github.com/login/device")
    );
    assert_eq!(
        link.attr("target").await.unwrap().as_deref(),
        Some("_blank")
    );
    assert_eq!(
        link.attr("rel").await.unwrap().as_deref(),
        Some("noopener noreferrer")
    );
    assert!(browser.text("#time-left").await.contains("left"));
    browser.shown("#status").await;
    browser.click("#copy").await;
    browser.shown("#copy-state").await;
    browser.screenshot("copilot-code").await;

    mock.answer(APPROVED);
    let text = result(&browser, "copilot-success").await;
    assert!(text.contains("Logged in"), "{text}");
    let id = browser.text("#credential-id").await;
    assert!(!id.is_empty() && text.contains(&id));
    let manage = browser.find("#manage-link").await;
    assert_eq!(
        manage.attr("href").await.unwrap().as_deref(),
        Some("/v0/management/auths/copilot")
    );
    assert!(!browser.is_shown("#retry").await);
    let r = app
        .call_with(
            "GET",
            "/v0/management/auths/copilot",
            None,
            &[("authorization", &format!("Bearer {MANAGEMENT_KEY}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let auths = r.json()["auths"].as_array().unwrap().clone();
    assert!(auths.iter().any(|a| a["id"] == id.as_str()), "{auths:?}");
    // The wrong key's 401, and nothing else.
    browser
        .assert_no_console_errors_but(&[
            "/v0/oauth/copilot/start - Failed to load resource: the server responded with a status of 401",
        ])
        .await;

    browser.close().await;
    app.stop().await;
}

/// Kiro with Builder ID: start, the code and the complete link, approval, success.
#[tokio::test]
async fn kiro_builder_id_flow_from_start_to_success() {
    let _one = BROWSER.lock().await;
    let mock = Mock::start().await;
    let home = Home::new(&mock.config());
    let app = home.start().await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser().await;

    browser.open(&format!("{}/v0/oauth/kiro", app.base)).await;
    browser.click("#start").await;
    assert_eq!(code(&browser).await, "KIRO-5678");
    let complete = browser.shown("#verify-complete-link").await;
    assert_eq!(
        complete.attr("href").await.unwrap().as_deref(),
        Some("https://device.sso.us-east-1.amazonaws.com/?user_code=KIRO-5678")
    );
    browser.screenshot("kiro-code").await;

    mock.answer(APPROVED);
    let text = result(&browser, "kiro-success").await;
    assert!(text.contains("Logged in"), "{text}");
    let id = browser.text("#credential-id").await;
    let auths = app.get("/v0/management/auths/kiro").await.json()["auths"].clone();
    assert!(
        auths
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id.as_str()),
        "{auths}"
    );
    let calls = mock.calls.lock().unwrap().clone();
    assert!(
        calls.iter().any(|p| p == "/us-east-1/device_authorization"),
        "{calls:?}"
    );
    browser.assert_no_console_errors().await;

    browser.close().await;
    app.stop().await;
}

/// Reloading the page mid-flow (the user's guide: "refresh the auth page") resumes the login
/// this tab started: the same code, no second start at the provider; it ends as usual, and a
/// reload after the end offers a new start.
#[tokio::test]
async fn a_reload_mid_flow_resumes_the_login() {
    let _one = BROWSER.lock().await;
    let mock = Mock::start().await;
    let home = Home::new(&mock.config());
    let app = home.start().await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser().await;
    let page = format!("{}/v0/oauth/copilot", app.base);
    let starts = || {
        mock.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.as_str() == "/login/device/code")
            .count()
    };

    browser.open(&page).await;
    browser.click("#start").await;
    assert_eq!(code(&browser).await, "PAGE-1234");
    assert_eq!(starts(), 1);
    browser.client.refresh().await.unwrap();
    assert_eq!(code(&browser).await, "PAGE-1234");
    assert!(browser.text("#time-left").await.contains("left"));
    assert!(!browser.is_shown("#begin").await);
    assert_eq!(starts(), 1, "the reload started another login");

    mock.answer(APPROVED);
    let text = result(&browser, "copilot-resumed-success").await;
    assert!(text.contains("Logged in"), "{text}");
    browser.client.refresh().await.unwrap();
    browser.shown("#start").await;
    assert!(!browser.is_shown("#flow").await);
    browser.assert_no_console_errors().await;
    browser.close().await;
    app.stop().await;
}

/// A denied flow ends on its reason with a retry button; retry starts a new flow.
#[tokio::test]
async fn a_denied_flow_shows_its_reason_and_a_retry() {
    let _one = BROWSER.lock().await;
    let mock = Mock::start().await;
    mock.answer(DENIED);
    let home = Home::new(&mock.config());
    let app = home.start().await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser().await;

    browser
        .open(&format!("{}/v0/oauth/copilot", app.base))
        .await;
    browser.click("#start").await;
    let text = result(&browser, "copilot-denied").await;
    assert!(text.contains("denied"), "{text}");
    assert!(!browser.is_shown("#success-detail").await);
    mock.answer(PENDING);
    browser.click("#retry").await;
    assert_eq!(code(&browser).await, "PAGE-1234");
    assert!(!browser.is_shown("#result").await);
    browser.assert_no_console_errors().await;

    browser.close().await;
    app.stop().await;
}
