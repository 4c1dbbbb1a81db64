//! The management key check: argon2id off the async runtime, counted against the caller's
//! address before it runs, bounded in number, with one check kept for the console.

use super::ban_table::{self, Admission, BanKey, Bans};
use crate::config::ManagementConfig;
use crate::crypto::{self, Fingerprinter, PhcParams};
use crate::http::caller::Caller;
use crate::http::error::ApiError;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

/// The memory argon2 checks in flight may hold together (each holds the hash's `m`): one
/// check of `hash-secret`'s 64 MiB. Checks are CPU-bound, so more of them at once would not
/// answer faster on a small machine, and this keeps a server under a flood of wrong keys well
/// within the soak test's 200 MB. The console's own check comes on top (see
/// [`ManagementAuth`]).
pub const ARGON2_MEMORY_BUDGET_KIB: u32 = 64 * 1024;
/// Checks in flight at most, whatever their memory: they are CPU-bound.
pub const MAX_CHECKS: usize = 4;
/// How long a management call waits for its turn at an argon2 check before 503.
pub const CHECK_WAIT: Duration = Duration::from_secs(5);
/// The `Retry-After` of that 503.
const BUSY_RETRY_SECS: u64 = 2;

/// The argon2 checks in flight allowed for a hash of this cost: as many as fit the budget,
/// at least one, at most [`MAX_CHECKS`].
pub fn check_permits(cost: PhcParams) -> usize {
    let fit = ARGON2_MEMORY_BUDGET_KIB / cost.m_kib.max(1);
    (fit as usize).clamp(1, MAX_CHECKS)
}

fn busy() -> ApiError {
    ban_table::busy(
        BUSY_RETRY_SECS,
        "Too many management keys are being checked at once; try again shortly",
    )
}

/// Counts of argon2 checks: their bound is what bounds memory, so tests read them.
#[derive(Debug, Default)]
struct CheckStats {
    runs: AtomicU64,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl CheckStats {
    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        self.runs.fetch_add(1, Ordering::Relaxed);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let out = f();
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

/// An attempt counted against its address (or the block it is counted in). Dropped
/// unresolved (the check never ran, or its request was abandoned before), it gives its place
/// back without counting as a wrong key.
struct Ticket {
    bans: Arc<Bans>,
    slot: BanKey,
    now: DateTime<Utc>,
    outcome: Option<bool>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.bans.finish(self.slot, self.outcome, self.now);
    }
}

/// The management guard's state.
///
/// Checks run under one of two semaphores: `checks`, which callers from anywhere but the
/// console share and which holds [`check_permits`] checks, and `console`, one check kept for
/// direct loopback peers. Without it, guesses from many addresses (each allowed five) could
/// keep every permit taken and the queue long enough that the operator's own call never gets
/// a turn within [`CHECK_WAIT`]. So argon2 holds at most the budget for everyone else, plus
/// one check's `m` for the console.
pub struct ManagementAuth {
    /// The argon2id PHC string of the key; `None` when no key is configured.
    phc: Option<Arc<str>>,
    allow_remote: bool,
    bans: Arc<Bans>,
    checks: Arc<Semaphore>,
    console: Arc<Semaphore>,
    permits: usize,
    wait: Duration,
    /// A keyed digest of the last key that verified, so a correct key costs one argon2 run
    /// per process rather than one per request.
    accepted: Mutex<Option<Vec<u8>>>,
    digester: Fingerprinter,
    stats: Arc<CheckStats>,
}

impl std::fmt::Debug for ManagementAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementAuth")
            .field("key_configured", &self.phc.is_some())
            .field("allow_remote", &self.allow_remote)
            .field("permits", &self.permits)
            .finish()
    }
}

