//! The store's side of token refresh: which credentials are due ([`Store::refresh_scan`]), what
//! a refresh starts from ([`Store::refresh_material`]), the claim that keeps a credential to one
//! refresh at a time across processes ([`Store::claim_refresh`]), writing what a refresh brought
//! or that it was refused for good, and the history of every check ([`RefreshHistory`]).
//!
//! No transaction is held across a token call: the caller claims, reads the material, calls the
//! provider, then stores the result only if it still holds the claim. The claim is a row with
//! an expiry, so a process that died holding one delays the next refresh by the claim's
//! time-to-live at most, and a PostgreSQL backend can give the same promise across instances.

use super::audit::{self, AuditEntry};
use super::ledger::Touched;
use super::{Result, Store, StoreError, Written, after, clip};
use crate::crypto::Field;
use crate::domain::refresh::{RefreshMaterial, RefreshTrigger, Refreshed};
use crate::domain::{CredentialId, OauthExtra, ProviderName, from_unix, rfc3339};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::time::Duration;

/// The most credentials one scan returns as due (the soonest to expire); the rest are due at
/// the next check.
pub const MAX_SCAN: u32 = 10_000;
/// The most candidates a manual refresh of one provider gets.
pub const MAX_CANDIDATES: u32 = 10_000;
/// The most characters of an error or a reason kept in the history and in a credential's
/// state: what a provider says is bounded before it is stored.
pub const MAX_REASON: usize = 300;
/// The most outcomes [`Store::refresh_history`] returns.
pub const MAX_RECENT: u32 = 200;
/// Rows one pruning transaction deletes at most, so a large backlog never holds the write
/// lock for long (the request path's ledger writes through the same lock).
const PRUNE_BATCH: i64 = 10_000;
/// Pruning transactions one call runs at most (a backlog past that is left for the next call).
const PRUNE_ROUNDS: usize = 100;
/// The audit log's actor for what the refresh worker writes.
const ACTOR: &str = "refresh";

/// A credential the refresh worker may refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshCandidate {
    pub id: CredentialId,
    pub provider: ProviderName,
    pub expires_at: Option<DateTime<Utc>>,
    /// Set when a refresh was refused for good: the stored state is `expired` (with this
    /// reason); the worker leaves it alone until its tokens are replaced.
    pub rejected: Option<String>,
}

/// What one scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshScan {
    /// Refreshable credentials, not counting those refused for good.
    pub checked: u64,
    /// Those of them due now, soonest expiry first.
    pub due: Vec<RefreshCandidate>,
}

/// One refresh check as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRun {
    pub trigger: RefreshTrigger,
    pub started_at: DateTime<Utc>,
    /// `None` while it runs (or when its process died during it).
    pub finished_at: Option<DateTime<Utc>>,
    pub checked: u64,
    pub refreshed: u64,
    pub failed: u64,
}

/// One credential's refresh as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshOutcome {
    pub credential_id: CredentialId,
    pub provider: ProviderName,
    pub trigger: RefreshTrigger,
    pub at: DateTime<Utc>,
    pub ok: bool,
    pub error: Option<String>,
}

/// What the refresh status shows of the history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshHistory {
    /// The latest finished scheduled check.
    pub last_scheduled: Option<RefreshRun>,
    /// The latest check of any trigger, finished or not.
    pub last_any: Option<RefreshRun>,
    /// The latest outcomes, newest first.
    pub recent: Vec<RefreshOutcome>,
}

/// A candidate as the scan reads it.
struct CandidateRow {
    id: String,
    provider: String,
    expires_at: Option<i64>,
    state: String,
    state_reason: Option<String>,
}

impl From<CandidateRow> for RefreshCandidate {
    fn from(r: CandidateRow) -> Self {
        let rejected = (r.state == "expired").then(|| {
            r.state_reason
                .unwrap_or_else(|| "refresh refused".to_string())
        });
        RefreshCandidate {
            id: r.id.into(),
            provider: r.provider.into(),
            expires_at: r.expires_at.map(from_unix),
            rejected,
        }
    }
}

/// A run as read back.
struct RunRow {
    trigger: String,
    started_at: i64,
    finished_at: Option<i64>,
    checked: i64,
    refreshed: i64,
    failed: i64,
}

impl From<RunRow> for RefreshRun {
    fn from(r: RunRow) -> Self {
        RefreshRun {
            trigger: trigger(&r.trigger),
            started_at: from_unix(r.started_at),
            finished_at: r.finished_at.map(from_unix),
            checked: r.checked.max(0) as u64,
            refreshed: r.refreshed.max(0) as u64,
            failed: r.failed.max(0) as u64,
        }
    }
}

/// A stored trigger (the table's CHECK allows only the three).
fn trigger(text: &str) -> RefreshTrigger {
    RefreshTrigger::parse(text).unwrap_or(RefreshTrigger::Schedule)
}

/// A count for an INTEGER column.
fn count(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

/// Whether a claim held by this process is in `conn`'s transaction.
async fn holds_claim(conn: &mut sqlx::SqliteConnection, id: &str, owner: &str) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT 1 AS "one!: i64" FROM refresh_claims WHERE credential_id = ? AND owner = ?"#,
        id,
        owner
    )
    .fetch_optional(conn)
    .await?
    .is_some())
}

/// What a claimed write found.
enum Claimed {
    Written,
    /// The claim is another process's (or nobody's): nothing was written.
    NotOurs,
    /// The credential is gone (deleted meanwhile); the claim was dropped.
    Gone,
}

