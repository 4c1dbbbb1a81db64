//! Building and serving the application. `main` and the tests go through the same path:
//! [`Application::build`] opens the store, imports `auth_dir` and binds the listener (port 0
//! in tests); [`Application::serve`] runs until the shutdown future resolves.

use crate::config::{DatabaseLocation, Loaded};
use crate::crypto::{Encryption, EncryptionKey, Secret};
use crate::events::AuthLog;
use crate::http::{Guards, HttpState};
use crate::import;
use crate::jobs::Jobs;
use crate::login::Logins;
use crate::notify::{Notifier, Webhook};
use crate::oauth::Flows;
use crate::providers::Registry;
use crate::proxy::{Parts, RequestPath, Settings};
use crate::refresh::Refresher;
use crate::state::{AppState, Clock};
use crate::store::{ImportMode, ImportReport, Store, StoreError, StoreOptions};
use chrono::Utc;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Why the application could not start, with the exit code the README gives it (0 ok,
/// 1 runtime failure, 2 bad config or arguments).
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

/// The encryption the config asks for: AES-256-GCM-SIV under `auth.encryption.key` (or the
/// variable `key_env` names) when encryption is enabled, else off.
pub fn encryption_from_config(
    config: &crate::config::EncryptionConfig,
) -> Result<Encryption, StartError> {
    if !config.enabled {
        return Ok(Encryption::off());
    }
    let from_env;
    let (setting, text) = if !config.key_env.is_empty() {
        from_env = Secret::new(std::env::var(&config.key_env).map_err(|_| {
            StartError::Config(format!(
                "`auth.encryption.key_env`: the environment variable {} is not set",
                config.key_env
            ))
        })?);
        ("auth.encryption.key_env", &from_env)
    } else {
        ("auth.encryption.key", &config.key)
    };
    let key = EncryptionKey::from_base64(text.expose())
        .map_err(|e| StartError::Config(format!("`{setting}`: the key {e}")))?;
    Ok(Encryption::with_key(&key))
}

/// What a store error at open means for the operator: a key that does not fit is a config
/// error (exit 2) naming the setting.
fn open_error(e: StoreError, encryption: &crate::config::EncryptionConfig) -> StartError {
    match e {
        StoreError::Key(reason) => {
            let setting = if !encryption.enabled {
                "auth.encryption.enabled"
            } else if !encryption.key_env.is_empty() {
                "auth.encryption.key_env"
            } else {
                "auth.encryption.key"
            };
            StartError::Config(format!(
                "`{setting}`: the database's secrets cannot be opened with this setting ({reason}); nothing was changed"
            ))
        }
        other => StartError::Runtime(other.to_string()),
    }
}

/// Open the store and the auth log for a loaded config (what `serve`, `import` and
/// `rotate-key` share): warn about secret files others can read, check the key, seal secrets
/// left in clear, mark credentials whose secrets do not open. The guards' settings are checked
/// too (a bad `management.secret_key` fails every command, as it would fail the server).
pub async fn open_state(config: Loaded, clock: Clock) -> Result<Arc<AppState>, StartError> {
    Ok(open(config, clock, Flows::default()).await?.app)
}

/// [`open_state`], with the guards the HTTP edge puts in front of the routes and the
/// request path. `extra_flows` are registered over the config's (an embedding program's own).
async fn open(config: Loaded, clock: Clock, extra_flows: Flows) -> Result<Opened, StartError> {
    let DatabaseLocation::File(path) = &config.database;
    let encryption_config = &config.config.auth.encryption;
    let encryption = encryption_from_config(encryption_config)?;
    warn_readable_secret_files(&config);
    let guards = Guards::from_config(&config.config)
        .await
        .map_err(StartError::Config)?;
    let store = Store::open(StoreOptions {
        path: path.clone(),
        encryption,
        schedules: config.config.auth.quota.reset_schedule.clone(),
        default_limits: config
            .config
            .auth
            .quota
            .default_limit
            .iter()
            .map(|(provider, limit)| (provider.clone(), limit.get()))
            .collect(),
        read_connections: 2,
    })
    .await
    .map_err(|e| open_error(e, encryption_config))?;
    let auth_log = AuthLog::open(&config.log_dir).map(Arc::new).map_err(|e| {
        StartError::Runtime(format!(
            "{}: cannot open the auth log: {e}",
            config.log_dir.display()
        ))
    })?;
    let (sealed, unopenable) = store
        .prepare_secrets(clock())
        .await
        .map_err(|e| StartError::Runtime(e.to_string()))?;
    if sealed > 0 {
        auth_log.record(&format!(
            "encryption on: sealed the secrets of {sealed} credential(s) stored in clear"
        ));
    }
    for (id, reason) in &unopenable {
        tracing::error!(credential = %id, %reason, "credential unusable");
        auth_log.record(&format!("credential {id} is unusable: {reason}"));
    }
    let mut registry = Registry::from_config(&config.config.providers);
    let copilot = &config.config.oauth.copilot;
    registry.configure_copilot(copilot.header_list(), copilot.api_hosts());
    let registry = Arc::new(registry);
    let upstream = crate::upstream::Upstream::new(config.config.proxy.request_timeout.0)
        .map_err(StartError::Runtime)?;
    // The guards keep digests and the store its cipher; the keys in clear are not needed any
    // more, so they are wiped now rather than kept for the life of the process. The webhooks'
    // secrets move to their delivery tasks.
    let mut config = config;
    let settings = &mut config.config;
    let notifications = &mut settings.auth.notifications;
    let webhooks = notifications
        .webhooks
        .iter_mut()
        .map(|hook| Webhook {
            url: hook.url.clone(),
            events: hook.events.clone(),
            secret: hook.secret.take(),
        })
        .collect();
    let notifier =
        Notifier::start(webhooks, notifications.timeout.0).map_err(StartError::Runtime)?;
    settings.api_keys.clear();
    settings.management.secret_key.take();
    settings.auth.encryption.key.take();
    // One set of flows, shared by the refresher and the logins.
    let mut flows = Flows::from_config(&config.config, &registry);
    flows.merge(extra_flows);
    let refresher = Refresher::new(crate::refresh::Parts {
        store: store.clone(),
        flows: flows.clone(),
        auth_log: auth_log.clone(),
        notifier: notifier.clone(),
        clock: clock.clone(),
        settings: crate::refresh::Settings::from_config(&config.config),
    });
    let path = RequestPath::new(Parts {
        store: store.clone(),
        upstream,
        auth_log: auth_log.clone(),
        registry: registry.clone(),
        clock: clock.clone(),
        settings: Settings::from_config(&config.config),
        notifier: notifier.clone(),
        refresher: Some(refresher.clone()),
    });
    let logins = Logins::new(crate::login::Parts {
        store: store.clone(),
        flows,
        registry: registry.clone(),
        refresher: refresher.clone(),
        auth_log: auth_log.clone(),
        clock: clock.clone(),
    });
    let app = Arc::new(AppState {
        config: Arc::new(config),
        store,
        registry,
        auth_log,
        notifier,
        refresher,
        logins,
        clock,
    });
    Ok(Opened { app, guards, path })
}

/// What [`open`] builds.
struct Opened {
    app: Arc<AppState>,
    guards: Guards,
    path: RequestPath,
}

/// Warn (naming the path, its mode and the fix) about files holding secrets that users other
/// than the owner can read: the config file when it holds a key itself, and the credential
/// files of `auth_dir`.
fn warn_readable_secret_files(config: &Loaded) {
    if let Some(file) = &config.config_file
        && !config.secrets_in_file.is_empty()
    {
        warn_if_readable(file, &config.secrets_in_file.join(", "));
    }
    let Ok(entries) = std::fs::read_dir(&config.auth_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if import::is_credential_file(&path) {
            warn_if_readable(&path, "credentials");
        }
    }
}

/// Warn when `path` (holding `what`) is readable by its group or by everyone.
fn warn_if_readable(path: &std::path::Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_file() && mode & 0o044 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:03o}"),
            "this file holds {what} and other users can read it; run: chmod 600 {}",
            path.display()
        );
    }
}

