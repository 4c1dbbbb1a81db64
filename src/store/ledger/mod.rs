//! The ledger: the request path's writes, committed in groups.
//!
//! One thread owns the request path's writes, on a connection of its own (`db.rs`). It takes
//! every reserve, settle, release and lease renewal queued while the previous group was committing, decides each against an in-memory mirror of the
//! counters and usable credentials, and commits the whole group in one `BEGIN IMMEDIATE`
//! transaction (one fsync for all of them), then answers each caller.
//! A reservation is answered only once its group is durable, so it is on disk before the
//! upstream call. The mirror is exact because every other write (management changes) happens
//! under the write side of `gate` and the mirror follows it there (`mirror.rs`), while a group
//! is decided and committed under the read side.

mod db;
mod hot;
mod mirror;

pub(super) use db::LedgerDb;
pub(super) use hot::Hot;
pub(super) use mirror::{MANY, Touched, follow, load};
#[cfg(debug_assertions)]
pub(super) use mirror::{Snapshot, difference, snapshot};

use super::reservation::{
    Mark, Renewal, RenewedLease, Reservation, ReservationKind, ReserveRequestOwned, Unavailable,
};
use super::{Result, StoreError};
use crate::crypto::Sealer;
use crate::domain::Usage;
use crate::domain::status::StoredState;
use crate::quota::ResetSchedule;
use chrono::{DateTime, Utc};
use db::{Effects, NewReservation, Renewed, Settlement};
use hot::{HotCred, HotRes};
use sqlx::SqlitePool;
use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Most operations committed in one group.
const MAX_GROUP: usize = 2048;
/// How long settlements wait for a reservation to share their commit.
const SETTLE_LINGER: std::time::Duration = std::time::Duration::from_millis(2);
/// How long the ledger waits for its mirror to reload.
const RELOAD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// One operation for the ledger.
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
    /// Extend a live lease by its length from `now`, unless its credential is out of use.
    Renew {
        id: String,
        now: DateTime<Utc>,
        reply: oneshot::Sender<Result<Renewal>>,
    },
    /// Settle a lease at its reservation if it is past its expiry at `now` (the sweep): decided
    /// here, not by the sweep's earlier read, so a renewal in between keeps the lease.
    Expire {
        id: String,
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
    /// A settlement or release: its reply, whether the mirror held it, and its reservation.
    Done(oneshot::Sender<Result<bool>>, bool, String),
    /// A renewal: its reply, what it did in the mirror, and its lease.
    Renew(oneshot::Sender<Result<Renewal>>, Renewal, String),
}

/// What the ledger's thread shares with the store.
pub(super) struct Ledger {
    pub hot: Arc<Mutex<Hot>>,
    pub gate: Arc<tokio::sync::RwLock<()>>,
    pub freed: Arc<tokio::sync::Notify>,
    pub schedules: BTreeMap<String, ResetSchedule>,
    /// To reload the mirror after a group that failed or found reservations gone.
    pub writer: SqlitePool,
    pub sealer: Sealer,
    pub runtime: tokio::runtime::Handle,
}

