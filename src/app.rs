//! Building and serving the application. `main` and the tests go through the same path:
//! [`Application::build`] opens the store, imports `auth_dir` and binds the listener (port 0
//! in tests); [`Application::serve`] runs until the shutdown future resolves.

use crate::config::{DatabaseLocation, Loaded};
use crate::crypto::Sealer;
use crate::events::AuthLog;
use crate::import::{self, Batch};
use crate::providers::Registry;
use crate::store::{ImportMode, ImportReport, Store, StoreError, StoreOptions};
use chrono::{DateTime, Utc};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The clock the application reads; tests may replace it.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Everything a handler needs.
pub struct AppState {
    pub config: Arc<Loaded>,
    pub store: Store,
    pub registry: Registry,
    pub auth_log: AuthLog,
    clock: Clock,
}

impl AppState {
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Apply an import batch and write its outcome to the auth log: one line per credential
    /// created or changed, one per error or notice, and a summary.
    pub async fn import(
        &self,
        batch: Batch,
        mode: ImportMode,
        actor: &str,
        dry_run: bool,
    ) -> Result<ImportReport, StoreError> {
        let files = batch.files;
        let report = self
            .store
            .import(batch, mode, actor, dry_run, self.now())
            .await?;
        if dry_run {
            return Ok(report);
        }
        let mut lines: Vec<String> = Vec::new();
        for c in &report.changes {
            lines.push(format!(
                "{} credential {} ({}) from {} by {actor}",
                if c.created { "imported" } else { "updated" },
                c.credential_id,
                c.provider,
                c.source
            ));
        }
        for e in &report.errors {
            tracing::warn!(source = %e.source, error = %e.error, "import error");
            lines.push(format!("import error in {}: {}", e.source, e.error));
        }
        for n in &report.notices {
            lines.push(format!("import notice for {}: {}", n.source, n.notice));
        }
        lines.push(format!(
            "import by {actor}: {} imported, {} updated, {} skipped, {} errors{}",
            report.imported,
            report.updated,
            report.skipped,
            report.errors.len(),
            if mode == ImportMode::Files {
                format!(" ({files} files)")
            } else {
                String::new()
            }
        ));
        self.auth_log.record_all(lines.iter().map(String::as_str));
        Ok(report)
    }
}

/// Why the application could not start, with the exit code the contract gives it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A bad config or argument: exit code 2.
    #[error("{0}")]
    Config(String),
    /// Anything else: exit code 1.
    #[error("{0}")]
    Runtime(String),
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) => 2,
            StartError::Runtime(_) => 1,
        }
    }
}

/// Open the store and the auth log for a loaded config (what `serve` and `import` share).
pub async fn open_state(config: Loaded, clock: Clock) -> Result<Arc<AppState>, StartError> {
    let DatabaseLocation::File(path) = &config.database;
    let store = Store::open(StoreOptions {
        path: path.clone(),
        sealer: Sealer::plain(),
        schedules: config.config.auth.quota.reset_schedule.clone(),
        read_connections: 4,
    })
    .await
    .map_err(|e| StartError::Runtime(e.to_string()))?;
    let auth_log = AuthLog::open(&config.log_dir).map_err(|e| {
        StartError::Runtime(format!(
            "{}: cannot open the auth log: {e}",
            config.log_dir.display()
        ))
    })?;
    let registry = Registry::from_config(&config.config.providers);
    Ok(Arc::new(AppState {
        config: Arc::new(config),
        store,
        registry,
        auth_log,
        clock,
    }))
}

/// A built application: store open, `auth_dir` imported, listener bound.
pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    import_report: ImportReport,
}

impl Application {
    pub async fn build(config: Loaded) -> Result<Application, StartError> {
        Self::build_with_clock(config, Arc::new(Utc::now)).await
    }

    pub async fn build_with_clock(config: Loaded, clock: Clock) -> Result<Application, StartError> {
        let addr = SocketAddr::new(config.config.host, config.config.port);
        let state = open_state(config, clock).await?;
        let import_report = import_auth_dir(&state, "startup").await?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| StartError::Runtime(format!("cannot listen on {addr}: {e}")))?;
        Ok(Application {
            listener,
            state,
            import_report,
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// The report of the import of `auth_dir` made while building.
    pub fn import_report(&self) -> &ImportReport {
        &self.import_report
    }

    /// Serve until `shutdown` resolves, then finish in-flight requests and close the store.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = crate::http::router(self.state.clone());
        let result = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        self.state.store.close().await;
        result
    }
}

/// Import every credential file of `auth_dir` (creating the folder, owner-only, if missing).
pub async fn import_auth_dir(state: &AppState, actor: &str) -> Result<ImportReport, StartError> {
    let dir = state.config.auth_dir.clone();
    if !dir.exists() {
        crate::store::create_private_dir(&dir).map_err(|e| {
            StartError::Runtime(format!("{}: cannot create auth_dir: {e}", dir.display()))
        })?;
    }
    let registry = state.registry.clone();
    let batch = tokio::task::spawn_blocking(move || import::read_paths(&registry, &[dir]))
        .await
        .map_err(|e| StartError::Runtime(e.to_string()))?;
    state
        .import(batch, ImportMode::Files, actor, false)
        .await
        .map_err(|e| StartError::Runtime(format!("import failed: {e}")))
}
