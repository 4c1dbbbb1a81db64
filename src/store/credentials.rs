//! Credentials: listing with the effective status, adding, updating, deleting (with a
//! tombstone), and finding one by id or by token.

use super::audit::{self, AuditEntry};
use super::{Result, Store, StoreError, is_unique_violation, new_credential_id};
use crate::crypto::{Field, Secret, token_preview};
use crate::domain::{CredentialKind, CredentialRow, NewCredential, Status, from_unix};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::SqliteConnection;

/// Which credentials to list. `None` means no filter; paging defaults to everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub provider: Option<String>,
    pub id: Option<String>,
    pub status: Option<Status>,
    pub limit: Option<u32>,
    pub offset: u32,
}

/// A change through `PUT`: every field optional; `Some(None)` clears a nullable field.
#[derive(Debug, Default)]
pub struct CredentialPatch {
    pub token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub priority: Option<i64>,
    pub label: Option<Option<String>>,
    pub disabled: Option<bool>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

impl CredentialPatch {
    /// The names of the fields it changes, for the audit log (never their values).
    fn fields(&self) -> Vec<&'static str> {
        [
            ("token", self.token.is_some()),
            ("refresh_token", self.refresh_token.is_some()),
            ("priority", self.priority.is_some()),
            ("label", self.label.is_some()),
            ("disabled", self.disabled.is_some()),
            ("expires_at", self.expires_at.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
}

fn opt_time(t: Option<i64>) -> Option<DateTime<Utc>> {
    t.map(from_unix)
}

/// Why a credential has the status it has, for `status_reason`.
fn status_reason(row: &CredentialRow, stored_reason: Option<String>) -> Option<String> {
    match row.status {
        Status::Active => None,
        Status::Disabled => Some("disabled by a user".into()),
        Status::Cooldown => stored_reason.or_else(|| Some("rate-limited by the provider".into())),
        Status::Exhausted => stored_reason.or_else(|| {
            row.limit
                .map(|l| format!("used {} of its {l} tokens this period", row.used))
        }),
        Status::Expired => stored_reason.or_else(|| Some("token expired".into())),
        Status::Invalid => stored_reason.or_else(|| Some("rejected by the provider".into())),
    }
}

impl Store {
    /// List credentials with their counters and effective status at `now`, ordered by
    /// provider, priority and creation.
    pub async fn list(
        &self,
        filter: &ListFilter,
        now: DateTime<Utc>,
    ) -> Result<Vec<CredentialRow>> {
        let now = now.timestamp();
        let status = filter.status.map(Status::as_str);
        let limit: i64 = filter.limit.map(i64::from).unwrap_or(-1);
        let offset = i64::from(filter.offset);
        // The status expression appears twice (select and filter); it must stay the same in
        // both. `?6` is now.
        let rows = sqlx::query!(
            r#"SELECT c.id, c.provider, c.kind, c.label, c.token_preview, c.priority,
                      c.state_reason, c.expires_at, c.cooldown_until, q.last_used_at,
                      c.last_refresh_at, c.source, c.created_at, c.updated_at,
                      q.limit_tokens, q.used, q.period_start,
                      COALESCE(r.reserved, 0) AS "reserved!: i64",
                      CASE WHEN c.disabled THEN 'disabled'
                           WHEN c.state = 'invalid' THEN 'invalid'
                           WHEN c.state = 'expired'
                                OR (c.expires_at IS NOT NULL AND c.expires_at <= ?6
                                    AND c.refresh_token_sealed IS NULL) THEN 'expired'
                           WHEN c.state = 'exhausted'
                                OR (q.limit_tokens IS NOT NULL AND q.used >= q.limit_tokens)
                                THEN 'exhausted'
                           WHEN c.cooldown_until IS NOT NULL AND c.cooldown_until > ?6
                                THEN 'cooldown'
                           ELSE 'active' END AS "status!: String"
               FROM credentials c JOIN quotas q ON q.credential_id = c.id
               LEFT JOIN (SELECT credential_id, SUM(tokens) AS reserved FROM reservations
                          GROUP BY credential_id) r ON r.credential_id = c.id
               WHERE (?1 IS NULL OR c.provider = ?1)
                 AND (?2 IS NULL OR c.id = ?2)
                 AND (?3 IS NULL OR ?3 =
                      CASE WHEN c.disabled THEN 'disabled'
                           WHEN c.state = 'invalid' THEN 'invalid'
                           WHEN c.state = 'expired'
                                OR (c.expires_at IS NOT NULL AND c.expires_at <= ?6
                                    AND c.refresh_token_sealed IS NULL) THEN 'expired'
                           WHEN c.state = 'exhausted'
                                OR (q.limit_tokens IS NOT NULL AND q.used >= q.limit_tokens)
                                THEN 'exhausted'
                           WHEN c.cooldown_until IS NOT NULL AND c.cooldown_until > ?6
                                THEN 'cooldown'
                           ELSE 'active' END)
               ORDER BY c.provider, c.priority, c.seq
               LIMIT ?4 OFFSET ?5"#,
            filter.provider,
            filter.id,
            status,
            limit,
            offset,
            now
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut row = CredentialRow {
                    id: r.id,
                    provider: r.provider,
                    kind: CredentialKind::parse(&r.kind).unwrap_or(CredentialKind::ApiKey),
                    label: r.label,
                    token_preview: r.token_preview,
                    priority: r.priority,
                    status: Status::parse(&r.status).unwrap_or(Status::Active),
                    status_reason: None,
                    limit: r.limit_tokens.map(|l| l.max(0) as u64),
                    used: r.used.max(0) as u64,
                    reserved: r.reserved.max(0) as u64,
                    period_start: from_unix(r.period_start),
                    expires_at: opt_time(r.expires_at),
                    cooldown_until: opt_time(r.cooldown_until),
                    last_used_at: opt_time(r.last_used_at),
                    last_refresh_at: opt_time(r.last_refresh_at),
                    source: r.source,
                    created_at: from_unix(r.created_at),
                    updated_at: from_unix(r.updated_at),
                };
                row.status_reason = status_reason(&row, r.state_reason);
                row
            })
            .collect())
    }

