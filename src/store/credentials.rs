//! Credentials: listing a page at a time with the effective status, adding, updating,
//! deleting (with a tombstone), and finding one by id or by token.

use super::audit::{self, AuditEntry};
use super::ledger::Touched;
use super::{Result, Store, StoreError, Written, is_unique_violation, new_credential_id};
use crate::crypto::{Field, Secret, token_preview};
use crate::domain::status::{self, State, StoredState};
use crate::domain::{
    CredentialId, CredentialKind, CredentialRow, NewCredential, ProviderName, Status, from_unix,
};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::SqliteConnection;

/// Rows in a page of a list when the client names no `limit`.
pub const DEFAULT_PAGE: u32 = 500;
/// The most rows a page may hold.
pub const MAX_PAGE: u32 = 1000;

/// Which credentials to list, and which page of them.
#[derive(Debug, Clone)]
pub struct ListFilter {
    pub provider: Option<String>,
    pub status: Option<Status>,
    /// Rows per page, 1 to [`MAX_PAGE`] (clamped there).
    pub limit: u32,
    /// Where the previous page ended.
    pub after: Option<Cursor>,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            provider: None,
            status: None,
            limit: DEFAULT_PAGE,
            after: None,
        }
    }
}

/// A place in the list order (provider, priority, creation): the last row of a page, from
/// which the next page starts. Lists page by this key rather than by an offset, so a page
/// costs the same wherever it is, and rows added or removed meanwhile do not shift the pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    provider: String,
    priority: i64,
    seq: i64,
}

/// One page of a list; `next` is where the following page starts, when more rows follow.
#[derive(Debug, Clone)]
pub struct Page {
    pub rows: Vec<CredentialRow>,
    pub next: Option<Cursor>,
}

/// A cursor's bytes before its MAC: priority, seq, then the provider (a short name).
const CURSOR_FIXED: usize = 16;
const CURSOR_MAC: usize = 16;
/// Provider names are at most 64 bytes (`providers::valid_name`), so a cursor made here is at
/// most 128 characters; a longer text is refused before it is decoded.
const CURSOR_MAX_TEXT: usize = 200;

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

/// Rows read by the first query of a page with a status filter (which skips the rows of other
/// statuses); each further query reads twice as many, up to [`MAX_CHUNK`], so a status few
/// credentials have costs a few dozen queries over 100,000 rows, not one per page size.
const MAX_CHUNK: usize = 8 * MAX_PAGE as usize;

/// A credential row as the list query reads it: the stored fields the status rule
/// ([`crate::domain::status`]) reads, and the rest of the row.
struct ListRecord {
    seq: i64,
    id: String,
    provider: String,
    kind: String,
    label: Option<String>,
    token_preview: String,
    priority: i64,
    disabled: bool,
    state: String,
    state_reason: Option<String>,
    has_token: bool,
    has_refresh_token: bool,
    expires_at: Option<i64>,
    cooldown_until: Option<i64>,
    exhausted_until: Option<i64>,
    last_used_at: Option<i64>,
    last_refresh_at: Option<i64>,
    source: String,
    created_at: i64,
    updated_at: i64,
    limit_tokens: Option<i64>,
    used: i64,
    period_start: i64,
    reserved: i64,
}

impl ListRecord {
    /// Where this row is in the list order.
    fn cursor(&self) -> Cursor {
        Cursor {
            provider: self.provider.clone(),
            priority: self.priority,
            seq: self.seq,
        }
    }

    /// What the status rule reads of the row.
    fn state(&self) -> State<'_> {
        State {
            disabled: self.disabled,
            stored: StoredState::parse(&self.state),
            state_reason: self.state_reason.as_deref(),
            expires_at: self.expires_at,
            has_refresh_token: self.has_refresh_token,
            has_token: self.has_token,
            exhausted_until: self.exhausted_until,
            cooldown_until: self.cooldown_until,
            limit: self.limit_tokens,
            used: self.used,
        }
    }

    /// The row with its effective status at `now` (unix seconds).
    fn into_row(self, now: i64) -> CredentialRow {
        let (status, status_reason) = status::effective(&self.state(), now);
        CredentialRow {
            id: self.id.into(),
            provider: self.provider.into(),
            kind: CredentialKind::parse(&self.kind).unwrap_or(CredentialKind::ApiKey),
            label: self.label,
            token_preview: self.token_preview,
            priority: self.priority,
            status,
            status_reason,
            limit: self.limit_tokens.map(|l| l.max(0) as u64),
            used: self.used.max(0) as u64,
            reserved: self.reserved.max(0) as u64,
            period_start: from_unix(self.period_start),
            expires_at: opt_time(self.expires_at),
            cooldown_until: opt_time(self.cooldown_until),
            exhausted_until: opt_time(self.exhausted_until),
            last_used_at: opt_time(self.last_used_at),
            last_refresh_at: opt_time(self.last_refresh_at),
            source: self.source,
            created_at: from_unix(self.created_at),
            updated_at: from_unix(self.updated_at),
        }
    }
}

