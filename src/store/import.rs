//! Applying an import batch in one transaction: new entries are inserted, changed ones updated
//! in place (never their live counters), unchanged ones left alone, entries of credentials
//! deleted through the API skipped (for file imports) with a notice, and a credential given
//! twice taken from its first source only, the others skipped with a notice.

use super::audit::{self, AuditEntry};
use super::credentials::insert_quotas;
use super::ledger::Touched;
use super::{Result, Store, Written};
use crate::crypto::to_hex;
use crate::crypto::token_preview;
use crate::import::{Batch, Entry, ImportError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;

/// Where a batch came from, which decides what a tombstone means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMode {
    /// Files in `auth_dir` (at start, `cliproxyapi import`, or a rescan): a credential deleted
    /// through the API stays deleted.
    Files,
    /// Credentials posted to the import endpoint: an explicit add, which lifts a tombstone.
    Body,
}

/// Something worth telling about an entry that was not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notice {
    pub source: String,
    pub notice: String,
}

/// The import report of contract section 4 (with `notices` beside the errors, and the ids of
/// the credentials each source made or changed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub imported: usize,
    pub updated: usize,
    pub skipped: usize,
    pub errors: Vec<ImportError>,
    pub notices: Vec<Notice>,
    #[serde(skip)]
    pub changes: Vec<Change>,
}

/// A credential an import created or updated, for the auth log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub source: String,
    pub credential_id: String,
    pub provider: String,
    pub created: bool,
}

/// An entry with its fingerprint and the digest of its content.
type Keyed = (Entry, Vec<u8>, Vec<u8>);

/// An import ready to apply: entries with their fingerprints and digests, one per credential,
/// and what was already found wrong with the batch.
struct Planned {
    entries: Vec<Keyed>,
    duplicates: Vec<Notice>,
    errors: Vec<ImportError>,
}

/// The entries' fingerprints as a JSON array of hex strings, for `json_each`.
fn wanted(entries: &[Keyed]) -> String {
    let hex: Vec<String> = entries.iter().map(|(_, fp, _)| to_hex(fp)).collect();
    serde_json::Value::from(hex).to_string()
}

/// Keep the first entry of each credential (by fingerprint: the same provider and token), in
/// batch order, which is sorted path order for files and entry order for a body. Each later
/// one is a notice naming both sources: two sources applied in turn would undo each other's
/// settings at every import, and overwrite what was changed through the API.
fn first_of_each(entries: Vec<Keyed>) -> (Vec<Keyed>, Vec<Notice>) {
    let mut first: HashMap<Vec<u8>, String> = HashMap::with_capacity(entries.len());
    let mut kept = Vec::with_capacity(entries.len());
    let mut duplicates = Vec::new();
    for (entry, fp, digest) in entries {
        match first.get(&fp) {
            Some(winner) => duplicates.push(Notice {
                notice: format!(
                    "duplicate: the same credential (provider and token) as {winner}, which comes first and wins; this entry is ignored"
                ),
                source: entry.source,
            }),
            None => {
                first.insert(fp.clone(), entry.source.clone());
                kept.push((entry, fp, digest));
            }
        }
    }
    (kept, duplicates)
}

