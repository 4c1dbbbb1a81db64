//! The store: the SQLite pools, the migrations, and every SQL statement of the program.
//!
//! Writes go through one writer connection, each in a `BEGIN IMMEDIATE` transaction that holds
//! no network I/O; reads use a separate pool of read-only connections (WAL lets them run beside
//! the writer). Counters change only in single SQL statements. Secrets enter and leave through
//! the [`Sealer`]; the store returns domain types and maps sqlx errors at its boundary, so
//! nothing above it knows SQL. A PostgreSQL backend would be another implementation of this
//! same type's methods.

mod audit;
mod credentials;
mod defaults;
mod import;
mod ledger;
mod logins;
mod quota;
mod refresh;
mod requests;
mod reservation;
mod resets;
mod secrets;

pub use credentials::{CredentialPatch, Cursor, DEFAULT_PAGE, ListFilter, MAX_PAGE, Page};
// The import's report types, where the store's callers have always found them.
pub use crate::import::{ImportMode, ImportReport, Notice};
pub use logins::{
    InsertLoginError, LoginEnd, LoginSecrets, LoginSession, LoginStatus, MAX_LOGIN_MESSAGE,
    new_login_id,
};
pub use quota::{QuotaPatch, QuotaTotal};
pub use refresh::{
    MAX_REASON, MAX_RECENT, MAX_SCAN, RefreshCandidate, RefreshHistory, RefreshOutcome, RefreshRun,
    RefreshScan,
};
pub use reservation::{
    Mark, Renewal, RenewedLease, Reservation, ReservationKind, ReserveRequest, Unavailable,
};
pub use resets::PeriodReset;

use crate::crypto::{CryptoError, Encryption, Fingerprinter, Sealer, to_hex};
use crate::files::{create_private_dir, warn_if_shared};
use crate::quota::ResetSchedule;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("credential not found")]
    NotFound,
    #[error("the credential already exists as {id}")]
    Duplicate { id: String },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The configured key (or its absence) does not open the database's secrets.
    #[error("{0}")]
    Key(String),
    #[error("cannot prepare the database at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// From the ledger's own connection (`ledger/db.rs`).
    #[error("database error: {0}")]
    Ledger(#[from] rusqlite::Error),
    /// The ledger's group this operation was in did not commit.
    #[error("the request path's group commit failed: {0}")]
    GroupFailed(String),
    /// The ledger's thread is gone (the store is closing, or the thread ended): the request
    /// path can reserve, settle or release nothing more.
    #[error("the request path's ledger has stopped")]
    LedgerGone,
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// `rotate-key` committed after this process opened the database: a write now would seal
    /// under the retired key and fingerprint under the retired fingerprint key.
    #[error("the encryption key was rotated after this command started; run it again")]
    KeyRotated,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    /// What the config asks for; bound to the database's id it becomes the store's sealer.
    pub encryption: Encryption,
    /// Quota reset schedules by provider (absent: never), for the period of new counters.
    pub schedules: BTreeMap<String, ResetSchedule>,
    /// The config's default limits by provider (`auth.quota.default_limit`), for new
    /// credentials that name none; a default stored through the API wins over these.
    pub default_limits: BTreeMap<String, u64>,
    pub read_connections: u32,
}

/// The credential store. Cheap to clone: pools and keys are shared.
#[derive(Debug, Clone)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
    sealer: Sealer,
    fingerprinter: Fingerprinter,
    /// Fingerprint keys before the last `rotate-key`s, only to recognise the tombstones and
    /// import digests made under them (see `secrets::Store::adopt_retired`).
    retired: Arc<Vec<Fingerprinter>>,
    /// Credentials whose secrets opening the database sealed or re-sealed.
    resealed_at_open: usize,
    /// The key check and fingerprint key generations found at open, checked by every write.
    key_marker: Arc<secrets::KeyMarker>,
    /// Checkpoints owed after secrets were removed, and the connection that runs them.
    forget: Arc<secrets::Forgetter>,
    schedules: BTreeMap<String, ResetSchedule>,
    /// The config's default limits (see [`StoreOptions::default_limits`]).
    default_limits: Arc<BTreeMap<String, u64>>,
    /// This process's name on the reservations it makes, so those of a dead one are known.
    instance: Arc<str>,
    /// Woken whenever a group of settlements or releases frees reserved room.
    freed: Arc<tokio::sync::Notify>,
    /// The request path's writes go to the ledger's thread, which commits them in groups.
    ledger: std::sync::mpsc::Sender<ledger::Op>,
    /// The ledger's in-memory mirror of counters and usable credentials.
    hot: Arc<std::sync::Mutex<ledger::Hot>>,
    /// Read side: a ledger group being decided and committed. Write side: any other write,
    /// which the mirror then follows, so the two never interleave.
    gate: Arc<tokio::sync::RwLock<()>>,
}

