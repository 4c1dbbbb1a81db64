//! Bans: wrong keys counted per client address, the addresses refused for a while after too
//! many, and the management endpoints that list and lift them.
//!
//! The management guard and the client-key guard each keep their own table ([`Bans`]) with
//! their own [`BanRule`]. An address is an IPv4 address, an IPv6 /64 (what one host or one
//! subscriber usually gets, so rotating through it gains nothing), or all of loopback as one
//! (every local process is the same machine). The table holds at most [`MAX_TRACKED`]
//! addresses; when live bans fill it, addresses it does not know yet are refused with 503
//! `server_busy` until room frees, rather than guessing unwatched.

use super::error::ApiError;
use super::extract::Query;
use super::management::Actor;
use crate::app::AppState;
use crate::domain::rfc3339;
use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Addresses one table tracks at most (an entry is under 100 bytes).
pub const MAX_TRACKED: usize = 65_536;
/// Ban lines waiting for the auth log at most; a flood of bans is summarised past it.
const MAX_EVENTS: usize = 1_000;

/// Which guard a ban belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanKind {
    Management,
    Client,
}

impl BanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BanKind::Management => "management",
            BanKind::Client => "client",
        }
    }

    fn what(self) -> &'static str {
        match self {
            BanKind::Management => "management keys",
            BanKind::Client => "API keys",
        }
    }
}

/// When an address is banned, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BanRule {
    pub kind: BanKind,
    /// Wrong keys that ban the address.
    pub max_failures: u32,
    /// How long a ban lasts; also how long a wrong key is remembered after the last one.
    pub ban: Duration,
}

/// Contract section 8: five wrong management keys ban an address for 30 minutes.
pub const MANAGEMENT_RULE: BanRule = BanRule {
    kind: BanKind::Management,
    max_failures: 5,
    ban: Duration::minutes(30),
};

/// Client keys are checked in microseconds, so without a ban one address could try thousands
/// a second; a client with a stale key is not locked out for long.
pub const CLIENT_RULE: BanRule = BanRule {
    kind: BanKind::Client,
    max_failures: 10,
    ban: Duration::minutes(15),
};

/// The unit a ban covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BanKey {
    /// Every loopback address, IPv4 and IPv6.
    Loopback,
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl BanKey {
    pub fn of(ip: IpAddr) -> BanKey {
        match ip.to_canonical() {
            ip if ip.is_loopback() => BanKey::Loopback,
            IpAddr::V4(a) => BanKey::V4(a),
            IpAddr::V6(a) => BanKey::V6((a.to_bits() >> 64) as u64),
        }
    }

    /// What an operator may write to name a ban: `loopback`, an address, or (as the list
    /// shows it) an IPv6 /64.
    pub fn parse(text: &str) -> Option<BanKey> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("loopback") {
            return Some(BanKey::Loopback);
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(BanKey::of(ip));
        }
        match text.parse::<ipnet::IpNet>().ok()? {
            ipnet::IpNet::V6(net) if net.prefix_len() == 64 => Some(BanKey::of(net.addr().into())),
            ipnet::IpNet::V4(net) if net.prefix_len() == 32 => Some(BanKey::of(net.addr().into())),
            _ => None,
        }
    }
}

impl fmt::Display for BanKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanKey::Loopback => f.write_str("loopback"),
            BanKey::V4(a) => write!(f, "{a}"),
            BanKey::V6(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from_bits(u128::from(*prefix) << 64))
            }
        }
    }
}

/// A ban in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub key: BanKey,
    pub kind: BanKind,
    pub until: DateTime<Utc>,
}

impl Ban {
    fn view(&self) -> serde_json::Value {
        json!({"address": self.key.to_string(), "kind": self.kind.as_str(), "until": rfc3339(self.until)})
    }
}

#[derive(Debug, Default)]
struct Entry {
    /// Wrong keys since the last ban, success, or quiet period.
    failures: u32,
    /// Checks admitted and not finished (counted before they run, so a burst of guesses
    /// cannot all start before the first one fails).
    pending: u32,
    last_failure: Option<DateTime<Utc>>,
    banned_until: Option<DateTime<Utc>>,
}

