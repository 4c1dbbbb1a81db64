//! The audit log: one row per management change, written in the same transaction as the
//! change, so the log and the data never disagree. `detail` carries non-secret fields only.

use super::Result;
use sqlx::SqliteConnection;

/// What changed, for the audit row.
pub(super) struct AuditEntry<'a> {
    pub now: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub credential_id: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub detail: serde_json::Value,
}

pub(super) async fn record(conn: &mut SqliteConnection, entry: AuditEntry<'_>) -> Result<()> {
    let detail = entry.detail.to_string();
    sqlx::query!(
        "INSERT INTO audit_log (at, actor, action, credential_id, provider, detail)
         VALUES (?, ?, ?, ?, ?, ?)",
        entry.now,
        entry.actor,
        entry.action,
        entry.credential_id,
        entry.provider,
        detail
    )
    .execute(conn)
    .await?;
    Ok(())
}
