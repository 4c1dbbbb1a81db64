//! One client connection's life: where it is (waiting for a request's headers, serving
//! requests, idle between them), the deadline of that phase, and closing it when the deadline
//! passes (gracefully where something may still be written), when it is evicted to make room
//! for a new connection, or when the server stops.
//!
//! While requests are in flight the only deadline is the write deadline. A response waits on
//! the application while its body has nothing ready (a slow provider, a long upstream wait):
//! no deadline. It waits on the client from the moment hyper takes its head or a frame of its
//! body until hyper asks the body for more: hyper asks only once what it took has gone out, to
//! the socket (HTTP/1.1) or into the client's flow-control window (HTTP/2). While any response
//! waits on the client, the socket must take bytes at least every `write_timeout`, or the
//! connection is closed. Progress is counted at the socket, not per frame, so a client that
//! reads slowly but steadily is never cut, however long one large frame takes to go out; the
//! kernel's queue of unsent bytes is kept short ([`super::UNSENT_LOW_WATER`]) so that a client
//! that reads shows as writes here, not only once megabytes of kernel buffers have drained.

use super::Shared;
use crate::http::body::BodyLimits;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, oneshot, watch};
use tokio::time::Instant;

/// How long a connection closed gracefully (an HTTP/2 one past its header or idle deadline,
/// which is sent a GOAWAY, or any one with nothing in flight when the server stops) gets to
/// write what it has before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The deadlines of a connection's phases.
pub(super) struct Timeouts {
    pub(super) header_read: Duration,
    pub(super) idle: Duration,
    pub(super) write: Duration,
}

/// Where the server is in its life, for every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Stop {
    Running,
    /// Stop accepting requests; those in flight finish.
    Graceful,
    /// `server.shutdown_timeout` has passed: drop every connection now.
    Now,
}