impl Entry {
    fn live_ban(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.banned_until.filter(|u| *u > now)
    }

    /// Forget what has expired: a ban past its end, failures older than `quiet`.
    fn expire(&mut self, now: DateTime<Utc>, quiet: Duration) {
        if self.banned_until.is_some_and(|u| u <= now) {
            self.banned_until = None;
        }
        if self.last_failure.is_some_and(|t| now - t >= quiet) {
            self.failures = 0;
            self.last_failure = None;
        }
    }

    fn idle(&self) -> bool {
        self.failures == 0 && self.pending == 0 && self.banned_until.is_none()
    }
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<BanKey, Entry>,
    /// While the table is full of live bans: when the first of them ends (no sweep before).
    full_until: Option<DateTime<Utc>>,
    events: Vec<String>,
    dropped_events: usize,
}

/// The outcome of asking to start a slow key check.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Go,
    Banned(DateTime<Utc>),
    /// The address has as many checks running as it has wrong keys left: wait for one.
    Wait,
    /// The table is full; retry after this many seconds.
    Full(u64),
}

/// One guard's table of failures and bans.
#[derive(Debug)]
pub struct Bans {
    rule: BanRule,
    max_tracked: usize,
    table: Mutex<Table>,
    /// Whether `table.events` has lines, so that the guards, which ask after every request,
    /// take the lock only when there is something to write.
    has_events: AtomicBool,
    /// Signalled whenever a check finishes or a ban is lifted, for checks waiting their turn.
    pub(super) changed: Notify,
}

/// Whole seconds from `now` to `until`, rounded up (a client told to come back then is not
/// refused again), at least one.
fn secs_until(until: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let ms = (until - now).num_milliseconds();
    (ms.saturating_add(999) / 1000).clamp(1, i64::from(u32::MAX)) as u64
}

impl Bans {
    pub fn new(rule: BanRule) -> Bans {
        Bans::with_capacity(rule, MAX_TRACKED)
    }

