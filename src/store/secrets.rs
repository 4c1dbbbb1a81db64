//! Keeping stored secrets under the configured key.
//!
//! Where a database's secrets stand is read from `meta` and the stored values themselves:
//! - no `key_check` and every value in clear: the database is not encrypted. With encryption
//!   off it stays so; with it on, the start seals every value once (the one migration in which
//!   a value in clear is sealed) and writes the key check.
//! - a `key_check`: the database is encrypted, and the configured key must open the marker
//!   (sealed under the key, bound to the database id) before anything is written. A value in
//!   clear found in it was put there behind the program's back: it is refused, never sealed.
//!
//! Anything else (a marker that is missing, in clear or does not open while values are
//! sealed, encryption off over sealed values, or no marker over values of the first sealed
//! format, which only builds before the database id wrote) stops the start before any
//! write. Each change is one transaction, so a crash leaves the database wholly before or
//! wholly after it; after one that replaced secrets, the WAL is checkpointed and truncated so
//! no old copy stays on disk ([`Forgetter`], which never makes a writer wait on a reader).
//! Every write transaction checks that the keys are still those this process opened with
//! ([`KeyMarker`]).

use super::{Result, Store, StoreError};
use crate::crypto::{
    CryptoError, DatabaseId, Encryption, Field, Fingerprinter, Form, PREVIEW_UNKNOWN, Sealer,
    Secret, form_of, to_hex, token_preview,
};
use crate::domain::CredentialKind;
use crate::import::plan::Keyed;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Where a database's secrets stand, and so what opening it must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Not encrypted, and encryption is off (or a new database without encryption).
    Plain,
    /// Not encrypted, and encryption is on: seal every value once (or a new database).
    TurnOn,
    /// Encrypted, and the configured key opened its key check.
    Sealed,
}

/// What [`inspect`] found.
struct Found {
    database: Option<DatabaseId>,
    standing: Standing,
}

/// The secret columns of one credential.
struct SealedRow {
    id: String,
    provider: String,
    kind: String,
    values: [Option<Vec<u8>>; 3],
}

const FIELDS: [Field; 3] = [Field::Token, Field::RefreshToken, Field::ClientSecret];

impl SealedRow {
    /// The first secret of the row that does not open, and why.
    fn first_failure(&self, sealer: &Sealer) -> Option<String> {
        FIELDS.iter().zip(&self.values).find_map(|(field, value)| {
            let v = value.as_ref()?;
            sealer
                .open(&self.id, *field, v)
                .err()
                .map(|e| e.to_string())
        })
    }

    /// Every secret of the row, opened.
    fn open_all(&self, sealer: &Sealer) -> Result<[Option<Secret>; 3]> {
        let mut out: [Option<Secret>; 3] = [None, None, None];
        for ((slot, field), value) in out.iter_mut().zip(FIELDS).zip(&self.values) {
            if let Some(v) = value {
                *slot = Some(sealer.open(&self.id, field, v)?);
            }
        }
        Ok(out)
    }

    /// The secret that identifies the credential (see `NewCredential::identity`).
    fn identity<'a>(&self, secrets: &'a [Option<Secret>; 3]) -> Option<&'a Secret> {
        let [token, refresh, _] = secrets;
        match CredentialKind::parse(&self.kind) {
            Some(CredentialKind::Oauth) => refresh.as_ref().or(token.as_ref()),
            _ => token.as_ref(),
        }
    }
}

async fn sealed_rows(conn: &mut SqliteConnection) -> Result<Vec<SealedRow>> {
    Ok(sqlx::query!(
        "SELECT id, provider, kind, token_sealed, refresh_token_sealed, client_secret_sealed
         FROM credentials"
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| SealedRow {
        id: r.id,
        provider: r.provider,
        kind: r.kind,
        values: [
            r.token_sealed,
            r.refresh_token_sealed,
            r.client_secret_sealed,
        ],
    })
    .collect())
}

