//! The command line (README: "Quick start", "Credential files", "Security"). Exit codes: 0 ok, 1 runtime failure, 2 bad config
//! or arguments, with one line naming the key or file at fault.

use crate::app::{self, Application, StartError};
use crate::config::Config;
use crate::crypto::{self, Encryption, EncryptionKey};
use crate::state::AppState;
use crate::store::ImportMode;
use chrono::Utc;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "cliproxyapi",
    version,
    about = "A credential server for LLM providers"
)]
struct Cli {
    /// The config file [default: $CLIPROXY_CONFIG, then ./config.yaml]
    #[arg(long, global = true, env = "CLIPROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default command).
    Serve,
    /// Import credential files into the database without starting the server.
    Import {
        /// Check and report without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Files or folders to import [default: the config's auth_dir].
        paths: Vec<PathBuf>,
    },
    /// Read a secret on stdin; print its argon2id PHC string for `management.secret_key`
    /// (RFC 9106's second recommended parameters: 64 MiB, 3 passes, 4 lanes).
    HashSecret,
    /// Print a fresh base64 32-byte key for `auth.encryption.key`.
    GenKey,
    /// Re-encrypt every stored secret under a new key, in one transaction.
    RotateKey {
        /// The environment variable holding the new key (base64 of 32 bytes).
        #[arg(long, value_name = "VAR")]
        new_key_env: String,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Every command holds a secret in memory (a key, a token, the secret to hash); a core
    // file would write it to disk.
    if let Err(e) = disable_core_dumps() {
        eprintln!("warning: cannot disable core dumps: {e}");
    }
    // The commands that need no config.
    match &cli.command {
        Some(Command::HashSecret) => return hash_secret(),
        Some(Command::GenKey) => {
            println!("{}", EncryptionKey::generate_base64());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let (path, must_exist) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.yaml"), false),
    };
    let loaded = match Config::load(&path, must_exist) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&loaded.config.logging.level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(loaded).await,
            Command::Import { dry_run, paths } => import(loaded, dry_run, paths).await,
            Command::RotateKey { new_key_env } => rotate_key(loaded, &new_key_env).await,
            Command::HashSecret | Command::GenKey => unreachable!("handled before the config"),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(std::io::stdout().is_terminal())
        .try_init();
}

async fn serve(loaded: crate::config::Loaded) -> Result<ExitCode, StartError> {
    // Taken over before the (possibly long) start, so that from here on a SIGHUP, which log
    // rotation sends, no longer ends the process as it does by default.
    let hangups = signal(SignalKind::hangup())
        .map_err(|e| StartError::Runtime(format!("cannot handle SIGHUP: {e}")))?;
    let app = Application::build(loaded).await?;
    release_startup_memory();
    let report = app.import_report();
    tracing::info!(
        imported = report.imported,
        updated = report.updated,
        skipped = report.skipped,
        errors = report.errors.len(),
        "imported auth_dir"
    );
    tracing::info!(address = %app.local_addr(), "listening");
    let reopener = tokio::spawn(reopen_logs_on_hangup(hangups, app.state()));
    let served = app.serve(shutdown_signal()).await;
    reopener.abort();
    served.map_err(|e| StartError::Runtime(format!("server failed: {e}")))?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Start-up reads every credential a few times (import, secrets check, the ledger's mirror);
/// hand the memory those reads freed back to the system rather than keep it as the peak.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_startup_memory() {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_startup_memory() {}

/// On every SIGHUP, reopen `logs/auth.log` (rotated away, it is created again) and say so in
/// it; the server keeps serving either way.
async fn reopen_logs_on_hangup(mut hangups: Signal, state: Arc<AppState>) {
    while hangups.recv().await.is_some() {
        match state.auth_log.reopen() {
            Ok(()) => state.auth_log.record(&format!(
                "SIGHUP: reopened the auth log {}",
                state.auth_log.path().display()
            )),
            Err(e) => tracing::error!(
                path = %state.auth_log.path().display(),
                error = %e,
                "SIGHUP: cannot reopen the auth log; still writing to the file open before"
            ),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn import(
    loaded: crate::config::Loaded,
    dry_run: bool,
    paths: Vec<PathBuf>,
) -> Result<ExitCode, StartError> {
    let paths = if paths.is_empty() {
        vec![loaded.auth_dir.clone()]
    } else {
        paths
    };
    let state = app::open_state(loaded, Arc::new(Utc::now)).await?;
    let batch = state.read_paths(paths).await;
    let report = state
        .import(batch, ImportMode::Files, "cli", dry_run)
        .await
        .map_err(|e| StartError::Runtime(format!("import failed: {e}")))?;
    forget_before_exit(&state).await;
    state.store.close().await;
    for c in &report.changes {
        let what = if c.created { "imported" } else { "updated" };
        println!("{what}\t{}\t{} ({})", c.source, c.credential_id, c.provider);
    }
    for n in &report.notices {
        println!("skipped\t{}\t{}", n.source, n.notice);
    }
    for e in &report.errors {
        println!("error\t{}\t{}", e.source, e.error);
    }
    println!(
        "{}{} imported, {} updated, {} skipped, {} errors",
        if dry_run { "dry run: " } else { "" },
        report.imported,
        report.updated,
        report.skipped,
        report.errors.len()
    );
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// How long a command waits, before it exits, for the checkpoint that removes the secrets it
/// replaced from the WAL, while another connection reads an older snapshot. It never blocks
/// a writer meanwhile (see `store::secrets::Forgetter`).
const FORGET_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Wait for the checkpoint owed for secrets the command replaced or removed; if a reader keeps
/// it from completing, say what stays on disk and until when.
async fn forget_before_exit(state: &AppState) {
    if !state.store.old_secrets_forgotten(FORGET_WAIT).await {
        let crate::config::DatabaseLocation::File(database) = &state.config.database;
        eprintln!(
            "warning: another connection kept {}-wal from being checkpointed for {}s; secrets replaced or removed before it was checkpointed stay in it until that reader finishes and a command or the server starts",
            database.display(),
            FORGET_WAIT.as_secs()
        );
    }
}

/// Longest secret `hash-secret` reads: a management key is a header value, and stdin could be
/// a file that never ends.
const MAX_SECRET_BYTES: u64 = 4096;

fn hash_secret() -> ExitCode {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(MAX_SECRET_BYTES + 1)
        .read_until(b'\n', &mut line);
    if let Err(e) = read {
        eprintln!("error: cannot read the secret from stdin: {e}");
        return ExitCode::from(1);
    }
    let Ok(secret) = String::from_utf8(line) else {
        eprintln!("error: the secret on stdin is not UTF-8 text");
        return ExitCode::from(2);
    };
    let secret = secret.trim_end_matches(['\n', '\r']);
    if secret.len() as u64 > MAX_SECRET_BYTES {
        eprintln!("error: the secret on stdin is longer than {MAX_SECRET_BYTES} bytes");
        return ExitCode::from(2);
    }
    if secret.is_empty() {
        eprintln!("error: the secret on stdin is empty");
        return ExitCode::from(2);
    }
    // The printed hash must pass the policy a server applies at start.
    match crypto::hash_secret(secret).and_then(|phc| crypto::check_phc(&phc).map(|_| phc)) {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot hash the secret: {e}");
            ExitCode::from(1)
        }
    }
}

async fn rotate_key(
    loaded: crate::config::Loaded,
    new_key_env: &str,
) -> Result<ExitCode, StartError> {
    let text = std::env::var(new_key_env).map_err(|_| {
        StartError::Config(format!(
            "--new-key-env: the environment variable {new_key_env} is not set"
        ))
    })?;
    let new_key = EncryptionKey::from_base64(&text)
        .map_err(|e| StartError::Config(format!("--new-key-env {new_key_env}: the key {e}")))?;
    // No server may write under the old key while the secrets move to the new one, nor start
    // before the rotation is done.
    let crate::config::DatabaseLocation::File(database) = &loaded.database;
    let _lock = app::lock_database(database, app::Holder::RotateKey)?;
    let state = app::open_state(loaded, Arc::new(Utc::now)).await?;
    let count = state
        .store
        .rekey(&Encryption::with_key(&new_key))
        .await
        .map_err(|e| StartError::Runtime(format!("rotation failed, nothing was changed: {e}")))?;
    forget_before_exit(&state).await;
    state.store.close().await;
    state.auth_log.record(&format!(
        "rotated the encryption key: {count} credential(s) re-sealed under key {:08x}, fingerprints recomputed under a new fingerprint key",
        new_key.id()
    ));
    println!(
        "re-encrypted {count} credential(s) under key {:08x}. Now set auth.encryption.enabled: true and auth.encryption.key (or key_env) to the new key; the old key no longer opens the database.",
        new_key.id()
    );
    Ok(ExitCode::SUCCESS)
}

/// No core file for this process (`RLIMIT_CORE` 0, soft and hard), and not dumpable, which
/// also keeps other processes of the same user from attaching to it or reading its memory
/// through `/proc`.
pub fn disable_core_dumps() -> std::io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct passed by reference; prctl(PR_SET_DUMPABLE) takes
    // plain integers. Neither touches memory of ours beyond that.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        #[cfg(target_os = "linux")]
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runtime worker threads: `TOKIO_WORKER_THREADS` when set, else one fewer than the cores (at
/// least one). The ledger's thread, which decides and commits every reservation and
/// settlement, keeps the last core busy under load; a worker for every core as well only
/// moves requests between threads. On two cores, in three alternated pairs, one worker served
/// 9-28 % more requests per second at 64 connections than two, and p50 was 0.10-0.14 ms lower
/// at one connection (bench/README.md).
fn worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let default = cores.saturating_sub(1).max(1);
    let Ok(value) = std::env::var("TOKIO_WORKER_THREADS") else {
        return default;
    };
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 => n,
        _ => {
            tracing::warn!(
                value = %value,
                "TOKIO_WORKER_THREADS is not a positive whole number; using {default} worker thread(s)"
            );
            default
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn core_dumps_are_disabled() {
        super::disable_core_dumps().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: getrlimit writes the struct; prctl(PR_GET_DUMPABLE) only returns a value.
        let dumpable = unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_CORE, &mut limit), 0);
            libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0)
        };
        assert_eq!((limit.rlim_cur, limit.rlim_max), (0, 0));
        assert_eq!(dumpable, 0);
    }
}
