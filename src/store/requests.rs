//! The request path's transactions: pick a credential and reserve tokens on it (one short
//! write transaction, before any upstream call), then settle what was used or release the
//! reservation with a mark on the credential (another). A reservation row exists from the one
//! to the other, so a settlement applies once, and a crash in between loses nothing: at start,
//! reservations of a dead process are charged in full.

use super::audit::{self, AuditEntry};
use super::{Result, Store};
use crate::config::SelectionStrategy;
use crate::crypto::Field;
use crate::providers::wire::Usage;
use crate::selection::{self, Candidate};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::sync::atomic::Ordering;

/// What a reservation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationKind {
    Request,
    Lease,
}

impl ReservationKind {
    fn as_str(self) -> &'static str {
        match self {
            ReservationKind::Request => "request",
            ReservationKind::Lease => "lease",
        }
    }
}

/// A request to reserve tokens on some credential of a provider.
#[derive(Debug, Clone)]
pub struct ReserveRequest<'a> {
    pub provider: &'a str,
    pub tokens: u64,
    pub strategy: SelectionStrategy,
    /// Credentials this request already tried.
    pub exclude: &'a [String],
    pub kind: ReservationKind,
    /// When an unreported lease is settled at its reservation.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Tokens held on a credential until settled or released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: String,
    pub credential_id: String,
    pub tokens: u64,
}

/// Why nothing could be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The provider has no credential at all.
    NoCredentials,
    /// Every credential is exhausted, cooling down or full of reservations; the earliest may be
    /// usable again in this many seconds. `in_flight`: some credential has room but for the
    /// reservations of requests in flight, which settlements will free.
    Busy { retry_after: u64, in_flight: bool },
    /// Every credential is disabled, invalid or expired (or was tried already).
    Unusable,
}

/// What happened to the credential that made a request fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    Invalid(String),
    Exhausted(String),
    Cooldown {
        until: DateTime<Utc>,
        reason: String,
    },
}

impl Mark {
    /// One line for the auth log.
    pub fn describe(&self) -> String {
        match self {
            Mark::Invalid(r) => format!("invalid: {r}"),
            Mark::Exhausted(r) => format!("exhausted: {r}"),
            Mark::Cooldown { until, reason } => {
                format!(
                    "cooling down until {}: {reason}",
                    crate::domain::rfc3339(*until)
                )
            }
        }
    }
}

fn new_reservation_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("res_{suffix}")
}

