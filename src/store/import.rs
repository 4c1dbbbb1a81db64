//! Applying an import batch: the store hands up a [`Snapshot`] of what it holds for the batch's
//! fingerprints, [`crate::import::plan`] decides what the import does, and the store applies
//! that [`Plan`] in the write transaction it read the snapshot in (rolled back for a dry run),
//! so a concurrent write cannot come between the decision and its statements.

use super::audit::{self, AuditEntry};
use super::credentials::insert_quotas;
use super::ledger::Touched;
use super::{Result, Store, Written};
use crate::crypto::to_hex;
use crate::crypto::token_preview;
use crate::import::Batch;
use crate::import::plan::{
    self, Action, ImportMode, ImportReport, Keyed, Known, Plan, Prepared, Snapshot,
};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::SqliteConnection;
use std::collections::HashMap;

/// Fingerprints as a JSON array of hex strings, for `json_each`.
fn hex_array<'a>(fingerprints: impl Iterator<Item = &'a [u8]>) -> String {
    let hex: Vec<String> = fingerprints.map(to_hex).collect();
    serde_json::Value::from(hex).to_string()
}

/// What `conn` holds for `prepared`'s fingerprints, in two queries: one statement per entry
/// would cost a round trip to SQLite's thread each. Tombstones are read only for fingerprints
/// without a live credential (the live one decides alone), so a rescan of unchanged files
/// reads no tombstone.
async fn snapshot(conn: &mut SqliteConnection, prepared: &Prepared) -> Result<Snapshot> {
    let wanted = hex_array(prepared.fingerprints());
    let credentials: HashMap<Vec<u8>, Known> = sqlx::query!(
        "SELECT fingerprint, id, import_digest FROM credentials
         WHERE fingerprint IN (SELECT unhex(value) FROM json_each(?))",
        wanted
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| {
        let known = Known {
            id: r.id,
            import_digest: r.import_digest,
        };
        (r.fingerprint, known)
    })
    .collect();
    let unknown = hex_array(
        prepared
            .fingerprints()
            .filter(|fp| !credentials.contains_key(*fp)),
    );
    let tombstones: HashMap<Vec<u8>, String> = sqlx::query!(
        "SELECT fingerprint, credential_id FROM tombstones
         WHERE fingerprint IN (SELECT unhex(value) FROM json_each(?))",
        unknown
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.fingerprint, r.credential_id))
    .collect();
    Ok(Snapshot {
        credentials,
        tombstones,
    })
}

