//! The test harness: the real application on port 0 with a temporary folder holding its
//! config, database, auth files and logs; and the real binary, for restarts and `kill -9`.

use cliproxyapi::app::{Application, StartError};
use cliproxyapi::config::Config;
use cliproxyapi::oauth::Flows;
use cliproxyapi::state::Clock;
use serde_json::Value;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A temporary home for one server: `config.yaml`, `auths/`, `data/`, `logs/`.
pub struct Home {
    pub dir: TempDir,
}

impl Home {
    /// A home whose config is the defaults on port 0 plus `extra` YAML lines.
    pub fn new(extra: &str) -> Home {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("auths")).unwrap();
        std::fs::write(
            dir.path().join("config.yaml"),
            format!("host: 127.0.0.1\nport: 0\n{extra}"),
        )
        .unwrap();
        Home { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("config.yaml")
    }

    pub fn auth_file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path().join("auths").join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// The refresh worker is off unless the test's config names `refresh:`: credentials that
    /// other tests add with a refresh token alone would otherwise be refreshed against the
    /// real token endpoints, which no test may reach.
    fn refresh_off(&self) -> Option<(&'static str, &'static str)> {
        let yaml = std::fs::read_to_string(self.config_path()).unwrap_or_default();
        (!yaml.contains("refresh:")).then_some(("CLIPROXY__AUTH__REFRESH__ENABLED", "false"))
    }

    /// No secret of `secrets` in clear in any file of `data/` (the database, its WAL).
    pub fn assert_sealed(&self, secrets: &[impl AsRef<str>]) {
        for entry in std::fs::read_dir(self.path().join("data")).unwrap() {
            let path = entry.unwrap().path();
            if !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for secret in secrets.iter().map(AsRef::as_ref) {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} in clear on disk, in {}",
                    path.display()
                );
            }
        }
    }

    pub fn auth_log(&self) -> String {
        std::fs::read_to_string(self.path().join("logs/auth.log")).unwrap_or_default()
    }

    /// Build and serve the application in this process.
    pub async fn start(&self) -> TestApp {
        self.start_with(&[], Arc::new(chrono::Utc::now)).await
    }

    /// Build with `CLIPROXY__*` overrides and a clock of the test's.
    pub async fn start_with(&self, env: &[(&str, &str)], clock: Clock) -> TestApp {
        self.start_with_flows(env, clock, Flows::default()).await
    }

    /// [`Home::start_with`], with the test's own login and refresh flows registered over the
    /// config's (`Application::build_with_flows`).
    pub async fn start_with_flows(
        &self,
        env: &[(&str, &str)],
        clock: Clock,
        flows: Flows,
    ) -> TestApp {
        let app = self
            .build_with_flows(env, clock, flows)
            .await
            .expect("application builds");
        let base = format!("http://{}", app.local_addr());
        let state = app.state();
        let guards = app.guards();
        let report = app.import_report().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(app.serve(async {
            let _ = rx.await;
        }));
        TestApp {
            base,
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            handle: Some(handle),
            state,
            guards,
            import_report: report,
        }
    }

    /// Build (not serve) the application, for tests of start failures.
    pub async fn build(
        &self,
        env: &[(&str, &str)],
        clock: Clock,
    ) -> Result<Application, StartError> {
        self.build_with_flows(env, clock, Flows::default()).await
    }

    async fn build_with_flows(
        &self,
        env: &[(&str, &str)],
        clock: Clock,
        flows: Flows,
    ) -> Result<Application, StartError> {
        let env = env
            .iter()
            .copied()
            .chain(self.refresh_off())
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let loaded = Config::load_with_env(&self.config_path(), true, env).expect("config");
        Application::build_with_flows(loaded, clock, flows).await
    }

    /// Start the real binary on this home and wait until it listens.
    pub fn spawn_binary(&self) -> Binary {
        let config = self.config_path();
        self.spawn_program(
            Path::new(env!("CARGO_BIN_EXE_cliproxyapi")),
            &[OsStr::new("--config"), config.as_os_str()],
            &[],
        )
    }

    /// Start `program ARGS` (the binary, or a program embedding the server) on this home,
    /// with `env` over the test's environment, and wait until it prints its `address=` line.
    /// The program is killed when the [`Binary`] is dropped.
    pub fn spawn_program(&self, program: &Path, args: &[&OsStr], env: &[(&str, &str)]) -> Binary {
        let mut child = Command::new(program)
            .args(args)
            .current_dir(self.path())
            .env_remove("CLIPROXY_CONFIG")
            .envs(self.refresh_off())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", program.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("address=").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        // Killed on the way out when it never listens, as on drop.
        let mut binary = Binary {
            child,
            base: String::new(),
            client: reqwest::Client::new(),
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{} prints its address", program.display()));
        binary.base = format!("http://{addr}");
        binary
    }

    /// Run `cliproxyapi ARGS` on this home to completion.
    pub fn run_binary(&self, args: &[&str]) -> std::process::Output {
        self.run_binary_env(args, &[])
    }

    /// The binary command for `ARGS` with extra environment variables, not yet started.
    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cliproxyapi"));
        cmd.arg("--config")
            .arg(self.config_path())
            .args(args)
            .current_dir(self.path())
            .env_remove("CLIPROXY_CONFIG")
            .envs(self.refresh_off());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn run_binary_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        self.command(args, env).output().expect("binary runs")
    }
}