impl Store {
    /// Apply `batch` (see `import_locked`).
    pub async fn import(
        &self,
        batch: Batch,
        mode: ImportMode,
        actor: &str,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> Result<ImportReport> {
        let large = batch.entries.len() >= super::ledger::MANY;
        // Fingerprints and digests (CPU only) before the gate; and when every entry is a
        // credential already imported with the same content (a rescan of unchanged files, at
        // every start and on demand), nothing is written, so the request path is not stopped
        // at all, however many credentials there are.
        let keyed: Vec<Keyed> = batch
            .entries
            .into_iter()
            .map(|e| {
                let fp = e.credential.fingerprint(&self.fingerprinter);
                let digest = e.credential.content_digest(&self.fingerprinter);
                (e, fp, digest)
            })
            .collect();
        let (entries, duplicates) = first_of_each(keyed);
        if self.all_unchanged(&entries).await? {
            let report = ImportReport {
                skipped: entries.len() + duplicates.len(),
                errors: batch.errors,
                notices: duplicates,
                ..Default::default()
            };
            if large {
                super::release_freed_memory();
            }
            return Ok(report);
        }
        let planned = Planned {
            entries,
            duplicates,
            errors: batch.errors,
        };
        let report = self
            .exclusive(async {
                let report = self
                    .import_locked(planned, mode, actor, dry_run, now)
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
            super::release_freed_memory();
        }
        Ok(report)
    }

    /// Whether every entry is a live credential whose last import had this same content, read
    /// outside any write (the transaction checks again).
    async fn all_unchanged(&self, entries: &[Keyed]) -> Result<bool> {
        let wanted = wanted(entries);
        let known: HashMap<Vec<u8>, Option<Vec<u8>>> = sqlx::query!(
            "SELECT fingerprint, id, import_digest FROM credentials
             WHERE fingerprint IN (SELECT unhex(value) FROM json_each(?))",
            wanted
        )
        .fetch_all(&self.reader)
        .await?
        .into_iter()
        .map(|r| (r.fingerprint, r.import_digest))
        .collect();
        Ok(entries.iter().all(|(_, fp, digest)| {
            known
                .get(fp)
                .is_some_and(|last| last.as_deref() == Some(digest.as_slice()))
        }))
    }

    /// Apply planned entries in one write transaction (rolled back when `dry_run`). Errors
    /// and duplicates already found are carried into the report.
    async fn import_locked(
        &self,
        planned: Planned,
        mode: ImportMode,
        actor: &str,
        dry_run: bool,
        now: DateTime<Utc>,
    ) -> Result<ImportReport> {
        let Planned {
            entries,
            duplicates,
            errors,
        } = planned;
        let mut report = ImportReport {
            errors,
            skipped: duplicates.len(),
            notices: duplicates,
            ..Default::default()
        };
        let ts = now.timestamp();
        // The rows the entries match, in two queries: one statement per entry would cost a
        // round trip to SQLite's thread each.
        let wanted = wanted(&entries);
        let mut tx = self.begin_write().await?;
        self.adopt_retired(&mut tx, &entries).await?;
        // fingerprint -> (id, digest of its last import)
        let mut known: HashMap<Vec<u8>, (String, Option<Vec<u8>>)> = sqlx::query!(
            "SELECT fingerprint, id, import_digest FROM credentials
             WHERE fingerprint IN (SELECT unhex(value) FROM json_each(?))",
            wanted
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.fingerprint, (r.id, r.import_digest)))
        .collect();
        let mut tombstones: HashMap<Vec<u8>, String> = sqlx::query!(
            "SELECT fingerprint, credential_id FROM tombstones
             WHERE fingerprint IN (SELECT unhex(value) FROM json_each(?))",
            wanted
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.fingerprint, r.credential_id))
        .collect();
        let mut quota_seeds = Vec::new();
        let mut audits: Vec<(String, &'static str, String, String)> = Vec::new();
        for (entry, fp, digest) in entries {
            let new = &entry.credential;
            let source = match mode {
                ImportMode::Files => entry.source.clone(),
                ImportMode::Body => "import:api".to_string(),
            };
            if let Some((id, last_digest)) = known.get_mut(&fp) {
                if last_digest.as_deref() == Some(digest.as_slice()) {
                    report.skipped += 1;
                    continue;
                }
                self.update_from_import(&mut tx, id, new, &digest, &source, ts)
                    .await?;
                *last_digest = Some(digest);
                audits.push((
                    id.clone(),
                    "credential.import_update",
                    new.provider.clone(),
                    entry.source.clone(),
                ));
                report.updated += 1;
                report.changes.push(Change {
                    source: entry.source,
                    credential_id: id.clone(),
                    provider: new.provider.clone(),
                    created: false,
                });
                continue;
            }
            if let Some(old_id) = tombstones.get(&fp) {
                if mode == ImportMode::Files {
                    report.skipped += 1;
                    report.notices.push(Notice {
                        source: entry.source,
                        notice: format!(
                            "{old_id} was deleted through the management API and is not imported again; add it through the API to restore it"
                        ),
                    });
                    continue;
                }
                sqlx::query!("DELETE FROM tombstones WHERE fingerprint = ?", fp)
                    .execute(&mut *tx)
                    .await?;
                tombstones.remove(&fp);
            }
            let id = self
                .insert_credential(&mut tx, new, &fp, Some(&digest), &source, now)
                .await?;
            quota_seeds.push(self.quota_seed(&id, new, now));
            known.insert(fp, (id.clone(), Some(digest)));
            audits.push((
                id.clone(),
                "credential.import",
                new.provider.clone(),
                entry.source.clone(),
            ));
            report.imported += 1;
            report.changes.push(Change {
                source: entry.source,
                credential_id: id,
                provider: new.provider.clone(),
                created: true,
            });
        }
        insert_quotas(&mut tx, &quota_seeds).await?;
        let audit_entries: Vec<AuditEntry> = audits
            .iter()
            .map(|(id, action, provider, source)| AuditEntry {
                now: ts,
                actor,
                action,
                credential_id: Some(id),
                provider: Some(provider),
                detail: json!({ "source": source }),
            })
            .collect();
        audit::record_all(&mut tx, &audit_entries).await?;
        if dry_run {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok(report)
    }

    /// Update a credential in place from a changed import entry: its secrets and settings,
    /// never `used` or `reserved`. A changed secret clears an `invalid` or `expired` mark.
    async fn update_from_import(
        &self,
        conn: &mut sqlx::SqliteConnection,
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
        let limit = new.limit.map(|l| l.min(i64::MAX as u64) as i64);
        sqlx::query!(
            "UPDATE credentials SET kind = ?1, label = ?2, token_sealed = ?3,
                 refresh_token_sealed = ?4, client_secret_sealed = ?5, token_preview = ?6,
                 extra = ?7, priority = ?8, disabled = ?9, expires_at = ?10, import_digest = ?11,
                 source = ?12, updated_at = ?13,
                 state = CASE WHEN state IN ('invalid', 'expired') THEN 'active' ELSE state END,
                 state_reason = CASE WHEN state IN ('invalid', 'expired') THEN NULL ELSE state_reason END
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
        sqlx::query!(
            "UPDATE quotas SET limit_tokens = ? WHERE credential_id = ?",
            limit,
            id
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