impl Store {
    /// Import `batch`: plan it over what the database holds, and apply the plan in one write
    /// transaction (rolled back when `dry_run`).
    #[tracing::instrument(skip_all, fields(entries = batch.entries.len(), errors = batch.errors.len(), ?mode, dry_run))]
    pub async fn import(
        &self,
        batch: Batch,
        mode: ImportMode,
        actor: &str,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> Result<ImportReport> {
        let large = batch.entries.len() >= super::ledger::MANY;
        // Fingerprints and digests (CPU only) before the gate.
        let keyed: Vec<Keyed> = batch
            .entries
            .into_iter()
            .map(|entry| Keyed {
                fingerprint: entry.credential.fingerprint(&self.fingerprinter),
                digest: entry.credential.content_digest(&self.fingerprinter),
                entry,
            })
            .collect();
        let prepared = Prepared::new(keyed, batch.errors);
        // A plan over a snapshot read outside any write: when it writes nothing (a rescan of
        // unchanged files, at every start and on demand), the request path is not stopped at
        // all, however many credentials there are. Otherwise the transaction plans again over
        // what it reads itself.
        // One read transaction, so both of the snapshot's reads see the same database.
        let mut reader = self.reader.begin().await?;
        let outside = snapshot(&mut reader, &prepared).await?;
        reader.rollback().await?;
        let unchanged = plan::plan(&prepared, &outside, mode);
        if unchanged.writes_nothing() {
            if large {
                super::release_freed_memory();
            }
            return Ok(unchanged.report);
        }
        drop(unchanged);
        let report = self
            .exclusive(async {
                let report = self
                    .import_locked(&prepared, mode, actor, dry_run, now)
                    .await?;
                let touched = if dry_run {
                    Touched::Nothing
                } else {
                    Touched::Credentials(
                        report
                            .changes
                            .iter()
                            .map(|c| c.credential_id.clone())
                            .collect(),
                    )
                };
                Ok(Written::new(report, touched))
            })
            .await?;
        if report.updated > 0 && !dry_run {
            self.forget_old_secrets().await;
        }
        if large {
            // What reading and matching the entries allocated is free now.
            drop(prepared);
            super::release_freed_memory();
        }
        Ok(report)
    }

    /// In one write transaction: re-key what retired fingerprint keys made, read the snapshot,
    /// plan over it, and apply the plan (rolled back when `dry_run`).
    async fn import_locked(
        &self,
        prepared: &Prepared,
        mode: ImportMode,
        actor: &str,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> Result<ImportReport> {
        let mut tx = self.begin_write().await?;
        self.adopt_retired(&mut tx, &prepared.entries).await?;
        let snapshot = snapshot(&mut tx, prepared).await?;
        let plan = plan::plan(prepared, &snapshot, mode);
        let report = self.apply(&mut tx, plan, actor, now).await?;
        if dry_run {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok(report)
    }

    /// The statements of `plan`, in its order: each update in place, each new credential
    /// (after lifting its tombstone), then the new counters and the audit rows in one
    /// statement each. Returns the plan's report with the changes made.
    async fn apply(
        &self,
        conn: &mut SqliteConnection,
        plan: Plan<'_>,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<ImportReport> {
        let Plan {
            actions,
            mut report,
        } = plan;
        let ts = now.timestamp();
        let defaults = self.default_limits_in(conn).await?;
        let mut quota_seeds = Vec::new();
        for action in &actions {
            let keyed = action.keyed();
            let new = &keyed.entry.credential;
            let limit = defaults.resolve(&new.provider, new.limit);
            let id = match action {
                Action::Update { id, source, .. } => {
                    self.update_from_import(conn, id, new, &keyed.digest, source, ts)
                        .await?;
                    set_limit(conn, id, limit).await?;
                    id.clone()
                }
                Action::Create {
                    source,
                    lift_tombstone,
                    ..
                } => {
                    if *lift_tombstone {
                        sqlx::query!(
                            "DELETE FROM tombstones WHERE fingerprint = ?",
                            keyed.fingerprint
                        )
                        .execute(&mut *conn)
                        .await?;
                    }
                    let id = self
                        .insert_credential(
                            conn,
                            new,
                            &keyed.fingerprint,
                            Some(&keyed.digest),
                            source,
                            now,
                        )
                        .await?;
                    quota_seeds.push(self.quota_seed(&id, new, limit, now));
                    id
                }
            };
            report.changes.push(action.change(&id));
        }
        insert_quotas(conn, &quota_seeds).await?;
        let audit_entries: Vec<AuditEntry> = actions
            .iter()
            .zip(&report.changes)
            .map(|(action, change)| AuditEntry {
                now: ts,
                actor,
                action: action.audit_action(),
                credential_id: Some(&change.credential_id),
                provider: Some(&change.provider),
                detail: json!({ "source": change.source }),
            })
            .collect();
        audit::record_all(conn, &audit_entries).await?;
        Ok(report)
    }

    /// Update a credential in place from a changed import entry: its secrets and settings
    /// (its limit: [`set_limit`]), never `used` or `reserved`. A changed secret clears an
    /// `invalid` or `expired` mark, and the `refresh_after` of the tokens it replaces. A
    /// credential refreshed since keeps its tokens: only its settings change.
    async fn update_from_import(
        &self,
        conn: &mut SqliteConnection,
        id: &str,
        new: &crate::domain::NewCredential,
        digest: &[u8],
        source: &str,
        ts: i64,
    ) -> Result<()> {
        let [token, refresh, client_secret] = self.seal_secrets(id, new);
        let preview = token_preview(new.identity().expose());
        let extra = serde_json::to_string(&new.extra).expect("extra serializes");
        let kind = new.kind.as_str();
        let expires_at = new.expires_at.map(|t| t.timestamp());
        sqlx::query!(
            // Once refreshed, the credential's tokens are newer than the file's (which still
            // holds the refresh token it was imported with: that is how the file matched it,
            // and a rotating provider no longer takes it), so only the settings change.
            "UPDATE credentials SET kind = ?1, label = ?2,
                 token_sealed = CASE WHEN last_refresh_at IS NULL THEN ?3 ELSE token_sealed END,
                 refresh_token_sealed = CASE WHEN last_refresh_at IS NULL THEN ?4 ELSE refresh_token_sealed END,
                 client_secret_sealed = CASE WHEN last_refresh_at IS NULL THEN ?5 ELSE client_secret_sealed END,
                 token_preview = CASE WHEN last_refresh_at IS NULL THEN ?6 ELSE token_preview END,
                 extra = CASE WHEN last_refresh_at IS NULL THEN ?7 ELSE extra END,
                 priority = ?8, disabled = ?9,
                 expires_at = CASE WHEN last_refresh_at IS NULL THEN ?10 ELSE expires_at END,
                 import_digest = ?11, source = ?12, updated_at = ?13,
                 refresh_after = CASE WHEN last_refresh_at IS NULL THEN NULL ELSE refresh_after END,
                 state = CASE WHEN last_refresh_at IS NULL AND state IN ('invalid', 'expired') THEN 'active' ELSE state END,
                 state_reason = CASE WHEN last_refresh_at IS NULL AND state IN ('invalid', 'expired') THEN NULL ELSE state_reason END
             WHERE id = ?14",
            kind,
            new.label,
            token,
            refresh,
            client_secret,
            preview,
            extra,
            new.priority,
            new.disabled,
            expires_at,
            digest,
            source,
            ts,
            id
        )
        .execute(&mut *conn)
        .await?;
        // As for a `PUT` of a new refresh token: a refresh under way must not overwrite it
        // (when the file's tokens were written, above).
        sqlx::query!(
            "DELETE FROM refresh_claims WHERE credential_id = ?1
                 AND EXISTS (SELECT 1 FROM credentials WHERE id = ?1 AND last_refresh_at IS NULL)",
            id
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Set the limit of a credential a changed import entry updates: the entry's own, or when it
/// names none its provider's default, as for a new credential.
async fn set_limit(conn: &mut SqliteConnection, id: &str, limit: Option<u64>) -> Result<()> {
    let limit = limit.map(|l| l.min(i64::MAX as u64) as i64);
    sqlx::query!(
        "UPDATE quotas SET limit_tokens = ? WHERE credential_id = ?",
        limit,
        id
    )
    .execute(conn)
    .await?;
    Ok(())
}