impl Ledger {
    /// Start the ledger's thread. It stops on [`Op::Close`], or when every sender is gone.
    pub fn start(self, db: LedgerDb, rx: Receiver<Op>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || self.run(db, rx))?;
        Ok(())
    }

    fn run(self, mut db: LedgerDb, rx: Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            if let Op::Close { reply } = first {
                drop(db);
                let _ = reply.send(());
                return;
            }
            let mut ops = vec![first];
            let close = gather(&rx, &mut ops);
            let orphans = self.run_group(&mut db, ops);
            if !orphans.is_empty() {
                // Their requests went away while the group committed (a client that
                // disconnected from a lease call): nobody will settle them, so they are
                // released now rather than held until the next start or a lease's expiry.
                tracing::warn!(
                    reservations = orphans.len(),
                    "reservations whose requests went away; releasing them"
                );
                let now = Utc::now();
                let releases = orphans
                    .into_iter()
                    .map(|id| Op::Release {
                        id,
                        mark: None,
                        now,
                        reply: oneshot::channel().0,
                    })
                    .collect();
                self.run_group(&mut db, releases);
            }
            if let Some(reply) = close {
                drop(db);
                let _ = reply.send(());
                return;
            }
        }
    }

    /// Decide and commit one group, then answer each caller. Returns the reservations made
    /// whose caller was gone by then.
    fn run_group(&self, db: &mut LedgerDb, ops: Vec<Op>) -> Vec<String> {
        let mut orphans = Vec::new();
        let _gate = self.gate.blocking_read();
        let mut effects = Effects::default();
        let mut pending = Vec::with_capacity(ops.len());
        {
            let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
            for op in ops {
                match op {
                    Op::Reserve { req, now, reply } => {
                        let result =
                            decide_reserve(&mut hot, &self.schedules, req, now, &mut effects);
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
                            id.clone(),
                            usage,
                            at_least_reserved,
                            now.timestamp(),
                            &mut effects,
                        );
                        pending.push(Pending::Done(reply, done, id));
                    }
                    Op::Release {
                        id,
                        mark,
                        now,
                        reply,
                    } => {
                        let done =
                            release_in(&mut hot, id.clone(), mark, now.timestamp(), &mut effects);
                        pending.push(Pending::Done(reply, done, id));
                    }
                    Op::Renew { id, now, reply } => {
                        let renewal = renew_in(&mut hot, &id, now.timestamp(), &mut effects);
                        pending.push(Pending::Renew(reply, renewal, id));
                    }
                    Op::Expire { id, now, reply } => {
                        let ts = now.timestamp();
                        let due = hot
                            .reservations
                            .get(&id)
                            .is_some_and(|r| r.expires_at.is_some_and(|e| e <= ts));
                        let done = due
                            && settle_in(
                                &mut hot,
                                id.clone(),
                                Usage::default(),
                                true,
                                ts,
                                &mut effects,
                            );
                        pending.push(Pending::Done(reply, done, id));
                    }
                    Op::Close { .. } => unreachable!("Close is handled before a group"),
                }
            }
        }
        match db.commit(&effects) {
            Ok(gone) => {
                if !gone.is_empty() {
                    // Another process settled these already (something run against the
                    // database outside this server: CLI commands leave live reservations
                    // alone, and a second server is refused); the mirror counted them again.
                    tracing::warn!(
                        reservations = gone.len(),
                        "reservations were already gone when settled or released; not charged again"
                    );
                    self.reload();
                }
                self.freed.notify_waiters();
                for p in pending {
                    match p {
                        Pending::Reserve(reply, r) => {
                            if let Err(Ok(Ok(r))) = reply.send(Ok(r)) {
                                orphans.push(r.id.into_string());
                            }
                        }
                        Pending::Done(reply, done, id) => {
                            let _ = reply.send(Ok(done && !gone.contains(&id)));
                        }
                        Pending::Renew(reply, renewal, id) => {
                            // A row another process settled is no lease any more.
                            let renewal = if gone.contains(&id) {
                                Renewal::NotFound
                            } else {
                                renewal
                            };
                            let _ = reply.send(Ok(renewal));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "a group of request-path writes failed; reloading");
                self.reload();
                let msg = e.to_string();
                for p in pending {
                    let err = || StoreError::GroupFailed(msg.clone());
                    match p {
                        Pending::Reserve(reply, _) => {
                            let _ = reply.send(Err(err()));
                        }
                        Pending::Done(reply, ..) => {
                            let _ = reply.send(Err(err()));
                        }
                        Pending::Renew(reply, ..) => {
                            let _ = reply.send(Err(err()));
                        }
                    }
                }
            }
        }
        orphans
    }

    /// Reload the mirror from the database (after a group that failed or found reservations
    /// gone), on the runtime, waiting here for it (at most a minute: the mirror is then left
    /// as it is rather than the ledger stopped for good).
    fn reload(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let (writer, sealer, hot) = (self.writer.clone(), self.sealer.clone(), self.hot.clone());
        self.runtime.spawn(async move {
            let _ = done.send(mirror::load(&writer, &sealer, &hot).await);
        });
        match wait.recv_timeout(RELOAD_PATIENCE) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot reload the ledger's mirror"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::error!("cannot reload the ledger's mirror: no answer within a minute")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => tracing::error!(
                "cannot reload the ledger's mirror: the runtime is gone or the reload panicked"
            ),
        }
    }
}

