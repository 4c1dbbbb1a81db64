//! The ledger: the request path's writes, committed in groups.
//!
//! One task owns the request path's writes, on a connection of its own. It takes every reserve, settle and release queued
//! while the previous group was committing, decides each against an in-memory mirror of the
//! counters and usable credentials, and commits the whole group in one `BEGIN IMMEDIATE`
//! transaction of a few set statements (one fsync for all of them), then answers each caller.
//! A reservation is answered only once its group is durable, so it is on disk before the
//! upstream call. The mirror is exact because every other write (management changes) happens
//! under the write side of `gate` and reloads it, while a group is decided and committed under
//! the read side.

use super::requests::{Mark, Reservation, ReservationKind, ReserveRequestOwned, Unavailable};
use super::{Result, Store, StoreError};
use crate::config::SelectionStrategy;
use crate::crypto::Secret;
use crate::providers::wire::Usage;
use crate::quota::ResetSchedule;
use crate::selection;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Connection, SqliteConnection};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

/// Most operations committed in one group.
const MAX_GROUP: usize = 2048;
/// How long settlements wait for a reservation to share their commit.
const SETTLE_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

#[derive(Debug, Clone)]
pub(super) struct HotCred {
    seq: i64,
    priority: i64,
    limit: Option<i64>,
    used: i64,
    reserved: i64,
    /// Reserved by leases (held until reported).
    leased: i64,
    disabled: bool,
    state: String,
    expires_at: Option<i64>,
    cooldown_until: Option<i64>,
    has_token: bool,
    period_start: i64,
}

impl HotCred {
    fn usable(&self, now: i64) -> bool {
        !self.disabled
            && self.state == "active"
            && self.has_token
            && self.expires_at.is_none_or(|e| e > now)
            && self.cooldown_until.is_none_or(|c| c <= now)
    }

    fn has_room(&self, tokens: i64) -> bool {
        self.limit
            .is_none_or(|l| self.used + self.reserved + tokens <= l)
    }
}

#[derive(Debug, Clone)]
struct HotRes {
    credential_id: String,
    tokens: i64,
    kind: ReservationKind,
}

/// A provider's credentials in selection order, with the round-robin cursors.
#[derive(Debug, Default)]
struct ProviderList {
    /// Ids by creation order.
    by_seq: Vec<String>,
    /// Ids by (priority, creation).
    by_priority: Vec<String>,
    /// The priority of each entry of `by_priority`.
    levels: Vec<i64>,
    rr_cursor: usize,
    /// Per priority level, the next position within that level.
    level_cursors: HashMap<i64, usize>,
}

/// The in-memory mirror of what the request path decides on.
#[derive(Debug, Default)]
pub(super) struct Hot {
    creds: HashMap<String, HotCred>,
    lists: HashMap<String, ProviderList>,
    reservations: HashMap<String, HotRes>,
    /// Opened tokens with the sealed value they came from: opened when the mirror is loaded,
    /// and kept across reloads while the stored value is unchanged.
    pub(super) tokens: HashMap<String, (Vec<u8>, Secret)>,
}

impl Hot {
    /// Pick a usable credential with room for `tokens`, not in `exclude`.
    fn pick(
        &mut self,
        provider: &str,
        tokens: i64,
        strategy: SelectionStrategy,
        exclude: &[String],
        now: i64,
    ) -> Option<String> {
        let creds = &self.creds;
        let list = self.lists.get_mut(provider)?;
        let ok = |id: &String| {
            !exclude.contains(id)
                && creds
                    .get(id)
                    .is_some_and(|c| c.usable(now) && c.has_room(tokens))
        };
        match strategy {
            SelectionStrategy::RoundRobin => {
                let (i, next) =
                    selection::rotate(list.by_seq.len(), list.rr_cursor, |i| ok(&list.by_seq[i]))?;
                list.rr_cursor = next;
                Some(list.by_seq[i].clone())
            }
            SelectionStrategy::Priority => {
                let levels: Vec<i64> = list
                    .by_priority
                    .iter()
                    .map(|id| creds[id].priority)
                    .collect();
                let i = selection::by_priority(&levels, &mut list.level_cursors, |i| {
                    ok(&list.by_priority[i])
                })?;
                Some(list.by_priority[i].clone())
            }
            SelectionStrategy::QuotaAware => {
                let rooms = list.by_seq.iter().map(|id| {
                    ok(id).then(|| {
                        let c = &creds[id];
                        c.limit
                            .map_or(u64::MAX, |l| (l - c.used - c.reserved).max(0) as u64)
                    })
                });
                selection::most_room(rooms).map(|i| list.by_seq[i].clone())
            }
        }
    }