async fn write_row(
    conn: &mut SqliteConnection,
    id: &str,
    sealed: &[Option<Vec<u8>>; 3],
) -> Result<()> {
    let [token, refresh, client_secret] = sealed;
    sqlx::query!(
        "UPDATE credentials SET token_sealed = ?, refresh_token_sealed = ?, client_secret_sealed = ?
         WHERE id = ?",
        token,
        refresh,
        client_secret,
        id
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The owner a fingerprint key is sealed for: its generation is part of it, so keys cannot
/// be swapped between generations.
fn key_owner(generation: i64) -> String {
    format!("meta/{generation}")
}

fn is_missing_table(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.message().contains("no such table"))
}

async fn meta_value(conn: &mut SqliteConnection, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(
        sqlx::query_scalar!("SELECT value FROM meta WHERE key = ?", key)
            .fetch_optional(conn)
            .await?,
    )
}

async fn set_meta(conn: &mut SqliteConnection, key: &str, value: &[u8]) -> Result<()> {
    sqlx::query!(
        "INSERT INTO meta (key, value) VALUES (?, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        key,
        value
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The stored fingerprint keys by generation, oldest first.
async fn fingerprint_keys(conn: &mut SqliteConnection) -> Result<Vec<(i64, Vec<u8>)>> {
    Ok(
        sqlx::query!("SELECT generation, key_sealed FROM fingerprint_keys ORDER BY generation")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| (r.generation, r.key_sealed))
            .collect(),
    )
}

/// Which forms the stored secrets (of credentials and fingerprint keys) are in.
#[derive(Debug, Default)]
struct Forms {
    plain: bool,
    obsolete: bool,
    sealed: bool,
    unknown: bool,
}

impl Forms {
    fn add(&mut self, form: Form) {
        match form {
            Form::Plain => self.plain = true,
            Form::Obsolete => self.obsolete = true,
            Form::Sealed => self.sealed = true,
            Form::Unknown => self.unknown = true,
        }
    }

    fn any_encrypted(&self) -> bool {
        self.obsolete || self.sealed || self.unknown
    }
}

async fn forms(conn: &mut SqliteConnection, keys: &[(i64, Vec<u8>)]) -> Result<Forms> {
    let mut forms = Forms::default();
    let firsts = sqlx::query_scalar!(
        r#"SELECT DISTINCT substr(v, 1, 1) AS "first!: Vec<u8>" FROM (
               SELECT token_sealed AS v FROM credentials
               UNION ALL SELECT refresh_token_sealed FROM credentials
               UNION ALL SELECT client_secret_sealed FROM credentials)
           WHERE v IS NOT NULL"#
    )
    .fetch_all(&mut *conn)
    .await?;
    for first in firsts {
        forms.add(form_of(&first));
    }
    for (_, key) in keys {
        forms.add(form_of(key));
    }
    Ok(forms)
}

/// Where the database's secrets stand under `encryption`; an error (changing nothing) when the
/// configured key, or its absence, does not fit the database.
async fn inspect(conn: &mut SqliteConnection, encryption: &Encryption) -> Result<Found> {
    let fresh = Found {
        database: None,
        standing: if encryption.is_on() {
            Standing::TurnOn
        } else {
            Standing::Plain
        },
    };
    let database = match meta_value(conn, "database_id").await {
        // A database from before the first migration has no `meta` yet: nothing is stored.
        Err(StoreError::Db(e)) if is_missing_table(&e) => return Ok(fresh),
        Err(e) => return Err(e),
        Ok(id) => id,
    };
    let marker = meta_value(conn, "key_check").await?;
    let keys = fingerprint_keys(conn).await?;
    let forms = forms(conn, &keys).await?;
    let refuse = |reason: &str| Err(StoreError::Key(reason.to_string()));
    let database = match database {
        None => None,
        Some(stored) => match DatabaseId::parse(&stored) {
            Some(id) => Some(id),
            None => return refuse("the database id in `meta` is malformed, so `meta` was altered"),
        },
    };
    if let Some(marker) = marker {
        if !encryption.is_on() {
            return refuse("the database's secrets are encrypted, and encryption is off");
        }
        let Some(id) = &database else {
            return refuse(
                "the database has a key check but no database id, so `meta` was altered",
            );
        };
        return match encryption.for_database(id).verify_key_check(&marker) {
            Ok(()) => Ok(Found {
                database,
                standing: Standing::Sealed,
            }),
            Err(e) => refuse(&format!(
                "the key does not open the database's key check: {e}"
            )),
        };
    }
    if !forms.any_encrypted() {
        return Ok(Found {
            database,
            standing: fresh.standing,
        });
    }
    // Values of the first sealed format come from a build before the database id, which wrote
    // no key check: whatever the key, this version cannot open them, so say that first.
    if forms.obsolete {
        return refuse(
            "the database holds values sealed in the first format (version 1, before the database id), which only earlier builds wrote and this version cannot open",
        );
    }
    if !encryption.is_on() {
        return refuse("the database's secrets are encrypted, and encryption is off");
    }
    refuse(
        "the database holds encrypted values but no key check, so the key cannot be verified (`meta` was altered)",
    )
}

/// Before an existing database is opened for writing: does `encryption` fit it? The check
/// reads through a read-only connection, so a wrong key changes nothing on disk. Without a
/// WAL the file is the whole database, and it is read as immutable, so that not even an empty
/// WAL or shared-memory file is left behind.
pub(super) async fn check(path: &std::path::Path, encryption: &Encryption) -> Result<()> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(!std::path::Path::new(&wal).exists())
        .connect()
        .await?;
    let result = inspect(&mut conn, encryption).await.map(|_| ());
    conn.close().await?;
    result
}