    /// One credential by id.
    pub async fn get(&self, id: &str, now: DateTime<Utc>) -> Result<CredentialRow> {
        let filter = ListFilter {
            id: Some(id.to_string()),
            ..Default::default()
        };
        self.list(&filter, now)
            .await?
            .pop()
            .ok_or(StoreError::NotFound)
    }

    /// The ids of a provider's credentials, in list order.
    pub async fn ids_of_provider(&self, provider: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar!(
            "SELECT id FROM credentials WHERE provider = ? ORDER BY priority, seq",
            provider
        )
        .fetch_all(&self.reader)
        .await?)
    }

    /// Resolve `key` (a credential id, or the credential's token in clear, as the seed's
    /// `DELETE ...?id=sk-ant-key1` does) to a credential id of `provider`.
    pub async fn resolve(&self, provider: &str, key: &str) -> Result<String> {
        let by_id = sqlx::query_scalar!(
            "SELECT id FROM credentials WHERE id = ? AND provider = ?",
            key,
            provider
        )
        .fetch_optional(&self.reader)
        .await?;
        if let Some(id) = by_id {
            return Ok(id);
        }
        let fp = self.fingerprinter.credential(provider, &Secret::new(key));
        sqlx::query_scalar!("SELECT id FROM credentials WHERE fingerprint = ?", fp)
            .fetch_optional(&self.reader)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Add a credential through the API (see `add_locked`).
    pub async fn add(
        &self,
        new: &NewCredential,
        source: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<CredentialRow> {
        self.exclusive(self.add_locked(new, source, actor, now))
            .await
    }

    /// Apply a `PUT` (see `update_locked`).
    pub async fn update(
        &self,
        id: &str,
        patch: &CredentialPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<CredentialRow> {
        let row = self
            .exclusive(self.update_locked(id, patch, actor, now))
            .await?;
        if patch.token.is_some() || patch.refresh_token.is_some() {
            self.forget_old_secrets().await;
        }
        Ok(row)
    }

    /// Delete a credential (see `delete_locked`).
    pub async fn delete(&self, id: &str, actor: &str, now: DateTime<Utc>) -> Result<CredentialRow> {
        let row = self.exclusive(self.delete_locked(id, actor, now)).await?;
        self.forget_old_secrets().await;
        Ok(row)
    }

    /// Add a credential through the API. A credential with the same provider and identifying
    /// secret is a [`StoreError::Duplicate`]; a tombstone of it is lifted.
    async fn add_locked(
        &self,
        new: &NewCredential,
        source: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<CredentialRow> {
        let fp = new.fingerprint(&self.fingerprinter);
        let mut tx = self.begin_write().await?;
        if let Some(id) = find_by_fingerprint(&mut tx, &fp).await? {
            return Err(StoreError::Duplicate { id });
        }
        sqlx::query!("DELETE FROM tombstones WHERE fingerprint = ?", fp)
            .execute(&mut *tx)
            .await?;
        let id = self.insert(&mut tx, new, &fp, None, source, now).await?;
        audit::record(
            &mut tx,
            AuditEntry {
                now: now.timestamp(),
                actor,
                action: "credential.add",
                credential_id: Some(&id),
                provider: Some(&new.provider),
                detail: json!({"source": source, "type": new.kind.as_str(), "priority": new.priority}),
            },
        )
        .await?;
        tx.commit().await?;
        self.get(&id, now).await
    }

    /// Insert a new credential and its counter inside `conn`'s transaction; returns its id.
    pub(super) async fn insert(
        &self,
        conn: &mut SqliteConnection,
        new: &NewCredential,
        fingerprint: &[u8],
        import_digest: Option<&[u8]>,
        source: &str,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let id = self
            .insert_credential(conn, new, fingerprint, import_digest, source, now)
            .await?;
        let seed = self.quota_seed(&id, new, now);
        insert_quotas(conn, &[seed]).await?;
        Ok(id)
    }

    /// A new credential's token, refresh token and client secret, sealed for row `id`.
    pub(super) fn seal_secrets(&self, id: &str, new: &NewCredential) -> [Option<Vec<u8>>; 3] {
        let seal =
            |value: &Option<Secret>, field| value.as_ref().map(|v| self.sealer.seal(id, field, v));
        [
            seal(&new.token, Field::Token),
            seal(&new.refresh_token, Field::RefreshToken),
            seal(&new.client_secret, Field::ClientSecret),
        ]
    }

    /// The counter row of a new credential, for [`insert_quotas`].
    pub(super) fn quota_seed(
        &self,
        id: &str,
        new: &NewCredential,
        now: DateTime<Utc>,
    ) -> serde_json::Value {
        let limit = new.limit.map(|l| l.min(i64::MAX as u64) as i64);
        let used = new.used.min(i64::MAX as u64) as i64;
        json!([id, limit, used, self.period_start(&new.provider, now)])
    }

    /// Insert the credential row alone (its counter comes from [`insert_quotas`]).
    pub(super) async fn insert_credential(
        &self,
        conn: &mut SqliteConnection,
        new: &NewCredential,
        fingerprint: &[u8],
        import_digest: Option<&[u8]>,
        source: &str,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let id = new_credential_id();
        let [token, refresh, client_secret] = self.seal_secrets(&id, new);
        let preview = token_preview(new.identity().expose());
        let extra = serde_json::to_string(&new.extra).expect("extra serializes");
        let kind = new.kind.as_str();
        let expires_at = new.expires_at.map(|t| t.timestamp());
        let ts = now.timestamp();
        let inserted = sqlx::query!(
            "INSERT INTO credentials (id, provider, kind, label, fingerprint, token_sealed,
                 refresh_token_sealed, client_secret_sealed, token_preview, extra, priority,
                 disabled, expires_at, source, import_digest, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            id,
            new.provider,
            kind,
            new.label,
            fingerprint,
            token,
            refresh,
            client_secret,
            preview,
            extra,
            new.priority,
            new.disabled,
            expires_at,
            source,
            import_digest,
            ts,
            ts
        )
        .execute(&mut *conn)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                let id = find_by_fingerprint(conn, fingerprint)
                    .await?
                    .unwrap_or_default();
                Err(StoreError::Duplicate { id })
            }
            Err(e) => Err(e.into()),
            Ok(_) => Ok(id),
        }
    }

    /// Apply a `PUT`. Changing the identifying secret re-keys the fingerprint and leaves a
    /// tombstone for the old one (the old token was removed through the API); a new secret
    /// also clears an `invalid` or `expired` mark, since it deserves a fresh chance.
    async fn update_locked(
        &self,
        id: &str,
        patch: &CredentialPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<CredentialRow> {
        let mut tx = self.begin_write().await?;
        let current = sqlx::query!(
            r#"SELECT provider, kind, fingerprint,
                      (refresh_token_sealed IS NOT NULL) AS "has_refresh!: bool"
               FROM credentials WHERE id = ?"#,
            id
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let kind = CredentialKind::parse(&current.kind).unwrap_or(CredentialKind::ApiKey);
        // Which secret now identifies the credential, if the patch changes it.
        let new_identity = match kind {
            CredentialKind::ApiKey => patch.token.as_ref(),
            CredentialKind::Oauth => patch
                .refresh_token
                .as_ref()
                .or(patch.token.as_ref().filter(|_| !current.has_refresh)),
        };
        let ts = now.timestamp();
        let (fingerprint, preview) = match new_identity {
            Some(secret) => {
                let fp = self.fingerprinter.credential(&current.provider, secret);
                if fp != current.fingerprint {
                    if let Some(other) = find_by_fingerprint(&mut tx, &fp).await? {
                        return Err(StoreError::Duplicate { id: other });
                    }
                    sqlx::query!(
                        "INSERT OR REPLACE INTO tombstones (fingerprint, provider, credential_id, deleted_at)
                         VALUES (?, ?, ?, ?)",
                        current.fingerprint,
                        current.provider,
                        id,
                        ts
                    )
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query!("DELETE FROM tombstones WHERE fingerprint = ?", fp)
                        .execute(&mut *tx)
                        .await?;
                }
                (Some(fp), Some(token_preview(secret.expose())))
            }
            None => (None, None),
        };
        let token = patch
            .token
            .as_ref()
            .map(|t| self.sealer.seal(id, Field::Token, t));
        let refresh = patch
            .refresh_token
            .as_ref()
            .map(|t| self.sealer.seal(id, Field::RefreshToken, t));
        let secret_changed = token.is_some() || refresh.is_some();
        let set_label = patch.label.is_some();
        let label = patch.label.clone().flatten();
        let set_expires = patch.expires_at.is_some();
        let expires_at = patch.expires_at.flatten().map(|t| t.timestamp());
        sqlx::query!(
            "UPDATE credentials SET
                 priority = COALESCE(?1, priority),
                 label = CASE WHEN ?2 THEN ?3 ELSE label END,
                 disabled = COALESCE(?4, disabled),
                 expires_at = CASE WHEN ?5 THEN ?6 ELSE expires_at END,
                 token_sealed = COALESCE(?7, token_sealed),
                 refresh_token_sealed = COALESCE(?8, refresh_token_sealed),
                 fingerprint = COALESCE(?9, fingerprint),
                 token_preview = COALESCE(?10, token_preview),
                 state = CASE WHEN ?11 AND state IN ('invalid', 'expired') THEN 'active' ELSE state END,
                 state_reason = CASE WHEN ?11 AND state IN ('invalid', 'expired') THEN NULL ELSE state_reason END,
                 updated_at = ?12
             WHERE id = ?13",
            patch.priority,
            set_label,
            label,
            patch.disabled,
            set_expires,
            expires_at,
            token,
            refresh,
            fingerprint,
            preview,
            secret_changed,
            ts,
            id
        )
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            AuditEntry {
                now: ts,
                actor,
                action: "credential.update",
                credential_id: Some(id),
                provider: Some(&current.provider),
                detail: json!({"fields": patch.fields()}),
            },
        )
        .await?;
        tx.commit().await?;
        self.get(id, now).await
    }

    /// Delete a credential (its counter and reservations go with it) and leave a tombstone so
    /// an unchanged import file does not bring it back.
    async fn delete_locked(
        &self,
        id: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<CredentialRow> {
        let row = self.get(id, now).await?;
        let mut tx = self.begin_write().await?;
        let fp = sqlx::query_scalar!(
            "DELETE FROM credentials WHERE id = ? RETURNING fingerprint",
            id
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let ts = now.timestamp();
        sqlx::query!(
            "INSERT OR REPLACE INTO tombstones (fingerprint, provider, credential_id, deleted_at)
             VALUES (?, ?, ?, ?)",
            fp,
            row.provider,
            id,
            ts
        )
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            AuditEntry {
                now: ts,
                actor,
                action: "credential.delete",
                credential_id: Some(id),
                provider: Some(&row.provider),
                detail: json!({"used": row.used, "source": row.source}),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(row)
    }
}

pub(super) async fn find_by_fingerprint(
    conn: &mut SqliteConnection,
    fp: &[u8],
) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar!("SELECT id FROM credentials WHERE fingerprint = ?", fp)
            .fetch_optional(conn)
            .await?,
    )
}

/// Insert counter rows `[credential_id, limit, used, period_start]` in one statement.
pub(super) async fn insert_quotas(
    conn: &mut SqliteConnection,
    seeds: &[serde_json::Value],
) -> Result<()> {
    if seeds.is_empty() {
        return Ok(());
    }
    let rows = serde_json::Value::from(seeds.to_vec()).to_string();
    sqlx::query!(
        "INSERT INTO quotas (credential_seq, credential_id, limit_tokens, used, reserved, period_start)
         SELECT c.seq, value ->> 0, value ->> 1, value ->> 2, 0, value ->> 3
         FROM json_each(?) JOIN credentials c ON c.id = value ->> 0",
        rows
    )
    .execute(conn)
    .await?;
    Ok(())
}
