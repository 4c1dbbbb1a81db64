//! The ban tables: wrong keys counted per client address, and the addresses refused for a
//! while after too many. The management guard and the client-key guard each keep one
//! ([`Bans`]) with their own [`BanRule`].
//!
//! An address is an IPv4 address, an IPv6 /64 (what one host or one subscriber usually gets,
//! so rotating through it gains nothing), or all of loopback as one (every local process is
//! the same machine). A table holds at most [`MAX_TRACKED`] addresses, plus loopback, which
//! always has its place, so the operator on the machine is never refused for want of room.
//!
//! When live bans and checks in flight fill it, an address the table does not know yet is
//! counted with its neighbours instead: by its IPv4 /24 or its IPv6 /48, in a second level of
//! the same size. A ban there covers every address of the block. So one attacker with a /48
//! of /64s, or a few /24s, who bans enough addresses to fill the table, then only bans his
//! own blocks, not every client the table has not met. If both levels fill (it takes 65,536
//! live bans of distinct blocks), what happens depends on the check:
//! - [`Bans::admit`], for the slow management checks, refuses with 503 `server_busy` (the
//!   count before the check is what bounds their memory, so none runs uncounted);
//! - [`Bans::record_failure`], for the fast client-key compare, admits the address untracked
//!   and says so in the auth log (at most once a minute): client keys are long random
//!   secrets, while refusing every new address would lock every client out.

use super::super::error::ApiError;
use crate::domain::rfc3339;
use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

/// Addresses one level of a table tracks at most (an entry is under 100 bytes).
pub const MAX_TRACKED: usize = 65_536;
/// Ban lines waiting for the auth log at most; a flood of bans is summarised past it.
const MAX_EVENTS: usize = 1_000;
/// How often at most the auth log hears that wrong keys went uncounted in a full table.
const UNCOUNTED_NOTICE_EVERY: Duration = Duration::minutes(1);

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

/// README, "Management and client keys": five wrong management keys ban an address for 30 minutes.
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
    /// An IPv4 /24 (the address's first 24 bits), counted when the addresses fill the table.
    V4Block(u32),
    /// An IPv6 /48 (the address's first 48 bits), likewise.
    V6Block(u64),
}

impl BanKey {
    pub fn of(ip: IpAddr) -> BanKey {
        match ip.to_canonical() {
            ip if ip.is_loopback() => BanKey::Loopback,
            IpAddr::V4(a) => BanKey::V4(a),
            IpAddr::V6(a) => BanKey::V6((a.to_bits() >> 64) as u64),
        }
    }

    /// The block an address is counted in when the table of addresses is full.
    pub fn block(self) -> Option<BanKey> {
        match self {
            BanKey::V4(a) => Some(BanKey::V4Block(a.to_bits() >> 8)),
            BanKey::V6(prefix) => Some(BanKey::V6Block(prefix >> 16)),
            BanKey::Loopback | BanKey::V4Block(_) | BanKey::V6Block(_) => None,
        }
    }

    fn is_block(self) -> bool {
        matches!(self, BanKey::V4Block(_) | BanKey::V6Block(_))
    }

