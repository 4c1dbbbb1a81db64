//! A connection's phase and its deadline ([`Watch`]): waiting for a request's headers, serving
//! requests, idle between them. Shared by the connection's I/O, its requests and its task
//! (`connection.rs`), and by the slots that evict idle connections (`slots.rs`); the rules of
//! the deadlines are in `connection.rs`'s module docs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The deadlines of a connection's phases.
pub(super) struct Timeouts {
    pub(super) header_read: Duration,
    pub(super) idle: Duration,
    pub(super) write: Duration,
}

/// `now + d`, or a moment so far ahead that it never comes when that does not fit.
pub(super) fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Where a connection is in its life, for its deadline.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request's headers, whose first byte (or the connection) came at `since`.
    Head { since: Instant },
    /// Requests in flight: from their headers until their responses are sent (or dropped).
    Busy { requests: usize },
    /// A kept-alive connection with nothing in flight and no byte of a next request, since.
    Idle { since: Instant },
}

/// Which deadline is next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    Head,
    Idle,
    /// A response waits on a client that takes no bytes.
    Write,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// When the socket last took bytes.
    wrote: Instant,
    /// The responses that wait on the client (by id), and since when.
    waiting: Vec<(u64, Instant)>,
    next_response: u64,
    /// The connection's task sleeps without a write deadline: wake it when one appears.
    unwatched: bool,
    /// A read found nothing to read: the client has had its chance to send (a connection
    /// accepted with its request already in the kernel's buffer is never evicted before its
    /// request is seen).
    asked: bool,
    /// Closed to make room for another connection.
    evicted: bool,
}

impl State {
    /// Since when the connection has been doing nothing that it could lose by being closed:
    /// idle (kept alive after a request), or (unless `idle_only`) waiting for a request's
    /// headers; `None` while it serves a request.
    fn evictable_since(&self, idle_only: bool) -> Option<Instant> {
        match self.phase {
            _ if self.evicted => None,
            Phase::Head { since } if self.asked && !idle_only => Some(since),
            Phase::Idle { since } => Some(since),
            _ => None,
        }
    }
}

/// One connection's phase, shared by its I/O, its requests, its task and the slots.
pub(super) struct Watch {
    state: Mutex<State>,
    /// HTTP/2 frames (pings, window updates, settings) arrive between requests, so on HTTP/2
    /// bytes do not start a request's header clock; the idle clock stays.
    pub(super) h2: AtomicBool,
    /// Woken when a deadline moves earlier or appears, or the connection is evicted.
    pub(super) changed: Notify,
    /// Shared by every connection: woken when one may have become evictable.
    freed: Arc<Notify>,
}