    /// Why nothing could be picked.
    fn why(
        &self,
        provider: &str,
        tokens: i64,
        exclude: &[String],
        now: i64,
        schedule: &ResetSchedule,
    ) -> Unavailable {
        let Some(list) = self.lists.get(provider).filter(|l| !l.by_seq.is_empty()) else {
            return Unavailable::NoCredentials;
        };
        let mut earliest: Option<i64> = None;
        let mut in_flight = false;
        let mut consider = |at: i64| earliest = Some(earliest.map_or(at, |e| e.min(at)));
        for id in &list.by_seq {
            let c = &self.creds[id];
            if c.disabled || !c.has_token || c.state == "invalid" || c.state == "expired" {
                continue;
            }
            if c.expires_at.is_some_and(|e| e <= now) || exclude.contains(id) {
                continue;
            }
            let next_reset = || {
                schedule
                    .next_reset(crate::domain::from_unix(c.period_start))
                    .map(|t| t.timestamp())
            };
            if c.state == "exhausted" || c.limit.is_some_and(|l| c.used >= l) {
                if let Some(at) = next_reset() {
                    consider(at);
                }
                continue;
            }
            if let Some(until) = c.cooldown_until.filter(|u| *u > now) {
                consider(until);
                continue;
            }
            match c.limit {
                Some(l) if c.used + c.leased + tokens > l => {
                    if let Some(at) = next_reset() {
                        consider(at);
                    }
                }
                _ => {
                    in_flight = true;
                    consider(now + 1);
                }
            }
        }
        match earliest {
            Some(at) => Unavailable::Busy {
                retry_after: (at - now).max(1) as u64,
                in_flight,
            },
            None => Unavailable::Unusable,
        }
    }
}

/// One operation for the ledger task.
pub(super) enum Op {
    /// Close the ledger's connection and stop (the store is closing).
    Close { reply: oneshot::Sender<()> },
    Reserve {
        req: ReserveRequestOwned,
        now: DateTime<Utc>,
        reply: oneshot::Sender<Result<std::result::Result<Reservation, Unavailable>>>,
    },
    Settle {
        id: String,
        usage: Usage,
        at_least_reserved: bool,
        now: DateTime<Utc>,
        reply: oneshot::Sender<Result<bool>>,
    },
    Release {
        id: String,
        mark: Option<Mark>,
        now: DateTime<Utc>,
        reply: oneshot::Sender<Result<bool>>,
    },
}

/// A reply waiting for its group's commit.
enum Pending {
    Reserve(
        oneshot::Sender<Result<std::result::Result<Reservation, Unavailable>>>,
        std::result::Result<Reservation, Unavailable>,
    ),
    Done(oneshot::Sender<Result<bool>>, bool),
}

/// What a group writes.
#[derive(Default)]
struct Effects {
    /// New reservations, as rows for `json_each`.
    inserts: Vec<Value>,
    /// Settlements `[id, input, output, unreported, at]`: the settle trigger charges them.
    settles: Vec<Value>,
    /// Reservations settled or released in this group, deleted at its end.
    deletes: Vec<String>,
    marks: Vec<(String, Mark, i64)>,
}

fn res_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("res_{suffix}")
}