/// What opening a database produced for the store.
pub(super) struct Opened {
    pub sealer: Sealer,
    /// The current fingerprint key.
    pub fingerprinter: Fingerprinter,
    /// Earlier keys, kept only to recognise tombstones and import digests made under them.
    pub retired: Vec<Fingerprinter>,
    /// Credentials whose secrets were sealed (encryption turned on).
    pub resealed: usize,
    /// The keys as this open left them, which every later write checks.
    pub marker: KeyMarker,
}

/// After the migrations, in one transaction: give the database its id, seal the values in
/// clear when encryption is turned on, write the key check, load (or create) the fingerprint
/// keys, and bring stored previews to the current rule. The caller then checkpoints (see
/// [`Forgetter`]), so nothing replaced stays in the WAL or the database file, also after a
/// crash between an earlier commit and its checkpoint.
pub(super) async fn prepare(writer: &SqlitePool, encryption: &Encryption) -> Result<Opened> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let found = inspect(&mut tx, encryption).await?;
    let database = match found.database {
        Some(id) => id,
        None => {
            let id = DatabaseId::random();
            set_meta(&mut tx, "database_id", id.as_str().as_bytes()).await?;
            id
        }
    };
    let sealer = encryption.for_database(&database);
    let resealed = match found.standing {
        Standing::Plain | Standing::Sealed => 0,
        Standing::TurnOn => seal_values_in_clear(&mut tx, &sealer).await?,
    };
    if found.standing != Standing::Sealed
        && let Some(marker) = sealer.seal_key_check()
    {
        set_meta(&mut tx, "key_check", &marker).await?;
    }
    let (fingerprinter, retired) = load_fingerprint_keys(&mut tx, &sealer).await?;
    let previews = apply_preview_rule(&mut tx, &sealer).await?;
    let marker = KeyMarker::read(&mut tx).await?;
    tx.commit().await?;
    if resealed > 0 || previews > 0 {
        tracing::info!(
            resealed,
            previews,
            "stored secrets brought to the current form"
        );
    }
    Ok(Opened {
        sealer,
        fingerprinter,
        retired,
        resealed,
        marker,
    })
}