/// The list query, with `$keyset` (a string literal over parameters from `?2`) choosing which
/// rows, in list order: one text for every shape. `?1` is the most rows. The status is not
/// decided here but in Rust, by the rule the request path uses too.
macro_rules! list_rows {
    ($keyset:tt, $limit:expr $(, $arg:expr)*) => {
        sqlx::query_as!(
            ListRecord,
            r#"SELECT c.seq, c.id, c.provider, c.kind, c.label, c.token_preview, c.priority,
                      c.disabled AS "disabled!: bool", c.state, c.state_reason,
                      (c.token_sealed IS NOT NULL) AS "has_token!: bool",
                      (c.refresh_token_sealed IS NOT NULL) AS "has_refresh_token!: bool",
                      c.expires_at, c.cooldown_until, c.exhausted_until,
                      q.last_used_at,
                      c.last_refresh_at, c.source, c.created_at, c.updated_at,
                      q.limit_tokens, q.used, q.period_start,
                      COALESCE(r.reserved, 0) AS "reserved!: i64"
               FROM credentials c JOIN quotas q ON q.credential_id = c.id
               LEFT JOIN (SELECT credential_id, SUM(tokens) AS reserved FROM reservations
                          GROUP BY credential_id) r ON r.credential_id = c.id
               WHERE "# + $keyset + r#"
               ORDER BY c.provider, c.priority, c.seq
               LIMIT ?1"#,
            $limit
            $(, $arg)*
        )
    };
}