impl Store {
    /// Load the mirror from the database (under the gate's write side, or before the ledger
    /// task starts).
    pub(super) async fn load_hot(&self) -> Result<()> {
        let rows = sqlx::query!(
            r#"SELECT c.id, c.provider, c.seq, c.priority, c.disabled AS "disabled!: bool", c.state,
                      c.expires_at, c.cooldown_until, c.token_sealed,
                      q.limit_tokens, q.used, q.period_start
               FROM credentials c JOIN quotas q ON q.credential_id = c.id
               ORDER BY c.seq"#
        )
        .fetch_all(&self.writer)
        .await?;
        let reservations = sqlx::query!("SELECT id, credential_id, tokens, kind FROM reservations")
            .fetch_all(&self.writer)
            .await?;
        let mut hot = Hot::default();
        let old_tokens =
            std::mem::take(&mut self.hot.lock().unwrap_or_else(|p| p.into_inner()).tokens);
        for r in rows {
            if let Some(sealed) = &r.token_sealed {
                match old_tokens.get(&r.id) {
                    Some((was, secret)) if was == sealed => {
                        hot.tokens
                            .insert(r.id.clone(), (was.clone(), secret.clone()));
                    }
                    _ => {
                        // One that does not open is left out; `open_token` reports it on use.
                        if let Ok(secret) =
                            self.sealer.open(&r.id, crate::crypto::Field::Token, sealed)
                        {
                            hot.tokens.insert(r.id.clone(), (sealed.clone(), secret));
                        }
                    }
                }
            }
            hot.lists
                .entry(r.provider)
                .or_default()
                .by_seq
                .push(r.id.clone());
            hot.creds.insert(
                r.id,
                HotCred {
                    seq: r.seq,
                    priority: r.priority,
                    limit: r.limit_tokens,
                    used: r.used,
                    reserved: 0,
                    leased: 0,
                    disabled: r.disabled,
                    state: r.state,
                    expires_at: r.expires_at,
                    cooldown_until: r.cooldown_until,
                    has_token: r.token_sealed.is_some(),
                    period_start: r.period_start,
                },
            );
        }
        for r in reservations {
            let kind = if r.kind == "lease" {
                ReservationKind::Lease
            } else {
                ReservationKind::Request
            };
            if let Some(c) = hot.creds.get_mut(&r.credential_id) {
                c.reserved += r.tokens;
                if kind == ReservationKind::Lease {
                    c.leased += r.tokens;
                }
            }
            hot.reservations.insert(
                r.id,
                HotRes {
                    credential_id: r.credential_id,
                    tokens: r.tokens,
                    kind,
                },
            );
        }
        {
            let creds = &hot.creds;
            for list in hot.lists.values_mut() {
                list.by_priority = list.by_seq.clone();
                list.by_priority
                    .sort_by_key(|id| (creds[id].priority, creds[id].seq));
                list.levels = list
                    .by_priority
                    .iter()
                    .map(|id| creds[id].priority)
                    .collect();
            }
        }
        // Keep the round-robin positions across reloads, so a management change does not send
        // the next requests back to the first credential.
        let mut current = self.hot.lock().unwrap_or_else(|p| p.into_inner());
        for (provider, list) in hot.lists.iter_mut() {
            if let Some(old) = current.lists.get(provider) {
                list.rr_cursor = old.rr_cursor;
                list.level_cursors = old.level_cursors.clone();
            }
        }
        *current = hot;
        Ok(())
    }

