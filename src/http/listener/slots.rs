//! The connection slots: every open connection by its address, and the choice of the one to
//! close when a new connection needs room. A connection that is idle, or waiting for a
//! request's headers, holds nothing a client would lose by its closing (a kept-alive client
//! reconnects): at a cap, the one that has been so the longest makes room. Connections
//! serving requests are never closed for another.
//!
//! One address (an IPv6 /64) is served on at most `max_connections_per_address` connections
//! at once. Past that, its connection kept alive and idle the longest makes room; if there is
//! none, the new connection is parked (accepted, not yet read) until one of them ends. A
//! parked connection holds a slot of the global cap but is the first to make room for
//! anyone else's, so one address with many requests in flight cannot keep others out, and a
//! local client with hundreds of requests at once is still served, in turn.

use super::phase::Watch;
use crate::config::Cidr;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, oneshot};

/// The address a connection counts against: its IPv4 address, or its IPv6 /64 (what one
/// host, or one customer of a provider, is given).
pub(super) fn address_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// Attempts at evicting the chosen connection before giving up for now (each fails only if
/// the connection started a request between the choice and the attempt).
const EVICT_ATTEMPTS: usize = 4;

pub(super) struct Slots {
    inner: Mutex<Inner>,
    /// `server.max_connections_per_address`.
    per_address: usize,
    /// `server.trusted_proxies`: they speak for many clients, so only the global cap holds them.
    exempt: Vec<Cidr>,
    /// Woken when a connection may have become evictable.
    freed: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    open: HashMap<u64, Open>,
    by_address: HashMap<IpAddr, Address>,
}

/// One address's connections.
#[derive(Default)]
struct Address {
    /// Connections being served.
    serving: usize,
    /// Connections waiting for one of those to end, oldest first, each with its signal.
    parked: VecDeque<(u64, oneshot::Sender<()>)>,
}

struct Open {
    /// `None` for a trusted proxy.
    address: Option<IpAddr>,
    watch: Arc<Watch>,
    parked: bool,
}

impl Inner {
    /// A connection leaves its slot: its address's oldest parked connection, if any, is served
    /// in its place.
    fn remove(&mut self, id: u64) {
        let Some(open) = self.open.remove(&id) else {
            return;
        };
        let Some(address) = open.address else { return };
        let Some(a) = self.by_address.get_mut(&address) else {
            return;
        };
        if open.parked {
            a.parked.retain(|(p, _)| *p != id);
        } else {
            a.serving = a.serving.saturating_sub(1);
            if let Some((next, turn)) = a.parked.pop_front() {
                a.serving += 1;
                let _ = turn.send(());
                if let Some(next) = self.open.get_mut(&next) {
                    next.parked = false;
                }
            }
        }
        if a.serving == 0 && a.parked.is_empty() {
            self.by_address.remove(&address);
        }
    }

    /// The connection evictable the longest. With an `address`: of that address, being
    /// served and idle after a request (one just accepted from it, whose request may be on its
    /// way, waits for its header deadline instead: a burst from one address must not evict
    /// its own requests).
    fn oldest(&self, address: Option<IpAddr>) -> Option<u64> {
        self.open
            .iter()
            .filter(|(_, open)| address.is_none() || (open.address == address && !open.parked))
            .filter_map(|(id, open)| Some((open.watch.evictable_since(address.is_some())?, *id)))
            .min()
            .map(|(_, id)| id)
    }

    /// Evict the connection evictable the longest (see [`Inner::oldest`]); which one, if any.
    /// It leaves its slot at once; its task closes it and gives its descriptors back.
    fn evict(&mut self, address: Option<IpAddr>) -> Option<u64> {
        for _ in 0..EVICT_ATTEMPTS {
            let id = self.oldest(address)?;
            let idle_only = address.is_some();
            if self
                .open
                .get(&id)
                .is_some_and(|open| open.watch.try_evict(idle_only))
            {
                self.remove(id);
                return Some(id);
            }
        }
        None
    }
}

