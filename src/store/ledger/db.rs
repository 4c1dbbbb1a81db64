//! The ledger's connection: a plain SQLite handle, driven directly by the ledger's own thread.
//!
//! Everything else in the store goes through sqlx, whose SQLite driver runs each statement on a
//! worker thread and hands it back: about 35 µs per statement here, so 100 µs of the 0.3 ms a
//! request may add went to hand-offs of `BEGIN`, one write and `COMMIT` alone. The ledger owns
//! a thread anyway, so it calls SQLite itself (rusqlite over the same `libsqlite3-sys` that
//! sqlx links, so one SQLite library is in the process). Its statements are not checked at
//! compile time like the rest; instead every one is prepared when the ledger opens, so a
//! statement that does not fit the migrated schema stops the start, and each test's start
//! checks them.

use super::super::reservation::Mark;
use crate::domain::status::StoredState;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// A reservation made in this group.
pub(super) struct NewReservation {
    pub id: String,
    pub credential_id: String,
    pub kind: &'static str,
    pub tokens: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub provider: String,
}

/// A lease renewed in this group: its new term.
pub(super) struct Renewed {
    pub id: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// A settlement, charged to the counter and the hour's usage history.
pub(super) struct Settlement {
    pub id: String,
    pub credential_id: String,
    pub provider: String,
    pub input: i64,
    pub output: i64,
    pub unreported: i64,
    pub at: i64,
}

/// One credential's usage in one hour, summed over a group's settlements.
#[derive(Default)]
struct Hour<'a> {
    provider: &'a str,
    requests: i64,
    input: i64,
    output: i64,
    unreported: i64,
}

/// What a group writes.
#[derive(Default)]
pub(super) struct Effects {
    pub inserts: Vec<NewReservation>,
    /// Leases renewed: written before the group's settlements and releases, so that a
    /// renewal decided before a report of the same lease finds its row.
    pub renewals: Vec<Renewed>,
    pub settles: Vec<Settlement>,
    /// Reservations released unused.
    pub releases: Vec<String>,
    /// Marks on credentials whose failure released a reservation: (credential, mark, when).
    pub marks: Vec<(String, Mark, i64)>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty()
            && self.renewals.is_empty()
            && self.settles.is_empty()
            && self.releases.is_empty()
            && self.marks.is_empty()
    }
}

const INSERT: &str = "INSERT INTO reservations
        (id, credential_id, kind, tokens, owner, created_at, expires_at, provider)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
// Counters saturate at the counter bound (10^15, `quota::MAX_COUNTER_TOKENS`): an SQLite
// integer sum past 2^63 would silently become a float, and MIN keeps even that an integer.
/// The statements that saturate at the counter bound, for the test that ties them to it.
#[cfg(test)]
pub(super) const BOUNDED_SQL: [&str; 2] = [CHARGE, HISTORY];
const CHARGE: &str = "UPDATE quotas SET used = MIN(used + ?2, 1000000000000000), last_used_at = ?3
    WHERE credential_id = ?1";
const HISTORY: &str = "INSERT INTO usage_hourly
        (credential_id, provider, bucket_start, requests, input_tokens, output_tokens,
         unreported_tokens)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT (credential_id, bucket_start) DO UPDATE SET
        requests = MIN(requests + excluded.requests, 1000000000000000),
        input_tokens = MIN(input_tokens + excluded.input_tokens, 1000000000000000),
        output_tokens = MIN(output_tokens + excluded.output_tokens, 1000000000000000),
        unreported_tokens = MIN(unreported_tokens + excluded.unreported_tokens, 1000000000000000)";
const RENEW: &str = "UPDATE reservations SET created_at = ?2, expires_at = ?3
    WHERE id = ?1 AND kind = 'lease'";
const DELETE: &str = "DELETE FROM reservations WHERE id = ?1";
// A mark replaces the state, and with it any earlier exhausted-until date: the provider's
// latest word counts (`apply_mark` in `mod.rs` does the same to the mirror).
const MARK_STATE: &str = "UPDATE credentials
    SET state = ?1, state_reason = ?2, exhausted_until = ?3, updated_at = ?4
    WHERE id = ?5";
// The reason is kept only on a credential that reads as usable (active, or exhausted until a
// date now past), so the reason of a mark that still holds is not overwritten.
const MARK_COOLDOWN: &str = "UPDATE credentials
    SET cooldown_until = max(COALESCE(cooldown_until, 0), ?1),
        state_reason = CASE WHEN state = 'active'
                                 OR (state = 'exhausted' AND exhausted_until <= ?3)
                            THEN ?2 ELSE state_reason END,
        updated_at = ?3
    WHERE id = ?4";
const STATEMENTS: [&str; 7] = [
    INSERT,
    RENEW,
    CHARGE,
    HISTORY,
    DELETE,
    MARK_STATE,
    MARK_COOLDOWN,
];

pub(in crate::store) struct LedgerDb {
    conn: Connection,
    /// This process's name on its reservations.
    owner: String,
}