impl Watch {
    pub(super) fn new(now: Instant, freed: Arc<Notify>) -> Self {
        Watch {
            state: Mutex::new(State {
                phase: Phase::Head { since: now },
                wrote: now,
                waiting: Vec::new(),
                next_response: 0,
                unwatched: false,
                asked: false,
                evicted: false,
            }),
            h2: AtomicBool::new(false),
            changed: Notify::new(),
            freed,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves a valid state: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A read found nothing: from now on, while it waits for headers, it may be evicted.
    pub(super) fn on_nothing_to_read(&self) {
        let mut state = self.state();
        if state.asked {
            return;
        }
        state.asked = true;
        let evictable = state.evictable_since(false).is_some();
        drop(state);
        if evictable {
            self.freed.notify_one();
        }
    }

    pub(super) fn on_read(&self, now: Instant) {
        let mut state = self.state();
        if matches!(state.phase, Phase::Idle { .. }) && !self.h2.load(Ordering::Relaxed) {
            state.phase = Phase::Head { since: now };
            drop(state);
            self.changed.notify_one();
        }
    }

    pub(super) fn on_write(&self, now: Instant) {
        let mut state = self.state();
        state.wrote = now;
        // HTTP/1.1: the tail of a response whose body has ended still going out is not idleness.
        if let Phase::Idle { since } = &mut state.phase
            && !self.h2.load(Ordering::Relaxed)
        {
            *since = now;
        }
    }

    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.enter();
        InFlight(self.clone())
    }

    pub(super) fn enter(&self) {
        let mut state = self.state();
        state.phase = match state.phase {
            Phase::Busy { requests } => Phase::Busy {
                requests: requests + 1,
            },
            _ => Phase::Busy { requests: 1 },
        };
    }

    pub(super) fn end(&self, now: Instant) {
        let mut state = self.state();
        if let Phase::Busy { requests } = state.phase {
            state.phase = if requests > 1 {
                Phase::Busy {
                    requests: requests - 1,
                }
            } else {
                Phase::Idle { since: now }
            };
        }
        let idle = matches!(state.phase, Phase::Idle { .. });
        drop(state);
        if idle {
            self.changed.notify_one();
            self.freed.notify_one();
        }
    }

    /// A response's head handed to hyper: it waits on the client; its id.
    pub(super) fn respond(&self, now: Instant) -> u64 {
        let mut state = self.state();
        let id = state.next_response;
        state.next_response += 1;
        state.waiting.push((id, now));
        self.watched(state);
        id
    }

    /// Response `id` waits on the client since `since`, or (`None`) no longer does.
    pub(super) fn waits_on_client(&self, id: u64, since: Option<Instant>) {
        let mut state = self.state();
        let at = state.waiting.iter().position(|(i, _)| *i == id);
        match (at, since) {
            (Some(at), Some(since)) => state.waiting[at].1 = since,
            (None, Some(since)) => state.waiting.push((id, since)),
            (Some(at), None) => {
                state.waiting.swap_remove(at);
            }
            (None, None) => {}
        }
        if since.is_some() {
            self.watched(state);
        }
    }

    /// Wake the task if it sleeps without a write deadline, now that there may be one.
    fn watched(&self, mut state: MutexGuard<'_, State>) {
        if state.unwatched {
            state.unwatched = false;
            drop(state);
            self.changed.notify_one();
        }
    }

    /// When the connection is to be closed unless something happens first, and why; `None`
    /// while requests in flight wait only on the application.
    pub(super) fn deadline(&self, timeouts: &Timeouts) -> Option<(Instant, Due)> {
        let mut state = self.state();
        let deadline = match state.phase {
            Phase::Head { since } => Some((after(since, timeouts.header_read), Due::Head)),
            Phase::Idle { since } => Some((after(since, timeouts.idle), Due::Idle)),
            Phase::Busy { .. } => {
                // HTTP/1.1: bytes leaving the socket are the response's own. HTTP/2: they may
                // be control frames the client asks for (a PING's answer) or another
                // stream's, which must not keep a stalled response alive; there only the
                // response taking its next chunk counts.
                let h2 = self.h2.load(Ordering::Relaxed);
                state
                    .waiting
                    .iter()
                    .map(|(_, since)| *since)
                    .min()
                    .map(|since| {
                        let from = if h2 { since } else { since.max(state.wrote) };
                        (after(from, timeouts.write), Due::Write)
                    })
            }
        };
        // Until a response waits on the client, its task must be told when one does.
        state.unwatched = !matches!(deadline, Some((_, Due::Write)));
        deadline
    }

    /// Parked (its address is at its cap): not read, so evictable from now on.
    pub(super) fn park(&self) {
        self.state().asked = true;
    }

    /// Unparked: its request (if the client sent it already) is still to be read.
    pub(super) fn unpark(&self, now: Instant) {
        let mut state = self.state();
        state.phase = Phase::Head { since: now };
        state.asked = false;
    }

    /// Since when the connection could be closed without losing anything (see
    /// [`State::evictable_since`]).
    pub(super) fn evictable_since(&self, idle_only: bool) -> Option<Instant> {
        self.state().evictable_since(idle_only)
    }

    /// Close the connection to make room for another, if it is still evictable.
    pub(super) fn try_evict(&self, idle_only: bool) -> bool {
        let mut state = self.state();
        if state.evictable_since(idle_only).is_none() {
            return false;
        }
        state.evicted = true;
        drop(state);
        self.changed.notify_one();
        true
    }

    pub(super) fn evicted(&self) -> bool {
        self.state().evicted
    }
}

/// A request in flight on its connection, until dropped (with its response's body).
pub(super) struct InFlight(pub(super) Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            write: Duration::from_secs(30),
        }
    }

    /// A clock of whole seconds from a start.
    fn clock() -> impl Fn(u64) -> Instant {
        let start = Instant::now();
        move |secs: u64| start + Duration::from_secs(secs)
    }

    #[test]
    fn far_deadlines_do_not_overflow() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now);
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn phases_move_the_deadline() {
        let t = timeouts();
        let at = clock();
        let watch = Watch::new(at(0), Arc::default());
        let deadline = |w: &Watch| w.deadline(&t).map(|(at, _)| at);
        assert_eq!(deadline(&watch), Some(at(10)));
        // Bytes of the first request do not restart its header clock.
        watch.on_read(at(5));
        assert_eq!(deadline(&watch), Some(at(10)));
        watch.enter();
        watch.enter();
        assert_eq!(deadline(&watch), None);
        // However long the requests take.
        watch.end(at(1000));
        assert_eq!(deadline(&watch), None);
        watch.end(at(1001));
        assert_eq!(deadline(&watch), Some(at(1061)));
        // The first byte of the next request starts its header clock; later ones do not.
        watch.on_read(at(1030));
        assert_eq!(deadline(&watch), Some(at(1040)));
        watch.on_read(at(1031));
        assert_eq!(deadline(&watch), Some(at(1040)));
        // On HTTP/2, frames between requests keep the idle clock.
        watch.enter();
        watch.h2.store(true, Ordering::Relaxed);
        watch.end(at(2000));
        watch.on_read(at(2030));
        assert_eq!(deadline(&watch), Some(at(2060)));
        // And so do the server's own writes (pings).
        watch.on_write(at(2040));
        assert_eq!(deadline(&watch), Some(at(2060)));
    }

    #[test]
    fn the_tail_of_an_http1_response_is_not_idleness() {
        let (t, at) = (timeouts(), clock());
        let watch = Watch::new(at(0), Arc::default());
        watch.enter();
        watch.end(at(1));
        watch.on_write(at(50));
        assert_eq!(watch.deadline(&t), Some((at(110), Due::Idle)));
    }

    #[test]
    fn only_a_response_that_waits_on_the_client_has_a_write_deadline() {
        let (t, at) = (timeouts(), clock());
        let watch = Watch::new(at(0), Arc::default());
        watch.enter();
        // The handler waits on its upstream: no deadline, however long.
        assert_eq!(watch.deadline(&t), None);
        // Its head is handed to hyper.
        let id = watch.respond(at(100));
        assert_eq!(watch.deadline(&t), Some((at(130), Due::Write)));
        // The head is written; the body has nothing ready (a slow provider).
        watch.on_write(at(101));
        watch.waits_on_client(id, None);
        assert_eq!(watch.deadline(&t), None);
        // A chunk, written at once, then nothing for an hour: still the provider's turn.
        watch.waits_on_client(id, Some(at(500)));
        watch.on_write(at(500));
        watch.waits_on_client(id, None);
        assert_eq!(watch.deadline(&t), None);
        // A chunk the client does not take: its clock runs from then.
        watch.waits_on_client(id, Some(at(4000)));
        assert_eq!(watch.deadline(&t), Some((at(4030), Due::Write)));
        // Every write the socket takes moves it.
        watch.on_write(at(4020));
        assert_eq!(watch.deadline(&t), Some((at(4050), Due::Write)));
        watch.on_write(at(4049));
        assert_eq!(watch.deadline(&t), Some((at(4079), Due::Write)));
        // Two responses (HTTP/2): the one waiting longest sets the clock, writes move it.
        watch.enter();
        let other = watch.respond(at(4060));
        assert_eq!(watch.deadline(&t), Some((at(4079), Due::Write)));
        watch.waits_on_client(id, None);
        assert_eq!(watch.deadline(&t), Some((at(4090), Due::Write)));
        watch.waits_on_client(other, None);
        assert_eq!(watch.deadline(&t), None);
    }

    #[test]
    fn the_task_is_woken_when_a_write_deadline_appears() {
        let (t, at) = (timeouts(), clock());
        let watch = Watch::new(at(0), Arc::default());
        watch.enter();
        assert_eq!(watch.deadline(&t), None);
        assert!(watch.state().unwatched);
        let id = watch.respond(at(1));
        assert!(!watch.state().unwatched);
        assert!(watch.deadline(&t).is_some());
        // With a write deadline set, later frames need no wake-up: it only moves later.
        watch.waits_on_client(id, Some(at(2)));
        assert!(!watch.state().unwatched);
        watch.waits_on_client(id, None);
        assert_eq!(watch.deadline(&t), None);
        assert!(watch.state().unwatched);
    }

    #[test]
    fn only_idle_connections_and_those_waiting_for_headers_can_be_evicted() {
        let at = clock();
        let watch = Watch::new(at(3), Arc::default());
        // Not before a read found nothing: its request may be in the kernel's buffer.
        assert_eq!(watch.evictable_since(false), None);
        watch.on_nothing_to_read();
        assert_eq!(watch.evictable_since(false), Some(at(3)));
        // Only idle ones, for an address's own cap.
        assert_eq!(watch.evictable_since(true), None);
        assert!(!watch.try_evict(true));
        watch.enter();
        assert_eq!(watch.evictable_since(false), None);
        assert!(!watch.try_evict(false));
        watch.end(at(7));
        assert_eq!(watch.evictable_since(false), Some(at(7)));
        assert_eq!(watch.evictable_since(true), Some(at(7)));
        watch.on_read(at(9));
        assert_eq!(watch.evictable_since(false), Some(at(9)));
        assert_eq!(watch.evictable_since(true), None);
        assert!(watch.try_evict(false));
        assert!(watch.evicted());
        assert!(!watch.try_evict(false), "evicted once");
        assert_eq!(watch.evictable_since(false), None);
    }
}