/// A connection's slot, given up when dropped.
pub(super) struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Slot {
    pub(super) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.inner().remove(self.id);
    }
}

/// A connection admitted to a slot.
pub(super) struct Admitted {
    pub(super) slot: Slot,
    /// Another connection of its address was evicted for it (so one descriptor permit comes
    /// back soon).
    pub(super) evicted: bool,
    /// Parked: resolves when the connection may be served (an error if it is evicted first).
    pub(super) turn: Option<oneshot::Receiver<()>>,
}

impl Slots {
    pub(super) fn new(per_address: u32, exempt: Vec<Cidr>, freed: Arc<Notify>) -> Self {
        Slots {
            inner: Mutex::default(),
            per_address: usize::try_from(per_address).unwrap_or(usize::MAX),
            exempt,
            freed,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every change under this lock leaves the maps consistent: keep using them.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Give a new connection from `peer` its slot. At its address's cap, the address's
    /// connection evictable the longest makes room; if every one of them is serving a
    /// request, the new one is parked.
    pub(super) fn admit(self: &Arc<Self>, peer: IpAddr, watch: &Arc<Watch>) -> Admitted {
        let address = (!self.exempt.iter().any(|c| c.contains(peer))).then(|| address_of(peer));
        let mut inner = self.inner();
        let id = inner.next;
        inner.next += 1;
        let (mut evicted, mut turn) = (false, None);
        if let Some(address) = address {
            let full = inner
                .by_address
                .get(&address)
                .is_some_and(|a| a.serving >= self.per_address);
            if full && inner.evict(Some(address)).is_some() {
                evicted = true;
            }
            let a = inner.by_address.entry(address).or_default();
            if a.serving < self.per_address {
                a.serving += 1;
            } else {
                let (tx, rx) = oneshot::channel();
                a.parked.push_back((id, tx));
                turn = Some(rx);
            }
        }
        inner.open.insert(
            id,
            Open {
                address,
                watch: watch.clone(),
                parked: turn.is_some(),
            },
        );
        drop(inner);
        if turn.is_some() {
            // Not read yet, so evictable from now on, by anyone.
            watch.park();
            self.freed.notify_one();
        }
        Admitted {
            slot: Slot {
                slots: self.clone(),
                id,
            },
            evicted,
            turn,
        }
    }

    /// Evict the connection evictable the longest, of any address; whether there was one.
    pub(super) fn evict_oldest(&self) -> Option<u64> {
        self.inner().evict(None)
    }

    fn any_evictable(&self) -> bool {
        self.inner()
            .open
            .values()
            .any(|open| open.watch.evictable_since(false).is_some())
    }

    /// Resolves once some connection is evictable.
    pub(super) async fn evictable(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.any_evictable() {
                return;
            }
            freed.await;
        }
    }

    /// Connections served from `address` (for tests).
    #[cfg(test)]
    fn serving(&self, address: IpAddr) -> usize {
        self.inner()
            .by_address
            .get(&address)
            .map_or(0, |a| a.serving)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        for (a, b, same) in [
            ("10.0.0.1", "10.0.0.1", true),
            ("10.0.0.1", "10.0.0.2", false),
            ("::ffff:10.0.0.1", "10.0.0.1", true),
            ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", true),
            ("2001:db8:1:2::1", "2001:db8:1:3::1", false),
            ("::1", "::2", true),
            ("127.0.0.1", "::1", false),
        ] {
            assert_eq!(address_of(ip(a)) == address_of(ip(b)), same, "{a} {b}");
        }
    }

    /// A connection that has been evictable since `at` (a read found nothing).
    fn waiting(at: Instant) -> Arc<Watch> {
        let watch = Arc::new(Watch::new(at, Arc::default()));
        watch.on_nothing_to_read();
        watch
    }

    /// A connection kept alive and idle since `at`, after a request.
    fn idle(at: Instant) -> Arc<Watch> {
        let watch = Arc::new(Watch::new(at, Arc::default()));
        watch.enter();
        watch.end(at);
        watch
    }

    fn since_of(watch: &Watch) -> Option<Instant> {
        watch.evictable_since(false)
    }

    #[test]
    fn at_an_address_cap_its_longest_waiting_connection_makes_room_or_the_new_one_waits() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        for cap in [1u32, 2, 5] {
            let slots = Arc::new(Slots::new(cap, vec![], Arc::default()));
            let (a, b) = (ip("192.0.2.1"), ip("2001:db8::1"));
            let mut held = Vec::new();
            for i in 0..cap {
                let w = idle(at(10 + u64::from(i)));
                let admitted = slots.admit(a, &w);
                assert!(
                    admitted.turn.is_none() && !admitted.evicted,
                    "under the cap"
                );
                held.push((w, admitted));
            }
            assert_eq!(slots.serving(a), cap as usize);
            // Another address is not concerned.
            let other = waiting(at(0));
            let _other = slots.admit(b, &other);
            assert!(!_other.evicted && _other.turn.is_none());
            // The next from `a` evicts a's oldest, not the older one of `b`.
            let next = idle(at(100));
            let admitted = slots.admit(a, &next);
            assert!(admitted.evicted && admitted.turn.is_none());
            assert!(since_of(&held[0].0).is_none(), "the oldest was evicted");
            assert!(since_of(&other).is_some());
            assert_eq!(slots.serving(a), cap as usize);
            // Every one of a's connections busy: the next two are parked, in order, and
            // evictable by anyone.
            for (w, _) in &held[1..] {
                w.enter();
            }
            next.enter();
            let (first, second) = (waiting(at(200)), waiting(at(201)));
            let mut parked1 = slots.admit(a, &first);
            let mut parked2 = slots.admit(a, &second);
            let mut turn1 = parked1.turn.take().expect("parked");
            let mut turn2 = parked2.turn.take().expect("parked");
            assert!(!parked1.evicted && !parked2.evicted);
            // (A connection just accepted, whose request may be on its way, is not evicted for
            // its own address.)
            assert!(since_of(&first).is_some() && first.evictable_since(true).is_none());
            assert_eq!(slots.serving(a), cap as usize);
            assert!(since_of(&first).is_some());
            // One of a's ends: the first parked is served in its place, the second waits.
            drop(admitted);
            assert_eq!(turn1.try_recv(), Ok(()));
            assert!(turn2.try_recv().is_err());
            assert_eq!(slots.serving(a), cap as usize);
            // A parked one evicted leaves the line.
            assert!(second.try_evict(false));
            drop(parked2);
            drop(parked1);
            assert_eq!(slots.serving(a), cap as usize - 1);
        }
    }

