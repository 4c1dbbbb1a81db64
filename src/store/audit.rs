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
    record_all(conn, &[entry]).await
}

/// Many audit rows in one statement (an import of thousands of credentials).
pub(super) async fn record_all(
    conn: &mut SqliteConnection,
    entries: &[AuditEntry<'_>],
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            serde_json::json!([
                e.now,
                e.actor,
                e.action,
                e.credential_id,
                e.provider,
                e.detail.to_string()
            ])
        })
        .collect();
    let rows = serde_json::Value::from(rows).to_string();
    sqlx::query!(
        "INSERT INTO audit_log (at, actor, action, credential_id, provider, detail)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5
         FROM json_each(?)",
        rows
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// One audit row as the API and tests see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRow {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub credential_id: Option<String>,
    pub provider: Option<String>,
    pub detail: String,
}

impl std::fmt::Display for AuditRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {}",
            self.at,
            self.actor,
            self.action,
            self.credential_id.as_deref().unwrap_or("-"),
            self.provider.as_deref().unwrap_or("-"),
            self.detail
        )
    }
}

impl super::Store {
    /// The whole audit log, oldest first, one line per change.
    #[tracing::instrument(skip_all)]
    pub async fn audit_dump(&self) -> Result<Vec<String>> {
        let rows = sqlx::query_as!(
            AuditRow,
            "SELECT at, actor, action, credential_id, provider, detail FROM audit_log ORDER BY id"
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(ToString::to_string).collect())
    }
}