impl Store {
    /// One page of credentials with their counters and effective status at `now`, ordered by
    /// provider, priority and creation. Rows are read past the cursor in chunks, each from the
    /// last row read: the rest of that row's priority level, then the levels after it, each an
    /// index range, so no page scans the rows before it. Without a status filter one chunk
    /// fills the page; with one, chunks are read (growing) until the page is full.
    #[tracing::instrument(skip_all, fields(provider = filter.provider.as_deref(), status = filter.status.map(Status::as_str)))]
    pub async fn list(&self, filter: &ListFilter, now: DateTime<Utc>) -> Result<Page> {
        let ts = now.timestamp();
        let limit = filter.limit.clamp(1, MAX_PAGE) as usize;
        // One row more than the page, to know whether another page follows.
        let want = limit + 1;
        let mut chunk = want;
        let mut from = filter.after.clone();
        let mut rows: Vec<(Cursor, CredentialRow)> = Vec::with_capacity(want);
        loop {
            let records = self
                .read_after(filter.provider.as_deref(), from.as_ref(), chunk)
                .await?;
            let more = records.len() == chunk;
            if let Some(last) = records.last() {
                from = Some(last.cursor());
            }
            for record in records {
                // The rule's status first (no allocation): only rows that match are built.
                if filter
                    .status
                    .is_some_and(|s| s != record.state().status(ts))
                {
                    continue;
                }
                rows.push((record.cursor(), record.into_row(ts)));
                if rows.len() == want {
                    break;
                }
            }
            if rows.len() == want || !more {
                break;
            }
            chunk = (chunk * 2).min(MAX_CHUNK);
        }
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|(cursor, _)| cursor.clone())
        } else {
            None
        };
        Ok(Page {
            rows: rows.into_iter().map(|(_, row)| row).collect(),
            next,
        })
    }

    /// Up to `n` rows in list order after `after` (from the start without one), of `provider`
    /// when one is named: the rest of the cursor's priority level, then the levels after it.
    async fn read_after(
        &self,
        provider: Option<&str>,
        after: Option<&Cursor>,
        n: usize,
    ) -> Result<Vec<ListRecord>> {
        let mut records = match after {
            Some(c) => {
                list_rows!(
                    "c.provider = ?2 AND c.priority = ?3 AND c.seq > ?4",
                    n as i64,
                    c.provider,
                    c.priority,
                    c.seq
                )
                .fetch_all(&self.reader)
                .await?
            }
            None => Vec::new(),
        };
        if records.len() < n {
            // Priorities are within `import::PRIORITY_RANGE`, so i64::MIN is below them all.
            let priority = after.map_or(i64::MIN, |c| c.priority);
            let more = (n - records.len()) as i64;
            let rest = match provider {
                Some(p) => {
                    list_rows!("c.provider = ?2 AND c.priority > ?3", more, p, priority)
                        .fetch_all(&self.reader)
                        .await?
                }
                None => {
                    let provider = after.map_or("", |c| c.provider.as_str());
                    list_rows!(
                        "(c.provider, c.priority) > (?2, ?3)",
                        more,
                        provider,
                        priority
                    )
                    .fetch_all(&self.reader)
                    .await?
                }
            };
            records.extend(rest);
        }
        Ok(records)
    }

    /// One credential by id.
    #[tracing::instrument(skip_all, fields(credential = %id))]
    pub async fn get(&self, id: &CredentialId, now: DateTime<Utc>) -> Result<CredentialRow> {
        list_rows!("c.id = ?2", 1i64, id.as_str())
            .fetch_optional(&self.reader)
            .await?
            .map(|r| r.into_row(now.timestamp()))
            .ok_or(StoreError::NotFound)
    }

    /// The text of `cursor` for the client: opaque, and bound by a MAC to this database and to
    /// the list's filter, so that a cursor changed or carried to another list is refused.
    pub fn cursor_text(&self, cursor: &Cursor, filter: &ListFilter) -> String {
        use base64::Engine;
        let mut bytes = Vec::with_capacity(CURSOR_FIXED + cursor.provider.len() + CURSOR_MAC);
        bytes.extend_from_slice(&cursor.priority.to_be_bytes());
        bytes.extend_from_slice(&cursor.seq.to_be_bytes());
        bytes.extend_from_slice(cursor.provider.as_bytes());
        let mac = self.cursor_mac(&bytes, filter);
        bytes.extend_from_slice(&mac);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The cursor a [`Store::cursor_text`] made for the same filter, or `None`.
    pub fn parse_cursor(&self, text: &str, filter: &ListFilter) -> Option<Cursor> {
        use base64::Engine;
        use subtle::ConstantTimeEq;
        if text.len() > CURSOR_MAX_TEXT {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let split = bytes.len().checked_sub(CURSOR_MAC)?;
        if split < CURSOR_FIXED {
            return None;
        }
        let (body, mac) = bytes.split_at(split);
        if !bool::from(self.cursor_mac(body, filter).ct_eq(mac)) {
            return None;
        }
        let (numbers, provider) = body.split_at(CURSOR_FIXED);
        let number = |i: usize| i64::from_be_bytes(numbers[i..i + 8].try_into().expect("8 bytes"));
        Some(Cursor {
            priority: number(0),
            seq: number(8),
            provider: String::from_utf8(provider.to_vec()).ok()?,
        })
    }

    fn cursor_mac(&self, body: &[u8], filter: &ListFilter) -> [u8; CURSOR_MAC] {
        let scope = json!([
            "list cursor",
            filter.provider,
            filter.status.map(Status::as_str),
            crate::crypto::to_hex(body),
        ]);
        let mac = self.fingerprinter.content(scope.to_string().as_bytes());
        let mut out = [0u8; CURSOR_MAC];
        out.copy_from_slice(&mac[..CURSOR_MAC]);
        out
    }

    /// The first `at_most` ids of a provider's credentials, in list order.
    #[tracing::instrument(skip_all, fields(provider = provider))]
    pub async fn ids_of_provider(&self, provider: &str, at_most: u32) -> Result<Vec<CredentialId>> {
        Ok(sqlx::query_scalar!(
            "SELECT id FROM credentials WHERE provider = ? ORDER BY priority, seq LIMIT ?",
            provider,
            at_most
        )
        .fetch_all(&self.reader)
        .await?
        .into_iter()
        .map(CredentialId::from)
        .collect())
    }

    /// How many credentials `provider` has.
    #[tracing::instrument(skip_all, fields(provider = provider))]
    pub async fn count_of_provider(&self, provider: &str) -> Result<u64> {
        let n = sqlx::query_scalar!(
            r#"SELECT COUNT(*) AS "n!: i64" FROM credentials WHERE provider = ?"#,
            provider
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(n.max(0) as u64)
    }

    /// Resolve `key` (a credential id, or the credential's token in clear, as the seed's
    /// `DELETE ...?id=sk-ant-key1` does) to a credential id of `provider`.
    /// Its span records the provider only: `key` may be a token.
    #[tracing::instrument(skip_all, fields(provider = provider.as_str()))]
    pub async fn resolve(&self, provider: &ProviderName, key: &str) -> Result<CredentialId> {
        let provider = provider.as_str();
        let by_id = sqlx::query_scalar!(
            "SELECT id FROM credentials WHERE id = ? AND provider = ?",
            key,
            provider
        )
        .fetch_optional(&self.reader)
        .await?;
        if let Some(id) = by_id {
            return Ok(id.into());
        }
        let fp = self.fingerprinter.credential(provider, &Secret::new(key));
        sqlx::query_scalar!("SELECT id FROM credentials WHERE fingerprint = ?", fp)
            .fetch_optional(&self.reader)
            .await?
            .map(CredentialId::from)
            .ok_or(StoreError::NotFound)
    }

    /// Add a credential through the API (see `add_locked`).
    #[tracing::instrument(skip_all, fields(provider = %new.provider, source = source, actor = actor))]
    pub async fn add(
        &self,
        new: &NewCredential,
        source: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<CredentialRow> {
        let id = self
            .exclusive(self.add_locked(new, source, actor, now))
            .await?;
        self.get(&CredentialId::from(id), now).await
    }

    /// Apply a `PUT` (see `update_locked`).
    #[tracing::instrument(skip_all, fields(credential = %id, actor = actor))]
    pub async fn update(
        &self,
        id: &CredentialId,
        patch: &CredentialPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<CredentialRow> {
        self.exclusive(self.update_locked(id.as_str(), patch, actor, now))
            .await?;
        if patch.token.is_some() || patch.refresh_token.is_some() {
            self.forget_old_secrets().await;
        }
        self.get(id, now).await
    }

    /// Delete a credential (see `delete_locked`); returns it as it was just before.
    #[tracing::instrument(skip_all, fields(credential = %id, actor = actor))]
    pub async fn delete(
        &self,
        id: &CredentialId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<CredentialRow> {
        let row = self.exclusive(self.delete_locked(id, actor, now)).await?;
        self.forget_old_secrets().await;
        Ok(row)
    }

    /// Add a credential through the API. A credential with the same provider and identifying
    /// secret, or (for a login that named one) the same provider and account
    /// (`extra.account`), is a [`StoreError::Duplicate`]; a tombstone of it is lifted. Both
    /// are looked for in the write transaction, so two logins as one account approved at once
    /// make one credential.
    async fn add_locked(
        &self,
        new: &NewCredential,
        source: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Written<String>> {
        let fp = new.fingerprint(&self.fingerprinter);
        let mut tx = self.begin_write().await?;
        if let Some(id) = find_by_fingerprint(&mut tx, &fp).await? {
            return Err(StoreError::Duplicate { id });
        }
        if let Some(account) = &new.extra.account
            && let Some(id) = find_by_account(&mut tx, &new.provider, account).await?
        {
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
        let touched = Touched::credential(&id);
        Ok(Written::new(id, touched))
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
        let limit = self
            .default_limits_in(conn)
            .await?
            .resolve(&new.provider, new.limit);
        let id = self
            .insert_credential(conn, new, fingerprint, import_digest, source, now)
            .await?;
        let seed = self.quota_seed(&id, new, limit, now);
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

    /// The counter row of a new credential, for [`insert_quotas`], with the `limit` it gets
    /// (its own, or its provider's default: [`super::defaults::DefaultLimits::resolve`]).
    pub(super) fn quota_seed(
        &self,
        id: &str,
        new: &NewCredential,
        limit: Option<u64>,
        now: DateTime<Utc>,
    ) -> serde_json::Value {
        let limit = limit.map(|l| l.min(i64::MAX as u64) as i64);
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
    /// also clears an `invalid` or `expired` mark, since it deserves a fresh chance, and the
    /// `refresh_after` the old token came with (copilot's `refresh_in`).
    async fn update_locked(
        &self,
        id: &str,
        patch: &CredentialPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Written<()>> {
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
                 refresh_after = CASE WHEN ?11 THEN NULL ELSE refresh_after END,
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
        if refresh.is_some() {
            // A refresh under way started from the refresh token just replaced: its result
            // must not overwrite it (it finds its claim gone and stores nothing). A new access
            // token alone leaves it be: the refresh's tokens are newer, and its rotated
            // refresh token is the only one that still works.
            sqlx::query!("DELETE FROM refresh_claims WHERE credential_id = ?", id)
                .execute(&mut *tx)
                .await?;
        }
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
        Ok(Written::new((), Touched::credential(id)))
    }

    /// Delete a credential (its counter and reservations go with it) and leave a tombstone so
    /// an unchanged import file does not bring it back.
    async fn delete_locked(
        &self,
        id: &CredentialId,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Written<CredentialRow>> {
        let row = self.get(id, now).await?;
        let mut tx = self.begin_write().await?;
        let fp = sqlx::query_scalar!(
            "DELETE FROM credentials WHERE id = ? RETURNING fingerprint",
            id.as_str()
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::NotFound)?;
        let ts = now.timestamp();
        sqlx::query!(
            "INSERT OR REPLACE INTO tombstones (fingerprint, provider, credential_id, deleted_at)
             VALUES (?, ?, ?, ?)",
            fp,
            row.provider.as_str(),
            id.as_str(),
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
                credential_id: Some(id.as_str()),
                provider: Some(row.provider.as_str()),
                detail: json!({"used": row.used, "source": row.source}),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Written::new(row, Touched::credential(id.as_str())))
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

/// The first credential of `provider` made by a login as `account` (`extra.account`).
pub(super) async fn find_by_account(
    conn: &mut SqliteConnection,
    provider: &str,
    account: &str,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM credentials
         WHERE provider = ? AND json_extract(extra, '$.account') = ?
         ORDER BY seq LIMIT 1",
        provider,
        account
    )
    .fetch_optional(conn)
    .await?)
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
        "INSERT INTO quotas (credential_seq, credential_id, limit_tokens, used, period_start)
         SELECT c.seq, value ->> 0, value ->> 1, value ->> 2, value ->> 3
         FROM json_each(?) JOIN credentials c ON c.id = value ->> 0",
        rows
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Encryption;
    use crate::domain::OauthExtra;
    use crate::store::test_options;

    fn login(provider: &str, token: &str, account: Option<&str>) -> NewCredential {
        NewCredential {
            provider: provider.into(),
            kind: CredentialKind::Oauth,
            token: None,
            refresh_token: Some(Secret::new(token)),
            client_secret: None,
            extra: OauthExtra {
                account: account.map(str::to_string),
                ..Default::default()
            },
            priority: 100,
            label: None,
            limit: None,
            used: 0,
            disabled: false,
            expires_at: None,
        }
    }

    /// A login naming an account its provider has a credential of is that credential's
    /// duplicate, whatever its token; another provider's, or another account's, is not.
    #[tokio::test]
    async fn an_account_is_a_duplicate_within_its_provider() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(test_options(dir.path(), Encryption::default()))
            .await
            .unwrap();
        let now = Utc::now();
        let add = async |new: NewCredential| store.add(&new, "oauth:test", "oauth", now).await;
        let first = add(login("copilot", "gho-1", Some("github:7")))
            .await
            .unwrap();
        match add(login("copilot", "gho-2", Some("github:7"))).await {
            Err(StoreError::Duplicate { id }) => assert_eq!(id, first.id.as_str()),
            other => panic!("{other:?}"),
        }
        for other in [
            login("kiro", "gho-2", Some("github:7")),
            login("copilot", "gho-3", Some("github:8")),
            login("copilot", "gho-4", None),
        ] {
            add(other).await.unwrap();
        }
        assert_eq!(store.count_of_provider("copilot").await.unwrap(), 3);
    }
}