/// Decide one reservation against the mirror, recording its write. At least one token is
/// reserved, so a request that names none (a lease estimating 0) still needs room and is not
/// handed a credential that is already full; more than a counter can hold never fits.
fn decide_reserve(
    hot: &mut Hot,
    schedules: &BTreeMap<String, ResetSchedule>,
    req: ReserveRequestOwned,
    now: DateTime<Utc>,
    effects: &mut Effects,
) -> std::result::Result<Reservation, Unavailable> {
    let ts = now.timestamp();
    if req.tokens > crate::quota::MAX_COUNTER_TOKENS {
        // More than any counter can hold never fits (the API refuses far less than this).
        return Err(Unavailable::Exhausted);
    }
    let tokens = req.tokens.max(1) as i64;
    let Some(credential_id) = hot.pick(&req.provider, tokens, req.strategy, &req.exclude, ts)
    else {
        let schedule = schedules
            .get(&req.provider)
            .cloned()
            .unwrap_or(ResetSchedule::Never);
        return Err(hot.why(&req.provider, tokens, &req.exclude, ts, &schedule));
    };
    // A reservation (or lease) id: `res_` and 24 random lowercase letters and digits.
    let id = super::random_id("res_", 24);
    let Some(c) = hot.creds.get_mut(&credential_id) else {
        // `pick` only returns credentials of the mirror; should it not, nothing is reserved.
        return Err(Unavailable::Unusable);
    };
    c.reserved = c.reserved.saturating_add(tokens);
    if req.kind == ReservationKind::Lease {
        c.leased = c.leased.saturating_add(tokens);
    }
    let expires_at = req.expires_at.map(|t| t.timestamp());
    hot.reservations.insert(
        id.clone(),
        HotRes {
            credential_id: credential_id.clone(),
            provider: req.provider.clone(),
            tokens,
            kind: req.kind,
            expires_at,
            created_at: ts,
        },
    );
    effects.inserts.push(NewReservation {
        id: id.clone(),
        credential_id: credential_id.clone(),
        kind: match req.kind {
            ReservationKind::Lease => "lease",
            ReservationKind::Request => "request",
        },
        tokens,
        created_at: ts,
        expires_at,
        provider: req.provider,
    });
    Ok(Reservation {
        id: id.into(),
        credential_id: credential_id.into(),
        tokens: tokens as u64,
    })
}

/// Add to `ops` every operation queued, and for a group of settlements only, wait briefly for
/// more: settlements may be committed a little later, so a quiet server spends one fsync per
/// request rather than two. A reservation (or a renewal, whose caller waits) commits at once. Returns the reply of a `Close`
/// that came, after which nothing more is taken.
fn gather(rx: &Receiver<Op>, ops: &mut Vec<Op>) -> Option<oneshot::Sender<()>> {
    let waited = |op: &Op| matches!(op, Op::Reserve { .. } | Op::Renew { .. });
    let mut reserves = ops.iter().any(waited);
    loop {
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(Op::Close { reply }) => return Some(reply),
                Ok(op) => {
                    reserves |= waited(&op);
                    ops.push(op);
                }
                Err(_) => break,
            }
        }
        if reserves || ops.len() >= MAX_GROUP {
            return None;
        }
        match rx.recv_timeout(SETTLE_LINGER) {
            Ok(Op::Close { reply }) => return Some(reply),
            Ok(op) => {
                reserves |= waited(&op);
                ops.push(op);
            }
            Err(_) => return None,
        }
    }
}

/// The longest term a renewal gives (a lease's length is the server's own, minutes; this
/// bounds one read from an edited database).
const MAX_LEASE_TERM: i64 = 86_400;