    /// What an operator may write to name a ban: `loopback`, an address, or (as the list
    /// shows them) an IPv6 /64, an IPv4 /24 or an IPv6 /48.
    pub fn parse(text: &str) -> Option<BanKey> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("loopback") {
            return Some(BanKey::Loopback);
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(BanKey::of(ip));
        }
        let net = text.parse::<ipnet::IpNet>().ok()?;
        let key = BanKey::of(net.network());
        match (net, net.prefix_len()) {
            (ipnet::IpNet::V4(_), 32) | (ipnet::IpNet::V6(_), 64) => Some(key),
            (ipnet::IpNet::V4(_), 24) | (ipnet::IpNet::V6(_), 48) => key.block(),
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
            BanKey::V4Block(b) => write!(f, "{}/24", Ipv4Addr::from_bits(b << 8)),
            BanKey::V6Block(b) => {
                write!(f, "{}/48", Ipv6Addr::from_bits(u128::from(*b) << 80))
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
    pub fn view(&self) -> serde_json::Value {
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

    fn reset(&mut self) {
        self.failures = 0;
        self.last_failure = None;
    }
}

/// The entries of one level: addresses, or blocks.
#[derive(Debug, Default)]
struct Level {
    entries: HashMap<BanKey, Entry>,
    /// While the level is full of live bans: when the first of them ends (no sweep before).
    full_until: Option<DateTime<Utc>>,
}

impl Level {
    /// Ensure there is room for one more entry: sweep what has expired or is idle. False
    /// when live bans and running checks fill the level.
    fn make_room(&mut self, max: usize, quiet: Duration, now: DateTime<Utc>) -> bool {
        if self.entries.len() < max {
            return true;
        }
        if self.full_until.is_some_and(|u| now < u) {
            return false;
        }
        // Failure counts go first: losing one costs a guesser's count, keeping the table
        // usable costs nothing.
        self.entries.retain(|_, e| {
            e.expire(now, quiet);
            e.live_ban(now).is_some() || e.pending > 0
        });
        if self.entries.len() < max {
            self.full_until = None;
            return true;
        }
        self.full_until = self.entries.values().filter_map(|e| e.live_ban(now)).min();
        if self.full_until.is_none() {
            // Only running checks: they end within seconds.
            self.full_until = Some(now + Duration::seconds(1));
        }
        false
    }
}

#[derive(Debug, Default)]
struct Table {
    /// Addresses, and loopback.
    addresses: Level,
    /// /24s and /48s, for addresses that found `addresses` full.
    blocks: Level,
    events: Vec<String>,
    dropped_events: usize,
    /// Wrong keys that found both levels full, since the last notice about them.
    uncounted: u64,
    last_notice: Option<DateTime<Utc>>,
}

impl Table {
    fn level(&mut self, key: BanKey) -> &mut Level {
        if key.is_block() {
            &mut self.blocks
        } else {
            &mut self.addresses
        }
    }

    fn push_event(&mut self, line: String) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(line);
        } else {
            self.dropped_events += 1;
        }
    }
}

/// The outcome of asking to start a slow key check.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Start it; report its end to [`Bans::finish`] with this key (the address, or the block
    /// it is counted in).
    Go(BanKey),
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
    pub(in crate::http) changed: Notify,
}

/// Whole seconds from `now` to `until`, rounded up (a client told to come back then is not
/// refused again), at least one.
fn secs_until(until: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let ms = (until - now).num_milliseconds();
    (ms.saturating_add(999) / 1000).clamp(1, i64::from(u32::MAX)) as u64
}

/// 503 `server_busy`: refused for now, not for anything the client did wrong.
pub fn busy(secs: u64, message: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_busy", message).retry_after(secs.max(1))
}

impl Bans {
    pub fn new(rule: BanRule) -> Bans {
        Bans::with_capacity(rule, MAX_TRACKED)
    }

    /// A table whose levels hold `max_tracked` entries each.
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

    /// The latest end of the bans in force on `key` and on the block holding it.
    fn ban_covering(
        &self,
        t: &mut Table,
        key: BanKey,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let quiet = self.rule.ban;
        [Some(key), key.block()]
            .into_iter()
            .flatten()
            .filter_map(|k| {
                let level = t.level(k);
                let entry = level.entries.get_mut(&k)?;
                entry.expire(now, quiet);
                let until = entry.live_ban(now);
                if entry.idle() {
                    level.entries.remove(&k);
                }
                until
            })
            .max()
    }

    /// Where the count of `key` is kept, or would be: the address itself if the table knows
    /// it or has room (loopback always has), else its block if that level does. `None` when
    /// both are full.
    fn slot(&self, t: &mut Table, key: BanKey, now: DateTime<Utc>) -> Option<BanKey> {
        let (max, quiet) = (self.max_tracked, self.rule.ban);
        if key == BanKey::Loopback
            || t.addresses.entries.contains_key(&key)
            || t.addresses.make_room(max, quiet, now)
        {
            return Some(key);
        }
        let block = key.block()?;
        if t.blocks.entries.contains_key(&block) || t.blocks.make_room(max, quiet, now) {
            return Some(block);
        }
        None
    }

    /// Seconds until a full table may have room.
    fn full_secs(t: &Table, now: DateTime<Utc>) -> u64 {
        [t.addresses.full_until, t.blocks.full_until]
            .into_iter()
            .flatten()
            .max()
            .map_or(1, |u| secs_until(u, now))
    }