impl LedgerDb {
    /// Open the (migrated) database with the pragmas of the store's other connections, and
    /// prepare every statement.
    pub(in crate::store) fn open(path: &Path, owner: &str) -> rusqlite::Result<LedgerDb> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.set_prepared_statement_cache_capacity(STATEMENTS.len());
        for sql in STATEMENTS {
            conn.prepare_cached(sql)?;
        }
        Ok(LedgerDb {
            conn,
            owner: owner.to_string(),
        })
    }

    /// Write a group in one `BEGIN IMMEDIATE` transaction: one fsync for all of it. On an
    /// error nothing of it stays. Returns the reservations settled, released or renewed whose
    /// row was already gone (another process settled it): those were not charged again, and
    /// the caller's mirror, which counted them, needs reloading.
    #[tracing::instrument(level = "debug", skip_all, fields(reservations = e.inserts.len(), renewals = e.renewals.len(), settlements = e.settles.len(), releases = e.releases.len(), marks = e.marks.len()))]
    pub(super) fn commit(&mut self, e: &Effects) -> rusqlite::Result<Vec<String>> {
        if e.is_empty() {
            return Ok(Vec::new());
        }
        let written = self.write(e);
        if written.is_err() && !self.conn.is_autocommit() {
            // The transaction's drop rolls back but ignores a failed ROLLBACK; never leave
            // the connection inside one, or every later group would fail on BEGIN.
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::error!(error = %e, "the ledger cannot roll back a failed group");
            }
        }
        written
    }

    fn write(&mut self, e: &Effects) -> rusqlite::Result<Vec<String>> {
        let mut gone = Vec::new();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !e.inserts.is_empty() {
            let mut insert = tx.prepare_cached(INSERT)?;
            for r in &e.inserts {
                insert.execute(params![
                    r.id,
                    r.credential_id,
                    r.kind,
                    r.tokens,
                    self.owner,
                    r.created_at,
                    r.expires_at,
                    r.provider
                ])?;
            }
        }
        if !e.renewals.is_empty() {
            let mut renew = tx.prepare_cached(RENEW)?;
            for r in &e.renewals {
                if renew.execute(params![r.id, r.created_at, r.expires_at])? == 0 {
                    gone.push(r.id.clone());
                }
            }
        }
        if !e.settles.is_empty() || !e.releases.is_empty() {
            let mut delete = tx.prepare_cached(DELETE)?;
            let mut charge = tx.prepare_cached(CHARGE)?;
            let mut history = tx.prepare_cached(HISTORY)?;
            // Deleting the row first makes a settlement apply once: one whose row is gone
            // charges nothing. What is charged is summed per credential and per hour, so a
            // group writes each counter and each hour's history row once.
            let mut counters: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
            let mut hours: BTreeMap<(&str, i64), Hour> = BTreeMap::new();
            for s in &e.settles {
                if delete.execute(params![s.id])? == 0 {
                    gone.push(s.id.clone());
                    continue;
                }
                let total = s
                    .input
                    .saturating_add(s.output)
                    .saturating_add(s.unreported);
                let counter = counters.entry(&s.credential_id).or_insert((0, s.at));
                counter.0 = counter.0.saturating_add(total);
                counter.1 = counter.1.max(s.at);
                let hour = hours
                    .entry((&s.credential_id, s.at - s.at.rem_euclid(3600)))
                    .or_insert_with(|| Hour {
                        provider: &s.provider,
                        ..Hour::default()
                    });
                hour.requests += 1;
                hour.input = hour.input.saturating_add(s.input);
                hour.output = hour.output.saturating_add(s.output);
                hour.unreported = hour.unreported.saturating_add(s.unreported);
            }
            for (credential, (total, at)) in counters {
                charge.execute(params![credential, total, at])?;
            }
            for ((credential, bucket), h) in hours {
                history.execute(params![
                    credential,
                    h.provider,
                    bucket,
                    h.requests,
                    h.input,
                    h.output,
                    h.unreported
                ])?;
            }
            for id in &e.releases {
                if delete.execute(params![id])? == 0 {
                    gone.push(id.clone());
                }
            }
        }
        for (id, mark, ts) in &e.marks {
            match mark {
                Mark::Invalid(reason) => {
                    tx.prepare_cached(MARK_STATE)?.execute(params![
                        StoredState::Invalid.as_str(),
                        reason,
                        None::<i64>,
                        ts,
                        id
                    ])?;
                }
                Mark::Exhausted { reason, until } => {
                    tx.prepare_cached(MARK_STATE)?.execute(params![
                        StoredState::Exhausted.as_str(),
                        reason,
                        until.map(|u| u.timestamp()),
                        ts,
                        id
                    ])?;
                }
                Mark::Cooldown { until, reason } => {
                    tx.prepare_cached(MARK_COOLDOWN)?.execute(params![
                        until.timestamp(),
                        reason,
                        ts,
                        id
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(gone)
    }
}