/// The device codes and client secrets of pending logins, sealed like the credentials' (each
/// bound to its session id), so a login under way when encryption is turned on goes on.
async fn seal_logins_in_clear(conn: &mut SqliteConnection, sealer: &Sealer) -> Result<()> {
    let rows = sqlx::query!(
        "SELECT id, device_code_sealed, client_secret_sealed FROM oauth_sessions
         WHERE device_code_sealed IS NOT NULL OR client_secret_sealed IS NOT NULL"
    )
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let id = row.id;
        let reseal = |field: Field, value: Option<Vec<u8>>| -> Result<Option<Vec<u8>>> {
            match value {
                Some(v) if form_of(&v) == Form::Plain => match sealer.open_plain(&id, field, &v) {
                    Ok(secret) => Ok(Some(sealer.seal(&id, field, &secret))),
                    // As for credentials: left as it is, and the start goes on; its poller ends
                    // the login `error` when the value does not open.
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, "a pending login's secret does not open; left as it is");
                        Ok(Some(v))
                    }
                },
                other => Ok(other),
            }
        };
        let device = reseal(Field::DeviceCode, row.device_code_sealed)?;
        let client = reseal(Field::ClientSecret, row.client_secret_sealed)?;
        sqlx::query!(
            "UPDATE oauth_sessions SET device_code_sealed = ?, client_secret_sealed = ? WHERE id = ?",
            device,
            client,
            id
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Seal under `sealer` every stored value in clear (credential secrets, fingerprint keys and
/// the secrets of logins under way), as turning encryption on does. A value that does not open stays as it is, for
/// `mark_unopenable` to report. Returns how many credentials changed.
async fn seal_values_in_clear(conn: &mut SqliteConnection, sealer: &Sealer) -> Result<usize> {
    let mut changed = 0;
    for row in sealed_rows(conn).await? {
        let mut values = row.values.clone();
        let mut touched = false;
        for (field, value) in FIELDS.into_iter().zip(values.iter_mut()) {
            if let Some(v) = value
                && form_of(v) == Form::Plain
                && let Ok(secret) = sealer.open_plain(&row.id, field, v)
            {
                *v = sealer.seal(&row.id, field, &secret);
                touched = true;
            }
        }
        if touched {
            write_row(conn, &row.id, &values).await?;
            changed += 1;
        }
    }
    seal_logins_in_clear(conn, sealer).await?;
    for (generation, key) in fingerprint_keys(conn).await? {
        if form_of(&key) != Form::Plain {
            continue;
        }
        let owner = key_owner(generation);
        let secret = sealer.open_plain(&owner, Field::FingerprintKey, &key)?;
        let sealed = sealer.seal(&owner, Field::FingerprintKey, &secret);
        sqlx::query!(
            "UPDATE fingerprint_keys SET key_sealed = ? WHERE generation = ?",
            sealed,
            generation
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(changed)
}

/// Open every fingerprint key (creating the first one of a new database): the newest is the
/// current one, the others are retired.
async fn load_fingerprint_keys(
    conn: &mut SqliteConnection,
    sealer: &Sealer,
) -> Result<(Fingerprinter, Vec<Fingerprinter>)> {
    let mut keys = Vec::new();
    for (generation, sealed) in fingerprint_keys(conn).await? {
        let text = sealer.open(&key_owner(generation), Field::FingerprintKey, &sealed)?;
        let key = Fingerprinter::from_text(&text).ok_or_else(|| CryptoError::Open {
            owner: key_owner(generation),
            field: Field::FingerprintKey.as_str(),
            reason: "the stored key is not 32 hex-encoded bytes",
        })?;
        keys.push(key);
    }
    match keys.pop() {
        Some(current) => Ok((current, keys)),
        // A new key would not find the stored fingerprints again: only a database that has
        // none gets one.
        None if has_fingerprints(conn).await? => Err(CryptoError::Open {
            owner: "fingerprint_keys".into(),
            field: Field::FingerprintKey.as_str(),
            reason: "there is none, yet the database holds fingerprints: the table was altered",
        }
        .into()),
        None => {
            let current = Fingerprinter::new(Fingerprinter::random_key());
            let sealed = sealer.seal(&key_owner(1), Field::FingerprintKey, &current.key_text());
            sqlx::query!(
                "INSERT INTO fingerprint_keys (generation, key_sealed) VALUES (1, ?)",
                sealed
            )
            .execute(&mut *conn)
            .await?;
            Ok((current, Vec::new()))
        }
    }
}

async fn has_fingerprints(conn: &mut SqliteConnection) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM credentials) OR EXISTS (SELECT 1 FROM tombstones)
           AS "some!: bool""#
    )
    .fetch_one(conn)
    .await?)
}

/// The name of the preview rule in force (`meta.token_preview_rule`): the last 4 characters
/// after a known public prefix.
const PREVIEW_RULE: &[u8] = b"prefix-last4";