    /// Start the ledger task. Called once the store is open.
    pub(super) fn start_ledger(
        &self,
        mut conn: SqliteConnection,
        mut rx: mpsc::UnboundedReceiver<Op>,
    ) {
        let store = self.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                if let Op::Close { reply } = first {
                    let _ = conn.close().await;
                    let _ = reply.send(());
                    return;
                }
                let mut ops = vec![first];
                loop {
                    while ops.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(Op::Close { reply }) => {
                                store.run_group(&mut conn, ops).await;
                                let _ = conn.close().await;
                                let _ = reply.send(());
                                return;
                            }
                            Ok(op) => ops.push(op),
                            Err(_) => break,
                        }
                    }
                    // Settlements may be committed a little later: wait briefly for a
                    // reservation to share their commit, so a quiet server spends one fsync
                    // per request rather than two. A reservation commits at once.
                    if ops.len() >= MAX_GROUP
                        || ops.iter().any(|op| matches!(op, Op::Reserve { .. }))
                    {
                        break;
                    }
                    match tokio::time::timeout(SETTLE_LINGER, rx.recv()).await {
                        Ok(Some(Op::Close { reply })) => {
                            store.run_group(&mut conn, ops).await;
                            let _ = conn.close().await;
                            let _ = reply.send(());
                            return;
                        }
                        Ok(Some(op)) => ops.push(op),
                        Ok(None) | Err(_) => break,
                    }
                }
                store.run_group(&mut conn, ops).await;
            }
        });
    }

    async fn run_group(&self, conn: &mut SqliteConnection, ops: Vec<Op>) {
        let _gate = self.gate.read().await;
        let mut effects = Effects::default();
        let mut pending = Vec::with_capacity(ops.len());
        {
            let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
            for op in ops {
                match op {
                    Op::Reserve { req, now, reply } => {
                        let result = self.decide_reserve(&mut hot, &req, now, &mut effects);
                        pending.push(Pending::Reserve(reply, result));
                    }
                    Op::Settle {
                        id,
                        usage,
                        at_least_reserved,
                        now,
                        reply,
                    } => {
                        let done = settle_in(
                            &mut hot,
                            &id,
                            usage,
                            at_least_reserved,
                            now.timestamp(),
                            &mut effects,
                        );
                        pending.push(Pending::Done(reply, done));
                    }
                    Op::Release {
                        id,
                        mark,
                        now,
                        reply,
                    } => {
                        let done = release_in(&mut hot, &id, mark, now.timestamp(), &mut effects);
                        pending.push(Pending::Done(reply, done));
                    }
                    Op::Close { .. } => unreachable!("Close is handled before a group"),
                }
            }
        }
        match self.commit_effects(conn, effects).await {
            Ok(()) => {
                self.freed.notify_waiters();
                for p in pending {
                    match p {
                        Pending::Reserve(reply, r) => {
                            let _ = reply.send(Ok(r));
                        }
                        Pending::Done(reply, done) => {
                            let _ = reply.send(Ok(done));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a group of request-path writes failed; reloading");
                if let Err(e) = self.load_hot().await {
                    tracing::error!(error = %e, "cannot reload the ledger's mirror");
                }
                let msg = e.to_string();
                for p in pending {
                    let err = || {
                        StoreError::Db(sqlx::Error::Protocol(format!("group commit failed: {msg}")))
                    };
                    match p {
                        Pending::Reserve(reply, _) => {
                            let _ = reply.send(Err(err()));
                        }
                        Pending::Done(reply, _) => {
                            let _ = reply.send(Err(err()));
                        }
                    }
                }
            }
        }
    }

    fn decide_reserve(
        &self,
        hot: &mut Hot,
        req: &ReserveRequestOwned,
        now: DateTime<Utc>,
        effects: &mut Effects,
    ) -> std::result::Result<Reservation, Unavailable> {
        let ts = now.timestamp();
        let tokens = req.tokens.min(i64::MAX as u64) as i64;
        let Some(credential_id) = hot.pick(&req.provider, tokens, req.strategy, &req.exclude, ts)
        else {
            let schedule = self
                .schedules
                .get(&req.provider)
                .cloned()
                .unwrap_or(ResetSchedule::Never);
            return Err(hot.why(&req.provider, tokens, &req.exclude, ts, &schedule));
        };
        let id = res_id();
        let c = hot
            .creds
            .get_mut(&credential_id)
            .expect("picked from the mirror");
        c.reserved += tokens;
        if req.kind == ReservationKind::Lease {
            c.leased += tokens;
        }
        hot.reservations.insert(
            id.clone(),
            HotRes {
                credential_id: credential_id.clone(),
                tokens,
                kind: req.kind,
            },
        );
        effects.inserts.push(json!([
            id,
            credential_id,
            if req.kind == ReservationKind::Lease {
                "lease"
            } else {
                "request"
            },
            tokens,
            &*self.instance,
            ts,
            req.expires_at.map(|t| t.timestamp()),
            req.provider,
        ]));
        Ok(Reservation {
            id,
            credential_id,
            tokens: req.tokens,
        })
    }

    async fn commit_effects(&self, conn: &mut SqliteConnection, e: Effects) -> Result<()> {
        if e.inserts.is_empty() && e.deletes.is_empty() && e.marks.is_empty() {
            return Ok(());
        }
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        if !e.inserts.is_empty() {
            let rows = Value::from(e.inserts).to_string();
            sqlx::query!(
                "INSERT INTO reservations (id, credential_id, kind, tokens, owner, created_at, expires_at, provider)
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7
                 FROM json_each(?)",
                rows
            )
            .execute(&mut *tx)
            .await?;
        }
        if !e.settles.is_empty() {
            let rows = Value::from(e.settles).to_string();
            sqlx::query!(
                "UPDATE reservations SET settle_input = d.i, settle_output = d.o,
                     settle_unreported = d.u, settled_at = d.at
                 FROM (SELECT value ->> 0 AS id, value ->> 1 AS i, value ->> 2 AS o,
                              value ->> 3 AS u, value ->> 4 AS at
                       FROM json_each(?)) AS d
                 WHERE reservations.id = d.id",
                rows
            )
            .execute(&mut *tx)
            .await?;
        }
        for (id, mark, ts) in &e.marks {
            super::requests::mark_credential(&mut tx, id, mark, *ts).await?;
        }
        if !e.deletes.is_empty() {
            let ids = Value::from(e.deletes).to_string();
            sqlx::query!(
                "DELETE FROM reservations WHERE id IN (SELECT value FROM json_each(?))",
                ids
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Settle in the mirror, recording the writes; `false` when already settled or released.
fn settle_in(
    hot: &mut Hot,
    id: &str,
    usage: Usage,
    at_least_reserved: bool,
    ts: i64,
    e: &mut Effects,
) -> bool {
    let Some(res) = hot.reservations.remove(id) else {
        return false;
    };
    let clamp = |n: u64| n.min(i64::MAX as u64) as i64;
    let (input, output) = (clamp(usage.input), clamp(usage.output));
    let unreported = if at_least_reserved {
        (res.tokens - input.saturating_add(output)).max(0)
    } else {
        0
    };
    let charged = input.saturating_add(output).saturating_add(unreported);
    if let Some(c) = hot.creds.get_mut(&res.credential_id) {
        c.reserved = (c.reserved - res.tokens).max(0);
        if res.kind == ReservationKind::Lease {
            c.leased = (c.leased - res.tokens).max(0);
        }
        c.used += charged;
    }
    e.settles.push(json!([id, input, output, unreported, ts]));
    e.deletes.push(id.to_string());
    true
}

/// Release in the mirror with an optional mark; `false` when already settled or released.
fn release_in(hot: &mut Hot, id: &str, mark: Option<Mark>, ts: i64, e: &mut Effects) -> bool {
    let Some(res) = hot.reservations.remove(id) else {
        return false;
    };
    if let Some(c) = hot.creds.get_mut(&res.credential_id) {
        c.reserved = (c.reserved - res.tokens).max(0);
        if res.kind == ReservationKind::Lease {
            c.leased = (c.leased - res.tokens).max(0);
        }
        if let Some(m) = &mark {
            apply_mark(c, m, ts);
        }
    }
    e.deletes.push(id.to_string());
    if let Some(m) = mark {
        e.marks.push((res.credential_id, m, ts));
    }
    true
}

/// The same change `mark_credential` makes in SQL, in the mirror.
fn apply_mark(c: &mut HotCred, mark: &Mark, _ts: i64) {
    match mark {
        Mark::Invalid(_) => c.state = "invalid".into(),
        Mark::Exhausted(_) => c.state = "exhausted".into(),
        Mark::Cooldown { until, .. } => {
            let until = until.timestamp();
            c.cooldown_until = Some(c.cooldown_until.map_or(until, |u| u.max(until)));
        }
    }
}