fn clamp(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

impl Store {
    /// Pick a credential by `strategy` among the usable ones with room for the tokens, and
    /// reserve them, in one transaction.
    pub async fn reserve(
        &self,
        req: &ReserveRequest<'_>,
        now: DateTime<Utc>,
    ) -> Result<std::result::Result<Reservation, Unavailable>> {
        let ts = now.timestamp();
        let tokens = clamp(req.tokens);
        let mut tx = self.begin_write().await?;
        let candidates: Vec<Candidate> = sqlx::query!(
            r#"SELECT c.id, c.seq, c.priority, q.limit_tokens, q.used, q.reserved, q.last_pick
               FROM credentials c JOIN quotas q ON q.credential_id = c.id
               WHERE c.provider = ?1 AND c.disabled = 0 AND c.state = 'active'
                 AND c.token_sealed IS NOT NULL
                 AND (c.expires_at IS NULL OR c.expires_at > ?2)
                 AND (c.cooldown_until IS NULL OR c.cooldown_until <= ?2)
                 AND (q.limit_tokens IS NULL OR q.used + q.reserved + ?3 <= q.limit_tokens)"#,
            req.provider,
            ts,
            tokens
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .filter(|r| !req.exclude.contains(&r.id))
        .map(|r| Candidate {
            id: r.id,
            seq: r.seq,
            priority: r.priority,
            limit: r.limit_tokens.map(|l| l.max(0) as u64),
            used: r.used.max(0) as u64,
            reserved: r.reserved.max(0) as u64,
            last_pick: r.last_pick,
        })
        .collect();
        let Some(i) = selection::pick(req.strategy, &candidates) else {
            drop(tx);
            return Ok(Err(self.why_unavailable(req, now).await?));
        };
        let credential_id = candidates[i].id.clone();
        let pick_no = self.picks.fetch_add(1, Ordering::Relaxed) + 1;
        let changed = sqlx::query!(
            "UPDATE quotas SET reserved = reserved + ?1, last_pick = ?2
             WHERE credential_id = ?3
               AND (limit_tokens IS NULL OR used + reserved + ?1 <= limit_tokens)",
            tokens,
            pick_no,
            credential_id
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed != 1 {
            // Cannot happen inside this transaction; refuse rather than overdraw.
            return Ok(Err(Unavailable::Busy {
                retry_after: 1,
                in_flight: true,
            }));
        }
        let id = new_reservation_id();
        let kind = req.kind.as_str();
        let expires_at = req.expires_at.map(|t| t.timestamp());
        sqlx::query!(
            "INSERT INTO reservations (id, credential_id, kind, tokens, owner, created_at, expires_at, provider)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            id,
            credential_id,
            kind,
            tokens,
            self.instance,
            ts,
            expires_at,
            req.provider
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(Reservation {
            id,
            credential_id,
            tokens: req.tokens,
        }))
    }

    /// Reserve as [`Store::reserve`], but when the only obstacle is room held by requests in
    /// flight, wait (up to `patience`) for their settlements to free it instead of failing.
    pub async fn reserve_waiting(
        &self,
        req: &ReserveRequest<'_>,
        now: impl Fn() -> DateTime<Utc>,
        patience: std::time::Duration,
    ) -> Result<std::result::Result<Reservation, Unavailable>> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let freed = self.freed.notified();
            match self.reserve(req, now()).await? {
                Err(Unavailable::Busy {
                    in_flight: true, ..
                }) if tokio::time::Instant::now() < deadline => {
                    // A settlement wakes us; the timer covers one that landed just before.
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(50), freed).await;
                }
                other => return Ok(other),
            }
        }
    }

    /// Why `reserve` found nothing: no credentials, all temporarily busy (with the earliest
    /// time one may be usable again), or all unusable.
    async fn why_unavailable(
        &self,
        req: &ReserveRequest<'_>,
        now: DateTime<Utc>,
    ) -> Result<Unavailable> {
        let ts = now.timestamp();
        let rows = sqlx::query!(
            r#"SELECT c.id, c.disabled AS "disabled!: bool", c.state, c.expires_at, c.cooldown_until,
                      c.token_sealed IS NOT NULL AS "has_token!: bool",
                      q.limit_tokens, q.used, q.reserved, q.period_start,
                      (SELECT COALESCE(SUM(r.tokens), 0) FROM reservations r
                       WHERE r.credential_id = c.id AND r.kind = 'lease') AS "leased!: i64"
               FROM credentials c JOIN quotas q ON q.credential_id = c.id
               WHERE c.provider = ?"#,
            req.provider
        )
        .fetch_all(&self.reader)
        .await?;
        if rows.is_empty() {
            return Ok(Unavailable::NoCredentials);
        }
        let schedule = self
            .schedules
            .get(req.provider)
            .cloned()
            .unwrap_or(crate::quota::ResetSchedule::Never);
        let mut earliest: Option<i64> = None;
        let mut in_flight = false;
        let mut consider = |at: i64| earliest = Some(earliest.map_or(at, |e| e.min(at)));
        for r in &rows {
            if r.disabled || !r.has_token || r.state == "invalid" || r.state == "expired" {
                continue;
            }
            if r.expires_at.is_some_and(|e| e <= ts) || req.exclude.contains(&r.id) {
                continue;
            }
            let full = r.limit_tokens.is_some_and(|l| r.used >= l);
            if r.state == "exhausted" || full {
                if let Some(next) = schedule.next_reset(crate::domain::from_unix(r.period_start)) {
                    consider(next.timestamp());
                }
                continue;
            }
            if let Some(until) = r.cooldown_until.filter(|u| *u > ts) {
                consider(until);
                continue;
            }
            // Room is taken by requests in flight (their settlements will free it soon), by
            // leases (held until reported), or the request is larger than what is left.
            let tokens = clamp(req.tokens);
            match r.limit_tokens {
                Some(l) if r.used + r.leased + tokens > l => {
                    if let Some(next) =
                        schedule.next_reset(crate::domain::from_unix(r.period_start))
                    {
                        consider(next.timestamp());
                    }
                }
                _ => {
                    in_flight = true;
                    consider(ts + 1);
                }
            }
        }
        Ok(match earliest {
            Some(at) => Unavailable::Busy {
                retry_after: (at - ts).max(1) as u64,
                in_flight,
            },
            None => Unavailable::Unusable,
        })
    }

    /// Settle a reservation with the usage reported. With `at_least_reserved` (a stream cut
    /// short, a lease reported without usage) the charge is at least the reservation; the part
    /// beyond the reported usage is recorded as unreported. Returns `false` when the
    /// reservation was already settled or released.
    pub async fn settle(
        &self,
        reservation_id: &str,
        usage: Usage,
        at_least_reserved: bool,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let ts = now.timestamp();
        let mut tx = self.begin_write().await?;
        let Some(res) = sqlx::query!(
            "DELETE FROM reservations WHERE id = ? RETURNING credential_id, tokens, provider",
            reservation_id
        )
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(false);
        };
        let input = clamp(usage.input);
        let output = clamp(usage.output);
        let unreported = if at_least_reserved {
            (res.tokens - input.saturating_add(output)).max(0)
        } else {
            0
        };
        let charged = input.saturating_add(output).saturating_add(unreported);
        sqlx::query!(
            "UPDATE quotas SET used = used + ?1, reserved = max(reserved - ?2, 0)
             WHERE credential_id = ?3",
            charged,
            res.tokens,
            res.credential_id
        )
        .execute(&mut *tx)
        .await?;
        let bucket = ts - ts.rem_euclid(3600);
        sqlx::query!(
            "INSERT INTO usage_hourly (credential_id, provider, bucket_start, requests, input_tokens, output_tokens, unreported_tokens)
             VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6)
             ON CONFLICT (credential_id, bucket_start) DO UPDATE SET
                 requests = requests + 1,
                 input_tokens = input_tokens + excluded.input_tokens,
                 output_tokens = output_tokens + excluded.output_tokens,
                 unreported_tokens = unreported_tokens + excluded.unreported_tokens",
            res.credential_id,
            res.provider,
            bucket,
            input,
            output,
            unreported
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "UPDATE credentials SET last_used_at = ? WHERE id = ?",
            ts,
            res.credential_id
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.freed.notify_waiters();
        Ok(true)
    }

    /// Release a reservation unused (the request failed before using anything), marking the
    /// credential when the failure was its own. Returns `false` when already settled.
    pub async fn release(
        &self,
        reservation_id: &str,
        mark: Option<&Mark>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let ts = now.timestamp();
        let mut tx = self.begin_write().await?;
        let Some(res) = sqlx::query!(
            "DELETE FROM reservations WHERE id = ? RETURNING credential_id, tokens",
            reservation_id
        )
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(false);
        };
        sqlx::query!(
            "UPDATE quotas SET reserved = max(reserved - ?, 0) WHERE credential_id = ?",
            res.tokens,
            res.credential_id
        )
        .execute(&mut *tx)
        .await?;
        if let Some(mark) = mark {
            mark_credential(&mut tx, &res.credential_id, mark, ts).await?;
        }
        tx.commit().await?;
        self.freed.notify_waiters();
        Ok(true)
    }

    /// Mark a credential without a reservation (a lease's token that does not open).
    pub async fn mark(&self, credential_id: &str, mark: &Mark, now: DateTime<Utc>) -> Result<()> {
        let mut tx = self.begin_write().await?;
        mark_credential(&mut tx, credential_id, mark, now.timestamp()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// At start: charge in full every request reservation left by a process that is gone (it
    /// may have used the tokens), and settle expired leases. One transaction; returns the
    /// number of reservations and tokens charged.
    pub async fn settle_dead(&self, now: DateTime<Utc>) -> Result<(u64, u64)> {
        let ts = now.timestamp();
        let mut tx = self.begin_write().await?;
        let dead = sqlx::query!(
            "DELETE FROM reservations WHERE kind = 'request' AND owner <> ?
             RETURNING id, credential_id, tokens, provider",
            self.instance
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut tokens = 0u64;
        let mut audits = Vec::new();
        for r in &dead {
            sqlx::query!(
                "UPDATE quotas SET used = used + ?1, reserved = max(reserved - ?1, 0) WHERE credential_id = ?2",
                r.tokens,
                r.credential_id
            )
            .execute(&mut *tx)
            .await?;
            tokens += r.tokens.max(0) as u64;
            audits.push((
                r.credential_id.clone(),
                r.provider.clone(),
                r.id.clone(),
                r.tokens,
            ));
        }
        let entries: Vec<AuditEntry> = audits
            .iter()
            .map(|(cred, provider, id, t)| AuditEntry {
                now: ts,
                actor: "startup",
                action: "reservation.settle_dead",
                credential_id: Some(cred),
                provider: Some(provider),
                detail: json!({"reservation": id, "tokens": t}),
            })
            .collect();
        audit::record_all(&mut tx, &entries).await?;
        tx.commit().await?;
        Ok((dead.len() as u64, tokens))
    }

    /// Settle every lease past its expiry at its reservation. Returns how many.
    pub async fn expire_leases(&self, now: DateTime<Utc>) -> Result<usize> {
        let ids = sqlx::query_scalar!(
            "SELECT id FROM reservations WHERE kind = 'lease' AND expires_at <= ?",
            now.timestamp()
        )
        .fetch_all(&self.reader)
        .await?;
        let mut n = 0;
        for id in ids {
            if self.settle(&id, Usage::default(), true, now).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// A live lease: its credential and provider, if it exists and is a lease.
    pub async fn lease(&self, id: &str) -> Result<Option<(String, String)>> {
        Ok(sqlx::query!(
            "SELECT credential_id, provider FROM reservations WHERE id = ? AND kind = 'lease'",
            id
        )
        .fetch_optional(&self.reader)
        .await?
        .map(|r| (r.credential_id, r.provider)))
    }

    /// A credential's token and, when it does not open, why (the caller marks it).
    pub async fn open_token(
        &self,
        id: &str,
    ) -> Result<std::result::Result<crate::crypto::Secret, String>> {
        let sealed = sqlx::query_scalar!("SELECT token_sealed FROM credentials WHERE id = ?", id)
            .fetch_optional(&self.reader)
            .await?
            .flatten();
        Ok(match sealed {
            None => Err("the credential has no token".to_string()),
            Some(s) => self
                .sealer
                .open(id, Field::Token, &s)
                .map_err(|e| e.to_string()),
        })
    }

    /// Per credential: `used`, and the usage history of its current period (for checks).
    pub async fn usage_totals(&self) -> Result<Vec<(String, u64, u64)>> {
        Ok(sqlx::query!(
            r#"SELECT q.credential_id, q.used,
                      (SELECT COALESCE(SUM(u.input_tokens + u.output_tokens + u.unreported_tokens), 0)
                       FROM usage_hourly u
                       WHERE u.credential_id = q.credential_id AND u.bucket_start >= q.period_start - 3599)
                      AS "history!: i64"
               FROM quotas q"#
        )
        .fetch_all(&self.reader)
        .await?
        .into_iter()
        .map(|r| (r.credential_id, r.used.max(0) as u64, r.history.max(0) as u64))
        .collect())
    }
}

async fn mark_credential(
    conn: &mut sqlx::SqliteConnection,
    id: &str,
    mark: &Mark,
    ts: i64,
) -> Result<()> {
    match mark {
        Mark::Invalid(reason) | Mark::Exhausted(reason) => {
            let state = if matches!(mark, Mark::Invalid(_)) {
                "invalid"
            } else {
                "exhausted"
            };
            sqlx::query!(
                "UPDATE credentials SET state = ?, state_reason = ?, updated_at = ? WHERE id = ?",
                state,
                reason,
                ts,
                id
            )
            .execute(conn)
            .await?;
        }
        Mark::Cooldown { until, reason } => {
            let until = until.timestamp();
            sqlx::query!(
                "UPDATE credentials SET cooldown_until = max(COALESCE(cooldown_until, 0), ?1),
                     state_reason = CASE WHEN state = 'active' THEN ?2 ELSE state_reason END,
                     updated_at = ?3
                 WHERE id = ?4",
                until,
                reason,
                ts,
                id
            )
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}