/// Recompute, once, the stored previews made under an earlier rule (which showed up to a
/// quarter of each end): from the token where it opens, else nothing of it.
async fn apply_preview_rule(conn: &mut SqliteConnection, sealer: &Sealer) -> Result<usize> {
    if meta_value(conn, "token_preview_rule").await?.as_deref() == Some(PREVIEW_RULE) {
        return Ok(0);
    }
    let previews: std::collections::HashMap<String, String> =
        sqlx::query!("SELECT id, token_preview FROM credentials")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| (r.id, r.token_preview))
            .collect();
    let mut changed = 0;
    for row in sealed_rows(conn).await? {
        let [token, refresh, _] = &row.values;
        let (field, value) = match (CredentialKind::parse(&row.kind), refresh) {
            (Some(CredentialKind::Oauth), Some(r)) => (Field::RefreshToken, Some(r)),
            _ => (Field::Token, token.as_ref()),
        };
        let preview = value
            .and_then(|v| sealer.open(&row.id, field, v).ok())
            .map(|s| token_preview(s.expose()))
            .unwrap_or_else(|| PREVIEW_UNKNOWN.to_string());
        if previews.get(&row.id) != Some(&preview) {
            sqlx::query!(
                "UPDATE credentials SET token_preview = ? WHERE id = ?",
                preview,
                row.id
            )
            .execute(&mut *conn)
            .await?;
            changed += 1;
        }
    }
    set_meta(conn, "token_preview_rule", PREVIEW_RULE).await?;
    Ok(changed)
}

/// The first pause before a checkpoint is tried again, doubled after each failed attempt up to
/// [`LAST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// The longest pause between attempts while a reader keeps the checkpoint from completing:
/// an attempt that finds nothing new to copy costs a few lock probes and no write.
const LAST_PAUSE: Duration = Duration::from_millis(500);
/// Failed attempts after which the wait is worth a warning: by then (about 10 s) it is no
/// passing read but a reader that stays, such as a backup or an open `sqlite3` shell.
const ATTEMPTS_BEFORE_WARNING: u32 = 25;

/// How far the checkpoints owed have got: each write that removed secrets asks for one, and
/// an attempt that completes settles every request made before it started.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    asked: u64,
    done: u64,
}

/// The checkpoints owed after secrets were replaced or removed ("secrets to forget"), and the
/// connection they run on.
///
/// A truncating checkpoint copies the WAL into the database file, so that a page image that
/// held a replaced or deleted secret survives neither in the WAL nor (overwritten by its new
/// image, freed space being zeroed by `secure_delete`) in the database file, and then cuts the
/// WAL to nothing. To copy the last frames it takes SQLite's write lock; to cut the WAL it
/// needs every reader to have left it. A reader on an older snapshot (a backup tool, a
/// `sqlite3` shell, a long list) keeps both from happening, and with a busy timeout the
/// checkpoint waits for that reader while holding the write lock, which stalls every writer:
/// the ledger's group commits (whose own busy timeout then runs out, failing live requests)
/// and the pool's writer alike.
///
/// So checkpoints run on a connection of their own whose busy timeout is zero: an attempt
/// copies what it can without the write lock, then takes that lock only if it is free, holds
/// it only to copy the rest and cut the WAL, and returns at once when a reader or a writer is
/// in the way, having copied what it could. The first attempt is
/// made right after the write that asked for it; if it cannot complete, a background task
/// tries again with a short backoff until one does. Every start asks for one too, so a crash
/// before the checkpoint leaves nothing behind either.
#[derive(Debug)]
pub(super) struct Forgetter {
    /// One connection, busy timeout zero: never waits on a lock.
    conn: SqlitePool,
    progress: watch::Sender<Progress>,
    /// Hands an incomplete checkpoint to the background task.
    retry: Notify,
}

impl Forgetter {
    /// Open the checkpoint connection (with the store's other pragmas) and start the task that
    /// retries checkpoints.
    pub(super) async fn open(base: &SqliteConnectOptions) -> Result<Arc<Forgetter>> {
        let conn = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // Opened with the store's busy timeout (the open itself may meet a lock), then
            // never waiting again.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA busy_timeout = 0")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_with(base.clone())
            .await?;
        let forgetter = Arc::new(Forgetter {
            conn,
            progress: watch::Sender::new(Progress::default()),
            retry: Notify::new(),
        });
        tokio::spawn(forgetter.clone().retry_until_closed());
        Ok(forgetter)
    }