    pub fn with_capacity(rule: BanRule, max_tracked: usize) -> Bans {
        Bans {
            rule,
            max_tracked: max_tracked.max(1),
            table: Mutex::new(Table::default()),
            has_events: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    pub fn rule(&self) -> BanRule {
        self.rule
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The refusal for a banned address.
    pub fn refusal(&self, until: DateTime<Utc>, now: DateTime<Utc>) -> ApiError {
        let secs = secs_until(until, now);
        ApiError::new(
            StatusCode::FORBIDDEN,
            "too_many_attempts",
            format!(
                "Too many wrong {} from this address; try again in {secs} s",
                self.rule.kind.what()
            ),
        )
        .retry_after(secs)
    }

    /// The refusal when the table has no room for another address.
    pub fn full(secs: u64) -> ApiError {
        busy(
            secs,
            "Too many client addresses are banned or being checked; try again later",
        )
    }

    /// When the ban on `key` ends, if one is in force.
    pub fn banned_until(&self, key: BanKey, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = self.lock();
        let entry = t.entries.get_mut(&key)?;
        entry.expire(now, self.rule.ban);
        let until = entry.live_ban(now);
        if entry.idle() {
            t.entries.remove(&key);
        }
        until
    }

    /// Refuse a banned address, or an unknown one while the table is full (the cheap check
    /// the client guard makes before it compares a key).
    pub fn check(&self, key: BanKey, now: DateTime<Utc>) -> Result<(), ApiError> {
        let mut t = self.lock();
        if let Some(entry) = t.entries.get_mut(&key) {
            entry.expire(now, self.rule.ban);
            if let Some(until) = entry.live_ban(now) {
                drop(t);
                return Err(self.refusal(until, now));
            }
            if entry.idle() {
                t.entries.remove(&key);
            }
            return Ok(());
        }
        if !self.make_room(&mut t, now) {
            let secs = t.full_until.map_or(1, |u| secs_until(u, now));
            return Err(Bans::full(secs));
        }
        Ok(())
    }

    /// Ensure there is room for one more address: sweep what has expired or is idle. False
    /// when live bans and running checks fill the table.
    fn make_room(&self, t: &mut Table, now: DateTime<Utc>) -> bool {
        if t.entries.len() < self.max_tracked {
            return true;
        }
        if t.full_until.is_some_and(|u| now < u) {
            return false;
        }
        let quiet = self.rule.ban;
        // Failure counts go first: losing one costs a guesser's count, keeping the table
        // usable costs nothing.
        t.entries.retain(|_, e| {
            e.expire(now, quiet);
            e.live_ban(now).is_some() || e.pending > 0
        });
        if t.entries.len() < self.max_tracked {
            t.full_until = None;
            return true;
        }
        t.full_until = t.entries.values().filter_map(|e| e.live_ban(now)).min();
        if t.full_until.is_none() {
            // Only running checks: they end within seconds.
            t.full_until = Some(now + Duration::seconds(1));
        }
        false
    }

    /// Ask to start a slow check from `key`, counting it now. `recovery` (the operator at the
    /// console lifting bans) passes a ban, one check at a time.
    pub fn admit(&self, key: BanKey, now: DateTime<Utc>, recovery: bool) -> Admission {
        let mut t = self.lock();
        if !t.entries.contains_key(&key) && !self.make_room(&mut t, now) {
            return Admission::Full(t.full_until.map_or(1, |u| secs_until(u, now)));
        }
        let entry = t.entries.entry(key).or_default();
        entry.expire(now, self.rule.ban);
        if let Some(until) = entry.live_ban(now) {
            if !recovery {
                return Admission::Banned(until);
            }
            if entry.pending > 0 {
                return Admission::Wait;
            }
        } else if entry.failures.saturating_add(entry.pending) >= self.rule.max_failures {
            return Admission::Wait;
        }
        entry.pending += 1;
        Admission::Go
    }

    /// A check admitted by [`Bans::admit`] ended: `Some(true)` right key, `Some(false)` wrong
    /// key, `None` it never ran.
    pub fn finish(&self, key: BanKey, outcome: Option<bool>, now: DateTime<Utc>) {
        {
            let mut t = self.lock();
            let t = &mut *t;
            if let Some(entry) = t.entries.get_mut(&key) {
                entry.pending = entry.pending.saturating_sub(1);
                match outcome {
                    Some(true) => {
                        entry.failures = 0;
                        entry.last_failure = None;
                    }
                    Some(false) => {
                        if let Some(line) = self.failed(key, entry, now) {
                            push_event(&mut t.events, &mut t.dropped_events, line);
                            self.has_events.store(true, Ordering::Release);
                        }
                    }
                    None => {}
                }
                if entry.idle() {
                    t.entries.remove(&key);
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// A wrong key from `key`, checked without admission (the fast client-key compare).
    /// False when the table had no room to remember it.
    pub fn record_failure(&self, key: BanKey, now: DateTime<Utc>) -> bool {
        let mut t = self.lock();
        if !t.entries.contains_key(&key) && !self.make_room(&mut t, now) {
            return false;
        }
        let t = &mut *t;
        let entry = t.entries.entry(key).or_default();
        entry.expire(now, self.rule.ban);
        if let Some(line) = self.failed(key, entry, now) {
            push_event(&mut t.events, &mut t.dropped_events, line);
            self.has_events.store(true, Ordering::Release);
        }
        true
    }

    /// A right key from `key`: its count of wrong ones starts again.
    pub fn forgive(&self, key: BanKey) {
        let mut t = self.lock();
        if let Some(entry) = t.entries.get_mut(&key) {
            entry.failures = 0;
            entry.last_failure = None;
            if entry.idle() {
                t.entries.remove(&key);
            }
        }
    }

    /// Count one wrong key; the auth-log line if it set a ban.
    fn failed(&self, key: BanKey, entry: &mut Entry, now: DateTime<Utc>) -> Option<String> {
        entry.expire(now, self.rule.ban);
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = Some(now);
        if entry.failures < self.rule.max_failures {
            return None;
        }
        let until = now + self.rule.ban;
        entry.failures = 0;
        entry.last_failure = None;
        entry.banned_until = Some(until);
        let line = format!(
            "{} access from {key} banned until {} after {} wrong {}",
            self.rule.kind.as_str(),
            rfc3339(until),
            self.rule.max_failures,
            self.rule.kind.what()
        );
        tracing::warn!("{line}");
        Some(line)
    }

    /// The bans in force, by address.
    pub fn list(&self, now: DateTime<Utc>) -> Vec<Ban> {
        let t = self.lock();
        let mut bans: Vec<Ban> = t
            .entries
            .iter()
            .filter_map(|(k, e)| {
                e.live_ban(now).map(|until| Ban {
                    key: *k,
                    kind: self.rule.kind,
                    until,
                })
            })
            .collect();
        bans.sort_by_key(|b| b.key);
        bans
    }

    /// Lift the ban on `key` (every ban without one), and forget its wrong keys.
    pub fn lift(&self, key: Option<BanKey>, now: DateTime<Utc>) -> Vec<Ban> {
        let mut lifted = Vec::new();
        {
            let mut t = self.lock();
            for (k, e) in t.entries.iter_mut() {
                if key.is_some_and(|want| want != *k) {
                    continue;
                }
                if let Some(until) = e.live_ban(now) {
                    lifted.push(Ban {
                        key: *k,
                        kind: self.rule.kind,
                        until,
                    });
                }
                e.banned_until = None;
                e.failures = 0;
                e.last_failure = None;
            }
            t.entries.retain(|_, e| !e.idle());
            t.full_until = None;
        }
        self.changed.notify_waiters();
        lifted.sort_by_key(|b| b.key);
        lifted
    }

    /// Ban lines not yet written to the auth log.
    pub fn take_events(&self) -> Vec<String> {
        if !self.has_events.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        let mut t = self.lock();
        let mut lines = std::mem::take(&mut t.events);
        let dropped = std::mem::take(&mut t.dropped_events);
        if dropped > 0 {
            lines.push(format!(
                "{dropped} more {} bans not listed",
                self.rule.kind.as_str()
            ));
        }
        lines
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().entries.len()
    }
}

fn push_event(events: &mut Vec<String>, dropped: &mut usize, line: String) {
    if events.len() < MAX_EVENTS {
        events.push(line);
    } else {
        *dropped += 1;
    }
}

/// 503 `server_busy`: refused for now, not for anything the client did wrong.
pub fn busy(secs: u64, message: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_busy", message).retry_after(secs.max(1))
}

/// `GET /v0/management/bans`: `{"bans": [{"address", "kind", "until"}]}`.
pub async fn list(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let now = state.now();
    let bans: Vec<_> = state
        .management
        .bans()
        .list(now)
        .into_iter()
        .chain(state.clients.bans().list(now))
        .map(|b| b.view())
        .collect();
    axum::Json(json!({ "bans": bans }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiftQuery {
    address: Option<String>,
}

/// `DELETE /v0/management/bans[?address=]`: lift one address's bans (both kinds), or all.
pub async fn lift(
    State(state): State<Arc<AppState>>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<LiftQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let key = match q.address.as_deref() {
        None => None,
        Some(text) => Some(BanKey::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "Invalid query parameter `address`: give `loopback`, an IP address, or an IPv6 /64 as the list shows it",
            )
        })?),
    };
    let actor = actor.0;
    let now = state.now();
    let mut lifted = state.management.bans().lift(key, now);
    lifted.extend(state.clients.bans().lift(key, now));
    let lines: Vec<String> = if lifted.is_empty() {
        vec![format!(
            "no ban to lift for {} (asked by {actor})",
            key.map_or("any address".into(), |k| k.to_string())
        )]
    } else {
        lifted
            .iter()
            .map(|b| {
                format!(
                    "lifted the {} ban on {} (until {}) by {actor}",
                    b.kind.as_str(),
                    b.key,
                    rfc3339(b.until)
                )
            })
            .collect()
    };
    state.auth_log.record_all(lines.iter().map(String::as_str));
    if lifted.is_empty()
        && let Some(k) = key
    {
        return Err(ApiError::not_found(
            "ban_not_found",
            format!("No ban is in force on {k}"),
        ));
    }
    let lifted: Vec<_> = lifted.iter().map(Ban::view).collect();
    Ok(axum::Json(json!({ "lifted": lifted })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keys_group_loopback_and_ipv6_64s() {
        let k = |s: &str| BanKey::of(ip(s));
        for a in [
            "127.0.0.1",
            "127.255.255.254",
            "127.0.0.2",
            "::1",
            "::ffff:127.0.0.9",
        ] {
            assert_eq!(k(a), BanKey::Loopback, "{a}");
        }
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
        // One /64, whatever the interface id.
        for a in [
            "2001:db8:1:2::",
            "2001:db8:1:2::1",
            "2001:db8:1:2:ffff:ffff:ffff:ffff",
            "2001:db8:1:2:dead:beef:0:1",
        ] {
            assert_eq!(k(a), k("2001:db8:1:2::99"), "{a}");
        }
        // Neighbouring /64s, and the extremes of the space, differ.
        for a in [
            "2001:db8:1:3::1",
            "2001:db8:1:1:ffff:ffff:ffff:ffff",
            "::2",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            assert_ne!(k(a), k("2001:db8:1:2::99"), "{a}");
        }
        assert_eq!(k("2001:db8:1:2::99").to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            k("ffff:ffff:ffff:ffff:1::").to_string(),
            "ffff:ffff:ffff:ffff::/64"
        );
        assert_eq!(k("::2").to_string(), "::/64");
        assert_eq!(k("::1").to_string(), "loopback");
        // What the list shows parses back; so does any address inside it.
        for key in [
            k("192.0.2.7"),
            k("2001:db8:1:2::99"),
            k("::2"),
            BanKey::Loopback,
        ] {
            assert_eq!(BanKey::parse(&key.to_string()), Some(key));
        }
        assert_eq!(BanKey::parse("2001:db8:1:2::5"), Some(k("2001:db8:1:2::1")));
        assert_eq!(BanKey::parse(" 127.0.0.5 "), Some(BanKey::Loopback));
        assert_eq!(BanKey::parse("LOOPBACK"), Some(BanKey::Loopback));
        assert_eq!(BanKey::parse("192.0.2.7/32"), Some(k("192.0.2.7")));
        for bad in [
            "",
            "x",
            "2001:db8::/48",
            "192.0.2.0/24",
            "1.2.3.4:80",
            "::/0",
            "2001:db8::/65",
        ] {
            assert_eq!(BanKey::parse(bad), None, "{bad}");
        }
    }

    fn rule(max: u32) -> BanRule {
        BanRule {
            kind: BanKind::Management,
            max_failures: max,
            ban: Duration::minutes(30),
        }
    }

    #[test]
    fn attempts_are_counted_before_they_run() {
        let now = Utc::now();
        let bans = Bans::new(rule(5));
        let a = BanKey::of(ip("192.0.2.1"));
        for _ in 0..5 {
            assert_eq!(bans.admit(a, now, false), Admission::Go);
        }
        // Five in flight: the sixth waits, however many come.
        for _ in 0..100 {
            assert_eq!(bans.admit(a, now, false), Admission::Wait);
        }
        // Another address is not held up.
        assert_eq!(
            bans.admit(BanKey::of(ip("192.0.2.2")), now, false),
            Admission::Go
        );
        // One check never ran: its place frees.
        bans.finish(a, None, now);
        assert_eq!(bans.admit(a, now, false), Admission::Go);
        for _ in 0..4 {
            bans.finish(a, Some(false), now);
        }
        assert!(bans.banned_until(a, now).is_none());
        bans.finish(a, Some(false), now);
        let until = bans.banned_until(a, now).unwrap();
        assert_eq!(until, now + Duration::minutes(30));
        assert_eq!(bans.admit(a, now, false), Admission::Banned(until));
        assert_eq!(bans.take_events().len(), 1);
        assert!(bans.take_events().is_empty());
        // The console may try, one at a time; a wrong key counts again.
        assert_eq!(bans.admit(a, now, true), Admission::Go);
        assert_eq!(bans.admit(a, now, true), Admission::Wait);
        bans.finish(a, Some(false), now);
        assert!(bans.check(a, now).is_err());
        // The ban ends by itself.
        let later = until + Duration::seconds(1);
        assert!(bans.check(a, later).is_ok());
        assert_eq!(bans.admit(a, later, false), Admission::Go);
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_period_and_a_success() {
        let now = Utc::now();
        let bans = Bans::new(rule(3));
        let a = BanKey::of(ip("2001:db8::1"));
        assert!(bans.record_failure(a, now));
        assert!(bans.record_failure(a, now));
        bans.forgive(a);
        assert!(bans.record_failure(a, now));
        assert!(bans.record_failure(a, now));
        assert!(bans.banned_until(a, now).is_none());
        // Thirty quiet minutes: the count starts again.
        let later = now + Duration::minutes(30);
        assert!(bans.record_failure(a, later));
        assert!(bans.record_failure(a, later));
        assert!(bans.banned_until(a, later).is_none());
        assert!(bans.record_failure(a, later));
        assert!(bans.banned_until(a, later).is_some());
        // Another host of the same /64 is banned with it.
        assert!(bans.check(BanKey::of(ip("2001:db8::ffff")), later).is_err());
        assert!(bans.check(BanKey::of(ip("2001:db8:0:1::1")), later).is_ok());
    }

    #[test]
    fn the_table_stays_bounded() {
        let now = Utc::now();
        let bans = Bans::with_capacity(rule(1), 8);
        let key = |i: u32| BanKey::V4(Ipv4Addr::from_bits(0x0a00_0000 + i));
        // Failure counts never fill it: they make way.
        let counting = Bans::with_capacity(rule(u32::MAX), 8);
        for i in 0..10_000 {
            assert!(counting.record_failure(key(i), now));
            assert!(counting.tracked() <= 8);
        }
        for i in 0..8 {
            assert!(bans.record_failure(key(i), now));
        }
        assert_eq!(bans.list(now).len(), 8);
        // Full of live bans: unknown addresses are refused, known ones answered as before.
        for i in 8..1000 {
            let e = bans.check(key(i), now).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (503, "server_busy"));
            assert_eq!(e.retry_after, Some(1800));
            assert!(!bans.record_failure(key(i), now));
            assert!(matches!(
                bans.admit(key(i), now, false),
                Admission::Full(1800)
            ));
        }
        assert_eq!(
            bans.check(key(0), now).unwrap_err().code,
            "too_many_attempts"
        );
        assert_eq!(bans.tracked(), 8);
        // Lifting one makes room.
        assert_eq!(bans.lift(Some(key(3)), now).len(), 1);
        assert!(bans.check(key(500), now).is_ok());
        // So does time.
        let later = now + Duration::minutes(30);
        assert!(bans.check(key(900), later).is_ok());
        assert!(bans.list(later).is_empty());
    }

    #[test]
    fn lifting_names_what_was_lifted() {
        let now = Utc::now();
        let bans = Bans::new(rule(1));
        let (a, b) = (BanKey::of(ip("192.0.2.1")), BanKey::Loopback);
        bans.record_failure(a, now);
        bans.record_failure(b, now);
        assert_eq!(bans.list(now).len(), 2);
        assert!(bans.lift(Some(BanKey::of(ip("192.0.2.2"))), now).is_empty());
        let lifted = bans.lift(Some(b), now);
        assert_eq!(lifted.len(), 1);
        assert_eq!(lifted[0].view()["address"], "loopback");
        assert_eq!(lifted[0].view()["kind"], "management");
        assert_eq!(bans.lift(None, now).len(), 1);
        assert!(bans.list(now).is_empty());
        assert_eq!(bans.tracked(), 0);
    }
}
