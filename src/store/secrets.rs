//! Keeping stored secrets under the configured key: checking the key before anything is
//! written, sealing values left in clear when encryption is turned on, marking credentials
//! whose secrets do not open, and re-sealing everything under a new key. Each change is one
//! transaction, so a crash leaves the database wholly before or wholly after it.

use super::{Result, Store, StoreError};
use crate::crypto::{Field, Sealer};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};

/// One credential's sealed secrets.
struct SealedRow {
    id: String,
    token: Option<Vec<u8>>,
    refresh: Option<Vec<u8>>,
    client_secret: Option<Vec<u8>>,
}

impl SealedRow {
    fn fields(&self) -> [(Field, Option<&Vec<u8>>); 3] {
        [
            (Field::Token, self.token.as_ref()),
            (Field::RefreshToken, self.refresh.as_ref()),
            (Field::ClientSecret, self.client_secret.as_ref()),
        ]
    }

    /// The first secret of the row that does not open, and why.
    fn first_failure(&self, sealer: &Sealer) -> Option<String> {
        self.fields().into_iter().find_map(|(field, value)| {
            value.and_then(|v| sealer.open(&self.id, field, v).err().map(|e| e.to_string()))
        })
    }

    /// Every secret of the row re-sealed by `to` (opened by `from`).
    fn resealed(&self, from: &Sealer, to: &Sealer) -> Result<[Option<Vec<u8>>; 3]> {
        let mut out: [Option<Vec<u8>>; 3] = [None, None, None];
        for (slot, (field, value)) in out.iter_mut().zip(self.fields()) {
            if let Some(v) = value {
                let secret = from.open(&self.id, field, v)?;
                *slot = Some(to.seal(&self.id, field, &secret));
            }
        }
        Ok(out)
    }
}

async fn sealed_rows(conn: &mut SqliteConnection) -> Result<Vec<SealedRow>> {
    Ok(sqlx::query!(
        "SELECT id, token_sealed, refresh_token_sealed, client_secret_sealed FROM credentials"
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(|r| SealedRow {
        id: r.id,
        token: r.token_sealed,
        refresh: r.refresh_token_sealed,
        client_secret: r.client_secret_sealed,
    })
    .collect())
}

async fn write_row(
    conn: &mut SqliteConnection,
    id: &str,
    sealed: [Option<Vec<u8>>; 3],
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

async fn reseal_meta(conn: &mut SqliteConnection, from: &Sealer, to: &Sealer) -> Result<()> {
    let sealed = sqlx::query_scalar!("SELECT value FROM meta WHERE key = 'fingerprint_key'")
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(sealed) = sealed {
        let key = from.open("meta", Field::FingerprintKey, &sealed)?;
        let resealed = to.seal("meta", Field::FingerprintKey, &key);
        sqlx::query!(
            "UPDATE meta SET value = ? WHERE key = 'fingerprint_key'",
            resealed
        )
        .execute(conn)
        .await?;
    }
    Ok(())
}

/// Before an existing database is opened for writing: does `sealer` open its secrets? The
/// check reads through a read-only connection, so a wrong key changes nothing on disk.
pub(super) async fn check_key(path: &std::path::Path, sealer: &Sealer) -> Result<()> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await?;
    let sealed = sqlx::query_scalar!("SELECT value FROM meta WHERE key = 'fingerprint_key'")
        .fetch_optional(&mut conn)
        .await;
    let result = match sealed {
        // A database from before the first migration has no `meta` yet: nothing to check.
        Err(sqlx::Error::Database(e)) if e.message().contains("no such table") => Ok(()),
        Err(e) => Err(e.into()),
        Ok(None) => Ok(()),
        Ok(Some(sealed)) => sealer
            .open("meta", Field::FingerprintKey, &sealed)
            .map(|_| ())
            .map_err(|e| StoreError::Key(e.to_string())),
    };
    conn.close().await?;
    result
}

impl Store {
    /// Seal, under the configured key, every secret still stored in another form (in clear,
    /// from before encryption was turned on). One transaction; returns how many credentials
    /// changed.
    pub(super) async fn seal_stale(&self) -> Result<usize> {
        if !self.sealer.is_encrypted() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let mut changed = 0;
        for row in sealed_rows(&mut tx).await? {
            let stale = row
                .fields()
                .iter()
                .any(|(_, v)| v.is_some_and(|v| !self.sealer.is_current(v)));
            // A value that does not open is left as it is, for `mark_unopenable` to report.
            if stale && row.first_failure(&self.sealer).is_none() {
                let resealed = row.resealed(&self.sealer, &self.sealer)?;
                write_row(&mut tx, &row.id, resealed).await?;
                changed += 1;
            }
        }
        let meta = sqlx::query_scalar!("SELECT value FROM meta WHERE key = 'fingerprint_key'")
            .fetch_optional(&mut *tx)
            .await?;
        if meta.is_some_and(|m| !self.sealer.is_current(&m)) {
            reseal_meta(&mut tx, &self.sealer, &self.sealer).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Mark every credential whose stored secrets do not open as `invalid`, with the reason;
    /// the others are untouched. Returns the ids and reasons of the marked ones.
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

    /// Re-seal every stored secret under `to` (see `rekey_locked`).
    pub async fn rekey(&self, to: &Sealer) -> Result<usize> {
        self.exclusive(async { Ok(super::Written::everything(self.rekey_locked(to).await?)) })
            .await
    }

    /// Re-seal every stored secret under `to`, in one transaction. Fails, changing nothing,
    /// if any secret does not open under the current key.
    async fn rekey_locked(&self, to: &Sealer) -> Result<usize> {
        let mut tx = self.begin_write().await?;
        let rows = sealed_rows(&mut tx).await?;
        for row in &rows {
            let resealed = row.resealed(&self.sealer, to)?;
            write_row(&mut tx, &row.id, resealed).await?;
        }
        reseal_meta(&mut tx, &self.sealer, to).await?;
        tx.commit().await?;
        Ok(rows.len())
    }
}