/// `now + d`, or a moment so far ahead that it never comes when that does not fit.
fn after(now: Instant, d: Duration) -> Instant {
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
enum Due {
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
    h2: AtomicBool,
    /// Woken when a deadline moves earlier or appears, or the connection is evicted.
    changed: Notify,
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

    fn on_read(&self, now: Instant) {
        let mut state = self.state();
        if matches!(state.phase, Phase::Idle { .. }) && !self.h2.load(Ordering::Relaxed) {
            state.phase = Phase::Head { since: now };
            drop(state);
            self.changed.notify_one();
        }
    }

    fn on_write(&self, now: Instant) {
        let mut state = self.state();
        state.wrote = now;
        // HTTP/1.1: the tail of a response whose body has ended still going out is not idleness.
        if let Phase::Idle { since } = &mut state.phase
            && !self.h2.load(Ordering::Relaxed)
        {
            *since = now;
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
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
    fn respond(&self, now: Instant) -> u64 {
        let mut state = self.state();
        let id = state.next_response;
        state.next_response += 1;
        state.waiting.push((id, now));
        self.watched(state);
        id
    }

    /// Response `id` waits on the client since `since`, or (`None`) no longer does.
    fn waits_on_client(&self, id: u64, since: Option<Instant>) {
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
    fn deadline(&self, timeouts: &Timeouts) -> Option<(Instant, Due)> {
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
    fn unpark(&self, now: Instant) {
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

    fn evicted(&self) -> bool {
        self.state().evicted
    }
}

/// A request in flight on its connection, until dropped (with its response's body).
struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end(Instant::now());
    }
}

/// A response body that keeps its request in flight until it is sent or dropped, and tells
/// the [`Watch`] whether the response waits on the client or on the application.
///
/// Over HTTP/2 a response's progress is hyper taking its next chunk (socket writes there may
/// be anything: a PING's answer, another stream), and hyper takes the next one only once the
/// last went out within the client's window. So large chunks are handed over in pieces of
/// [`H2_PIECE`]: a client that reads slowly but steadily takes a piece at least that often,
/// while one that opens its window a byte at a time does not.
struct Tracked {
    body: Body,
    id: u64,
    /// What hyper took last has not been asked for more since: it waits on the client.
    waiting: bool,
    in_flight: InFlight,
    /// HTTP/2: the part of a chunk not yet handed over.
    rest: Bytes,
}

/// The largest piece of a response's body handed to hyper at once over HTTP/2.
const H2_PIECE: usize = 16 * 1024;

impl Tracked {
    /// Hyper took a piece: from now the response waits on the client until it asks again.
    fn taken(&mut self) {
        self.waiting = true;
        self.in_flight
            .0
            .waits_on_client(self.id, Some(Instant::now()));
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            let piece = this.rest.split_to(this.rest.len().min(H2_PIECE));
            this.taken();
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => {
                if this.waiting {
                    this.waiting = false;
                    this.in_flight.0.waits_on_client(this.id, None);
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                let h2 = this.in_flight.0.h2.load(Ordering::Relaxed);
                let frame = match frame.into_data() {
                    Ok(mut data) if h2 && data.len() > H2_PIECE => {
                        this.rest = data.split_off(H2_PIECE);
                        Frame::data(data)
                    }
                    Ok(data) => Frame::data(data),
                    Err(frame) => frame,
                };
                this.taken();
                Poll::Ready(Some(Ok(frame)))
            }
            other => {
                if matches!(other, Poll::Ready(Some(Err(_)))) {
                    this.taken();
                }
                other
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.waiting {
            self.in_flight.0.waits_on_client(self.id, None);
        }
    }
}

/// The client's socket, noting in the [`Watch`] when bytes arrive, when a read finds none,
/// and when bytes are written.
struct Watched {
    io: TcpStream,
    watch: Arc<Watch>,
    asked: bool,
}

impl Watched {
    fn wrote(&self, result: &Poll<io::Result<usize>>) {
        if matches!(result, Poll::Ready(Ok(n)) if *n > 0) {
            self.watch.on_write(Instant::now());
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        match result {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.watch.on_read(Instant::now());
            }
            Poll::Pending if !self.asked => {
                self.asked = true;
                self.watch.on_nothing_to_read();
            }
            _ => {}
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What a connection holds while it is open: its permit (its descriptors) and its slot.
pub(super) struct Held {
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) _slot: super::slots::Slot,
}

/// Serve one connection until it ends, its deadline passes, it is evicted, or the server stops.
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    watch: Arc<Watch>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Stop>,
    turn: Option<oneshot::Receiver<()>>,
    _held: Held,
) {
    if let Some(turn) = turn {
        // Parked: wait for a turn of its address; evicted or stopped first, it is dropped
        // unread.
        tokio::pin!(turn);
        loop {
            if watch.evicted() {
                tracing::debug!(%peer, "closing a parked connection to make room for a new one");
                return;
            }
            tokio::select! {
                turn = &mut turn => match turn {
                    Ok(()) => break,
                    Err(_) => return,
                },
                () = watch.changed.notified() => {}
                _ = stop.wait_for(|s| *s != Stop::Running) => return,
            }
        }
        watch.unpark(Instant::now());
    }
    // Small writes (stream chunks) go out at once, not after a delayed ACK.
    let _ = stream.set_nodelay(true);
    super::limit_unsent(&stream);
    let io = TokioIo::new(Watched {
        io: stream,
        watch: watch.clone(),
        asked: false,
    });
    let service = {
        let (watch, shared) = (watch.clone(), shared.clone());
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let in_flight = watch.begin();
            if req.version() == hyper::Version::HTTP_2 {
                watch.h2.store(true, Ordering::Relaxed);
            }
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(BodyLimits {
                budget: shared.budget.clone(),
                deadline: after(Instant::now(), shared.body_read_timeout),
                timeout: shared.body_read_timeout,
            });
            let response = hyper::service::Service::call(&shared.app, req);
            async move {
                let response = response.await?;
                let id = in_flight.0.respond(Instant::now());
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    rest: Bytes::new(),
                    body,
                    id,
                    waiting: true,
                    in_flight,
                }))
            }
        })
    };
    let http = shared.builder.serve_connection(io, service);
    tokio::pin!(http);
    let mut stopping = false;
    let mut seen = Stop::Running;
    // Set when a graceful close starts: the connection is dropped then if still open.
    let mut closing_by: Option<Instant> = None;
    loop {
        if watch.evicted() {
            tracing::debug!(%peer, "closing a connection to make room for a new one");
            return;
        }
        let now = Instant::now();
        // While requests are in flight, a graceful close waits for them: only the write
        // deadline applies.
        let deadline = match watch.deadline(&shared.timeouts) {
            Some((at, due @ (Due::Head | Due::Idle))) => Some((closing_by.unwrap_or(at), due)),
            other => other,
        };
        if let Some((at, due)) = deadline {
            let past = at <= now;
            let h2 = watch.h2.load(Ordering::Relaxed);
            if closing_by.is_none() && due != Due::Write && (stopping || (past && h2)) {
                http.as_mut().graceful_shutdown();
                closing_by = Some(after(now, CLOSE_GRACE));
                continue;
            }
            if past {
                // An HTTP/1.1 connection past its header or idle deadline has nothing to
                // finish; one past its write deadline cannot write it; any other is past its
                // grace.
                tracing::debug!(%peer, ?due, "closing a connection past its deadline");
                return;
            }
        }
        let far = after(now, Duration::from_secs(3600));
        tokio::select! {
            result = http.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = watch.changed.notified() => {}
            () = tokio::time::sleep_until(deadline.map_or(far, |(at, _)| at)), if deadline.is_some() => {}
            next = stop.wait_for(|s| *s > seen) => {
                seen = next.map_or(Stop::Now, |s| *s);
                if seen == Stop::Now {
                    tracing::debug!(%peer, "dropping a connection still open at the end of server.shutdown_timeout");
                    return;
                }
                stopping = true;
                // Requests in flight finish; then HTTP/1.1 closes, HTTP/2 sends a GOAWAY.
                http.as_mut().graceful_shutdown();
            }
        }
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