/// What a write run by [`Store::exclusive`] returns: its result, and what it changed of what the
/// ledger's mirror holds, so the mirror follows exactly that rather than loading again whole
/// (seconds with 100,000 credentials, with the request path stopped meanwhile).
struct Written<T> {
    value: T,
    touched: ledger::Touched,
}

impl<T> Written<T> {
    fn new(value: T, touched: ledger::Touched) -> Self {
        Written { value, touched }
    }

    /// A write at start or from the command line, too broad to name: the mirror loads whole.
    fn everything(value: T) -> Self {
        Written::new(value, ledger::Touched::Everything)
    }
}

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Open (creating if missing) the database after checking that the configured key fits
    /// it, apply migrations, bring its secrets to the configured form, load the fingerprint
    /// keys.
    #[tracing::instrument(skip_all, fields(path = %options.path.display()))]
    pub async fn open(options: StoreOptions) -> Result<Store> {
        let path = &options.path;
        if let Some(parent) = path.parent() {
            create_private_dir(parent).map_err(io_err(parent))?;
        }
        warn_if_shared(path);
        if let Some(parent) = path.parent() {
            warn_if_shared(parent);
        }
        // An existing database must fit the configured key before anything is written.
        if path.exists() {
            secrets::check(path, &options.encryption).await?;
        }
        // Create the file ourselves so it is owner-only from its first byte; SQLite gives the
        // WAL and shared-memory files the same mode.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err(path))?;
        let base = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Freed pages are zeroed, so a deleted or re-sealed secret leaves no copy behind.
            .pragma("secure_delete", "ON")
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(base.clone().create_if_missing(true))
            .await?;
        MIGRATOR.run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .idle_timeout(None)
            .max_lifetime(None)
            // Readers serve management lists; a small page cache each keeps memory low.
            .connect_with(base.clone().read_only(true).pragma("cache_size", "-1024"))
            .await?;
        let opened = secrets::prepare(&writer, &options.encryption).await?;
        let forget = secrets::Forgetter::open(&base).await?;
        // Every start checkpoints: what opening replaced, and what a process that ended before
        // its checkpoint completed left behind.
        forget.forget().await;
        let instance = format!("proc_{}", to_hex(&rand::random::<[u8; 8]>()));
        // The ledger writes on a connection of its own, never at the same time as the pool's
        // writer (see `gate`), so neither waits on the other's lock.
        let ledger_db = {
            let (path, owner) = (path.clone(), instance.clone());
            tokio::task::spawn_blocking(move || ledger::LedgerDb::open(&path, &owner))
                .await
                .map_err(|e| StoreError::Io {
                    path: options.path.clone(),
                    source: std::io::Error::other(e),
                })??
        };
        let (ledger, ops) = std::sync::mpsc::channel();
        let store = Store {
            writer,
            reader,
            sealer: opened.sealer,
            fingerprinter: opened.fingerprinter,
            retired: Arc::new(opened.retired),
            resealed_at_open: opened.resealed,
            key_marker: Arc::new(opened.marker),
            forget,
            schedules: options.schedules,
            default_limits: Arc::new(options.default_limits),
            instance: Arc::from(instance),
            freed: Arc::new(tokio::sync::Notify::new()),
            ledger,
            hot: Arc::new(std::sync::Mutex::new(ledger::Hot::default())),
            gate: Arc::new(tokio::sync::RwLock::new(())),
        };
        store.load_hot().await?;
        ledger::Ledger {
            hot: store.hot.clone(),
            gate: store.gate.clone(),
            freed: store.freed.clone(),
            schedules: store.schedules.clone(),
            writer: store.writer.clone(),
            sealer: store.sealer.clone(),
            runtime: tokio::runtime::Handle::current(),
        }
        .start(ledger_db, ops)
        .map_err(io_err(path))?;
        Ok(store)
    }

    /// Run a write that is not the request path's (a management change): no ledger group runs
    /// meanwhile, and the ledger's mirror follows what the write says it touched before any
    /// group runs again. A write that fails after changing something (nothing it could name)
    /// gets the mirror loaded again whole.
    async fn exclusive<T>(
        &self,
        work: impl std::future::Future<Output = Result<Written<T>>>,
    ) -> Result<T> {
        let (value, read) = {
            let _gate = self.gate.write().await;
            let before = self.writes_so_far().await?;
            #[cfg(debug_assertions)]
            let mirror_before = ledger::snapshot(&self.hot);
            match work.await {
                Ok(Written { value, touched }) => {
                    let read = match ledger::follow(&self.writer, &self.sealer, &self.hot, &touched)
                        .await
                    {
                        Ok(read) => read,
                        Err(e) => {
                            tracing::error!(error = %e, "the ledger's mirror cannot follow a write; loading it whole");
                            self.load_hot().await?;
                            usize::MAX
                        }
                    };
                    #[cfg(debug_assertions)]
                    self.check_mirror(&mirror_before).await;
                    (value, read)
                }
                Err(e) => {
                    if self.writes_so_far().await? != before {
                        self.load_hot().await?;
                    }
                    return Err(e);
                }
            }
        };
        if read >= ledger::MANY {
            release_freed_memory();
        }
        Ok(value)
    }

    /// Debug builds (every test) check after each management write that the mirror it left is
    /// the one a whole load would make; a write that misnames what it touched stops there.
    #[cfg(debug_assertions)]
    async fn check_mirror(&self, before: &ledger::Snapshot) {
        match ledger::difference(&self.writer, &self.sealer, &self.hot, before).await {
            Ok(None) => {}
            Ok(Some(d)) => panic!("the ledger's mirror differs from the database: {d}"),
            Err(e) => tracing::warn!(error = %e, "cannot check the ledger's mirror"),
        }
    }

    /// Load the ledger's mirror whole from the database (under the gate's write side, or before
    /// the ledger starts).
    async fn load_hot(&self) -> Result<()> {
        ledger::load(&self.writer, &self.sealer, &self.hot).await
    }

    /// Rows changed through the writer connection since it opened (`total_changes()`).
    async fn writes_so_far(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar!(r#"SELECT total_changes() AS "n!: i64""#)
                .fetch_one(&self.writer)
                .await?,
        )
    }

    /// A write transaction that takes the write lock at once (no deferred upgrade that SQLite
    /// would refuse with SQLITE_BUSY under WAL), under the keys this process opened with.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        self.key_marker.unchanged(&mut tx).await?;
        Ok(tx)
    }

    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    /// The start of the quota period containing `now` for a provider's new counter.
    fn period_start(&self, provider: &str, now: DateTime<Utc>) -> i64 {
        self.schedules
            .get(provider)
            .unwrap_or(&ResetSchedule::Never)
            .period_start(now)
            .timestamp()
    }

    /// At start: mark the credentials whose secrets do not open. Returns how many credentials
    /// opening the database sealed (encryption just turned on) or re-sealed (an older sealed
    /// format), and the marked ones with their reasons.
    #[tracing::instrument(skip_all)]
    pub async fn prepare_secrets(
        &self,
        now: DateTime<Utc>,
    ) -> Result<(usize, Vec<(String, String)>)> {
        let failed = self
            .exclusive(async {
                Ok(Written::everything(
                    self.mark_unopenable(now.timestamp()).await?,
                ))
            })
            .await?;
        Ok((self.resealed_at_open, failed))
    }

    /// `PRAGMA integrity_check`; `Ok(())` when the database is sound.
    #[tracing::instrument(skip_all)]
    pub async fn integrity_check(&self) -> Result<Vec<String>> {
        let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    /// Close the ledger's connection (after its last group), the checkpoint connection (after
    /// a last attempt at a checkpoint still owed) and both pools; the last one to close
    /// checkpoints the WAL.
    #[tracing::instrument(skip_all)]
    pub async fn close(&self) {
        let (reply, done) = tokio::sync::oneshot::channel();
        if self.ledger.send(ledger::Op::Close { reply }).is_ok() {
            let _ = done.await;
        }
        self.forget.close().await;
        self.reader.close().await;
        self.writer.close().await;
    }
}

