//! The state the application shares: the config, the store, the provider registry, the auth
//! log, the webhook notifier and the clock. [`crate::app`] builds it; the HTTP edge, the command line and the tests
//! use it. It knows nothing of HTTP, nor of the request path (which is built from its parts
//! and owns its own): the edge serves all three ([`crate::http::HttpState`]).

use crate::config::Loaded;
use crate::events::AuthLog;
use crate::import::{self, Batch};
use crate::login::Logins;
use crate::notify::Notifier;
use crate::providers::Registry;
use crate::refresh::Refresher;
use crate::store::{ImportMode, ImportReport, Store, StoreError};
use chrono::{DateTime, Utc};
use std::path::PathBuf;
use std::sync::Arc;

pub use crate::domain::Clock;

/// What the handlers and the commands share (the request path holds its own handles to the
/// same store, registry, auth log and clock).
pub struct AppState {
    pub config: Arc<Loaded>,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub auth_log: Arc<AuthLog>,
    /// Where events for the webhooks go (README, "Notifications").
    pub notifier: Notifier,
    /// The token refresh service (the worker's checks, manual refreshes, the status).
    pub refresher: Refresher,
    /// The device-flow logins (their sessions and background polling).
    pub logins: Logins,
    /// What the application reads as now; tests set it.
    pub clock: Clock,
}

impl AppState {
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Read the credential files among `paths` off the async runtime (file I/O and parsing).
    /// A failure of the reading task itself is reported as an error of the batch.
    pub async fn read_paths(&self, paths: Vec<PathBuf>) -> Batch {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || import::read_paths(&registry, &paths))
            .await
            .unwrap_or_else(|e| Batch {
                errors: vec![import::ImportError {
                    source: "import".into(),
                    error: format!("reading the files failed: {e}"),
                }],
                ..Default::default()
            })
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