impl Store {
    /// Refreshable: kind oauth, a refresh token stored, not disabled, provider in `providers`.
    /// `checked` counts the refreshable credentials not rejected; `due` are those of them whose
    /// access token is missing, or expires at or before `now + lead`, or whose `refresh_after`
    /// is at or before `now`; soonest expiry first (a missing one first of all); at most
    /// [`MAX_SCAN`].
    #[tracing::instrument(skip_all, fields(providers = providers.len()))]
    pub async fn refresh_scan(
        &self,
        providers: &[ProviderName],
        now: DateTime<Utc>,
        lead: Duration,
    ) -> Result<RefreshScan> {
        if providers.is_empty() {
            return Ok(RefreshScan::default());
        }
        let names = serde_json::Value::from(
            providers
                .iter()
                .map(|p| p.as_str().to_string())
                .collect::<Vec<_>>(),
        )
        .to_string();
        let horizon = after(now, lead);
        let ts = now.timestamp();
        let checked = sqlx::query_scalar!(
            r#"SELECT COUNT(*) AS "n!: i64" FROM credentials
               WHERE kind = 'oauth' AND refresh_token_sealed IS NOT NULL AND disabled = 0
                 AND state <> 'expired'
                 AND provider IN (SELECT value FROM json_each(?1))"#,
            names
        )
        .fetch_one(&self.reader)
        .await?;
        let due = sqlx::query_as!(
            CandidateRow,
            r#"SELECT id, provider, expires_at, state, state_reason FROM credentials
               WHERE kind = 'oauth' AND refresh_token_sealed IS NOT NULL AND disabled = 0
                 AND state <> 'expired'
                 AND provider IN (SELECT value FROM json_each(?1))
                 AND (token_sealed IS NULL OR expires_at <= ?2 OR refresh_after <= ?3)
               ORDER BY expires_at IS NOT NULL, expires_at, seq
               LIMIT ?4"#,
            names,
            horizon,
            ts,
            MAX_SCAN
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(RefreshScan {
            checked: checked.max(0) as u64,
            due: due.into_iter().map(RefreshCandidate::from).collect(),
        })
    }

    /// The refreshable credentials of one provider (or the one `id`, which must be of it),
    /// rejected ones included (with `rejected` set), in list order: for a manual refresh.
    /// Empty when none; at most [`MAX_CANDIDATES`].
    #[tracing::instrument(skip_all, fields(provider = %provider, credential = id.map(CredentialId::as_str)))]
    pub async fn refresh_candidates(
        &self,
        provider: &ProviderName,
        id: Option<&CredentialId>,
    ) -> Result<Vec<RefreshCandidate>> {
        let id = id.map(CredentialId::as_str);
        let rows = sqlx::query_as!(
            CandidateRow,
            r#"SELECT id, provider, expires_at, state, state_reason FROM credentials
               WHERE kind = 'oauth' AND refresh_token_sealed IS NOT NULL AND disabled = 0
                 AND provider = ?1 AND (?2 IS NULL OR id = ?2)
               ORDER BY priority, seq
               LIMIT ?3"#,
            provider.as_str(),
            id,
            MAX_CANDIDATES
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(RefreshCandidate::from).collect())
    }

    /// What a refresh of `id` starts from: its secrets opened through the sealer, its extra
    /// fields parsed. [`StoreError::NotFound`] when it is gone; a secret that does not open is
    /// a [`StoreError::Crypto`] (which names the field, never the value).
    #[tracing::instrument(skip_all, fields(credential = %id))]
    pub async fn refresh_material(&self, id: &CredentialId) -> Result<RefreshMaterial> {
        let row = sqlx::query!(
            "SELECT provider, token_sealed, refresh_token_sealed, client_secret_sealed, extra,
                    expires_at
             FROM credentials WHERE id = ?",
            id.as_str()
        )
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::NotFound)?;
        let open = |sealed: Option<Vec<u8>>, field| {
            sealed
                .map(|s| self.sealer.open(id.as_str(), field, &s))
                .transpose()
        };
        let extra = serde_json::from_str::<OauthExtra>(&row.extra).unwrap_or_else(|e| {
            // Only this program writes `extra`; a row it cannot read refreshes without it (a
            // flow that needs a field says so as `Unrefreshable`).
            tracing::warn!(credential = %id, error = %e, "a credential's extra fields do not read");
            OauthExtra::default()
        });
        Ok(RefreshMaterial {
            credential_id: id.clone(),
            provider: row.provider.into(),
            access_token: open(row.token_sealed, Field::Token)?,
            refresh_token: open(row.refresh_token_sealed, Field::RefreshToken)?,
            client_secret: open(row.client_secret_sealed, Field::ClientSecret)?,
            extra,
            expires_at: row.expires_at.map(from_unix),
        })
    }

