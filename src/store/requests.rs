//! The request path's operations: pick a credential and reserve tokens on it (durable before
//! any upstream call), then settle what was used or release the reservation with a mark on the
//! credential. A reservation row exists from the one to the other, so a settlement applies
//! once, and a crash in between loses nothing: at start, reservations of a dead process are
//! charged in full. A lease's reservation may be renewed (its expiry moved) in between, by the
//! same ledger, so a renewal, a report and the expiry sweep are decided one after another. The writes themselves are committed in groups by the ledger's thread
//! (`ledger/`).

use super::audit::{self, AuditEntry};
use super::ledger::Op;
use super::reservation::{
    Mark, Renewal, Reservation, ReserveRequest, ReserveRequestOwned, Unavailable,
};
use super::{Result, Store, StoreError};
use crate::crypto::Field;
use crate::domain::{CredentialId, ProviderName, ReservationId, Usage};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::sync::Arc;
use tokio::sync::oneshot;

impl Store {
    async fn ask<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.ledger
            .send(op(tx))
            .map_err(|_| StoreError::LedgerGone)?;
        rx.await.map_err(|_| StoreError::LedgerGone)?
    }

    /// Pick a credential by `strategy` among the usable ones with room for the tokens, and
    /// reserve them. Answers once the reservation is durable.
    #[tracing::instrument(level = "debug", skip_all, fields(provider = req.provider.as_str(), tokens = req.tokens, kind = ?req.kind))]
    pub async fn reserve(
        &self,
        req: &ReserveRequest<'_>,
        now: DateTime<Utc>,
    ) -> Result<std::result::Result<Reservation, Unavailable>> {
        let req = ReserveRequestOwned {
            provider: req.provider.to_string(),
            tokens: req.tokens,
            strategy: req.strategy,
            exclude: req.exclude.iter().map(|c| c.to_string()).collect(),
            kind: req.kind,
            expires_at: req.expires_at,
        };
        self.ask(|reply| Op::Reserve { req, now, reply }).await
    }

    /// Reserve as [`Store::reserve`], but when the only obstacle is room held by requests in
    /// flight, wait (up to `patience`) for their settlements to free it instead of failing.
    #[tracing::instrument(level = "debug", skip_all, fields(provider = req.provider.as_str(), tokens = req.tokens))]
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

    /// Settle a reservation with the usage reported. With `at_least_reserved` (a stream cut
    /// short, a lease reported without usage) the charge is at least the reservation; the part
    /// beyond the reported usage is recorded as unreported. Returns `false` when the
    /// reservation was already settled or released.
    #[tracing::instrument(level = "debug", skip_all, fields(reservation = reservation_id.as_str(), input = usage.input, output = usage.output))]
    pub async fn settle(
        &self,
        reservation_id: &ReservationId,
        usage: Usage,
        at_least_reserved: bool,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let id = reservation_id.to_string();
        self.ask(|reply| Op::Settle {
            id,
            usage,
            at_least_reserved,
            now,
            reply,
        })
        .await
    }

    /// Queue a settlement (as [`Store::settle`]) without waiting for its commit. A failure is
    /// logged by the ledger; the reservation then stays, and the next start charges it.
    #[tracing::instrument(level = "debug", skip_all, fields(reservation = reservation_id.as_str(), input = usage.input, output = usage.output))]
    pub fn settle_later(
        &self,
        reservation_id: &ReservationId,
        usage: Usage,
        at_least_reserved: bool,
        now: DateTime<Utc>,
    ) {
        let (reply, _) = oneshot::channel();
        let id = reservation_id.to_string();
        self.tell(
            reservation_id,
            Op::Settle {
                id,
                usage,
                at_least_reserved,
                now,
                reply,
            },
        );
    }

    /// Queue a release without a mark (as [`Store::release`]) without waiting for it: for a
    /// request path that cannot wait (a reservation dropped while unwinding).
    #[tracing::instrument(level = "debug", skip_all, fields(reservation = reservation_id.as_str()))]
    pub fn release_later(&self, reservation_id: &ReservationId, now: DateTime<Utc>) {
        let (reply, _) = oneshot::channel();
        let id = reservation_id.to_string();
        self.tell(
            reservation_id,
            Op::Release {
                id,
                mark: None,
                now,
                reply,
            },
        );
    }

    /// Queue an operation on a reservation whose outcome nobody waits for.
    fn tell(&self, reservation_id: &ReservationId, op: Op) {
        if self.ledger.send(op).is_err() {
            tracing::error!(
                reservation = reservation_id.as_str(),
                "the ledger is gone; the reservation stays for the next start"
            );
        }
    }

    /// Release a reservation unused (the request failed before using anything), marking the
    /// credential when the failure was its own. Returns `false` when already settled.
    #[tracing::instrument(level = "debug", skip_all, fields(reservation = reservation_id.as_str(), marked = mark.is_some()))]
    pub async fn release(
        &self,
        reservation_id: &ReservationId,
        mark: Option<&Mark>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let id = reservation_id.to_string();
        let mark = mark.cloned();
        self.ask(|reply| Op::Release {
            id,
            mark,
            now,
            reply,
        })
        .await
    }

    /// At start: charge in full every request reservation left by a process that is gone (it
    /// may have used the tokens). One transaction; returns the number of reservations and
    /// tokens charged.
    #[tracing::instrument(skip_all)]
    pub async fn settle_dead(&self, now: DateTime<Utc>) -> Result<(u64, u64)> {
        self.exclusive(async {
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
                // Deleting the row took the tokens out of `reserved`; charge them.
                sqlx::query!(
                    "UPDATE quotas SET used = MIN(used + ?1, 1000000000000000)
                     WHERE credential_id = ?2",
                    r.tokens,
                    r.credential_id
                )
                .execute(&mut *tx)
                .await?;
                tokens = tokens.saturating_add(r.tokens.max(0) as u64);
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
            Ok(super::Written::everything((dead.len() as u64, tokens)))
        })
        .await
    }

    /// Settle every lease past its expiry at its reservation. Returns how many. The ledger
    /// checks each one's expiry again when it settles it, so a lease renewed since this read
    /// is kept.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn expire_leases(&self, now: DateTime<Utc>) -> Result<usize> {
        let ids = sqlx::query_scalar!(
            "SELECT id FROM reservations WHERE kind = 'lease' AND expires_at <= ?",
            now.timestamp()
        )
        .fetch_all(&self.reader)
        .await?;
        let mut n = 0;
        for id in ids {
            if self.ask(|reply| Op::Expire { id, now, reply }).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Renew lease `id` at `now`: a live lease whose credential is still in use gets its length
    /// again from `now`, committed with the ledger's group (the mirror, the database and the
    /// expiry sweep see the same expiry). A lease reported, released or past its expiry is
    /// [`Renewal::NotFound`]; one whose credential is out of use is left as it was.
    #[tracing::instrument(level = "debug", skip_all, fields(lease = id.as_str()))]
    pub async fn renew_lease(&self, id: &ReservationId, now: DateTime<Utc>) -> Result<Renewal> {
        let id = id.to_string();
        self.ask(|reply| Op::Renew { id, now, reply }).await
    }

    /// The access-token expiry of credential `id` as the mirror holds it now (`None` for an
    /// API key, a token without one, or a credential the mirror does not hold).
    pub fn token_expires_at(&self, id: &CredentialId) -> Option<DateTime<Utc>> {
        let hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
        hot.token_expires_at(id.as_str())
    }

    /// A live lease: its credential, its provider, and when it last handed out the
    /// credential's token (its grant or last renewal), if it exists and is a lease.
    #[tracing::instrument(level = "debug", skip_all, fields(lease = id.as_str()))]
    pub async fn lease(
        &self,
        id: &ReservationId,
    ) -> Result<Option<(CredentialId, ProviderName, DateTime<Utc>)>> {
        Ok(sqlx::query!(
            "SELECT credential_id, provider, created_at FROM reservations WHERE id = ? AND kind = 'lease'",
            id.as_str()
        )
        .fetch_optional(&self.reader)
        .await?
        .map(|r| {
            (
                CredentialId::from(r.credential_id),
                ProviderName::from(r.provider),
                crate::domain::from_unix(r.created_at),
            )
        }))
    }

    /// A credential's token and, when it does not open, why (the caller marks it). Opened
    /// tokens are kept in memory while the stored value is unchanged.
    #[tracing::instrument(level = "debug", skip_all, fields(credential = id.as_str()))]
    pub async fn open_token(
        &self,
        id: &CredentialId,
    ) -> Result<std::result::Result<Arc<crate::crypto::Secret>, String>> {
        if let Some((_, t)) = self
            .hot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tokens
            .get(id.as_str())
        {
            return Ok(Ok(t.clone()));
        }
        let sealed = sqlx::query_scalar!(
            "SELECT token_sealed FROM credentials WHERE id = ?",
            id.as_str()
        )
        .fetch_optional(&self.reader)
        .await?
        .flatten();
        Ok(match sealed {
            None => Err("the credential has no token".to_string()),
            Some(s) => match self.sealer.open(id.as_str(), Field::Token, &s) {
                Ok(token) => {
                    let token = Arc::new(token);
                    self.hot
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .tokens
                        .insert(id.to_string(), (s, token.clone()));
                    Ok(token)
                }
                Err(e) => Err(e.to_string()),
            },
        })
    }

    /// A copilot credential's API base (`extra.api_base`, as its last token answer named it
    /// and the allowlist allowed), from the mirror; `None` when it has none.
    pub fn api_base(&self, id: &CredentialId) -> Option<Arc<str>> {
        self.hot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .api_bases
            .get(id.as_str())
            .cloned()
    }

    /// Per credential: `used`, and the usage history of its current period (for checks).
    #[tracing::instrument(skip_all)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SelectionStrategy;
    use crate::crypto::{Encryption, Secret};
    use crate::domain::{CredentialKind, NewCredential, OauthExtra, Status};
    use crate::store::ListFilter;
    use crate::store::ReservationKind;

    /// A store in `dir` without encryption, schedules or default limits.
    async fn open_store(dir: &tempfile::TempDir) -> Store {
        Store::open(crate::store::test_options(dir.path(), Encryption::off()))
            .await
            .unwrap()
    }

    /// A reservation whose caller is gone by the time its group commits (a lease call whose
    /// client disconnected) is released by the ledger itself, not held until the next start.
    #[tokio::test]
    async fn a_reservation_nobody_waits_for_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let now = Utc::now();
        let new = NewCredential {
            provider: "claude".into(),
            kind: CredentialKind::ApiKey,
            token: Some(Secret::new("sk-ant-orphan")),
            refresh_token: None,
            client_secret: None,
            extra: OauthExtra::default(),
            priority: 100,
            label: None,
            limit: Some(Some(100)),
            used: 0,
            disabled: false,
            expires_at: None,
        };
        let id = store.add(&new, "api", "test", now).await.unwrap().id;
        for kind in [ReservationKind::Lease, ReservationKind::Request] {
            for tokens in [1, 60, 100] {
                let (reply, gone) = oneshot::channel();
                drop(gone);
                let req = ReserveRequestOwned {
                    provider: "claude".into(),
                    tokens,
                    strategy: SelectionStrategy::RoundRobin,
                    exclude: Vec::new(),
                    kind,
                    expires_at: Some(now + chrono::Duration::minutes(10)),
                };
                store.ledger.send(Op::Reserve { req, now, reply }).unwrap();
                // The whole limit is free again: a reservation of all of it goes through.
                let full = ReserveRequest {
                    provider: &"claude".into(),
                    tokens: 100,
                    strategy: SelectionStrategy::RoundRobin,
                    exclude: &[],
                    kind: ReservationKind::Request,
                    expires_at: None,
                };
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                let r = loop {
                    if let Ok(r) = store.reserve(&full, Utc::now()).await.unwrap() {
                        break r;
                    }
                    assert!(std::time::Instant::now() < deadline, "{kind:?} {tokens}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                };
                assert!(store.release(&r.id, None, Utc::now()).await.unwrap());
            }
        }
        let row = store.get(&id, Utc::now()).await.unwrap();
        assert_eq!((row.used, row.reserved), (0, 0));
        store.close().await;
    }

    /// Once the store is closed its ledger is gone, and the request path's operations say so
    /// as such (not as a database error).
    #[tokio::test]
    async fn operations_after_close_find_the_ledger_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let now = Utc::now();
        store
            .add(&api_key("sk-ant-gone"), "api", "test", now)
            .await
            .unwrap();
        store.close().await;
        let req = ReserveRequest {
            provider: &"claude".into(),
            tokens: 1,
            strategy: SelectionStrategy::RoundRobin,
            exclude: &[],
            kind: ReservationKind::Request,
            expires_at: None,
        };
        assert!(matches!(
            store.reserve(&req, now).await,
            Err(StoreError::LedgerGone)
        ));
        assert!(matches!(
            store.release(&"res_x".into(), None, now).await,
            Err(StoreError::LedgerGone)
        ));
        assert!(matches!(
            store
                .settle(&"res_x".into(), Usage::default(), false, now)
                .await,
            Err(StoreError::LedgerGone)
        ));
    }

    fn api_key(token: &str) -> NewCredential {
        NewCredential {
            provider: "claude".into(),
            kind: CredentialKind::ApiKey,
            token: Some(Secret::new(token)),
            refresh_token: None,
            client_secret: None,
            extra: OauthExtra::default(),
            priority: 100,
            label: None,
            limit: None,
            used: 0,
            disabled: false,
            expires_at: None,
        }
    }

    /// An exhausted mark with the provider's date holds until that date and no longer: the
    /// list (SQL) and selection (the ledger's mirror) agree at every moment around it, the
    /// answer for "nothing usable" names the date, and a later mark replaces the date.
    #[tokio::test]
    async fn an_exhausted_mark_with_a_date_holds_until_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir).await;
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let s = chrono::Duration::seconds;
        let req = ReserveRequest {
            provider: &"claude".into(),
            tokens: 1,
            strategy: SelectionStrategy::RoundRobin,
            exclude: &[],
            kind: ReservationKind::Request,
            expires_at: None,
        };
        let mut n = 0;
        // The shortest wait, a day, and a month.
        for wait in [s(1), s(86_400), s(31 * 86_400)] {
            n += 1;
            let id = store
                .add(&api_key(&format!("sk-ant-until-{n}")), "api", "test", t0)
                .await
                .unwrap()
                .id;
            let r = store.reserve(&req, t0).await.unwrap().unwrap();
            assert_eq!(r.credential_id, id);
            let mark = Mark::Exhausted {
                reason: "credit".into(),
                until: Some(t0 + wait),
            };
            assert!(store.release(&r.id, Some(&mark), t0).await.unwrap());
            for (at, exhausted) in [
                (t0, true),
                (t0 + wait - s(1), true),
                (t0 + wait, false),
                (t0 + wait + s(1), false),
                (t0 + s(365 * 86_400), false),
            ] {
                let row = store.get(&id, at).await.unwrap();
                let want = if exhausted {
                    Status::Exhausted
                } else {
                    Status::Active
                };
                assert_eq!(row.status, want, "{wait} at +{}", at - t0);
                assert_eq!(row.exhausted_until, Some(t0 + wait));
                let page = store
                    .list(
                        &ListFilter {
                            status: Some(want),
                            ..Default::default()
                        },
                        at,
                    )
                    .await
                    .unwrap();
                assert!(
                    page.rows.iter().any(|r| r.id == id),
                    "{wait} at +{}",
                    at - t0
                );
                match store.reserve(&req, at).await.unwrap() {
                    Ok(r) => {
                        assert!(!exhausted, "{wait} at +{}: picked", at - t0);
                        assert_eq!(r.credential_id, id);
                        assert!(store.release(&r.id, None, at).await.unwrap());
                    }
                    Err(why) => {
                        assert!(exhausted, "{wait} at +{}: {why:?}", at - t0);
                        let left = (t0 + wait - at).num_seconds() as u64;
                        assert_eq!(
                            why,
                            Unavailable::Busy {
                                retry_after: left.max(1),
                                in_flight: false
                            }
                        );
                    }
                }
            }
            // A mark without a date, after the date passed, holds for good (no reset here).
            let later = t0 + wait + s(10);
            let r = store.reserve(&req, later).await.unwrap().unwrap();
            let mark = Mark::Exhausted {
                reason: "quota".into(),
                until: None,
            };
            assert!(store.release(&r.id, Some(&mark), later).await.unwrap());
            let far = later + s(10 * 365 * 86_400);
            let row = store.get(&id, far).await.unwrap();
            assert_eq!((row.status, row.exhausted_until), (Status::Exhausted, None));
            assert_eq!(row.status_reason.as_deref(), Some("quota"));
            assert_eq!(
                store.reserve(&req, far).await.unwrap(),
                Err(Unavailable::Exhausted)
            );
            // A reset lifts it.
            let patch = crate::store::QuotaPatch {
                reset: true,
                ..Default::default()
            };
            store
                .set_quota(
                    &ProviderName::from("claude"),
                    Some(&id),
                    &patch,
                    "test",
                    far,
                )
                .await
                .unwrap();
            let row = store.get(&id, far).await.unwrap();
            assert_eq!((row.status, row.exhausted_until), (Status::Active, None));
            store
                .update(
                    &id,
                    &crate::store::CredentialPatch {
                        disabled: Some(true),
                        ..Default::default()
                    },
                    "test",
                    far,
                )
                .await
                .unwrap();
        }
        store.close().await;
    }
}