    /// When the ban on `key` (or on its block) ends, if one is in force.
    pub fn banned_until(&self, key: BanKey, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = self.lock();
        self.ban_covering(&mut t, key, now)
    }

    /// Refuse a banned address (the cheap check the client guard makes before it compares a
    /// key). An address the table has no room for is not refused: see the module doc.
    pub fn check(&self, key: BanKey, now: DateTime<Utc>) -> Result<(), ApiError> {
        let until = self.banned_until(key, now);
        until.map_or(Ok(()), |u| Err(self.refusal(u, now)))
    }

    /// Ask to start a slow check from `key`, counting it now. `recovery` (the operator at the
    /// console lifting bans) passes a ban, one check at a time.
    pub fn admit(&self, key: BanKey, now: DateTime<Utc>, recovery: bool) -> Admission {
        let mut t = self.lock();
        let banned = self.ban_covering(&mut t, key, now);
        if let Some(until) = banned
            && !recovery
        {
            return Admission::Banned(until);
        }
        let Some(slot) = self.slot(&mut t, key, now) else {
            return Admission::Full(Bans::full_secs(&t, now));
        };
        let entry = t.level(slot).entries.entry(slot).or_default();
        entry.expire(now, self.rule.ban);
        if banned.is_some() {
            if entry.pending > 0 {
                return Admission::Wait;
            }
        } else if entry.failures.saturating_add(entry.pending) >= self.rule.max_failures {
            return Admission::Wait;
        }
        entry.pending += 1;
        Admission::Go(slot)
    }

    /// A check admitted by [`Bans::admit`] as `slot` ended: `Some(true)` right key,
    /// `Some(false)` wrong key, `None` it never ran.
    pub fn finish(&self, slot: BanKey, outcome: Option<bool>, now: DateTime<Utc>) {
        {
            let mut t = self.lock();
            let t = &mut *t;
            let level = t.level(slot);
            let mut line = None;
            if let Some(entry) = level.entries.get_mut(&slot) {
                entry.pending = entry.pending.saturating_sub(1);
                match outcome {
                    Some(true) => entry.reset(),
                    Some(false) => line = self.failed(slot, entry, now),
                    None => {}
                }
                if entry.idle() {
                    level.entries.remove(&slot);
                }
            }
            if let Some(line) = line {
                t.push_event(line);
                self.has_events.store(true, Ordering::Release);
            }
        }
        self.changed.notify_waiters();
    }

    /// A wrong key from `key`, checked without admission (the fast client-key compare).
    /// False when neither the address nor its block had room to be counted.
    pub fn record_failure(&self, key: BanKey, now: DateTime<Utc>) -> bool {
        let mut t = self.lock();
        let t = &mut *t;
        let Some(slot) = self.slot(t, key, now) else {
            t.uncounted = t.uncounted.saturating_add(1);
            if t.last_notice
                .is_none_or(|l| now - l >= UNCOUNTED_NOTICE_EVERY)
            {
                let line = format!(
                    "{} ban table full ({} addresses, {} blocks): {} wrong {} not counted since the last notice",
                    self.rule.kind.as_str(),
                    t.addresses.entries.len(),
                    t.blocks.entries.len(),
                    t.uncounted,
                    self.rule.kind.what(),
                );
                tracing::warn!("{line}");
                t.push_event(line);
                self.has_events.store(true, Ordering::Release);
                t.uncounted = 0;
                t.last_notice = Some(now);
            }
            return false;
        };
        let entry = t.level(slot).entries.entry(slot).or_default();
        if let Some(line) = self.failed(slot, entry, now) {
            t.push_event(line);
            self.has_events.store(true, Ordering::Release);
        }
        true
    }