    /// Ask for a checkpoint after a committed write that replaced or removed secrets, and try
    /// it once at once. If it cannot complete, the background task takes it over; this never
    /// waits on a lock.
    pub(super) async fn forget(&self) {
        self.progress.send_modify(|p| p.asked += 1);
        match self.attempt().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(
                    "another connection is reading an older snapshot or writing; the checkpoint that removes replaced secrets from the WAL is retried in the background"
                );
                self.retry.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint failed; retried in the background");
                self.retry.notify_one();
            }
        }
    }

    /// One truncating checkpoint that waits for nothing. `Ok(true)` when it completed (the WAL
    /// copied and cut to nothing), which settles every request made before it started.
    async fn attempt(&self) -> Result<bool> {
        let covers = self.progress.borrow().asked;
        // A passive checkpoint copies what it can beside writers, without the write lock, so
        // the truncating one holds that lock only to copy what was committed in between.
        let _: (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&self.conn)
            .await?;
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.conn)
            .await?;
        if busy != 0 {
            return Ok(false);
        }
        self.progress.send_modify(|p| p.done = p.done.max(covers));
        Ok(true)
    }

    fn owed(&self) -> bool {
        let p = *self.progress.borrow();
        p.done < p.asked
    }

    /// Retry owed checkpoints, pausing a little longer after each failure, until the store
    /// closes.
    async fn retry_until_closed(self: Arc<Self>) {
        loop {
            self.retry.notified().await;
            let mut pause = FIRST_PAUSE;
            let mut failed = 0u32;
            while self.owed() && !self.conn.is_closed() {
                tokio::time::sleep(pause).await;
                match self.attempt().await {
                    Ok(true) => {
                        tracing::info!(
                            attempts = failed + 1,
                            "checkpointed: replaced secrets are gone from the WAL and the database file"
                        );
                    }
                    Ok(false) => failed += 1,
                    Err(_) if self.conn.is_closed() => return,
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(error = %e, "checkpoint failed; retrying");
                    }
                }
                if failed == ATTEMPTS_BEFORE_WARNING {
                    tracing::warn!(
                        "a reader has kept the WAL from being checkpointed for a while (a backup or an open sqlite3 shell?); replaced secrets stay in it until that reader finishes"
                    );
                }
                pause = (pause * 2).min(LAST_PAUSE);
            }
            if self.conn.is_closed() {
                return;
            }
        }
    }

    /// Wait, up to `within`, until every checkpoint asked for so far has completed (for a
    /// command that exits right after its write). `true` when none is owed.
    pub(super) async fn settled(&self, within: Duration) -> bool {
        let asked = self.progress.borrow().asked;
        let mut progress = self.progress.subscribe();
        tokio::time::timeout(within, progress.wait_for(|p| p.done >= asked))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// At close: one last attempt if a checkpoint is still owed, then close the connection.
    pub(super) async fn close(&self) {
        if self.owed() && !matches!(self.attempt().await, Ok(true)) {
            tracing::warn!(
                "a reader kept the WAL from being checkpointed; replaced secrets stay in it until the next start"
            );
        }
        self.conn.close().await;
        // Wake the retry task so it sees the closed connection and ends.
        self.retry.notify_one();
    }
}

/// What this process found, at open, in `meta`'s key check and the fingerprint key generations.
/// `rotate-key` changes both, so a write transaction that finds them changed would seal under
/// a retired key and fingerprint under a retired fingerprint key: it stops instead.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct KeyMarker {
    key_check: Option<Vec<u8>>,
    generations: Vec<i64>,
}

impl KeyMarker {
    async fn read(conn: &mut SqliteConnection) -> Result<KeyMarker> {
        Ok(KeyMarker {
            key_check: meta_value(conn, "key_check").await?,
            generations: fingerprint_keys(conn)
                .await?
                .into_iter()
                .map(|(generation, _)| generation)
                .collect(),
        })
    }

    /// Inside a write transaction (which holds the write lock, so no rotation can commit until
    /// it ends): [`StoreError::KeyRotated`] if the keys are no longer those of the open.
    pub(super) async fn unchanged(&self, conn: &mut SqliteConnection) -> Result<()> {
        if KeyMarker::read(conn).await? == *self {
            Ok(())
        } else {
            Err(StoreError::KeyRotated)
        }
    }
}

impl Store {
    /// After a write that replaced or deleted secrets (a `PUT` of a token, a delete, an import
    /// update, a rotation): checkpoint, at once if nothing is in the way, else in the background
    /// (see [`Forgetter`]). The write is committed whatever happens here.
    pub(super) async fn forget_old_secrets(&self) {
        self.forget.forget().await;
    }

