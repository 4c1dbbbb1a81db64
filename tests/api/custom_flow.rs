//! The example custom flow of DEV.md: examples/custom_flow/flow.rs,
//! included here as it is, registered with `Flows::register` and built with
//! `Application::build_with_flows` as examples/custom_flow/main.rs does, against a local mock
//! of the made-up provider Acme (its device and token endpoints, and its chat API): a login
//! through `/v0/oauth/acme/*`, a refresh through the management route, then a chat
//! completion with the refreshed token; and the same against the example program itself,
//! run as its own process.

#[path = "../../examples/custom_flow/flow.rs"]
mod flow;

use crate::common::{Api, Home, eventually};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use cliproxyapi::crypto::EncryptionKey;
use cliproxyapi::domain::ProviderName;
use cliproxyapi::oauth::Flows;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "custom-flow-client-key";
const WAIT: Duration = Duration::from_secs(30);
const DEVICE_CODE: &str = "acme-device-code-0123456789";

/// What the mock of Acme saw.
#[derive(Default)]
struct Acme {
    /// Every form posted to `/device/code` and `/token`, in order.
    forms: Mutex<Vec<HashMap<String, String>>>,
    /// The `authorization` header of every chat call.
    chats: Mutex<Vec<String>>,
}

fn form(body: &str) -> HashMap<String, String> {
    serde_urlencoded::from_str(body).unwrap_or_default()
}

fn oauth_error(error: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": error}))).into_response()
}

async fn device_code(State(acme): State<Arc<Acme>>, body: String) -> Json<Value> {
    acme.forms.lock().unwrap().push(form(&body));
    Json(json!({
        "device_code": DEVICE_CODE, "user_code": "ACME-1234",
        "verification_uri": "https://acme.example/device", "expires_in": 600, "interval": 1
    }))
}

/// The device-code poll (pending once, then the tokens) and the refresh grant (the first
/// refresh token buys a new access token and a rotated refresh token; any other is refused).
async fn token(State(acme): State<Arc<Acme>>, body: String) -> Response {
    let form = form(&body);
    let polls = {
        let mut forms = acme.forms.lock().unwrap();
        forms.push(form.clone());
        forms
            .iter()
            .filter(|f| f.get("device_code").is_some())
            .count()
    };
    let tokens = |access: &str, refresh: &str| {
        Json(
            json!({"access_token": access, "token_type": "Bearer", "expires_in": 3600,
                    "refresh_token": refresh}),
        )
        .into_response()
    };
    match form.get("grant_type").map(String::as_str) {
        Some("urn:ietf:params:oauth:grant-type:device_code") if polls == 1 => {
            oauth_error("authorization_pending")
        }
        Some("urn:ietf:params:oauth:grant-type:device_code") => {
            tokens("acme-access-1", "acme-refresh-1")
        }
        Some("refresh_token") if form["refresh_token"] == "acme-refresh-1" => {
            tokens("acme-access-2", "acme-refresh-2")
        }
        _ => oauth_error("invalid_grant"),
    }
}

async fn chat(State(acme): State<Arc<Acme>>, headers: HeaderMap) -> Json<Value> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    acme.chats.lock().unwrap().push(auth.to_string());
    Json(crate::common::chat_completion("acme-1"))
}

/// The mock of Acme on a free port: its device and token endpoints under `/auth/`, its chat
/// API under `/v1/`.
async fn acme_mock(acme: &Arc<Acme>) -> String {
    crate::common::serve(
        axum::Router::new()
            .route("/auth/device/code", post(device_code))
            .route("/auth/token", post(token))
            .route("/v1/chat/completions", post(chat))
            .with_state(acme.clone()),
    )
    .await
}

/// The config naming Acme at the mock `b`, with a client key and encryption on.
fn acme_home(b: &str) -> Home {
    let key = EncryptionKey::generate_base64();
    Home::new(&format!(
        "api_keys: [\"{KEY}\"]\nauth:\n  refresh:\n    check_interval: 1h\n  encryption:\n    enabled: true\n    key: \"{key}\"\n\
         providers:\n  acme:\n    format: openai\n    base_url: \"{b}/v1\"\n    models: [\"acme-*\"]\n"
    ))
}

