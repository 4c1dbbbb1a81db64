//! Scheduled quota resets: a provider's counters back to zero when its period turns over.
//! The same change as the manual reset (`quota.rs`), for the credentials whose period began
//! before the current one, through the exclusive path so the ledger's mirror follows it.

use super::audit::{self, AuditEntry};
use super::ledger::Touched;
use super::{Result, Store, Written};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

/// What one scheduled reset of a provider changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeriodReset {
    /// Counters set to zero and moved to the new period.
    pub credentials: u64,
    /// Of those, credentials whose `exhausted` mark was lifted.
    pub revived: u64,
}

impl Store {
    /// Start a new quota period at `start` for every credential of `provider` whose period
    /// began before it (the rule of `ResetSchedule::reset_due`): `used` to 0, `period_start`
    /// to `start`, an `exhausted` mark lifted, in one transaction with its audit row.
    /// Reservations in flight stay: they are not part of `used`, and settling one later adds
    /// its tokens to the new period's counter, once. A provider with nothing due costs one
    /// read and does not stop the request path.
    #[tracing::instrument(skip_all, fields(provider = provider, actor = actor))]
    pub async fn reset_period(
        &self,
        provider: &str,
        start: DateTime<Utc>,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<PeriodReset> {
        let start_ts = start.timestamp();
        let due = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM quotas q JOIN credentials c ON c.id = q.credential_id
                              WHERE c.provider = ?1 AND q.period_start < ?2) AS "due!: bool""#,
            provider,
            start_ts
        )
        .fetch_one(&self.reader)
        .await?;
        if !due {
            return Ok(PeriodReset::default());
        }
        self.exclusive(self.reset_period_locked(provider, start, actor, now))
            .await
    }

    async fn reset_period_locked(
        &self,
        provider: &str,
        start: DateTime<Utc>,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<Written<PeriodReset>> {
        let (ts, start_ts) = (now.timestamp(), start.timestamp());
        let mut tx = self.begin_write().await?;
        // The marks first: which counters are due is read from `period_start`, which the
        // second statement moves.
        let revived = sqlx::query!(
            "UPDATE credentials
             SET state = 'active', state_reason = NULL, exhausted_until = NULL, updated_at = ?1
             WHERE state = 'exhausted' AND provider = ?2
               AND id IN (SELECT credential_id FROM quotas WHERE period_start < ?3)",
            ts,
            provider,
            start_ts
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let ids: Vec<String> = sqlx::query_scalar!(
            "UPDATE quotas SET used = 0, period_start = ?1
             WHERE period_start < ?1
               AND credential_id IN (SELECT id FROM credentials WHERE provider = ?2)
             RETURNING credential_id",
            start_ts,
            provider
        )
        .fetch_all(&mut *tx)
        .await?;
        let reset = PeriodReset {
            credentials: ids.len() as u64,
            revived,
        };
        if ids.is_empty() {
            // Reset meanwhile by another run: nothing changed, nothing to record.
            return Ok(Written::new(reset, Touched::Nothing));
        }
        audit::record(
            &mut tx,
            AuditEntry {
                now: ts,
                actor,
                action: "quota.reset",
                credential_id: None,
                provider: Some(provider),
                detail: json!({
                    "credentials": reset.credentials,
                    "revived": reset.revived,
                    "period_start": start.to_rfc3339_opts(SecondsFormat::Secs, true),
                }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Written::new(reset, Touched::Credentials(ids)))
    }
}