/// A built application: store open, `auth_dir` imported, listener bound.
pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    guards: Arc<Guards>,
    path: RequestPath,
    import_report: ImportReport,
    /// `<database>.lock`, held while the server runs (see [`lock_database`]).
    _lock: std::fs::File,
}

/// Who holds `<database>.lock`: a server, or a command that must not run beside one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Server,
    RotateKey,
}

impl Holder {
    fn name(self) -> &'static str {
        match self {
            Holder::Server => "server",
            Holder::RotateKey => "rotate-key",
        }
    }
}

/// Take `<database>.lock` for as long as the server (or `rotate-key`) runs. A second server on
/// the same database would settle the first one's reservations as left by a dead process and
/// decide on a mirror of its own, so it is refused; `rotate-key` under a live server would
/// re-seal what the server then writes under the old key, so each refuses the other. The lock
/// is the kernel's (flock), so a killed process leaves none behind. Other CLI commands do not
/// take it: they may run beside a live server.
pub fn lock_database(
    database: &std::path::Path,
    holder: Holder,
) -> Result<std::fs::File, StartError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let cannot = |what: &str, e: &dyn std::fmt::Display| {
        StartError::Runtime(format!("cannot {what} {}: {e}", path.display()))
    };
    if let Some(parent) = path.parent() {
        crate::files::create_private_dir(parent).map_err(|e| cannot("create the folder of", &e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| cannot("open", &e))?;
    match file.try_lock() {
        Ok(()) => {
            // The holder's pid and what it is, for the message a second one prints.
            file.set_len(0).map_err(|e| cannot("write", &e))?;
            write!(file, "{} {}", std::process::id(), holder.name())
                .map_err(|e| cannot("write", &e))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let mut words = text.split_whitespace();
            let pid = match words.next().map(str::parse::<u32>) {
                Some(Ok(pid)) => format!(" (pid {pid})"),
                _ => String::new(),
            };
            let message = if words.next() == Some(Holder::RotateKey.name()) {
                format!(
                    "cliproxyapi rotate-key{pid} is re-sealing the database {}; wait for it to finish",
                    database.display()
                )
            } else {
                format!(
                    "another cliproxyapi server{pid} is using the database {}; stop it first",
                    database.display()
                )
            };
            Err(StartError::Runtime(message))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(cannot("lock", &e)),
    }
}

impl Application {
    pub async fn build(config: Loaded) -> Result<Application, StartError> {
        Self::build_with_clock(config, Arc::new(Utc::now)).await
    }

    pub async fn build_with_clock(config: Loaded, clock: Clock) -> Result<Application, StartError> {
        Self::build_with_flows(config, clock, Flows::default()).await
    }

    /// [`Application::build_with_clock`], with `flows` registered over the config's: an
    /// embedding program's own login and refresh flows (or a test's).
    pub async fn build_with_flows(
        config: Loaded,
        clock: Clock,
        flows: Flows,
    ) -> Result<Application, StartError> {
        let addr = SocketAddr::new(config.config.host, config.config.port);
        let DatabaseLocation::File(database) = &config.database;
        let lock = lock_database(database, Holder::Server)?;
        let Opened {
            app: state,
            guards,
            path,
        } = open(config, clock, flows).await?;
        // Only a server settles what a stopped one left: a CLI command may run beside a live
        // server, whose reservations are not dead.
        let (dead, dead_tokens) = state
            .store
            .settle_dead(state.now())
            .await
            .map_err(|e| StartError::Runtime(e.to_string()))?;
        if dead > 0 {
            state.auth_log.record(&format!(
                "settled {dead} reservation(s) left by a stopped process at their reserved {dead_tokens} tokens"
            ));
        }
        // So are the refresh claims of a stopped server: its refreshes ended with it, and the
        // credentials they held are free to refresh now rather than when the claims expire.
        let claims = state
            .store
            .drop_dead_refresh_claims()
            .await
            .map_err(|e| StartError::Runtime(e.to_string()))?;
        if claims > 0 {
            tracing::info!(claims, "dropped the refresh claims of a stopped process");
        }
        // A quota boundary passed while the server was down is applied now, once, before
        // any request is served.
        crate::jobs::resets::run(&state, state.now()).await;
        let import_report = import_auth_dir(&state, "startup").await?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| StartError::Runtime(format!("cannot listen on {addr}: {e}")))?;
        Ok(Application {
            listener,
            state,
            guards: Arc::new(guards),
            path,
            import_report,
            _lock: lock,
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

    /// The guards in front of the routes (their bans and checks, for tests).
    pub fn guards(&self) -> Arc<Guards> {
        self.guards.clone()
    }

    /// The report of the import of `auth_dir` made while building.
    pub fn import_report(&self) -> &ImportReport {
        &self.import_report
    }

    /// Serve until `shutdown` resolves, then finish in-flight requests, stop the background
    /// jobs ([`crate::jobs`]) and the webhook deliveries ([`crate::notify`]), and close the
    /// store.
    /// The listener applies the `server:` limits (see [`crate::http::listener`]).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = crate::http::router(HttpState {
            app: self.state.clone(),
            guards: self.guards.clone(),
            path: self.path.clone(),
        });
        let sweeper = tokio::spawn(sweep_leases(self.state.clone()));
        // The logins a stopped server left pending are polled again (or expire now).
        if let Err(e) = self.state.logins.resume().await {
            tracing::error!(error = %e, "cannot resume the pending logins");
        }
        let jobs = Jobs::start(self.state.clone())
            .await
            .map_err(|e| std::io::Error::other(format!("cannot start the job scheduler: {e}")))?;
        let result = crate::http::listener::serve(
            self.listener,
            app,
            &self.state.config.config.server,
            shutdown,
        )
        .await;
        sweeper.abort();
        // Pollers stop (a login approved meanwhile stores its credential first); the pending
        // sessions resume at the next start.
        self.state.logins.stop(crate::login::STOP_GRACE).await;
        // Refreshes start no more and store what they got; then the jobs' last check ends.
        self.state.refresher.close(crate::refresh::STOP_GRACE).await;
        jobs.stop().await;
        self.state.notifier.stop(crate::notify::STOP_GRACE).await;
        self.state.store.close().await;
        result
    }
}

/// Import every credential file of `auth_dir` (creating the folder, owner-only, if missing).
pub async fn import_auth_dir(state: &AppState, actor: &str) -> Result<ImportReport, StartError> {
    let dir = state.config.auth_dir.clone();
    if !dir.exists() {
        crate::files::create_private_dir(&dir).map_err(|e| {
            StartError::Runtime(format!("{}: cannot create auth_dir: {e}", dir.display()))
        })?;
    }
    let batch = state.read_paths(vec![dir]).await;
    state
        .import(batch, ImportMode::Files, actor, false)
        .await
        .map_err(|e| StartError::Runtime(format!("import failed: {e}")))
}

/// Settle leases past their expiry at their reservation, every few seconds.
async fn sweep_leases(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        match state.store.expire_leases(state.now()).await {
            Ok(0) => {}
            Ok(n) => state.auth_log.record(&format!(
                "settled {n} expired lease(s) at their reservation"
            )),
            Err(e) => tracing::error!(error = %e, "cannot settle expired leases"),
        }
    }
}