    /// A right key from `key`: the count of wrong ones where it is kept starts again.
    pub fn forgive(&self, key: BanKey) {
        let mut t = self.lock();
        for k in [Some(key), key.block()].into_iter().flatten() {
            let level = t.level(k);
            if let Some(entry) = level.entries.get_mut(&k) {
                entry.reset();
                if entry.idle() {
                    level.entries.remove(&k);
                }
                return;
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
        entry.reset();
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

    /// The bans in force, by address (blocks after addresses).
    pub fn list(&self, now: DateTime<Utc>) -> Vec<Ban> {
        let t = self.lock();
        let mut bans: Vec<Ban> = [&t.addresses, &t.blocks]
            .into_iter()
            .flat_map(|level| &level.entries)
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

    /// Lift the bans on `key` and on the block holding it (every ban without one), and forget
    /// their wrong keys.
    pub fn lift(&self, key: Option<BanKey>, now: DateTime<Utc>) -> Vec<Ban> {
        let mut lifted = Vec::new();
        {
            let mut t = self.lock();
            let t = &mut *t;
            for level in [&mut t.addresses, &mut t.blocks] {
                for (k, e) in level.entries.iter_mut() {
                    if key.is_some_and(|want| want != *k && want.block() != Some(*k)) {
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
                    e.reset();
                }
                level.entries.retain(|_, e| !e.idle());
                level.full_until = None;
            }
        }
        self.changed.notify_waiters();
        lifted.sort_by_key(|b| b.key);
        lifted
    }

    /// Ban lines (and notices of uncounted keys) not yet written to the auth log.
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

    /// Entries held: (addresses, blocks).
    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        let t = self.lock();
        (t.addresses.entries.len(), t.blocks.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn k(s: &str) -> BanKey {
        BanKey::of(ip(s))
    }

    #[test]
    fn keys_group_loopback_and_ipv6_64s() {
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
        // Blocks: an IPv4 /24 and an IPv6 /48, at the extremes too.
        let block = |s: &str| k(s).block().unwrap();
        assert_eq!(block("192.0.2.7").to_string(), "192.0.2.0/24");
        assert_eq!(block("192.0.2.7"), block("192.0.2.255"));
        assert_ne!(block("192.0.2.7"), block("192.0.3.0"));
        assert_eq!(block("0.0.0.0").to_string(), "0.0.0.0/24");
        assert_eq!(block("255.255.255.255").to_string(), "255.255.255.0/24");
        assert_eq!(block("2001:db8:1:2::99").to_string(), "2001:db8:1::/48");
        assert_eq!(block("2001:db8:1:ffff::1"), block("2001:db8:1::1"));
        assert_ne!(block("2001:db8:1::1"), block("2001:db8:2::1"));
        assert_eq!(
            block("ffff:ffff:ffff:ffff:ffff::").to_string(),
            "ffff:ffff:ffff::/48"
        );
        assert_eq!(BanKey::Loopback.block(), None);
        assert_eq!(block("192.0.2.7").block(), None);
        // What the list shows parses back; so does any address inside it.
        for key in [
            k("192.0.2.7"),
            k("2001:db8:1:2::99"),
            k("::2"),
            BanKey::Loopback,
            block("192.0.2.7"),
            block("2001:db8:1:2::99"),
            block("::2"),
            block("255.255.255.255"),
        ] {
            assert_eq!(BanKey::parse(&key.to_string()), Some(key));
        }
        assert_eq!(BanKey::parse("2001:db8:1:2::5"), Some(k("2001:db8:1:2::1")));
        assert_eq!(BanKey::parse(" 127.0.0.5 "), Some(BanKey::Loopback));
        assert_eq!(BanKey::parse("LOOPBACK"), Some(BanKey::Loopback));
        assert_eq!(BanKey::parse("192.0.2.7/32"), Some(k("192.0.2.7")));
        assert_eq!(BanKey::parse("192.0.2.7/24"), Some(block("192.0.2.0")));
        assert_eq!(BanKey::parse("2001:db8::/48"), Some(block("2001:db8::1")));
        for bad in [
            "",
            "x",
            "2001:db8::/47",
            "192.0.2.0/25",
            "192.0.2.0/23",
            "1.2.3.4:80",
            "::/0",
            "0.0.0.0/0",
            "2001:db8::/65",
            "127.0.0.0/24",
            "::1/128",
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
        let a = k("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(bans.admit(a, now, false), Admission::Go(a));
        }
        // Five in flight: the sixth waits, however many come.
        for _ in 0..100 {
            assert_eq!(bans.admit(a, now, false), Admission::Wait);
        }
        // Another address is not held up.
        let b = k("192.0.2.2");
        assert_eq!(bans.admit(b, now, false), Admission::Go(b));
        // One check never ran: its place frees.
        bans.finish(a, None, now);
        assert_eq!(bans.admit(a, now, false), Admission::Go(a));
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
        assert_eq!(bans.admit(a, now, true), Admission::Go(a));
        assert_eq!(bans.admit(a, now, true), Admission::Wait);
        bans.finish(a, Some(false), now);
        assert!(bans.check(a, now).is_err());
        // The ban ends by itself.
        let later = until + Duration::seconds(1);
        assert!(bans.check(a, later).is_ok());
        assert_eq!(bans.admit(a, later, false), Admission::Go(a));
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_period_and_a_success() {
        let now = Utc::now();
        let bans = Bans::new(rule(3));
        let a = k("2001:db8::1");
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
        assert!(bans.check(k("2001:db8::ffff"), later).is_err());
        assert!(bans.check(k("2001:db8:0:1::1"), later).is_ok());
    }

    /// 10.0.i.1: one address in each /24.
    fn v4(i: u32) -> BanKey {
        BanKey::V4(Ipv4Addr::from_bits(0x0a00_0001 + (i << 8)))
    }

    #[test]
    fn failure_counts_never_fill_the_table() {
        let now = Utc::now();
        let counting = Bans::with_capacity(rule(u32::MAX), 8);
        for i in 0..10_000 {
            assert!(counting.record_failure(v4(i), now));
            let (addresses, blocks) = counting.tracked();
            assert!(addresses <= 8 && blocks == 0, "{addresses} {blocks}");
        }
    }

    #[test]
    fn a_full_table_counts_new_addresses_by_block_and_refuses_no_one() {
        let now = Utc::now();
        let bans = Bans::with_capacity(rule(3), 8);
        let ban = |key: BanKey| {
            for _ in 0..3 {
                assert!(bans.record_failure(key, now));
            }
        };
        for i in 0..8 {
            ban(v4(i));
        }
        assert_eq!(bans.tracked(), (8, 0));
        let _ = bans.take_events();
        // Full of live bans: unknown addresses are answered, not refused, from the first to
        // the thousandth.
        for i in 8..1000 {
            assert!(bans.check(v4(i), now).is_ok(), "{i}");
        }
        // Their wrong keys are counted by /24: three from one block ban it, for every
        // address in it that the table does not know.
        let x = k("198.51.100.7");
        assert!(bans.record_failure(x, now));
        assert!(bans.record_failure(k("198.51.100.200"), now));
        assert!(bans.check(k("198.51.100.1"), now).is_ok());
        assert!(bans.record_failure(k("198.51.100.0"), now));
        for a in ["198.51.100.0", "198.51.100.7", "198.51.100.255"] {
            let e = bans.check(k(a), now).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.code),
                (403, "too_many_attempts"),
                "{a}"
            );
            assert!(matches!(bans.admit(k(a), now, false), Admission::Banned(_)));
        }
        for a in ["198.51.101.7", "198.51.99.255", "10.0.200.1"] {
            assert!(bans.check(k(a), now).is_ok(), "{a}");
        }
        assert_eq!(
            bans.take_events(),
            vec![format!(
                "management access from 198.51.100.0/24 banned until {} after 3 wrong management keys",
                rfc3339(now + Duration::minutes(30))
            )]
        );
        // The addresses already tracked keep their own bans.
        assert_eq!(
            bans.check(v4(0), now).unwrap_err().code,
            "too_many_attempts"
        );
        // IPv6: more /64s of one /48 are one block.
        for i in 0..3u32 {
            assert!(bans.record_failure(k(&format!("2001:db8:5:{i:x}::1")), now));
        }
        assert!(bans.check(k("2001:db8:5:ffff::1"), now).is_err());
        assert!(bans.check(k("2001:db8:6::1"), now).is_ok());
        assert_eq!(bans.tracked(), (8, 2));
        let list: Vec<String> = bans.list(now).iter().map(|b| b.key.to_string()).collect();
        assert_eq!(list.len(), 10);
        assert_eq!(list[8..], ["198.51.100.0/24", "2001:db8:5::/48"]);
        // Slow checks are counted by block too.
        let y = k("203.0.113.9");
        assert_eq!(bans.admit(y, now, false), Admission::Go(y.block().unwrap()));
        bans.finish(y.block().unwrap(), None, now);
        // Loopback always has its place.
        assert!(bans.record_failure(BanKey::Loopback, now));
        assert_eq!(
            bans.admit(BanKey::Loopback, now, false),
            Admission::Go(BanKey::Loopback)
        );
        bans.finish(BanKey::Loopback, None, now);
        assert_eq!(bans.tracked(), (9, 2));
        // Lifting an address lifts the block holding it.
        let lifted = bans.lift(Some(k("198.51.100.99")), now);
        assert_eq!(lifted.len(), 1);
        assert_eq!(lifted[0].key.to_string(), "198.51.100.0/24");
        assert!(bans.check(x, now).is_ok());
    }

    #[test]
    fn with_both_levels_full_client_keys_go_uncounted_and_slow_checks_wait() {
        let now = Utc::now();
        let bans = Bans::with_capacity(rule(1), 8);
        for i in 0..8 {
            assert!(bans.record_failure(v4(i), now));
        }
        // Eight blocks: 10.1.i.0/24.
        for i in 0..8u32 {
            let a = BanKey::V4(Ipv4Addr::from_bits(0x0a01_0001 + (i << 8)));
            assert!(bans.record_failure(a, now));
        }
        assert_eq!(bans.tracked(), (8, 8));
        assert_eq!(bans.take_events().len(), 16);
        // A new block: answered, its wrong keys not counted, and said so once a minute.
        for i in 0..1000 {
            let a = BanKey::V4(Ipv4Addr::from_bits(0xc000_0200 + i));
            assert!(bans.check(a, now).is_ok(), "{a}");
            assert!(!bans.record_failure(a, now), "{a}");
            assert!(bans.check(a, now).is_ok(), "{a}");
        }
        let events = bans.take_events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            events[0].contains(
                "ban table full (8 addresses, 8 blocks): 1 wrong management keys not counted"
            ),
            "{events:?}"
        );
        let soon = now + Duration::seconds(59);
        assert!(!bans.record_failure(k("192.0.2.1"), soon));
        assert!(bans.take_events().is_empty());
        let minute = now + Duration::minutes(1);
        assert!(!bans.record_failure(k("192.0.2.1"), minute));
        let events = bans.take_events();
        assert!(events[0].contains(": 1001 wrong"), "{events:?}");
        // The slow checks are never run uncounted: refused until the first ban ends.
        assert_eq!(
            bans.admit(k("192.0.2.1"), now, false),
            Admission::Full(1800)
        );
        // But loopback is counted still.
        assert!(bans.record_failure(BanKey::Loopback, now));
        assert!(bans.check(BanKey::Loopback, now).is_err());
        assert_eq!(
            bans.admit(BanKey::Loopback, now, true),
            Admission::Go(BanKey::Loopback)
        );
        // When the bans end, every level has room again.
        let later = now + Duration::minutes(30);
        let a = k("192.0.2.1");
        assert_eq!(bans.admit(a, later, false), Admission::Go(a));
        assert!(bans.record_failure(k("192.0.2.2"), later));
        let list: Vec<BanKey> = bans.list(later).iter().map(|b| b.key).collect();
        assert_eq!(list, [k("192.0.2.2")]);
    }

    #[test]
    fn lifting_names_what_was_lifted() {
        let now = Utc::now();
        let bans = Bans::new(rule(1));
        let (a, b) = (k("192.0.2.1"), BanKey::Loopback);
        bans.record_failure(a, now);
        bans.record_failure(b, now);
        assert_eq!(bans.list(now).len(), 2);
        assert!(bans.lift(Some(k("192.0.2.2")), now).is_empty());
        let lifted = bans.lift(Some(b), now);
        assert_eq!(lifted.len(), 1);
        assert_eq!(lifted[0].view()["address"], "loopback");
        assert_eq!(lifted[0].view()["kind"], "management");
        assert_eq!(bans.lift(None, now).len(), 1);
        assert!(bans.list(now).is_empty());
        assert_eq!(bans.tracked(), (0, 0));
    }
}