/// Hand the heap pages a bulk write freed (many credentials read or imported) back to the
/// system, after the gate is released: glibc keeps them otherwise, and each such write with
/// 100,000 credentials left the process 30 to 60 MB larger.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

/// Map a unique-constraint violation on insert to [`StoreError::Duplicate`].
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A fresh credential id: `cred_` and 20 random lowercase letters and digits.
pub fn new_credential_id() -> String {
    random_id("cred_", 20)
}

/// A unit test's store options: `db.sqlite` in `dir`, without schedules or default limits,
/// one reader.
#[cfg(test)]
fn test_options(dir: &Path, encryption: Encryption) -> StoreOptions {
    StoreOptions {
        path: dir.join("db.sqlite"),
        encryption,
        schedules: Default::default(),
        default_limits: Default::default(),
        read_connections: 1,
    }
}

/// At most `max` characters of `text`, cut on a character boundary: what a provider or a
/// flow says is bounded before it is stored.
fn clip(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// A duration in whole seconds for an INTEGER column, saturating.
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// `now + d` in unix seconds, saturating (a duration from config or a provider may be
/// anything).
fn after(now: DateTime<Utc>, d: Duration) -> i64 {
    now.timestamp().saturating_add(secs(d))
}

/// `prefix` and `len` random lowercase letters and digits.
fn random_id(prefix: &str, len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    id.extend((0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char));
    id
}
