//! The auth event log: imports, adds, updates, deletes and quota changes, one line each, in
//! `logs/auth.log` (owner-only) and on stdout through `tracing` (target `auth`).
//!
//! Lines are built only from ids, providers, sources, counts and reasons. Secrets are
//! [`crate::crypto::Secret`]s, whose `Display` prints nothing, so none can end up here.
//!
//! The server reopens the file on `SIGHUP` ([`AuthLog::reopen`]), so log rotation can move it
//! away and have new lines go to a new file.

use crate::files::{create_private_dir, warn_if_shared};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug)]
pub struct AuthLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuthLog {
    /// Open (appending) `dir/auth.log`, creating the folder owner-only if needed.
    pub fn open(dir: &Path) -> std::io::Result<AuthLog> {
        create_private_dir(dir)?;
        warn_if_shared(dir);
        let path = dir.join("auth.log");
        let file = open_file(&path)?;
        Ok(AuthLog {
            path,
            file: Mutex::new(file),
        })
    }

    /// Open the log's path again and write there from now on: after log rotation moved the
    /// file away, this creates a new one (owner-only). On failure the old file stays in use.
    pub fn reopen(&self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            create_private_dir(dir)?;
        }
        let file = open_file(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = file;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record one event. A failing write is reported on stdout but never fails the request
    /// that caused the event: the database audit log is the durable record.
    pub fn record(&self, message: &str) {
        tracing::info!(target: "auth", "{message}");
        self.write_lines(std::iter::once(message));
    }

    /// Record many events with one lock (an import of thousands of credentials).
    pub fn record_all<'a>(&self, messages: impl IntoIterator<Item = &'a str>) {
        let messages: Vec<&str> = messages.into_iter().collect();
        for m in &messages {
            tracing::info!(target: "auth", "{m}");
        }
        self.write_lines(messages.into_iter());
    }

    fn write_lines<'a>(&self, messages: impl Iterator<Item = &'a str>) {
        let now = crate::domain::rfc3339(chrono::Utc::now());
        let mut buf = String::new();
        for m in messages {
            buf.push_str(&now);
            buf.push(' ');
            // One event, one line, whatever a reason string contains.
            buf.extend(
                m.chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
            );
            buf.push('\n');
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(buf.as_bytes()) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the auth log");
        }
    }
}

/// Open `path` for appending, created readable by the owner only.
fn open_file(path: &Path) -> std::io::Result<File> {
    warn_if_shared(path);
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}