/// Over HTTP to `server`, with the flow's client id `acme-client`: the login (the code shown,
/// one authorization_pending, then approval), a refresh through the management route (Acme
/// sees the login's refresh token and rotates it), then a chat completion through the proxy
/// carrying the refreshed access token.
async fn login_refresh_chat(server: &impl Api, acme: &Acme) {
    // The login: the code shown, one authorization_pending, then approval.
    let r = server.call("POST", "/v0/oauth/acme/start", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let started = r.json();
    assert_eq!(started["user_code"], "ACME-1234");
    assert_eq!(started["verification_uri"], "https://acme.example/device");
    assert_eq!(started["interval"], 1);
    let session = started["session"].as_str().unwrap();
    let path = format!("/v0/oauth/acme/status?session={session}");
    let status = eventually(WAIT, || async {
        let s = server.get(&path).await.json();
        (s["status"] != "pending").then_some(s)
    })
    .await;
    assert_eq!(status["status"], "success", "{status}");
    let forms = acme.forms.lock().unwrap().clone();
    assert_eq!(forms.len(), 3, "{forms:?}");
    assert_eq!(forms[0]["client_id"], "acme-client");
    for poll in &forms[1..] {
        assert_eq!(poll["device_code"], DEVICE_CODE);
        assert_eq!(poll["client_id"], "acme-client");
    }
    let auths = server.auths().await;
    assert_eq!(auths.len(), 1, "{auths:?}");
    assert_eq!(auths[0]["id"], status["credential_id"]);
    assert_eq!(auths[0]["provider"], "acme");
    assert_eq!(auths[0]["status"], "active", "{}", auths[0]);

    // The refresh, through the flow: Acme sees the login's refresh token and rotates it.
    let r = server.post("/v0/management/auths/acme/refresh", "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let refreshed = r.json();
    assert_eq!(refreshed["refreshed"], 1, "{refreshed}");
    assert_eq!(refreshed["results"][0]["id"], status["credential_id"]);
    let grant = acme.forms.lock().unwrap().last().cloned().unwrap();
    assert_eq!(grant["grant_type"], "refresh_token");
    assert_eq!(grant["refresh_token"], "acme-refresh-1");

    // A chat completion through the proxy carries the refreshed access token.
    let body = json!({"model": "acme-1", "messages": [{"role": "user", "content": "hi"}]});
    let r = server.post_as(KEY, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        acme.chats.lock().unwrap().clone(),
        vec!["Bearer acme-access-2".to_string()]
    );
}

#[tokio::test]
async fn the_example_flow_logs_in_refreshes_and_serves() {
    let acme = Arc::new(Acme::default());
    let b = acme_mock(&acme).await;
    let home = acme_home(&b);
    // As examples/custom_flow/main.rs registers it, with ACME_AUTH_URL the mock.
    let mut flows = Flows::default();
    flows.register(
        ProviderName::from("acme"),
        Arc::new(flow::AcmeFlow::new(&format!("{b}/auth/"), "acme-client")),
    );
    let app = home
        .start_with_flows(&[], Arc::new(chrono::Utc::now), flows)
        .await;

    login_refresh_chat(&app, &acme).await;
    // The flow takes no login options: a request the routes accept (Kiro's Builder ID) is the
    // flow's to refuse, as the caller's mistake, and nothing reaches Acme.
    let forms = acme.forms.lock().unwrap().len();
    let r = app
        .call(
            "POST",
            "/v0/oauth/acme/start",
            Some(r#"{"method": "builder_id"}"#),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_login_request".to_string()),
        "{}",
        r.text
    );
    assert!(r.text.contains("takes no method"), "{}", r.text);
    assert_eq!(acme.forms.lock().unwrap().len(), forms);

    // The rotated refresh token is the one the next refresh presents.
    let r = app.post("/v0/management/auths/acme/refresh", "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let grant = acme.forms.lock().unwrap().last().cloned().unwrap();
    assert_eq!(grant["refresh_token"], "acme-refresh-2");

    app.stop().await;
    home.assert_sealed(&[
        DEVICE_CODE,
        "acme-access-1",
        "acme-refresh-1",
        "acme-access-2",
        "acme-refresh-2",
    ]);
}

/// The example program as `cargo test` builds it: `<target>/<profile>/examples/custom_flow`,
/// beside the `deps/` folder holding this test binary. Built (again) into that same target
/// folder and profile, with this binary's features, so it is never older than the library
/// it embeds (a no-op when `cargo test` just built it; a build when only `--test api` was).
fn example_program() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in <target>/<profile>/deps");
    let program = profile_dir.join("examples").join("custom_flow");
    let target_dir = profile_dir.parent().expect("<target>");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--example", "custom_flow", "--profile", profile])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if cfg!(feature = "sdk-tests") {
        cargo.args(["--features", "sdk-tests"]);
    }
    if let Some(offline) = std::env::var_os("SQLX_OFFLINE") {
        cargo.env("SQLX_OFFLINE", offline);
    }
    let status = cargo
        .status()
        .unwrap_or_else(|e| panic!("cargo does not run ({e}) to build examples/custom_flow"));
    assert!(
        status.success(),
        "`cargo build --example custom_flow` failed ({status}); build it and run again"
    );
    assert!(
        program.is_file(),
        "`cargo build --example custom_flow` built no {}",
        program.display()
    );
    program
}

/// The example program itself (examples/custom_flow/main.rs), run as its own process on a
/// config file, with Acme's settings from its environment: the same chain over HTTP.
#[tokio::test]
async fn the_example_program_logs_in_refreshes_and_serves() {
    let program = example_program();
    let acme = Arc::new(Acme::default());
    let b = acme_mock(&acme).await;
    let home = acme_home(&b);
    let config = home.config_path();
    let auth_url = format!("{b}/auth/");
    let server = home.spawn_program(
        &program,
        &[config.as_os_str()],
        &[
            ("ACME_AUTH_URL", auth_url.as_str()),
            ("ACME_CLIENT_ID", "acme-client"),
        ],
    );

    login_refresh_chat(&server, &acme).await;

    // Dropping the handle kills the program: its port no longer answers.
    let base = server.base.clone();
    drop(server);
    assert!(
        reqwest::get(format!("{base}/health")).await.is_err(),
        "the example program still answers after its handle was dropped"
    );
    home.assert_sealed(&[
        DEVICE_CODE,
        "acme-access-1",
        "acme-refresh-1",
        "acme-access-2",
        "acme-refresh-2",
    ]);
}
