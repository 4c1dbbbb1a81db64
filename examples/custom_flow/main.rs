//! The server embedded with a login and refresh flow of its own, for a provider its config
//! adds (DEV.md, "A walk through examples/custom_flow"). `config.yaml` names the provider as
//! any openai-format one:
//!
//! ```yaml
//! providers:
//!   acme:
//!     format: openai
//!     base_url: https://api.acme.example/v1
//! ```
//!
//! and the flow's own settings come from the environment (the server's config refuses keys it
//! does not know): `ACME_AUTH_URL`, the authorization server (default
//! `https://auth.acme.example`), and `ACME_CLIENT_ID`.
//!
//! Run: `ACME_AUTH_URL=http://127.0.0.1:9000 cargo run --example custom_flow -- config.yaml`,
//! then `curl -X POST http://127.0.0.1:8317/v0/oauth/acme/start`.

mod flow;

use cliproxyapi::app::Application;
use cliproxyapi::config::Config;
use cliproxyapi::domain::ProviderName;
use cliproxyapi::oauth::Flows;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[tokio::main]
async fn main() -> ExitCode {
    let path = PathBuf::from(std::env::args().nth(1).unwrap_or("config.yaml".into()));
    // The config as the binary loads it: the file (which must exist here), then the
    // `CLIPROXY__*` variables over it, validated.
    let loaded = match Config::load(&path, true) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            &loaded.config.logging.level,
        ))
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let auth_url =
        std::env::var("ACME_AUTH_URL").unwrap_or_else(|_| "https://auth.acme.example".into());
    let client_id = std::env::var("ACME_CLIENT_ID").unwrap_or_else(|_| "cliproxyapi".into());
    let mut flows = Flows::default();
    flows.register(
        ProviderName::from("acme"),
        Arc::new(flow::AcmeFlow::new(&auth_url, &client_id)),
    );

    let app = match Application::build_with_flows(loaded, Arc::new(chrono::Utc::now), flows).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    // As the binary does: a line with `address=`, for whoever waits for the server.
    println!("listening address={}", app.local_addr());
    match app.serve(shutdown()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: server failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// Ctrl-C or SIGTERM: in-flight requests finish, pending logins resume at the next start.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