    #[test]
    fn trusted_proxies_are_held_only_by_the_global_cap() {
        let proxy = ip("10.0.0.7");
        let exempt = vec![Cidr("10.0.0.0/24".parse().unwrap())];
        let slots = Arc::new(Slots::new(1, exempt, Arc::default()));
        let mut held = Vec::new();
        for _ in 0..10 {
            let w = waiting(Instant::now());
            w.enter();
            let admitted = slots.admit(proxy, &w);
            assert!(admitted.turn.is_none(), "a trusted proxy is not parked");
            held.push(admitted);
        }
        assert_eq!(slots.serving(proxy), 0);
    }

    #[test]
    fn the_global_eviction_takes_the_longest_waiting_of_any_address() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let slots = Arc::new(Slots::new(100, vec![], Arc::default()));
        let busy = waiting(at(0));
        busy.enter();
        let young = waiting(at(5));
        let old = waiting(at(2));
        let _held: Vec<_> = [
            (&busy, "192.0.2.1"),
            (&young, "192.0.2.2"),
            (&old, "192.0.2.3"),
        ]
        .into_iter()
        .map(|(w, a)| slots.admit(ip(a), w))
        .collect();
        assert!(slots.evict_oldest().is_some());
        assert!(since_of(&old).is_none());
        assert!(slots.evict_oldest().is_some());
        assert!(since_of(&young).is_none());
        assert!(slots.evict_oldest().is_none(), "the busy one stays");
        assert!(!slots.any_evictable());
    }
}