    /// Wait, up to `within`, until the checkpoints owed for secrets this process replaced or
    /// removed have completed; `false` if one is still owed (a reader holds an older snapshot).
    /// For a command that exits right after its write.
    pub async fn old_secrets_forgotten(&self, within: Duration) -> bool {
        self.forget.settled(within).await
    }

    /// Mark every credential whose stored secrets do not open as `invalid`, with the reason;
    /// the others are untouched. Returns the ids and reasons of the marked ones.
    #[tracing::instrument(skip_all)]
    pub(super) async fn mark_unopenable(&self, now: i64) -> Result<Vec<(String, String)>> {
        let rows = sealed_rows(&mut *self.reader.acquire().await?).await?;
        let failed: Vec<(String, String)> = rows
            .iter()
            .filter_map(|r| r.first_failure(&self.sealer).map(|e| (r.id.clone(), e)))
            .collect();
        if failed.is_empty() {
            return Ok(failed);
        }
        let mut tx = self.begin_write().await?;
        for (id, reason) in &failed {
            sqlx::query!(
                "UPDATE credentials SET state = 'invalid', state_reason = ?, updated_at = ?
                 WHERE id = ? AND (state <> 'invalid' OR state_reason IS NOT ?)",
                reason,
                now,
                id,
                reason
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(failed)
    }

    /// Re-seal every stored secret under `to` and replace the fingerprint key (see
    /// `rekey_locked`), then checkpoint so no value under the old key stays on disk.
    #[tracing::instrument(skip_all)]
    pub async fn rekey(&self, to: &Encryption) -> Result<usize> {
        let count = self
            .exclusive(async { Ok(super::Written::everything(self.rekey_locked(to).await?)) })
            .await?;
        self.forget_old_secrets().await;
        Ok(count)
    }

    /// In one transaction: re-seal every credential's secrets under `to`, recompute every
    /// credential's fingerprint under a new random fingerprint key, re-seal the older keys
    /// (kept for the tombstones and import digests made under them, which cannot be recomputed;
    /// dropped when there are none), seal the key check under `to`, and delete the pending
    /// logins (their device codes are sealed under the old key). Fails, changing nothing, if
    /// any secret does not open under the current key.
    async fn rekey_locked(&self, to: &Encryption) -> Result<usize> {
        let to = to.for_database(self.sealer.database());
        let fresh = Fingerprinter::new(Fingerprinter::random_key());
        let mut tx = self.begin_write().await?;
        let rows = sealed_rows(&mut tx).await?;
        for row in &rows {
            let secrets = row.open_all(&self.sealer)?;
            let mut resealed: [Option<Vec<u8>>; 3] = [None, None, None];
            for ((slot, field), secret) in resealed.iter_mut().zip(FIELDS).zip(&secrets) {
                *slot = secret.as_ref().map(|s| to.seal(&row.id, field, s));
            }
            write_row(&mut tx, &row.id, &resealed).await?;
            if let Some(identity) = row.identity(&secrets) {
                let fingerprint = fresh.credential(&row.provider, identity);
                sqlx::query!(
                    "UPDATE credentials SET fingerprint = ? WHERE id = ?",
                    fingerprint,
                    row.id
                )
                .execute(&mut *tx)
                .await?;
            }
        }
        let keys = fingerprint_keys(&mut tx).await?;
        let next = keys.last().map_or(1, |(generation, _)| generation + 1);
        let still_needed = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM tombstones)
                   OR EXISTS (SELECT 1 FROM credentials WHERE import_digest IS NOT NULL)
               AS "needed!: bool""#
        )
        .fetch_one(&mut *tx)
        .await?;
        for (generation, sealed) in keys {
            let owner = key_owner(generation);
            if still_needed {
                let key = self.sealer.open(&owner, Field::FingerprintKey, &sealed)?;
                let resealed = to.seal(&owner, Field::FingerprintKey, &key);
                sqlx::query!(
                    "UPDATE fingerprint_keys SET key_sealed = ? WHERE generation = ?",
                    resealed,
                    generation
                )
                .execute(&mut *tx)
                .await?;
            } else {
                sqlx::query!(
                    "DELETE FROM fingerprint_keys WHERE generation = ?",
                    generation
                )
                .execute(&mut *tx)
                .await?;
            }
        }
        let sealed = to.seal(&key_owner(next), Field::FingerprintKey, &fresh.key_text());
        sqlx::query!(
            "INSERT INTO fingerprint_keys (generation, key_sealed) VALUES (?, ?)",
            next,
            sealed
        )
        .execute(&mut *tx)
        .await?;
        if let Some(marker) = to.seal_key_check() {
            set_meta(&mut tx, "key_check", &marker).await?;
        }
        // Pending device-flow logins hold device codes sealed under the old key, and a running
        // server's poller would seal nothing new under the new one: rotating the key ends them
        // (README, "OAuth device flows"). Ended ones hold no secret.
        let logins = sqlx::query!("DELETE FROM oauth_sessions WHERE status = 'pending'")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if logins > 0 {
            tracing::info!(logins, "rotating the key ended the pending logins");
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Inside an import's transaction, before it looks up tombstones and digests: the
    /// tombstones and import digests of `entries` made under a retired fingerprint key (before
    /// a `rotate-key`) are re-keyed under the current one, so the import finds them as if they
    /// had always been. `entries` are keyed under the current key.
    pub(super) async fn adopt_retired(
        &self,
        conn: &mut SqliteConnection,
        entries: &[Keyed],
    ) -> Result<()> {
        for old in &*self.retired {
            let pairs: Vec<[String; 4]> = entries
                .iter()
                .map(|k| {
                    let credential = &k.entry.credential;
                    [
                        to_hex(&credential.fingerprint(old)),
                        to_hex(&k.fingerprint),
                        to_hex(&credential.content_digest(old)),
                        to_hex(&k.digest),
                    ]
                })
                .collect();
            let pairs = serde_json::to_string(&pairs).expect("strings serialize");
            sqlx::query!(
                "UPDATE OR REPLACE tombstones SET fingerprint = unhex(j.value ->> 1)
                 FROM json_each(?) j WHERE tombstones.fingerprint = unhex(j.value ->> 0)",
                pairs
            )
            .execute(&mut *conn)
            .await?;
            sqlx::query!(
                "UPDATE credentials SET import_digest = unhex(j.value ->> 3)
                 FROM json_each(?) j
                 WHERE credentials.fingerprint = unhex(j.value ->> 1)
                   AND credentials.import_digest = unhex(j.value ->> 2)",
                pairs
            )
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Executor;
    use sqlx::sqlite::SqliteJournalMode;

    async fn connect(options: &SqliteConnectOptions) -> SqliteConnection {
        options.connect().await.unwrap()
    }

    /// A reader on an older snapshot keeps the checkpoint from completing, yet neither the
    /// attempt nor a writer waits for it; once the reader ends, the background completes it.
    #[tokio::test]
    async fn a_reader_delays_the_checkpoint_and_blocks_no_writer() {
        let dir = tempfile::tempdir().unwrap();
        let base = SqliteConnectOptions::new()
            .filename(dir.path().join("db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        // A writer that gives up long before the reader ends: it may wait for a checkpoint's
        // copy, never for the reader.
        let mut writer = connect(&base.clone().busy_timeout(Duration::from_secs(1))).await;
        writer
            .execute("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('old')")
            .await
            .unwrap();
        let forget = Forgetter::open(&base).await.unwrap();
        // Readers from the extremes: one that began on an empty WAL (reading the database
        // file alone) and one whose snapshot is in the WAL.
        for checkpointed_first in [true, false] {
            if checkpointed_first {
                forget.forget().await;
                assert!(!forget.owed());
            }
            let mut reader = connect(&base).await;
            reader.execute("BEGIN").await.unwrap();
            let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
                .fetch_one(&mut reader)
                .await
                .unwrap();
            writer
                .execute("UPDATE t SET v = 'new'; INSERT INTO t VALUES ('more')")
                .await
                .unwrap();
            forget.forget().await;
            assert!(forget.owed(), "the reader keeps the WAL");
            // The background attempts meanwhile hold the write lock for their copy only.
            for _ in 0..3 {
                writer.execute("INSERT INTO t VALUES ('x')").await.unwrap();
                assert!(!forget.settled(Duration::from_millis(50)).await);
            }
            reader.execute("COMMIT").await.unwrap();
            assert!(forget.settled(Duration::from_secs(10)).await);
            let wal = std::fs::metadata(dir.path().join("db-wal")).unwrap();
            assert_eq!(wal.len(), 0, "truncated");
            reader.close().await.unwrap();
        }
        forget.close().await;
    }
}
