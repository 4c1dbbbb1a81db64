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
use super::phase::{Due, InFlight, Watch, after};
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
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, oneshot, watch};
use tokio::time::Instant;

/// How long a connection closed gracefully (an HTTP/2 one past its header or idle deadline,
/// which is sent a GOAWAY, or any one with nothing in flight when the server stops) gets to
/// write what it has before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Where the server is in its life, for every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Stop {
    Running,
    /// Stop accepting requests; those in flight finish.
    Graceful,
    /// `server.shutdown_timeout` has passed: drop every connection now.
    Now,
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