impl ManagementAuth {
    /// From the config: a PHC string must pass the policy of [`crypto::check_phc`]; plain text
    /// is hashed now, with a warning to store the hash instead.
    pub async fn from_config(config: &ManagementConfig) -> Result<Self, String> {
        let key = Zeroizing::new(config.secret_key.expose().trim().to_owned());
        let (phc, cost) = if key.is_empty() {
            (None, crypto::HASH_PARAMS)
        } else if crypto::is_phc(&key) {
            let cost =
                crypto::check_phc(&key).map_err(|e| format!("`management.secret_key`: {e}"))?;
            (Some(String::from(key.as_str())), cost)
        } else {
            tracing::warn!(
                "management.secret_key is plain text; it was hashed for this run. Store the output of `cliproxyapi hash-secret` instead"
            );
            let phc = tokio::task::spawn_blocking(move || crypto::hash_secret(&key))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("`management.secret_key`: cannot hash it: {e}"))?;
            (Some(phc), crypto::HASH_PARAMS)
        };
        let permits = check_permits(cost);
        Ok(ManagementAuth {
            phc: phc.map(Arc::from),
            allow_remote: config.allow_remote,
            bans: Arc::new(Bans::new(ban_table::MANAGEMENT_RULE)),
            checks: Arc::new(Semaphore::new(permits)),
            console: Arc::new(Semaphore::new(1)),
            permits,
            wait: CHECK_WAIT,
            accepted: Mutex::new(None),
            digester: Fingerprinter::new(Fingerprinter::random_key()),
            stats: Arc::default(),
        })
    }

    /// The same, with another limit on checks in flight (the console's aside) and on the
    /// wait for one.
    pub fn with_limits(mut self, permits: usize, wait: Duration) -> Self {
        self.permits = permits.max(1);
        self.checks = Arc::new(Semaphore::new(self.permits));
        self.wait = wait;
        self
    }

    pub fn bans(&self) -> &Bans {
        &self.bans
    }

    /// Argon2 checks in flight at most, the console's aside.
    pub fn permits(&self) -> usize {
        self.permits
    }

    /// Argon2 checks run since start, and the most that ever ran at once.
    pub fn check_counts(&self) -> (u64, usize) {
        (
            self.stats.runs.load(Ordering::SeqCst),
            self.stats.peak.load(Ordering::SeqCst),
        )
    }

    /// Whether a management key is configured (the OAuth pages ask for it only then).
    pub fn key_configured(&self) -> bool {
        self.phc.is_some()
    }

    /// The rules of [`check`](Self::check) that do not need the key, for the OAuth pages'
    /// static shell and assets (README, "OAuth pages"): a browser cannot send the key when it
    /// opens a page, so the page loads without it, asks for it, and sends it with each JSON
    /// call, which goes through `check`. The shell holds no data. Who may not manage at all
    /// (a remote client without `allow_remote`, a banned address) does not get it either.
    pub fn check_page(&self, caller: &Caller, now: DateTime<Utc>) -> Result<(), ApiError> {
        let loopback = caller.is_loopback();
        let client = caller.client_or_refuse()?;
        if !loopback && (self.phc.is_none() || !self.allow_remote) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "remote_management_disabled",
                "The management pages answer remote clients only with a management key and management.allow_remote",
            ));
        }
        if self.phc.is_some()
            && let Some(until) = self.bans.banned_until(BanKey::of(client), now)
        {
            return Err(self.bans.refusal(until, now));
        }
        Ok(())
    }

    /// Decide on one call from `caller` presenting `presented` at `now`. `recovery` marks the
    /// ban endpoints, which the operator at the console may reach while banned.
    pub async fn check(
        &self,
        caller: &Caller,
        presented: Option<&str>,
        recovery: bool,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let loopback = caller.is_loopback();
        let Some(phc) = &self.phc else {
            if loopback {
                return Ok(());
            }
            caller.client_or_refuse()?;
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "remote_management_disabled",
                "The management API answers only loopback clients unless a management key is configured",
            ));
        };
        let client = caller.client_or_refuse()?;
        if !loopback && !self.allow_remote {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "remote_management_disabled",
                "The management API answers remote clients only with management.allow_remote",
            ));
        }
        let key = BanKey::of(client);
        let console = caller.is_direct_loopback();
        let recovering = recovery && console;
        if !recovering && let Some(until) = self.bans.banned_until(key, now) {
            return Err(self.bans.refusal(until, now));
        }
        let Some(presented) = presented.filter(|p| !p.is_empty()) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_management_key",
                "Send the management key as Authorization: Bearer KEY or X-Management-Key: KEY",
            ));
        };
        let digest = self.digester.content(presented.as_bytes());
        let deadline = tokio::time::Instant::now() + self.wait;
        let Some(ticket) = self.admit(key, &digest, recovering, now, deadline).await? else {
            self.bans.forgive(key);
            return Ok(());
        };
        let checks = if console { &self.console } else { &self.checks };
        let permit = match tokio::time::timeout_at(deadline, checks.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(busy()),
        };
        // A check this one queued behind may have verified the same key.
        if self.is_accepted(&digest) {
            drop(ticket);
            self.bans.forgive(key);
            return Ok(());
        }
        // The copy the blocking thread needs is wiped when the check is done.
        let presented = Zeroizing::new(presented.to_owned());
        let (phc, stats) = (phc.clone(), self.stats.clone());
        // The permit and the ticket go with the check: if this request is abandoned, the check
        // still runs to its end, holding its memory and its place, and still counts.
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut ticket = ticket;
            let ok = stats.run(|| crypto::verify_secret(&phc, &presented));
            ticket.outcome = Some(ok);
            ok
        })
        .await
        .unwrap_or(false);
        if ok {
            *self.accepted.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest);
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_management_key",
                "The management key is wrong",
            ))
        }
    }

    fn is_accepted(&self, digest: &[u8]) -> bool {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .is_some_and(|c| bool::from(c.ct_eq(digest)))
    }

    /// Count an attempt from `key` before its check runs, waiting while the address has as
    /// many in flight as it has wrong keys left. `None`: the key is already known to be right
    /// (perhaps verified by a check this one waited for).
    async fn admit(
        &self,
        key: BanKey,
        digest: &[u8],
        recovering: bool,
        now: DateTime<Utc>,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Ticket>, ApiError> {
        loop {
            if self.is_accepted(digest) {
                return Ok(None);
            }
            let notified = self.bans.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.bans.admit(key, now, recovering) {
                Admission::Go(slot) => {
                    return Ok(Some(Ticket {
                        bans: self.bans.clone(),
                        slot,
                        now,
                        outcome: None,
                    }));
                }
                Admission::Banned(until) => return Err(self.bans.refusal(until, now)),
                Admission::Full(secs) => return Err(Bans::full(secs)),
                Admission::Wait => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(busy());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Secret;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn permits_fit_the_memory_budget() {
        let p = |m_kib| check_permits(PhcParams { m_kib, t: 3, p: 4 });
        assert_eq!(p(crypto::HASH_PARAMS.m_kib), 1);
        assert_eq!(p(19_456), 3);
        assert_eq!(p(7_168), 4);
        assert_eq!(p(47_104), 1);
        assert_eq!(p(131_072), 1);
        assert_eq!(p(crypto::PHC_MAX.m_kib), 1);
        assert_eq!(p(u32::MAX), 1);
        assert_eq!(p(0), MAX_CHECKS);
        for m in [7_168u32, 19_456, 65_536, 131_072, 262_144] {
            // The bound the README states: permits × m ≤ max(budget, m).
            assert!(p(m) as u64 * u64::from(m) <= u64::from(ARGON2_MEMORY_BUDGET_KIB.max(m)));
        }
    }

    fn cheap_phc(secret: &str) -> String {
        crypto::hash_secret_with(
            secret,
            PhcParams {
                m_kib: 7_168,
                t: 5,
                p: 1,
            },
        )
        .unwrap()
    }

    async fn keyed(allow_remote: bool) -> ManagementAuth {
        ManagementAuth::from_config(&ManagementConfig {
            secret_key: Secret::new(cheap_phc("right")),
            allow_remote,
        })
        .await
        .unwrap()
    }

    /// A wait no check of these tests needs, however loaded the machine: the counts they
    /// assert assume no call gives up waiting.
    const PATIENT: Duration = Duration::from_secs(600);

    fn remote(ip: &str) -> Caller {
        Caller::resolve(Some(ip.parse().unwrap()), &HeaderMap::new(), &[])
    }

    /// A client forwarded by a proxy at `peer`, trusted with all of `trusted`.
    fn forwarded(peer: &str, xff: &'static str, trusted: &str) -> Caller {
        let trusted: Vec<crate::config::Cidr> =
            vec![serde_json::from_value(serde_json::json!(trusted)).unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static(xff));
        Caller::resolve(Some(peer.parse().unwrap()), &h, &trusted)
    }

    /// The pages' shell: the address rules without a key; a banned address does not get it.
    #[tokio::test]
    async fn a_page_needs_no_key_but_the_address_rules_hold() {
        let now = Utc::now();
        let code = |r: Result<(), ApiError>| r.err().map(|e| e.code);
        let open = ManagementAuth::from_config(&ManagementConfig::default())
            .await
            .unwrap();
        assert!(!open.key_configured());
        assert_eq!(code(open.check_page(&remote("127.0.0.1"), now)), None);
        assert_eq!(code(open.check_page(&remote("::1"), now)), None);
        assert_eq!(
            code(open.check_page(&remote("192.0.2.9"), now)),
            Some("remote_management_disabled")
        );
        let local_only = keyed(false).await;
        assert!(local_only.key_configured());
        assert_eq!(code(local_only.check_page(&remote("127.0.0.1"), now)), None);
        assert_eq!(
            code(local_only.check_page(&remote("192.0.2.9"), now)),
            Some("remote_management_disabled")
        );
        let auth = keyed(true).await.with_limits(1, PATIENT);
        let caller = remote("192.0.2.9");
        assert_eq!(code(auth.check_page(&caller, now)), None);
        for i in 0..5 {
            let wrong = format!("wrong-{i}");
            let answer = auth.check(&caller, Some(&wrong), false, now).await;
            assert_eq!(code(answer), Some("invalid_management_key"));
        }
        assert_eq!(
            code(auth.check_page(&caller, now)),
            Some("too_many_attempts")
        );
        assert_eq!(code(auth.check_page(&remote("192.0.2.200"), now)), None);
    }

    #[tokio::test]
    async fn a_check_past_the_wait_is_refused_busy_and_not_counted() {
        let auth = keyed(true).await.with_limits(1, Duration::from_millis(50));
        let now = Utc::now();
        let caller = remote("192.0.2.1");
        // Every permit taken: the next check waits, then gives up without running argon2.
        let held = auth.checks.clone().acquire_many_owned(1).await.unwrap();
        for _ in 0..10 {
            let e = auth
                .check(&caller, Some("wrong"), false, now)
                .await
                .unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (503, "server_busy"));
            assert_eq!(e.retry_after, Some(BUSY_RETRY_SECS));
        }
        assert_eq!(auth.check_counts(), (0, 0));
        assert!(
            auth.bans()
                .banned_until(BanKey::of("192.0.2.1".parse().unwrap()), now)
                .is_none()
        );
        drop(held);
        assert!(auth.check(&caller, Some("right"), false, now).await.is_ok());
        assert_eq!(auth.check_counts().0, 1);
        // Verified once, the right key is recognised without argon2, even with no permit free.
        let held = auth.checks.clone().acquire_many_owned(1).await.unwrap();
        for _ in 0..20 {
            assert!(auth.check(&caller, Some("right"), false, now).await.is_ok());
        }
        assert_eq!(auth.check_counts().0, 1);
        drop(held);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_burst_of_wrong_keys_runs_few_checks_and_bans_every_address() {
        let auth = Arc::new(keyed(true).await.with_limits(MAX_CHECKS, PATIENT));
        let now = Utc::now();
        // Extremes first: one address, then many; IPv6 hosts of one /64 are one address.
        let groups: Vec<Vec<String>> = vec![
            vec!["198.51.100.1".into()],
            (1..=8).map(|i| format!("203.0.113.{i}")).collect(),
            (1..=8).map(|i| format!("2001:db8:7:7::{i:x}")).collect(),
        ];
        let mut banned_addresses = 0;
        for addrs in groups {
            let before = auth.check_counts().0;
            let mut tasks = Vec::new();
            for i in 0..400 {
                let auth = auth.clone();
                let caller = remote(&addrs[i % addrs.len()]);
                tasks.push(tokio::spawn(async move {
                    auth.check(&caller, Some(&format!("guess-{i}")), false, now)
                        .await
                        .unwrap_err()
                }));
            }
            let mut codes = std::collections::BTreeMap::new();
            for t in tasks {
                *codes.entry(t.await.unwrap().code).or_insert(0) += 1;
            }
            let keys: std::collections::BTreeSet<BanKey> = addrs
                .iter()
                .map(|a| BanKey::of(a.parse().unwrap()))
                .collect();
            let runs = auth.check_counts().0 - before;
            assert_eq!(runs, 5 * keys.len() as u64, "{addrs:?} {codes:?}");
            assert_eq!(codes.get("invalid_management_key"), Some(&(runs as i32)));
            assert_eq!(codes.get("too_many_attempts"), Some(&(400 - runs as i32)));
            for k in &keys {
                assert!(auth.bans().banned_until(*k, now).is_some(), "{k}");
            }
            banned_addresses += keys.len();
            assert_eq!(auth.bans().list(now).len(), banned_addresses);
        }
        let (_, peak) = auth.check_counts();
        assert!(peak >= 1 && peak <= auth.permits(), "{peak}");
        assert_eq!(auth.bans().take_events().len(), banned_addresses);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_console_keeps_a_check_of_its_own() {
        // From one permit (hash-secret's cost) to the most there can be.
        for permits in [1, MAX_CHECKS] {
            let auth = Arc::new(keyed(true).await.with_limits(permits, PATIENT));
            let now = Utc::now();
            // Every shared permit held, and guessers from many addresses queued behind them.
            let held = auth.checks.clone().acquire_many_owned(permits as u32).await;
            let held = held.unwrap();
            let guessers: Vec<_> = (0..20)
                .map(|i| {
                    let auth = auth.clone();
                    let caller = remote(&format!("2001:db8:{i:x}::1"));
                    tokio::spawn(
                        async move { auth.check(&caller, Some("guess"), false, now).await },
                    )
                })
                .collect();
            // The console's checks still run, from every loopback address, right key or wrong.
            // (Bounded, so that without a check of its own this fails rather than waits out
            // PATIENT; the bound is no measure of speed.)
            let console = |ip: &'static str, key: &'static str| {
                let auth = auth.clone();
                async move {
                    let caller = remote(ip);
                    let check = auth.check(&caller, Some(key), false, now);
                    tokio::time::timeout(Duration::from_secs(60), check)
                        .await
                        .expect("the console's check did not run")
                }
            };
            for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.9.9.9"] {
                let e = console(ip, "wrong").await.unwrap_err();
                assert_eq!(e.code, "invalid_management_key", "{ip}");
            }
            assert!(console("127.0.0.1", "right").await.is_ok());
            assert_eq!(auth.check_counts().0, 5, "{permits}");
            assert!(guessers.iter().all(|g| !g.is_finished()));
            // The guessers' turn comes when the shared permits free.
            drop(held);
            for g in guessers {
                let e = g.await.unwrap().unwrap_err();
                assert_eq!(e.code, "invalid_management_key");
            }
            assert_eq!(auth.check_counts().0, 25);
        }
        // Neither a loopback client forwarded by a local proxy nor a remote one forwarding
        // loopback is the console: they wait for the shared permits.
        let auth = keyed(true).await.with_limits(1, Duration::from_millis(50));
        let now = Utc::now();
        let held = auth.checks.clone().acquire_many_owned(1).await.unwrap();
        for caller in [
            forwarded("127.0.0.1", "127.0.0.1", "127.0.0.1"),
            forwarded("192.0.2.2", "127.0.0.1", "192.0.2.0/24"),
            remote("192.0.2.2"),
        ] {
            let e = auth
                .check(&caller, Some("right"), false, now)
                .await
                .unwrap_err();
            assert_eq!(e.code, "server_busy", "{caller:?}");
        }
        assert_eq!(auth.check_counts().0, 0);
        drop(held);
    }

    #[tokio::test]
    async fn the_console_may_lift_a_loopback_ban() {
        let auth = keyed(false).await;
        let now = Utc::now();
        let console = remote("127.0.0.1");
        for _ in 0..5 {
            assert_eq!(
                auth.check(&console, Some("wrong"), false, now)
                    .await
                    .unwrap_err()
                    .code,
                "invalid_management_key"
            );
        }
        // Banned everywhere else, from every loopback address.
        for ip in ["127.0.0.1", "127.0.0.2", "::1"] {
            let e = auth
                .check(&remote(ip), Some("right"), false, now)
                .await
                .unwrap_err();
            assert_eq!(e.code, "too_many_attempts");
        }
        // The ban endpoints: the console passes, with the key.
        let e = auth
            .check(&console, Some("wrong"), true, now)
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_management_key");
        assert_eq!(
            auth.check(&console, None, true, now)
                .await
                .unwrap_err()
                .code,
            "missing_management_key"
        );
        assert!(auth.check(&console, Some("right"), true, now).await.is_ok());
        // A loopback client forwarded by a trusted proxy is not the console.
        let forwarded = forwarded("127.0.0.1", "127.0.0.1", "127.0.0.1");
        assert!(forwarded.is_loopback());
        let e = auth
            .check(&forwarded, Some("right"), true, now)
            .await
            .unwrap_err();
        assert_eq!(e.code, "too_many_attempts");
        // Nor is a remote client.
        let auth = keyed(true).await;
        let far = remote("192.0.2.9");
        for _ in 0..5 {
            let _ = auth.check(&far, Some("wrong"), true, now).await;
        }
        let e = auth
            .check(&far, Some("right"), true, now)
            .await
            .unwrap_err();
        assert_eq!(e.code, "too_many_attempts");
    }

    #[tokio::test]
    async fn a_remote_proxy_forwarding_loopback_gets_no_loopback_rights() {
        let open = ManagementAuth::from_config(&ManagementConfig::default())
            .await
            .unwrap();
        let keyed = keyed(false).await;
        let now = Utc::now();
        for (peer, trusted) in [
            ("192.0.2.2", "192.0.2.0/24"),
            ("192.0.2.2", "0.0.0.0/0"),
            ("2001:db8::2", "::/0"),
            ("::ffff:192.0.2.2", "192.0.2.2"),
        ] {
            for xff in [
                "127.0.0.1",
                "::1",
                "::ffff:127.0.0.1",
                "127.0.0.1, 127.0.0.1",
            ] {
                let caller = forwarded(peer, xff, trusted);
                let e = open.check(&caller, None, false, now).await.unwrap_err();
                assert_eq!(
                    (e.status.as_u16(), e.code),
                    (403, "remote_management_disabled"),
                    "{peer} {xff}"
                );
                let e = keyed
                    .check(&caller, Some("right"), false, now)
                    .await
                    .unwrap_err();
                assert_eq!(e.code, "remote_management_disabled", "{peer} {xff}");
            }
        }
        // Over a loopback proxy, loopback is still loopback.
        let local = forwarded("127.0.0.1", "::1", "127.0.0.1");
        assert!(open.check(&local, None, false, now).await.is_ok());
        assert!(keyed.check(&local, Some("right"), false, now).await.is_ok());
    }
}