/// Renew lease `id` in the mirror at `ts`, recording the write: its new expiry is `ts` plus its
/// length (`expires_at - created_at`, which the renewal keeps by moving `created_at` to `ts`),
/// never earlier than it was. A lease already past its expiry is the sweep's, not renewed.
fn renew_in(hot: &mut Hot, id: &str, ts: i64, e: &mut Effects) -> Renewal {
    let Some(res) = hot.reservations.get_mut(id) else {
        return match hot.gone_leases.get(id) {
            Some(&until) if until > ts => Renewal::CredentialDeleted,
            _ => Renewal::NotFound,
        };
    };
    let Some(expires_at) = res
        .expires_at
        .filter(|_| res.kind == ReservationKind::Lease)
    else {
        return Renewal::NotFound;
    };
    if expires_at <= ts {
        return Renewal::NotFound;
    }
    let Some(c) = hot.creds.get(&res.credential_id) else {
        // Reservations go with their credential; should one not, it is not renewed.
        return Renewal::CredentialDeleted;
    };
    let status = c.state().status(ts);
    if Renewal::refuses(status) {
        return Renewal::CredentialUnusable(status);
    }
    let term = expires_at
        .saturating_sub(res.created_at)
        .clamp(1, MAX_LEASE_TERM);
    let renewed = ts.saturating_add(term).max(expires_at);
    res.expires_at = Some(renewed);
    res.created_at = renewed - term;
    e.renewals.push(Renewed {
        id: id.to_string(),
        created_at: res.created_at,
        expires_at: renewed,
    });
    Renewal::Renewed(RenewedLease {
        credential_id: res.credential_id.clone().into(),
        provider: res.provider.clone().into(),
        expires_at: crate::domain::from_unix(renewed),
        token_expires_at: c.token_expires_at(),
    })
}

/// Settle in the mirror, recording the writes; `false` when already settled or released.
fn settle_in(
    hot: &mut Hot,
    id: String,
    usage: Usage,
    at_least_reserved: bool,
    ts: i64,
    e: &mut Effects,
) -> bool {
    let Some(res) = hot.reservations.remove(&id) else {
        return false;
    };
    // Usage arrives clamped (`Usage::reported`); clamped again so no caller can pass more.
    let clamp = |n: u64| n.min(crate::quota::MAX_REQUEST_TOKENS) as i64;
    let (input, output) = (clamp(usage.input), clamp(usage.output));
    let unreported = if at_least_reserved {
        res.tokens
            .saturating_sub(input.saturating_add(output))
            .max(0)
    } else {
        0
    };
    let charged = input.saturating_add(output).saturating_add(unreported);
    if let Some(c) = hot.creds.get_mut(&res.credential_id) {
        unhold(c, &res);
        // As the database's counter does (`db.rs`), saturating at the bound.
        c.used = c.used.saturating_add(charged).min(hot::MAX_COUNTER);
    }
    e.settles.push(Settlement {
        id,
        credential_id: res.credential_id,
        provider: res.provider,
        input,
        output,
        unreported,
        at: ts,
    });
    true
}

/// Release in the mirror with an optional mark; `false` when already settled or released.
fn release_in(hot: &mut Hot, id: String, mark: Option<Mark>, ts: i64, e: &mut Effects) -> bool {
    let Some(res) = hot.reservations.remove(&id) else {
        return false;
    };
    if let Some(c) = hot.creds.get_mut(&res.credential_id) {
        unhold(c, &res);
        if let Some(m) = &mark {
            apply_mark(c, m, ts);
        }
    }
    e.releases.push(id);
    if let Some(m) = mark {
        e.marks.push((res.credential_id, m, ts));
    }
    true
}

/// Take a reservation's tokens out of its credential's `reserved` (and `leased`).
fn unhold(c: &mut HotCred, res: &HotRes) {
    c.reserved = c.reserved.saturating_sub(res.tokens).max(0);
    if res.kind == ReservationKind::Lease {
        c.leased = c.leased.saturating_sub(res.tokens).max(0);
    }
}