/// A response, read whole: status and body (JSON when it parses).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub text: String,
    pub retry_after: Option<String>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `error.code` of our error shape, checking the shape on the way.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let err = v
            .get("error")
            .unwrap_or_else(|| panic!("no error object: {v}"));
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without message: {v}"
        );
        err["code"].as_str().expect("error code").to_string()
    }
}

/// Requests to a running server; every response is recorded so tests can search them all.
pub trait Api {
    fn base(&self) -> &str;
    fn client(&self) -> &reqwest::Client;

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        self.call_with(method, path, body, &[]).await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .client()
            .request(method, format!("{}{}", self.base(), path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request is answered");
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().await.unwrap();
        Resp {
            status,
            text,
            retry_after,
        }
    }

    async fn get(&self, path: &str) -> Resp {
        self.call("GET", path, None).await
    }
    async fn post(&self, path: &str, body: &str) -> Resp {
        self.call("POST", path, Some(body)).await
    }
    async fn put(&self, path: &str, body: &str) -> Resp {
        self.call("PUT", path, Some(body)).await
    }
    async fn delete(&self, path: &str) -> Resp {
        self.call("DELETE", path, None).await
    }
    /// A `POST` of `body` as a client with key `key` (the proxy and lease APIs).
    async fn post_as(&self, key: &str, path: &str, body: &Value) -> Resp {
        let auth = format!("Bearer {key}");
        let body = body.to_string();
        self.call_with("POST", path, Some(&body), &[("authorization", &auth)])
            .await
    }
    /// Every credential, following the list's `next` cursor page by page.
    async fn auths(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut path = "/v0/management/auths?limit=1000".to_string();
        loop {
            let r = self.get(&path).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let page = r.json();
            all.extend(page["auths"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => path = format!("/v0/management/auths?limit=1000&after={next}"),
                None => return all,
            }
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub state: std::sync::Arc<cliproxyapi::state::AppState>,
    pub guards: std::sync::Arc<cliproxyapi::http::Guards>,
    pub import_report: cliproxyapi::store::ImportReport,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Api for TestApp {
    fn base(&self) -> &str {
        &self.base
    }
    fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl TestApp {
    /// Shut down gracefully and wait for the store to close.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

pub struct Binary {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Api for Binary {
    fn base(&self) -> &str {
        &self.base
    }
    fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Binary {
    /// `kill -9`: no shutdown, no checkpoint.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `f` until it returns `Some`, or panic after `timeout`.
#[allow(dead_code)]
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Find a credential in a list by its token preview... or by label.
pub fn by_label<'a>(auths: &'a [Value], label: &str) -> &'a Value {
    auths
        .iter()
        .find(|a| a["label"] == label)
        .unwrap_or_else(|| panic!("no credential labelled {label}"))
}

/// Every credential's secrets open: each is listed `active`, but those of `refresh_only` (an
/// OAuth provider whose credentials the test adds with a refresh token alone), which have no
/// access token before their first refresh and so are `expired`, awaiting refresh.
#[allow(dead_code)]
pub fn assert_all_open(auths: &[Value], refresh_only: &str) {
    for a in auths {
        if a["provider"] == refresh_only {
            assert_eq!(a["status"], "expired", "{a}");
            assert_eq!(a["status_reason"], "awaiting refresh", "{a}");
        } else {
            assert_eq!(a["status"], "active", "{a}");
        }
    }
}

/// Serve `app` on a free loopback port for the rest of the test; its `http://127.0.0.1:PORT`.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// A provider mock's answer to a chat completion for `model`: `hi`, 3 + 1 tokens.
pub fn chat_completion(model: &str) -> Value {
    serde_json::json!({
        "id": "c1", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    })
}
