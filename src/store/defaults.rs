//! Provider default limits: the quota limit a new credential takes when it names none (README,
//! "Management API"). The config's `auth.quota.default_limit` gives one per provider; a
//! `PUT .../quota` without `id` stores one in `provider_defaults`, which wins over the config's
//! (it is how an operator changes the default live, and it survives restarts). A stored row
//! with no limit says "unlimited" and wins too.

use super::{Result, Store};
use sqlx::SqliteConnection;
use std::collections::BTreeMap;

/// The effective default limit of every provider that has one set, in config or stored
/// (`None`: unlimited, by a stored row). A provider absent from the map is unlimited.
#[derive(Debug, Clone, Default)]
pub(super) struct DefaultLimits(BTreeMap<String, Option<u64>>);

impl DefaultLimits {
    /// The limit a new credential of `provider` that names `own` gets: its own when it names
    /// one (a number, or `Some(None)` for unlimited), else the provider's default.
    pub(super) fn resolve(&self, provider: &str, own: Option<Option<u64>>) -> Option<u64> {
        own.unwrap_or_else(|| self.of(provider))
    }

    /// The provider's default limit (`None`: unlimited).
    pub(super) fn of(&self, provider: &str) -> Option<u64> {
        self.0.get(provider).copied().flatten()
    }
}

/// A stored limit as read back (never negative: the table's CHECK).
fn stored(limit: Option<i64>) -> Option<u64> {
    limit.map(|l| l.max(0) as u64)
}

impl Store {
    /// The effective defaults, read inside `conn` (the write transaction that inserts the new
    /// credentials, so a concurrent change of a default cannot come between). The table holds
    /// a row per provider at most, so it is read whole.
    pub(super) async fn default_limits_in(
        &self,
        conn: &mut SqliteConnection,
    ) -> Result<DefaultLimits> {
        let rows = sqlx::query!("SELECT provider, limit_tokens FROM provider_defaults")
            .fetch_all(conn)
            .await?;
        let mut limits: BTreeMap<String, Option<u64>> = self
            .default_limits
            .iter()
            .map(|(provider, limit)| (provider.clone(), Some(*limit)))
            .collect();
        limits.extend(
            rows.into_iter()
                .map(|r| (r.provider, stored(r.limit_tokens))),
        );
        Ok(DefaultLimits(limits))
    }

    /// The default limit `provider`'s new credentials take (`None`: unlimited), for the quota
    /// view.
    #[tracing::instrument(skip_all, fields(provider = provider))]
    pub async fn default_limit(&self, provider: &str) -> Result<Option<u64>> {
        let row = sqlx::query!(
            "SELECT limit_tokens FROM provider_defaults WHERE provider = ?",
            provider
        )
        .fetch_optional(&self.reader)
        .await?;
        Ok(match row {
            Some(r) => stored(r.limit_tokens),
            None => self.default_limits.get(provider).copied(),
        })
    }
}

/// Store `limit` (`None`: unlimited) as `provider`'s default inside `conn`'s transaction.
pub(super) async fn set_default_limit(
    conn: &mut SqliteConnection,
    provider: &str,
    limit: Option<i64>,
    ts: i64,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO provider_defaults (provider, limit_tokens, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (provider) DO UPDATE SET limit_tokens = ?2, updated_at = ?3",
        provider,
        limit,
        ts
    )
    .execute(conn)
    .await?;
    Ok(())
}