    /// Take the claim on `id` for this process until `now + ttl`, in one statement of a
    /// `BEGIN IMMEDIATE` transaction: true when taken (no claim, or ours, or one past its
    /// `until`), false when another process holds it.
    #[tracing::instrument(skip_all, fields(credential = %id))]
    pub async fn claim_refresh(
        &self,
        id: &CredentialId,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<bool> {
        self.claim_as(&self.instance, id, now, ttl).await
    }

    /// Drop every refresh claim not this process's: called by a server at start, when those
    /// are a stopped server's (a second server on the database is refused). The number dropped.
    #[tracing::instrument(skip_all)]
    pub async fn drop_dead_refresh_claims(&self) -> Result<u64> {
        let instance: &str = &self.instance;
        let done = sqlx::query!("DELETE FROM refresh_claims WHERE owner <> ?", instance)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    /// [`Store::claim_refresh`] for `owner`. A claim touches nothing the ledger's mirror holds,
    /// so it needs no gate: it only waits, as any write does, for SQLite's write lock.
    async fn claim_as(
        &self,
        owner: &str,
        id: &CredentialId,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<bool> {
        // At least a second: claims are kept to the second, and one ending the moment it was
        // taken would be no claim.
        let until = after(now, ttl.max(Duration::from_secs(1)));
        let ts = now.timestamp();
        let mut tx = self.begin_write().await?;
        let taken = sqlx::query!(
            "INSERT INTO refresh_claims (credential_id, owner, until) VALUES (?1, ?2, ?3)
             ON CONFLICT (credential_id) DO UPDATE SET owner = excluded.owner,
                 until = excluded.until
             WHERE refresh_claims.owner = excluded.owner OR refresh_claims.until <= ?4",
            id.as_str(),
            owner,
            until,
            ts
        )
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(taken)
    }

    /// Let go of this process's claim on `id` (another's is left alone).
    #[tracing::instrument(skip_all, fields(credential = %id))]
    pub async fn release_refresh_claim(&self, id: &CredentialId) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query!(
            "DELETE FROM refresh_claims WHERE credential_id = ? AND owner = ?",
            id.as_str(),
            &*self.instance
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Store what a refresh brought, in one `BEGIN IMMEDIATE` transaction and only if this
    /// process still holds the claim on `id` (else `Ok(false)`, nothing written): the new
    /// access token, the rotated refresh token (when given; the old one is overwritten), a
    /// client registered again (its secret sealed; its id and secret's expiry into `extra`),
    /// `expires_at`, `refresh_after`, `last_refresh_at`; an `invalid` or `expired` mark is
    /// cleared; the claim is deleted; an audit row names the fields that changed (never a
    /// value). The fingerprint and token preview stay: the credential keeps the identity it
    /// was imported with, so an unchanged file imported again still matches it. The ledger's
    /// mirror then holds the new token, and the old secrets are forgotten (checkpointed away).
    /// [`StoreError::NotFound`] when the credential is gone (the claim is dropped).
    #[tracing::instrument(skip_all, fields(credential = %id))]
    pub async fn store_refreshed(
        &self,
        id: &CredentialId,
        refreshed: &Refreshed,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let claimed = self
            .exclusive(self.store_refreshed_locked(id.as_str(), refreshed, now))
            .await?;
        match claimed {
            Claimed::Written => {
                self.forget_old_secrets().await;
                Ok(true)
            }
            Claimed::NotOurs => Ok(false),
            Claimed::Gone => Err(StoreError::NotFound),
        }
    }

    async fn store_refreshed_locked(
        &self,
        id: &str,
        refreshed: &Refreshed,
        now: DateTime<Utc>,
    ) -> Result<Written<Claimed>> {
        let mut tx = self.begin_write().await?;
        if !holds_claim(&mut tx, id, &self.instance).await? {
            return Ok(Written::new(Claimed::NotOurs, Touched::Nothing));
        }
        let current = sqlx::query!("SELECT provider, extra FROM credentials WHERE id = ?", id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(current) = current else {
            drop_claim(&mut tx, id).await?;
            tx.commit().await?;
            return Ok(Written::new(Claimed::Gone, Touched::Nothing));
        };
        let token = self.sealer.seal(id, Field::Token, &refreshed.access_token);
        let refresh = refreshed
            .refresh_token
            .as_ref()
            .map(|t| self.sealer.seal(id, Field::RefreshToken, t));
        let client_secret = refreshed
            .client
            .as_ref()
            .map(|c| self.sealer.seal(id, Field::ClientSecret, &c.client_secret));
        // The client's id and its secret's expiry, and copilot's API base, join the other
        // extra fields, kept as they are (read as a JSON object, so a field this version does
        // not know is not lost). An API base the answer no longer names is removed.
        let mut extra: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&current.extra).unwrap_or_default();
        let stale_base = extra.contains_key("api_base");
        let extra = if refreshed.client.is_some() || refreshed.api_base.is_some() || stale_base {
            if let Some(client) = &refreshed.client {
                extra.insert("client_id".into(), json!(client.client_id));
                match client.client_secret_expires_at {
                    Some(at) => {
                        extra.insert("client_secret_expires_at".into(), json!(at));
                    }
                    None => {
                        extra.remove("client_secret_expires_at");
                    }
                }
            }
            match &refreshed.api_base {
                Some(base) => {
                    extra.insert("api_base".into(), json!(base));
                }
                None => {
                    extra.remove("api_base");
                }
            }
            Some(serde_json::Value::Object(extra).to_string())
        } else {
            None
        };
        let expires_at = refreshed.expires_at.timestamp();
        let refresh_after = refreshed.refresh_after.map(|t| t.timestamp());
        let ts = now.timestamp();
        sqlx::query!(
            "UPDATE credentials SET
                 token_sealed = ?1,
                 refresh_token_sealed = COALESCE(?2, refresh_token_sealed),
                 client_secret_sealed = COALESCE(?3, client_secret_sealed),
                 extra = COALESCE(?4, extra),
                 expires_at = ?5,
                 refresh_after = ?6,
                 last_refresh_at = ?7,
                 state = CASE WHEN state IN ('invalid', 'expired') THEN 'active' ELSE state END,
                 state_reason = CASE WHEN state IN ('invalid', 'expired') THEN NULL ELSE state_reason END,
                 updated_at = ?7
             WHERE id = ?8",
            token,
            refresh,
            client_secret,
            extra,
            expires_at,
            refresh_after,
            ts,
            id
        )
        .execute(&mut *tx)
        .await?;
        drop_claim(&mut tx, id).await?;
        let fields: Vec<&str> = [
            ("access_token", true),
            ("refresh_token", refreshed.refresh_token.is_some()),
            ("client", refreshed.client.is_some()),
            ("expires_at", true),
            ("refresh_after", refreshed.refresh_after.is_some()),
            ("api_base", refreshed.api_base.is_some() || stale_base),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        audit::record(
            &mut tx,
            AuditEntry {
                now: ts,
                actor: ACTOR,
                action: "credential.refresh",
                credential_id: Some(id),
                provider: Some(&current.provider),
                detail: json!({"fields": fields, "expires_at": rfc3339(refreshed.expires_at)}),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Written::new(Claimed::Written, Touched::credential(id)))
    }

    /// A refresh refused for good: the credential is `expired` with `reason` (its first
    /// [`MAX_REASON`] characters) until its tokens are replaced, the claim is deleted, an audit
    /// row says so, and the ledger's mirror follows. `Ok(false)` (nothing written) if this
    /// process does not hold the claim; [`StoreError::NotFound`] when the credential is gone.
    #[tracing::instrument(skip_all, fields(credential = %id))]
    pub async fn reject_refresh(
        &self,
        id: &CredentialId,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        match self
            .exclusive(self.reject_refresh_locked(id.as_str(), clip(reason, MAX_REASON), now))
            .await?
        {
            Claimed::Written => Ok(true),
            Claimed::NotOurs => Ok(false),
            Claimed::Gone => Err(StoreError::NotFound),
        }
    }

    async fn reject_refresh_locked(
        &self,
        id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Written<Claimed>> {
        let mut tx = self.begin_write().await?;
        if !holds_claim(&mut tx, id, &self.instance).await? {
            return Ok(Written::new(Claimed::NotOurs, Touched::Nothing));
        }
        let ts = now.timestamp();
        let provider = sqlx::query_scalar!(
            "UPDATE credentials SET state = 'expired', state_reason = ?1, updated_at = ?2
             WHERE id = ?3 RETURNING provider",
            reason,
            ts,
            id
        )
        .fetch_optional(&mut *tx)
        .await?;
        drop_claim(&mut tx, id).await?;
        let Some(provider) = provider else {
            tx.commit().await?;
            return Ok(Written::new(Claimed::Gone, Touched::Nothing));
        };
        audit::record(
            &mut tx,
            AuditEntry {
                now: ts,
                actor: ACTOR,
                action: "credential.refresh_rejected",
                credential_id: Some(id),
                provider: Some(&provider),
                detail: json!({"reason": reason}),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Written::new(Claimed::Written, Touched::credential(id)))
    }

    /// Record the start of a refresh check; returns its run id for its outcomes.
    #[tracing::instrument(skip_all, fields(trigger = trigger.as_str()))]
    pub async fn start_refresh_run(
        &self,
        trigger: RefreshTrigger,
        now: DateTime<Utc>,
    ) -> Result<i64> {
        let trigger = trigger.as_str();
        let ts = now.timestamp();
        let mut tx = self.begin_write().await?;
        let id = sqlx::query_scalar!(
            "INSERT INTO refresh_runs (trigger, started_at) VALUES (?, ?) RETURNING id",
            trigger,
            ts
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Record one credential's refresh in run `run` (with the run's trigger); `error` is kept
    /// to its first [`MAX_REASON`] characters. A run no longer there (pruned) records nothing.
    #[tracing::instrument(skip_all, fields(run = run, credential = %id, ok = ok))]
    pub async fn record_refresh_outcome(
        &self,
        run: i64,
        id: &CredentialId,
        provider: &ProviderName,
        ok: bool,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let error = error.map(|e| clip(e, MAX_REASON));
        let ts = now.timestamp();
        let mut tx = self.begin_write().await?;
        let written = sqlx::query!(
            "INSERT INTO refresh_outcomes (run_id, credential_id, provider, trigger, at, ok, error)
             SELECT id, ?2, ?3, trigger, ?4, ?5, ?6 FROM refresh_runs WHERE id = ?1",
            run,
            id.as_str(),
            provider.as_str(),
            ts,
            ok,
            error
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if written == 0 {
            tracing::warn!(run, "a refresh outcome for a run no longer recorded");
        }
        Ok(())
    }

    /// Record the end of run `run` with its counts.
    #[tracing::instrument(skip_all, fields(run = run))]
    pub async fn finish_refresh_run(
        &self,
        run: i64,
        checked: u64,
        refreshed: u64,
        failed: u64,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let (checked, refreshed, failed) = (count(checked), count(refreshed), count(failed));
        let ts = now.timestamp();
        let mut tx = self.begin_write().await?;
        sqlx::query!(
            "UPDATE refresh_runs SET finished_at = ?1, checked = ?2, refreshed = ?3, failed = ?4
             WHERE id = ?5",
            ts,
            checked,
            refreshed,
            failed,
            run
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The latest finished scheduled run, the latest run of any trigger, and the `recent`
    /// latest outcomes (newest first; `recent` clamped to 1..=[`MAX_RECENT`]).
    #[tracing::instrument(skip_all)]
    pub async fn refresh_history(&self, recent: u32) -> Result<RefreshHistory> {
        let recent = recent.clamp(1, MAX_RECENT);
        let mut conn = self.reader.acquire().await?;
        let last_scheduled = sqlx::query_as!(
            RunRow,
            "SELECT trigger, started_at, finished_at, checked, refreshed, failed
             FROM refresh_runs
             WHERE trigger = 'schedule' AND finished_at IS NOT NULL
             ORDER BY started_at DESC, id DESC LIMIT 1"
        )
        .fetch_optional(&mut *conn)
        .await?;
        let last_any = sqlx::query_as!(
            RunRow,
            "SELECT trigger, started_at, finished_at, checked, refreshed, failed
             FROM refresh_runs ORDER BY id DESC LIMIT 1"
        )
        .fetch_optional(&mut *conn)
        .await?;
        let outcomes = sqlx::query!(
            r#"SELECT credential_id, provider, trigger, at, ok AS "ok!: bool", error
               FROM refresh_outcomes ORDER BY id DESC LIMIT ?"#,
            recent
        )
        .fetch_all(&mut *conn)
        .await?;
        Ok(RefreshHistory {
            last_scheduled: last_scheduled.map(RefreshRun::from),
            last_any: last_any.map(RefreshRun::from),
            recent: outcomes
                .into_iter()
                .map(|o| RefreshOutcome {
                    credential_id: o.credential_id.into(),
                    provider: o.provider.into(),
                    trigger: trigger(&o.trigger),
                    at: from_unix(o.at),
                    ok: o.ok,
                    error: o.error,
                })
                .collect(),
        })
    }

    /// Delete the outcomes recorded before `before`, and the runs started before it (with
    /// their outcomes); returns the number of runs deleted. Each transaction deletes at most
    /// [`PRUNE_BATCH`] rows of each, so a large backlog never holds the write lock for long;
    /// a backlog past [`PRUNE_ROUNDS`] of them is left for the next call.
    #[tracing::instrument(skip_all)]
    pub async fn prune_refresh_history(&self, before: DateTime<Utc>) -> Result<u64> {
        let before = before.timestamp();
        let mut runs = 0u64;
        for _ in 0..PRUNE_ROUNDS {
            let mut tx = self.begin_write().await?;
            let outcomes = sqlx::query!(
                "DELETE FROM refresh_outcomes WHERE id IN
                     (SELECT id FROM refresh_outcomes WHERE at < ?1 LIMIT ?2)",
                before,
                PRUNE_BATCH
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            // A run's outcomes left now are its last ones, recorded from `before` on: few.
            let deleted = sqlx::query!(
                "DELETE FROM refresh_runs WHERE id IN
                     (SELECT id FROM refresh_runs WHERE started_at < ?1 LIMIT ?2)",
                before,
                PRUNE_BATCH
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            runs += deleted;
            if outcomes < PRUNE_BATCH as u64 && deleted < PRUNE_BATCH as u64 {
                break;
            }
            // Let the request path's writes through between rounds.
            tokio::task::yield_now().await;
        }
        Ok(runs)
    }
}

/// Delete the claim on `id` inside `conn`'s transaction (the caller checked it is ours).
async fn drop_claim(conn: &mut sqlx::SqliteConnection, id: &str) -> Result<()> {
    sqlx::query!("DELETE FROM refresh_claims WHERE credential_id = ?", id)
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Encryption, EncryptionKey, Secret};
    use crate::domain::refresh::NewClient;
    use crate::domain::{CredentialKind, NewCredential, Status};
    use crate::store::{CredentialPatch, test_options};
    use chrono::TimeZone;

    const MINUTE: Duration = Duration::from_secs(60);

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_900_000_000 + secs, 0).unwrap()
    }

    async fn open_store(dir: &tempfile::TempDir) -> Store {
        Store::open(test_options(dir.path(), Encryption::off()))
            .await
            .unwrap()
    }

    /// An OAuth credential of `provider` whose access token expires at `expires` (seconds from
    /// [`at`]'s origin), with a refresh token unless `refresh` is `None`.
    fn oauth(
        provider: &str,
        token: Option<&str>,
        refresh: Option<&str>,
        expires: Option<i64>,
    ) -> NewCredential {
        NewCredential {
            provider: provider.into(),
            kind: CredentialKind::Oauth,
            token: token.map(Secret::new),
            refresh_token: refresh.map(Secret::new),
            client_secret: None,
            extra: OauthExtra::default(),
            priority: 100,
            label: None,
            limit: None,
            used: 0,
            disabled: false,
            expires_at: expires.map(at),
        }
    }

    async fn add(store: &Store, new: &NewCredential) -> CredentialId {
        store.add(new, "api", "test", at(0)).await.unwrap().id
    }

    fn ids(candidates: &[RefreshCandidate]) -> Vec<&str> {
        candidates.iter().map(|c| c.id.as_str()).collect()
    }

    /// Change a row behind the store's back (a test's shortcut to a state), then have the
    /// mirror load again so the debug check of the next write agrees.
    async fn set_sql(store: &Store, sql: &'static str, id: &CredentialId) {
        sqlx::query(sql)
            .bind(id.as_str())
            .execute(&store.writer)
            .await
            .unwrap();
        store.load_hot().await.unwrap();
    }

    fn refreshed(token: &str, expires: i64) -> Refreshed {
        Refreshed {
            access_token: Secret::new(token),
            expires_at: at(expires),
            refresh_token: None,
            client: None,
            refresh_after: None,
            api_base: None,
        }
    }

    /// Claim, then store `r`: what the worker does.
    async fn refresh(store: &Store, id: &CredentialId, r: &Refreshed, now: DateTime<Utc>) {
        assert!(store.claim_refresh(id, now, MINUTE).await.unwrap());
        assert!(store.store_refreshed(id, r, now).await.unwrap());
    }

    #[tokio::test]
    async fn copilots_api_base_is_stored_replaced_and_removed_with_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let id = add(&store, &oauth("copilot", None, Some("gho_x"), None)).await;
        let other = add(&store, &oauth("kiro", Some("k"), Some("r"), Some(100))).await;
        assert_eq!(store.api_base(&id), None);
        let with = |base: Option<&str>| Refreshed {
            api_base: base.map(str::to_string),
            ..refreshed("tid=1", 3600)
        };
        refresh(
            &store,
            &id,
            &with(Some("https://api.business.githubcopilot.com")),
            at(10),
        )
        .await;
        assert_eq!(
            store.api_base(&id).as_deref(),
            Some("https://api.business.githubcopilot.com")
        );
        let m = store.refresh_material(&id).await.unwrap();
        assert_eq!(
            m.extra.api_base.as_deref(),
            Some("https://api.business.githubcopilot.com")
        );
        // A whole load of the mirror reads the same.
        store.load_hot().await.unwrap();
        assert_eq!(
            store.api_base(&id).as_deref(),
            Some("https://api.business.githubcopilot.com")
        );
        refresh(
            &store,
            &id,
            &with(Some("https://api.githubcopilot.com")),
            at(20),
        )
        .await;
        assert_eq!(
            store.api_base(&id).as_deref(),
            Some("https://api.githubcopilot.com")
        );
        // An answer that names none (or none allowed) removes the stale one.
        refresh(&store, &id, &with(None), at(30)).await;
        assert_eq!(store.api_base(&id), None);
        let m = store.refresh_material(&id).await.unwrap();
        assert!(m.extra.is_empty(), "{:?}", m.extra);
        // Another provider's extra, were it to hold one, is not read by the mirror.
        set_sql(
            &store,
            "UPDATE credentials SET extra = '{\"api_base\":\"https://x.example\"}' WHERE id = ?",
            &other,
        )
        .await;
        assert_eq!(store.api_base(&other), None);
    }

    #[tokio::test]
    async fn the_scan_picks_what_is_due_by_expiry_lead_refresh_after_and_missing_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let now = at(1000);
        let lead = Duration::from_secs(600);
        let expired = add(&store, &oauth("kiro", Some("a1"), Some("r1"), Some(900))).await;
        let within_lead = add(&store, &oauth("kiro", Some("a2"), Some("r2"), Some(1300))).await;
        let at_lead = add(&store, &oauth("kiro", Some("a3"), Some("r3"), Some(1600))).await;
        let later = add(&store, &oauth("kiro", Some("a4"), Some("r4"), Some(1601))).await;
        let no_token = add(&store, &oauth("copilot", None, Some("gh1"), None)).await;
        let unknown_expiry = add(&store, &oauth("kiro", Some("a5"), Some("r5"), None)).await;
        let copilot = add(
            &store,
            &oauth("copilot", Some("c1"), Some("gh2"), Some(9000)),
        )
        .await;
        // Copilot asks for a new token before its expiry: refresh_after is what makes it due.
        let mut r = refreshed("c2", 9000);
        r.refresh_after = Some(at(1000));
        refresh(&store, &copilot, &r, at(0)).await;
        let providers = ["kiro".into(), "copilot".into()];

        let scan = store.refresh_scan(&providers, now, lead).await.unwrap();
        assert_eq!(scan.checked, 7);
        // Soonest expiry first; no expiry (the missing token) before all.
        assert_eq!(
            ids(&scan.due),
            [&no_token, &expired, &within_lead, &at_lead, &copilot].map(CredentialId::as_str)
        );
        assert!(scan.due.iter().all(|c| c.rejected.is_none()));
        assert_eq!(scan.due[1].expires_at, Some(at(900)));
        assert_eq!(scan.due[1].provider.as_str(), "kiro");
        assert!(!ids(&scan.due).contains(&later.as_str()));
        assert!(!ids(&scan.due).contains(&unknown_expiry.as_str()));

        // A second earlier, the copilot credential's refresh_after is still ahead; the lead
        // decides the rest.
        let scan = store
            .refresh_scan(&providers, at(999), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            ids(&scan.due),
            [&no_token, &expired].map(CredentialId::as_str)
        );
        // Only the providers asked for.
        let scan = store
            .refresh_scan(&["copilot".into()], now, lead)
            .await
            .unwrap();
        assert_eq!(
            (scan.checked, ids(&scan.due)),
            (2, vec![no_token.as_str(), copilot.as_str()])
        );
        let scan = store.refresh_scan(&[], now, lead).await.unwrap();
        assert_eq!(scan, RefreshScan::default());
    }

    #[tokio::test]
    async fn the_scan_leaves_out_what_cannot_be_refreshed_and_what_was_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let now = at(1000);
        let due = add(&store, &oauth("kiro", Some("a1"), Some("r1"), Some(0))).await;
        let mut key = oauth("kiro", Some("sk-key"), None, None);
        key.kind = CredentialKind::ApiKey;
        let api_key = add(&store, &key).await;
        let mut off = oauth("kiro", Some("a2"), Some("r2"), Some(0));
        off.disabled = true;
        let disabled = add(&store, &off).await;
        let no_refresh = add(&store, &oauth("kiro", Some("a3"), None, Some(0))).await;
        let other = add(&store, &oauth("gemini", Some("a4"), Some("r4"), Some(0))).await;
        let refused = add(&store, &oauth("kiro", Some("a5"), Some("r5"), Some(0))).await;
        assert!(store.claim_refresh(&refused, now, MINUTE).await.unwrap());
        assert!(
            store
                .reject_refresh(&refused, "invalid_grant: gone", now)
                .await
                .unwrap()
        );

        let scan = store
            .refresh_scan(&["kiro".into()], now, MINUTE)
            .await
            .unwrap();
        assert_eq!(scan.checked, 1);
        assert_eq!(ids(&scan.due), [due.as_str()]);

        // A manual refresh sees the refused one too, saying why.
        let all = store
            .refresh_candidates(&"kiro".into(), None)
            .await
            .unwrap();
        assert_eq!(ids(&all), [due.as_str(), refused.as_str()]);
        assert_eq!(all[0].rejected, None);
        assert_eq!(all[1].rejected.as_deref(), Some("invalid_grant: gone"));
        let one = store
            .refresh_candidates(&"kiro".into(), Some(&refused))
            .await
            .unwrap();
        assert_eq!(ids(&one), [refused.as_str()]);
        for (provider, id) in [
            ("kiro", &api_key),
            ("kiro", &disabled),
            ("kiro", &no_refresh),
            ("kiro", &other),
            ("gemini", &due),
        ] {
            let none = store
                .refresh_candidates(&provider.into(), Some(id))
                .await
                .unwrap();
            assert!(none.is_empty(), "{provider} {id}");
        }
        assert!(
            store
                .refresh_candidates(&"claude".into(), None)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn one_process_holds_a_claim_until_it_releases_or_the_claim_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let one = open_store(&dir).await;
        // Another process on the same database.
        let two = open_store(&dir).await;
        let id = add(&one, &oauth("kiro", Some("a1"), Some("r1"), Some(0))).await;
        let now = at(1000);

        assert!(one.claim_refresh(&id, now, MINUTE).await.unwrap());
        assert!(!two.claim_refresh(&id, now, MINUTE).await.unwrap());
        // The holder may take it again (renewing it).
        assert!(one.claim_refresh(&id, at(1030), MINUTE).await.unwrap());
        assert!(!two.claim_refresh(&id, at(1089), MINUTE).await.unwrap());
        // Releasing someone else's claim does nothing.
        two.release_refresh_claim(&id).await.unwrap();
        assert!(!two.claim_refresh(&id, at(1089), MINUTE).await.unwrap());
        // Past its `until` it is taken over, and the first process no longer holds it.
        assert!(two.claim_refresh(&id, at(1090), MINUTE).await.unwrap());
        assert!(!one.claim_refresh(&id, at(1091), MINUTE).await.unwrap());
        assert!(
            !one.store_refreshed(&id, &refreshed("new", 5000), at(1091))
                .await
                .unwrap()
        );
        assert!(!one.reject_refresh(&id, "no", at(1091)).await.unwrap());
        // Released, it is free at once.
        two.release_refresh_claim(&id).await.unwrap();
        assert!(one.claim_refresh(&id, at(1092), MINUTE).await.unwrap());
        two.close().await;
        one.close().await;
    }

    #[tokio::test]
    async fn a_refresh_is_stored_sealed_and_the_request_path_gets_the_new_token() {
        let dir = tempfile::tempdir().unwrap();
        let key = EncryptionKey::from_base64(&EncryptionKey::generate_base64()).unwrap();
        let store = Store::open(test_options(dir.path(), Encryption::with_key(&key)))
            .await
            .unwrap();
        let mut new = oauth(
            "kiro",
            Some("old-access"),
            Some("old-refresh-token"),
            Some(100),
        );
        new.client_secret = Some(Secret::new("old-client-secret"));
        new.extra.client_id = Some("old-client".into());
        new.extra.region = Some("us-east-1".into());
        let id = add(&store, &new).await;
        let before = store.get(&id, at(0)).await.unwrap();
        let fingerprint = || async {
            sqlx::query_scalar::<_, Vec<u8>>("SELECT fingerprint FROM credentials WHERE id = ?")
                .bind(id.as_str())
                .fetch_one(&store.reader)
                .await
                .unwrap()
        };
        let fp_before = fingerprint().await;
        // The provider had refused the old access token (a 401 on a proxied request).
        set_sql(
            &store,
            "UPDATE credentials SET state = 'invalid', state_reason = '401' WHERE id = ?",
            &id,
        )
        .await;
        assert_eq!(store.get(&id, at(0)).await.unwrap().status, Status::Invalid);
        assert_eq!(
            store.open_token(&id).await.unwrap().unwrap().expose(),
            "old-access"
        );

        let now = at(50);
        let r = Refreshed {
            access_token: Secret::new("new-access-token-1234"),
            expires_at: at(3650),
            refresh_token: Some(Secret::new("rotated-refresh-token-5678")),
            client: Some(NewClient {
                client_id: "new-client".into(),
                client_secret: Secret::new("new-client-secret-9012"),
                client_secret_expires_at: Some(at(90_000)),
            }),
            refresh_after: None,
            api_base: None,
        };
        refresh(&store, &id, &r, now).await;

        // The request path's mirror followed: the new token, and the credential usable again.
        assert_eq!(
            store.open_token(&id).await.unwrap().unwrap().expose(),
            "new-access-token-1234"
        );
        let row = store.get(&id, now).await.unwrap();
        assert_eq!((row.status, row.status_reason), (Status::Active, None));
        assert_eq!(row.expires_at, Some(at(3650)));
        assert_eq!(row.last_refresh_at, Some(now));
        assert_eq!(row.token_preview, before.token_preview);
        assert_eq!(fingerprint().await, fp_before);
        // What the next refresh starts from: the rotated token and the new client.
        let m = store.refresh_material(&id).await.unwrap();
        assert_eq!(m.access_token.unwrap().expose(), "new-access-token-1234");
        assert_eq!(
            m.refresh_token.unwrap().expose(),
            "rotated-refresh-token-5678"
        );
        assert_eq!(m.client_secret.unwrap().expose(), "new-client-secret-9012");
        assert_eq!(m.extra.client_id.as_deref(), Some("new-client"));
        assert_eq!(m.extra.client_secret_expires_at, Some(at(90_000)));
        assert_eq!(m.extra.region.as_deref(), Some("us-east-1"));
        assert_eq!(m.expires_at, Some(at(3650)));
        assert_eq!(m.provider.as_str(), "kiro");
        // The claim went with the write; the audit row names fields, never values.
        let claims: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM refresh_claims")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(claims, 0);
        let audit = store.audit_dump().await.unwrap();
        let line = audit
            .iter()
            .find(|l| l.contains("credential.refresh"))
            .unwrap();
        assert!(
            line.contains("refresh_token") && line.contains("client"),
            "{line}"
        );
        assert!(
            !audit
                .iter()
                .any(|l| l.contains("new-") || l.contains("rotated"))
        );
        // Not one of the new secrets is in the database's files in clear.
        store.close().await;
        for file in ["db.sqlite", "db.sqlite-wal"] {
            let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
            for secret in [
                "new-access-token-1234",
                "rotated-refresh-token-5678",
                "new-client-secret-9012",
            ] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} in {file}"
                );
            }
        }
        // And they open again after a restart.
        let store = Store::open(test_options(dir.path(), Encryption::with_key(&key)))
            .await
            .unwrap();
        let m = store.refresh_material(&id).await.unwrap();
        assert_eq!(
            m.refresh_token.unwrap().expose(),
            "rotated-refresh-token-5678"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_refresh_without_rotation_keeps_the_refresh_token_and_without_the_claim_writes_nothing()
     {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let id = add(&store, &oauth("kiro", Some("a1"), Some("r1"), Some(100))).await;
        // Never claimed: nothing written, the claim of nobody is not made either.
        assert!(
            !store
                .store_refreshed(&id, &refreshed("a2", 5000), at(10))
                .await
                .unwrap()
        );
        assert!(!store.reject_refresh(&id, "no", at(10)).await.unwrap());
        let m = store.refresh_material(&id).await.unwrap();
        assert_eq!(m.access_token.unwrap().expose(), "a1");
        assert_eq!(m.expires_at, Some(at(100)));
        assert_eq!(store.get(&id, at(10)).await.unwrap().last_refresh_at, None);
        assert!(
            !store
                .audit_dump()
                .await
                .unwrap()
                .iter()
                .any(|l| l.contains("refresh"))
        );

        refresh(&store, &id, &refreshed("a2", 5000), at(20)).await;
        let m = store.refresh_material(&id).await.unwrap();
        assert_eq!(m.access_token.unwrap().expose(), "a2");
        assert_eq!(m.refresh_token.unwrap().expose(), "r1");
        assert_eq!(store.open_token(&id).await.unwrap().unwrap().expose(), "a2");
        // The claim was used up with the write.
        assert!(
            !store
                .store_refreshed(&id, &refreshed("a3", 6000), at(30))
                .await
                .unwrap()
        );

        // A credential deleted while its refresh was in flight.
        assert!(store.claim_refresh(&id, at(40), MINUTE).await.unwrap());
        store.delete(&id, "test", at(41)).await.unwrap();
        assert!(matches!(
            store
                .store_refreshed(&id, &refreshed("a4", 7000), at(42))
                .await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            store.refresh_material(&id).await,
            Err(StoreError::NotFound)
        ));
    }

    #[tokio::test]
    async fn a_refused_refresh_leaves_the_credential_expired_until_its_tokens_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let id = add(
            &store,
            &oauth("copilot", Some("c1"), Some("gh1"), Some(100)),
        )
        .await;
        let mut r = refreshed("c2", 5000);
        r.refresh_after = Some(at(4000));
        refresh(&store, &id, &r, at(10)).await;
        let now = at(4500);
        assert_eq!(
            store
                .refresh_scan(&["copilot".into()], now, MINUTE)
                .await
                .unwrap()
                .due
                .len(),
            1
        );

        assert!(store.claim_refresh(&id, now, MINUTE).await.unwrap());
        let long = format!("bad_verification_code: {}", "é".repeat(400));
        assert!(store.reject_refresh(&id, &long, now).await.unwrap());
        let row = store.get(&id, now).await.unwrap();
        assert_eq!(row.status, Status::Expired);
        let reason = row.status_reason.unwrap();
        assert!(reason.starts_with("bad_verification_code: é"));
        assert_eq!(reason.chars().count(), MAX_REASON);
        let scan = store
            .refresh_scan(&["copilot".into()], now, MINUTE)
            .await
            .unwrap();
        assert_eq!((scan.checked, scan.due.len()), (0, 0));
        assert!(
            store
                .audit_dump()
                .await
                .unwrap()
                .iter()
                .any(|l| l.contains("credential.refresh_rejected"))
        );
        // The claim went with it.
        assert!(store.claim_refresh(&id, now, MINUTE).await.unwrap());
        store.release_refresh_claim(&id).await.unwrap();

        // New tokens through the API: active again, and the old refresh_after is gone.
        let patch = CredentialPatch {
            token: Some(Secret::new("c3")),
            refresh_token: Some(Secret::new("gh3")),
            expires_at: Some(Some(at(9000))),
            ..Default::default()
        };
        store.update(&id, &patch, "test", now).await.unwrap();
        assert_eq!(store.get(&id, now).await.unwrap().status, Status::Active);
        let scan = store
            .refresh_scan(&["copilot".into()], now, MINUTE)
            .await
            .unwrap();
        assert_eq!((scan.checked, scan.due.len()), (1, 0));
    }

    #[tokio::test]
    async fn the_history_survives_a_restart_and_is_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let (kiro, cred): (ProviderName, CredentialId) = ("kiro".into(), "cred_a".into());
        let old = store
            .start_refresh_run(RefreshTrigger::Schedule, at(0))
            .await
            .unwrap();
        store
            .record_refresh_outcome(old, &cred, &kiro, true, None, at(1))
            .await
            .unwrap();
        store.finish_refresh_run(old, 3, 1, 0, at(2)).await.unwrap();
        let sched = store
            .start_refresh_run(RefreshTrigger::Schedule, at(100))
            .await
            .unwrap();
        let long = "x".repeat(1000);
        store
            .record_refresh_outcome(sched, &cred, &kiro, false, Some(&long), at(101))
            .await
            .unwrap();
        store
            .finish_refresh_run(sched, 5, 0, 1, at(102))
            .await
            .unwrap();
        // A scheduled run still going, and a manual one after it.
        store
            .start_refresh_run(RefreshTrigger::Schedule, at(200))
            .await
            .unwrap();
        let manual = store
            .start_refresh_run(RefreshTrigger::Manual, at(201))
            .await
            .unwrap();
        store
            .record_refresh_outcome(manual, &cred, &kiro, true, None, at(202))
            .await
            .unwrap();
        let request = store
            .start_refresh_run(RefreshTrigger::Request, at(203))
            .await
            .unwrap();
        store
            .record_refresh_outcome(request, &"cred_b".into(), &kiro, true, None, at(204))
            .await
            .unwrap();
        store
            .finish_refresh_run(request, 1, 1, 0, at(205))
            .await
            .unwrap();
        store.close().await;

        let store = open_store(&dir).await;
        let h = store.refresh_history(0).await.unwrap();
        assert_eq!(
            h.last_scheduled,
            Some(RefreshRun {
                trigger: RefreshTrigger::Schedule,
                started_at: at(100),
                finished_at: Some(at(102)),
                checked: 5,
                refreshed: 0,
                failed: 1
            })
        );
        assert_eq!(
            h.last_any.as_ref().unwrap().trigger,
            RefreshTrigger::Request
        );
        // `recent` is at least one.
        assert_eq!(h.recent.len(), 1);
        assert_eq!(h.recent[0].credential_id.as_str(), "cred_b");
        assert_eq!(h.recent[0].trigger, RefreshTrigger::Request);
        let h = store.refresh_history(1000).await.unwrap();
        let triggers: Vec<_> = h.recent.iter().map(|o| (o.trigger, o.ok, o.at)).collect();
        assert_eq!(
            triggers,
            [
                (RefreshTrigger::Request, true, at(204)),
                (RefreshTrigger::Manual, true, at(202)),
                (RefreshTrigger::Schedule, false, at(101)),
                (RefreshTrigger::Schedule, true, at(1)),
            ]
        );
        assert_eq!(h.recent[2].error.as_ref().unwrap().len(), MAX_REASON);

        // Runs started before 150 go, with their outcomes.
        assert_eq!(store.prune_refresh_history(at(150)).await.unwrap(), 2);
        let h = store.refresh_history(200).await.unwrap();
        assert_eq!(h.recent.len(), 2);
        assert_eq!(h.last_scheduled, None);
        assert_eq!(store.prune_refresh_history(at(150)).await.unwrap(), 0);
        // An outcome of a pruned run is not recorded, and is no error.
        store
            .record_refresh_outcome(old, &cred, &kiro, true, None, at(300))
            .await
            .unwrap();
        assert_eq!(store.refresh_history(200).await.unwrap().recent.len(), 2);
        assert_eq!(store.prune_refresh_history(at(1000)).await.unwrap(), 3);
        assert_eq!(
            store.refresh_history(200).await.unwrap(),
            RefreshHistory::default()
        );
    }

    #[tokio::test]
    async fn pruning_a_backlog_takes_many_short_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let run = store
            .start_refresh_run(RefreshTrigger::Schedule, at(0))
            .await
            .unwrap();
        let n = PRUNE_BATCH + 5;
        sqlx::query(
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?2)
             INSERT INTO refresh_outcomes (run_id, credential_id, provider, trigger, at, ok)
             SELECT ?1, 'cred_' || i, 'kiro', 'schedule', ?3, 1 FROM k",
        )
        .bind(run)
        .bind(n)
        .bind(at(500).timestamp())
        .execute(&store.writer)
        .await
        .unwrap();
        // The run started before 100, its outcomes after: the outcomes go with the run.
        assert_eq!(store.prune_refresh_history(at(100)).await.unwrap(), 1);
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM refresh_outcomes")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(left, 0);
        // Outcomes before the cut alone, more than one batch of them.
        let run = store
            .start_refresh_run(RefreshTrigger::Schedule, at(1000))
            .await
            .unwrap();
        sqlx::query(
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?2)
             INSERT INTO refresh_outcomes (run_id, credential_id, provider, trigger, at, ok)
             SELECT ?1, 'cred_' || i, 'kiro', 'schedule', ?3 + (i % 2) * 1000, 1 FROM k",
        )
        .bind(run)
        .bind(2 * n)
        .bind(at(500).timestamp())
        .execute(&store.writer)
        .await
        .unwrap();
        assert_eq!(store.prune_refresh_history(at(1000)).await.unwrap(), 0);
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM refresh_outcomes")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(left, n);
    }

    #[test]
    fn clip_cuts_on_a_character_boundary() {
        assert_eq!(clip("short", MAX_REASON), "short");
        let long = "ü".repeat(MAX_REASON + 1);
        assert_eq!(clip(&long, MAX_REASON).chars().count(), MAX_REASON);
        assert_eq!(after(at(0), Duration::from_secs(u64::MAX)), i64::MAX);
    }
}
