//! The ledger: the request path's writes, committed in groups.
//!
//! One thread owns the request path's writes, on a connection of its own (`db.rs`). It takes
//! every reserve, settle and release queued while the previous group was committing, decides each against an in-memory mirror of the
//! counters and usable credentials, and commits the whole group in one `BEGIN IMMEDIATE`
//! transaction (one fsync for all of them), then answers each caller.
//! A reservation is answered only once its group is durable, so it is on disk before the
//! upstream call. The mirror is exact because every other write (management changes) happens
//! under the write side of `gate` and reloads it, while a group is decided and committed under
//! the read side.

mod db;
mod hot;

pub(super) use db::LedgerDb;
pub(super) use hot::{Hot, load};

use super::requests::{Mark, Reservation, ReservationKind, ReserveRequestOwned, Unavailable};
use super::{Result, StoreError};
use crate::crypto::Sealer;
use crate::providers::wire::Usage;
use crate::quota::ResetSchedule;
use chrono::{DateTime, Utc};
use db::{Effects, NewReservation, Settlement};
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
}

/// A reply waiting for its group's commit.
enum Pending {
    Reserve(
        oneshot::Sender<Result<std::result::Result<Reservation, Unavailable>>>,
        std::result::Result<Reservation, Unavailable>,
    ),
    /// A settlement or release: its reply, whether the mirror held it, and its reservation.
    Done(oneshot::Sender<Result<bool>>, bool, String),
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
            self.run_group(&mut db, ops);
            if let Some(reply) = close {
                drop(db);
                let _ = reply.send(());
                return;
            }
        }
    }

    fn run_group(&self, db: &mut LedgerDb, ops: Vec<Op>) {
        let _gate = self.gate.blocking_read();
        let mut effects = Effects::default();
        let mut pending = Vec::with_capacity(ops.len());
        {
            let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
            for op in ops {
                match op {
                    Op::Reserve { req, now, reply } => {
                        let result = self.decide_reserve(&mut hot, req, now, &mut effects);
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
                            let _ = reply.send(Ok(r));
                        }
                        Pending::Done(reply, done, id) => {
                            let _ = reply.send(Ok(done && !gone.contains(&id)));
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
                    }
                }
            }
        }
    }

    /// Reload the mirror from the database (after a group that failed or found reservations
    /// gone), on the runtime, waiting here for it (at most a minute: the mirror is then left
    /// as it is rather than the ledger stopped for good).
    fn reload(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let (writer, sealer, hot) = (self.writer.clone(), self.sealer.clone(), self.hot.clone());
        self.runtime.spawn(async move {
            let _ = done.send(hot::load(&writer, &sealer, &hot).await);
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

    fn decide_reserve(
        &self,
        hot: &mut Hot,
        req: ReserveRequestOwned,
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
        // A reservation (or lease) id: `res_` and 24 random lowercase letters and digits.
        let id = super::random_id("res_", 24);
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
                provider: req.provider.clone(),
                tokens,
                kind: req.kind,
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
            expires_at: req.expires_at.map(|t| t.timestamp()),
            provider: req.provider,
        });
        Ok(Reservation {
            id,
            credential_id,
            tokens: req.tokens,
        })
    }
}

/// Add to `ops` every operation queued, and for a group of settlements only, wait briefly for
/// more: settlements may be committed a little later, so a quiet server spends one fsync per
/// request rather than two. A reservation commits at once. Returns the reply of a `Close`
/// that came, after which nothing more is taken.
fn gather(rx: &Receiver<Op>, ops: &mut Vec<Op>) -> Option<oneshot::Sender<()>> {
    let mut reserves = ops.iter().any(|op| matches!(op, Op::Reserve { .. }));
    loop {
        while ops.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(Op::Close { reply }) => return Some(reply),
                Ok(op) => {
                    reserves |= matches!(op, Op::Reserve { .. });
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
                reserves |= matches!(op, Op::Reserve { .. });
                ops.push(op);
            }
            Err(_) => return None,
        }
    }
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
        c.used = c.used.saturating_add(charged);
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
        c.reserved = (c.reserved - res.tokens).max(0);
        if res.kind == ReservationKind::Lease {
            c.leased = (c.leased - res.tokens).max(0);
        }
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

/// The same change a mark makes in SQL (`db.rs`), in the mirror.
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