/// The same change a mark makes in SQL (`db.rs`), in the mirror.
fn apply_mark(c: &mut HotCred, mark: &Mark, _ts: i64) {
    match mark {
        Mark::Invalid(_) => {
            c.state = StoredState::Invalid;
            c.exhausted_until = None;
        }
        Mark::Exhausted { until, .. } => {
            c.state = StoredState::Exhausted;
            c.exhausted_until = until.map(|u| u.timestamp());
        }
        Mark::Cooldown { until, .. } => {
            let until = until.timestamp();
            c.cooldown_until = Some(c.cooldown_until.map_or(until, |u| u.max(until)));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The ledger's decisions driven with arbitrary sizes and usages: a reservation is granted
    //! only when it fits under the limit beside what is used and reserved, whatever the
    //! numbers; `reserved` always equals the reservations held; counters never wrap.
    use super::hot::{HotCred, MAX_COUNTER, ProviderList};
    use super::*;
    use crate::config::SelectionStrategy;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const PROVIDER: &str = "openai";

    #[derive(Debug, Clone)]
    enum Step {
        Reserve {
            tokens: u64,
            lease: bool,
            strategy: SelectionStrategy,
        },
        Settle {
            pick: usize,
            input: u64,
            output: u64,
            at_least_reserved: bool,
        },
        Release {
            pick: usize,
            cooldown: bool,
        },
    }

    /// Token counts, the extremes first: 0, 1, the bounds, and the integer limits.
    fn tokens() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(crate::quota::MAX_REQUEST_TOKENS),
            Just(crate::quota::MAX_COUNTER_TOKENS),
            Just(i64::MAX as u64),
            Just(i64::MAX as u64 + 1),
            Just(u64::MAX),
            0u64..200,
            any::<u64>(),
        ]
    }

    /// A counter or limit as the mirror holds it (loaded within the counter bound).
    fn counter() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(MAX_COUNTER),
            Just(MAX_COUNTER - 1),
            0i64..300,
            0..=MAX_COUNTER,
        ]
    }

    fn strategy() -> impl Strategy<Value = SelectionStrategy> {
        prop_oneof![
            Just(SelectionStrategy::RoundRobin),
            Just(SelectionStrategy::QuotaAware),
            Just(SelectionStrategy::Priority),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (tokens(), any::<bool>(), strategy()).prop_map(|(tokens, lease, strategy)| {
                Step::Reserve {
                    tokens,
                    lease,
                    strategy,
                }
            }),
            (any::<usize>(), tokens(), tokens(), any::<bool>()).prop_map(
                |(pick, input, output, at_least_reserved)| Step::Settle {
                    pick,
                    input,
                    output,
                    at_least_reserved,
                }
            ),
            (any::<usize>(), any::<bool>())
                .prop_map(|(pick, cooldown)| Step::Release { pick, cooldown }),
        ]
    }

    /// Credentials: (limit, used, priority).
    fn creds() -> impl Strategy<Value = Vec<(Option<i64>, i64, i64)>> {
        prop::collection::vec(
            (
                proptest::option::weighted(0.8, counter()),
                counter(),
                0i64..3,
            ),
            1..5,
        )
    }

    fn mirror(creds: &[(Option<i64>, i64, i64)]) -> Hot {
        let mut hot = Hot::default();
        let mut list = ProviderList::default();
        for (i, (limit, used, priority)) in creds.iter().enumerate() {
            let id = format!("cred_{i}");
            list.by_seq.push(id.clone());
            hot.creds.insert(
                id,
                HotCred {
                    limit: *limit,
                    used: *used,
                    ..HotCred::at_rest(i as i64, *priority)
                },
            );
        }
        list.sort(&hot.creds);
        hot.lists.insert(PROVIDER.into(), list);
        hot
    }

    /// Run `steps`, checking every grant and the accounting after each step. With `honest`,
    /// usage never exceeds its reservation, and then no credential that started within its
    /// limit ever has `used + reserved` past it.
    fn run(creds: &[(Option<i64>, i64, i64)], steps: &[Step], honest: bool) {
        let mut hot = mirror(creds);
        let schedules = BTreeMap::new();
        let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let within: Vec<bool> = creds
            .iter()
            .map(|(limit, used, _)| limit.is_none_or(|l| *used <= l))
            .collect();
        let mut live: Vec<String> = Vec::new();
        for step in steps {
            let before: HashMap<String, HotCred> = hot.creds.clone();
            let mut effects = Effects::default();
            match step {
                Step::Reserve {
                    tokens,
                    lease,
                    strategy,
                } => {
                    let req = ReserveRequestOwned {
                        provider: PROVIDER.into(),
                        tokens: *tokens,
                        strategy: *strategy,
                        exclude: Vec::new(),
                        kind: if *lease {
                            ReservationKind::Lease
                        } else {
                            ReservationKind::Request
                        },
                        expires_at: lease.then(|| now + chrono::Duration::minutes(10)),
                    };
                    if let Ok(r) = decide_reserve(&mut hot, &schedules, req, now, &mut effects) {
                        let c = &before[r.credential_id.as_str()];
                        assert!(*tokens <= crate::quota::MAX_COUNTER_TOKENS);
                        let asked = i128::from((*tokens).max(1));
                        if let Some(limit) = c.limit {
                            let total = i128::from(c.used) + i128::from(c.reserved) + asked;
                            assert!(
                                total <= i128::from(limit),
                                "granted {tokens} on used {} reserved {} limit {limit}",
                                c.used,
                                c.reserved
                            );
                        }
                        assert_eq!(i128::from(r.tokens as i64), asked);
                        live.push(r.id.into_string());
                    }
                }
                Step::Settle {
                    pick,
                    input,
                    output,
                    at_least_reserved,
                } if !live.is_empty() => {
                    let id = live.swap_remove(pick % live.len());
                    let held = hot.reservations[&id].tokens as u64;
                    let (input, output) = if honest {
                        let input = input % (held + 1);
                        (input, output % (held - input + 1))
                    } else {
                        (*input, *output)
                    };
                    let usage = Usage { input, output };
                    let ts = now.timestamp();
                    assert!(settle_in(
                        &mut hot,
                        id.clone(),
                        usage,
                        *at_least_reserved,
                        ts,
                        &mut effects
                    ));
                    assert!(!settle_in(&mut hot, id, usage, true, ts, &mut effects));
                }
                Step::Release { pick, cooldown } if !live.is_empty() => {
                    let id = live.swap_remove(pick % live.len());
                    let mark = cooldown.then(|| Mark::Cooldown {
                        until: now,
                        reason: "test".into(),
                    });
                    let ts = now.timestamp();
                    assert!(release_in(&mut hot, id.clone(), mark, ts, &mut effects));
                    assert!(!release_in(&mut hot, id, None, ts, &mut effects));
                }
                _ => {}
            }
            for (id, c) in &hot.creds {
                let held: i128 = hot
                    .reservations
                    .values()
                    .filter(|r| &r.credential_id == id)
                    .map(|r| i128::from(r.tokens))
                    .sum();
                let leased: i128 = hot
                    .reservations
                    .values()
                    .filter(|r| &r.credential_id == id && r.kind == ReservationKind::Lease)
                    .map(|r| i128::from(r.tokens))
                    .sum();
                assert_eq!(i128::from(c.reserved), held, "{id} reserved");
                assert_eq!(i128::from(c.leased), leased, "{id} leased");
                let was = &before[id];
                assert!(c.used >= was.used.min(MAX_COUNTER), "{id}: used went down");
                assert!(
                    c.used <= was.used.max(MAX_COUNTER),
                    "{id}: used past the bound"
                );
                let i = id["cred_".len()..].parse::<usize>().unwrap();
                if honest
                    && within[i]
                    && let Some(limit) = c.limit
                {
                    let total = i128::from(c.used) + i128::from(c.reserved);
                    assert!(total <= i128::from(limit), "{id}: {total} of {limit}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

        #[test]
        fn grants_never_pass_a_limit(creds in creds(), steps in prop::collection::vec(step(), 1..40)) {
            run(&creds, &steps, false);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn honest_usage_keeps_used_and_reserved_within_limits(
            creds in creds(),
            steps in prop::collection::vec(step(), 1..40),
        ) {
            run(&creds, &steps, true);
        }
    }

    /// A renewal gives the lease its length again from its time (never less than it had), keeps
    /// that length for the next one, and refuses a lease that is gone, past its expiry, or
    /// whose credential is out of use; the expiry sweep settles only what is due.
    #[test]
    fn renewals_keep_the_leases_length() {
        let mut hot = mirror(&[(Some(1000), 0, 0)]);
        let t0 = 1_800_000_000;
        let res = |expires_at| HotRes {
            credential_id: "cred_0".into(),
            provider: PROVIDER.into(),
            tokens: 10,
            kind: ReservationKind::Lease,
            expires_at: Some(expires_at),
            created_at: t0,
        };
        hot.reservations.insert("res_a".into(), res(t0 + 600));
        let mut e = Effects::default();
        let Renewal::Renewed(r) = renew_in(&mut hot, "res_a", t0 + 100, &mut e) else {
            panic!("not renewed");
        };
        assert_eq!(r.expires_at.timestamp(), t0 + 700);
        assert_eq!(r.token_expires_at, None);
        assert_eq!(hot.reservations["res_a"].created_at, t0 + 100);
        // A clock gone back never shortens it; the length stays 600.
        assert!(matches!(
            renew_in(&mut hot, "res_a", t0, &mut e),
            Renewal::Renewed(_)
        ));
        assert_eq!(hot.reservations["res_a"].expires_at, Some(t0 + 700));
        let Renewal::Renewed(r) = renew_in(&mut hot, "res_a", t0 + 650, &mut e) else {
            panic!("not renewed");
        };
        assert_eq!(r.expires_at.timestamp(), t0 + 1250);
        assert_eq!(e.renewals.len(), 3);
        // Past its expiry: the sweep's.
        assert_eq!(
            renew_in(&mut hot, "res_a", t0 + 1250, &mut e),
            Renewal::NotFound
        );
        assert_eq!(renew_in(&mut hot, "res_b", t0, &mut e), Renewal::NotFound);
        // Out of use: refused, and left as it was.
        hot.creds.get_mut("cred_0").unwrap().disabled = true;
        assert_eq!(
            renew_in(&mut hot, "res_a", t0 + 700, &mut e),
            Renewal::CredentialUnusable(crate::domain::Status::Disabled)
        );
        assert_eq!(hot.reservations["res_a"].expires_at, Some(t0 + 1250));
        assert_eq!(e.renewals.len(), 3);
        // A lease that went with its deleted credential says so until its expiry.
        hot.remember_gone_lease("res_c".into(), t0 + 600);
        assert_eq!(
            renew_in(&mut hot, "res_c", t0, &mut e),
            Renewal::CredentialDeleted
        );
        assert_eq!(
            renew_in(&mut hot, "res_c", t0 + 600, &mut e),
            Renewal::NotFound
        );
        // Remembered leases are bounded.
        for i in 0..3 * hot::GONE_LEASES {
            hot.remember_gone_lease(format!("res_{i}"), t0 + i as i64);
        }
        assert!(hot.gone_leases.len() <= hot::GONE_LEASES);
    }

    #[test]
    fn the_sql_bound_is_the_counter_bound() {
        let bound = crate::quota::MAX_COUNTER_TOKENS.to_string();
        for sql in super::db::BOUNDED_SQL {
            let mins = sql.matches("MIN(").count();
            assert!(mins > 0, "{sql}");
            assert_eq!(sql.matches(&bound).count(), mins, "{sql}");
        }
        // The start-up settlement of reservations left by a dead process (sqlx, checked at
        // compile time, so written out there).
        let settle_dead = include_str!("../requests.rs");
        assert!(settle_dead.contains(&format!("MIN(used + ?1, {bound})")));
        assert_eq!(MAX_COUNTER.to_string(), bound);
    }
}
