//! Quota settings through the management API: limits, a manual `used`, and resets. Each change
//! is one UPDATE over the chosen counters, in one transaction with its audit row.

use super::audit::{self, AuditEntry};
use super::defaults::set_default_limit;
use super::ledger::Touched;
use super::{Result, Store, StoreError, Written};
use crate::domain::{CredentialId, ProviderName};
use chrono::{DateTime, Utc};
use serde_json::json;

/// A `PUT .../quota` body. `limit: Some(None)` makes the quota unlimited.
#[derive(Debug, Clone, Default)]
pub struct QuotaPatch {
    pub limit: Option<Option<u64>>,
    pub used: Option<u64>,
    pub reset: bool,
}

impl QuotaPatch {
    /// Whether applying it to `id` also sets the provider's default limit: a limit given for
    /// all of the provider's credentials (no `id`).
    pub fn sets_default<Id>(&self, id: Option<Id>) -> bool {
        id.is_none() && self.limit.is_some()
    }
}

/// A provider's quota summed over its credentials: `limit` and `remaining` are unlimited
/// (`None`) as soon as one credential is; sums saturate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaTotal {
    pub limit: Option<u64>,
    pub used: u64,
    pub remaining: Option<u64>,
}

/// A sum read as its high and low 32 bits, joined (saturating at `u64::MAX`).
fn joined(high: i64, low: i64) -> u64 {
    let sum = (u128::from(high.max(0) as u64) << 32) + u128::from(low.max(0) as u64);
    u64::try_from(sum).unwrap_or(u64::MAX)
}

impl Store {
    /// The quota of all of `provider`'s credentials, summed in the database rather than over
    /// rows read out (100,000 of them with one provider). SQLite's SUM fails past 2^63, which
    /// 10,000 counters at their bound (10^15) pass, so each counter is summed as two 32-bit
    /// halves that cannot reach it.
    #[tracing::instrument(skip_all, fields(provider = provider))]
    pub async fn quota_total(&self, provider: &str) -> Result<QuotaTotal> {
        let r = sqlx::query!(
            r#"SELECT COUNT(*) AS "credentials!: i64",
                      COUNT(q.limit_tokens) AS "limited!: i64",
                      COALESCE(SUM(q.used >> 32), 0) AS "used_high!: i64",
                      COALESCE(SUM(q.used & 4294967295), 0) AS "used_low!: i64",
                      COALESCE(SUM(q.limit_tokens >> 32), 0) AS "limit_high!: i64",
                      COALESCE(SUM(q.limit_tokens & 4294967295), 0) AS "limit_low!: i64",
                      COALESCE(SUM(MAX(q.limit_tokens - q.used, 0) >> 32), 0) AS "left_high!: i64",
                      COALESCE(SUM(MAX(q.limit_tokens - q.used, 0) & 4294967295), 0)
                          AS "left_low!: i64"
               FROM credentials c JOIN quotas q ON q.credential_id = c.id
               WHERE c.provider = ?"#,
            provider
        )
        .fetch_one(&self.reader)
        .await?;
        let limited = r.limited == r.credentials;
        Ok(QuotaTotal {
            limit: limited.then(|| joined(r.limit_high, r.limit_low)),
            used: joined(r.used_high, r.used_low),
            remaining: limited.then(|| joined(r.left_high, r.left_low)),
        })
    }

    /// Apply a quota change (see `set_quota_locked`). The provider and the credential are
    /// typed, so they cannot be passed in each other's place.
    #[tracing::instrument(skip_all, fields(provider = provider.as_str(), credential = id.map(CredentialId::as_str), actor = actor))]
    pub async fn set_quota(
        &self,
        provider: &ProviderName,
        id: Option<&CredentialId>,
        patch: &QuotaPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let (provider, id) = (provider.as_str(), id.map(CredentialId::as_str));
        self.exclusive(self.set_quota_locked(provider, id, patch, actor, now))
            .await
    }

    /// Apply `patch` to one credential of `provider` (`id`), or to all of them; a limit for
    /// all of them is also stored as the provider's default, for the credentials added later
    /// ([`QuotaPatch::sets_default`]). Returns how many counters changed; `NotFound` when `id`
    /// names no credential of the provider.
    async fn set_quota_locked(
        &self,
        provider: &str,
        id: Option<&str>,
        patch: &QuotaPatch,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Written<u64>> {
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
        if patch.sets_default(id) {
            set_default_limit(&mut tx, provider, limit, ts).await?;
        }
        if patch.reset {
            // A reset starts a new period: a provider's "quota exhausted" mark ends with it.
            sqlx::query!(
                "UPDATE credentials
                 SET state = 'active', state_reason = NULL, exhausted_until = NULL, updated_at = ?1
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
                detail: {
                    let mut detail = json!({
                        "limit": patch.limit,
                        "used": patch.used,
                        "reset": patch.reset,
                        "credentials": changed,
                    });
                    if patch.sets_default(id) {
                        detail["default_limit"] = json!(patch.limit.flatten());
                    }
                    detail
                },
            },
        )
        .await?;
        tx.commit().await?;
        let touched = match id {
            Some(id) => Touched::credential(id),
            None => Touched::Provider(provider.to_string()),
        };
        Ok(Written::new(changed, touched))
    }
}
