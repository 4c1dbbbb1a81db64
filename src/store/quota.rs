//! Quota settings through the management API: limits, a manual `used`, and resets. Each change
//! is one UPDATE over the chosen counters, in one transaction with its audit row.

use super::audit::{self, AuditEntry};
use super::{Result, Store, StoreError};
use chrono::{DateTime, Utc};
use serde_json::json;

/// A `PUT .../quota` body. `limit: Some(None)` makes the quota unlimited.
#[derive(Debug, Clone, Default)]
pub struct QuotaPatch {
    pub limit: Option<Option<u64>>,
    pub used: Option<u64>,
    pub reset: bool,
}

impl Store {
    /// Apply a quota change (see `set_quota_locked`).
    pub async fn set_quota(
        &self,
        provider: &str,
        id: Option<&str>,
        patch: &QuotaPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        self.exclusive(self.set_quota_locked(provider, id, patch, actor, now))
            .await
    }

    /// Apply `patch` to one credential of `provider` (`id`), or to all of them. Returns how
    /// many counters changed; `NotFound` when `id` names no credential of the provider.
    async fn set_quota_locked(
        &self,
        provider: &str,
        id: Option<&str>,
        patch: &QuotaPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let ts = now.timestamp();
        let period_start = self.period_start(provider, now);
        let set_limit = patch.limit.is_some();
        let limit = patch.limit.flatten().map(|l| l.min(i64::MAX as u64) as i64);
        let used = patch.used.map(|u| u.min(i64::MAX as u64) as i64);
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query!(
            "UPDATE quotas SET
                 limit_tokens = CASE WHEN ?1 THEN ?2 ELSE limit_tokens END,
                 used = CASE WHEN ?3 IS NOT NULL THEN ?3 WHEN ?4 THEN 0 ELSE used END,
                 period_start = CASE WHEN ?4 THEN ?5 ELSE period_start END
             WHERE credential_id IN
                 (SELECT id FROM credentials WHERE provider = ?6 AND (?7 IS NULL OR id = ?7))",
            set_limit,
            limit,
            used,
            patch.reset,
            period_start,
            provider,
            id
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if id.is_some() && changed == 0 {
            return Err(StoreError::NotFound);
        }
        if patch.reset {
            // A reset starts a new period: a provider's "quota exhausted" mark ends with it.
            sqlx::query!(
                "UPDATE credentials SET state = 'active', state_reason = NULL, updated_at = ?1
                 WHERE state = 'exhausted' AND provider = ?2 AND (?3 IS NULL OR id = ?3)",
                ts,
                provider,
                id
            )
            .execute(&mut *tx)
            .await?;
        }
        audit::record(
            &mut tx,
            AuditEntry {
                now: ts,
                actor,
                action: "quota.update",
                credential_id: id,
                provider: Some(provider),
                detail: json!({
                    "limit": patch.limit,
                    "used": patch.used,
                    "reset": patch.reset,
                    "credentials": changed,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(changed)
    }
}
