//! One client connection's life: where it is (waiting for a request's headers, serving
//! requests, idle between them), the deadline of that phase, and closing it when the deadline
//! passes, gracefully where something may still be written, never with a request in flight.

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
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// How long a connection closed gracefully (an HTTP/2 one past its deadline, which is sent a
/// GOAWAY, or any one with nothing in flight when the server stops) gets to write what it has
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The deadlines of a connection's phases.
pub(super) struct Timeouts {
    pub(super) header_read: Duration,
    pub(super) idle: Duration,
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

/// One connection's phase, shared by its I/O, its requests and its task.
struct Watch {
    phase: Mutex<Phase>,
    /// HTTP/2 frames (pings, window updates, settings) arrive between requests, so on HTTP/2
    /// bytes do not start a request's header clock; the idle clock stays.
    h2: AtomicBool,
    /// Woken when a deadline moves earlier or appears.
    changed: Notify,
}

impl Watch {
    fn new(now: Instant) -> Self {
        Watch {
            phase: Mutex::new(Phase::Head { since: now }),
            h2: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        // A panic while holding this lock leaves a valid phase: keep using it.
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on_read(&self, now: Instant) {
        let mut phase = self.phase();
        if matches!(*phase, Phase::Idle { .. }) && !self.h2.load(Ordering::Relaxed) {
            *phase = Phase::Head { since: now };
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.enter();
        InFlight(self.clone())
    }

    fn enter(&self) {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy { requests } => Phase::Busy {
                requests: requests + 1,
            },
            _ => Phase::Busy { requests: 1 },
        };
    }

    fn end(&self, now: Instant) {
        let mut phase = self.phase();
        if let Phase::Busy { requests } = *phase {
            *phase = if requests > 1 {
                Phase::Busy {
                    requests: requests - 1,
                }
            } else {
                Phase::Idle { since: now }
            };
        }
        let idle = matches!(*phase, Phase::Idle { .. });
        drop(phase);
        if idle {
            self.changed.notify_one();
        }
    }

    /// When the connection is to be closed, unless something happens first; `None` while a
    /// request is in flight.
    fn deadline(&self, timeouts: &Timeouts) -> Option<Instant> {
        match *self.phase() {
            Phase::Head { since } => Some(after(since, timeouts.header_read)),
            Phase::Idle { since } => Some(after(since, timeouts.idle)),
            Phase::Busy { .. } => None,
        }
    }
}

/// A request in flight on its connection, until dropped (with its response's body).
struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end(Instant::now());
    }
}

/// A response body that keeps its request in flight until it is sent or dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket, noting in the [`Watch`] when bytes arrive.
struct Watched {
    io: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.on_read(Instant::now());
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
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

/// Serve one connection until it ends, its deadline passes, or the server stops.
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    // Small writes (stream chunks) go out at once, not after a delayed ACK.
    let _ = stream.set_nodelay(true);
    let watch = Arc::new(Watch::new(Instant::now()));
    let io = TokioIo::new(Watched {
        io: stream,
        watch: watch.clone(),
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
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let http = shared.builder.serve_connection(io, service);
    tokio::pin!(http);
    let mut stopping = false;
    // Set when a graceful close starts: the connection is dropped then if still open.
    let mut closing_by: Option<Instant> = None;
    loop {
        let now = Instant::now();
        // None while a request is in flight: nothing cuts it, not even a graceful close.
        let deadline = watch
            .deadline(&shared.timeouts)
            .map(|d| closing_by.unwrap_or(d));
        if let Some(deadline) = deadline {
            let due = deadline <= now;
            let h2 = watch.h2.load(Ordering::Relaxed);
            if closing_by.is_none() && (stopping || (due && h2)) {
                http.as_mut().graceful_shutdown();
                closing_by = Some(after(now, CLOSE_GRACE));
                continue;
            }
            if due {
                // An HTTP/1.1 connection past its header or idle deadline has nothing to
                // finish; any other is past its grace.
                tracing::debug!(%peer, "closing a connection past its deadline");
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
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {}
            _ = stop.wait_for(|stop| *stop), if !stopping => {
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
        let t = Timeouts {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        };
        let at = {
            let start = Instant::now();
            move |secs: u64| start + Duration::from_secs(secs)
        };
        let watch = Watch::new(at(0));
        assert_eq!(watch.deadline(&t), Some(at(10)));
        // Bytes of the first request do not restart its header clock.
        watch.on_read(at(5));
        assert_eq!(watch.deadline(&t), Some(at(10)));
        watch.enter();
        watch.enter();
        assert_eq!(watch.deadline(&t), None);
        // However long the requests take.
        watch.end(at(1000));
        assert_eq!(watch.deadline(&t), None);
        watch.end(at(1001));
        assert_eq!(watch.deadline(&t), Some(at(1061)));
        // The first byte of the next request starts its header clock; later ones do not.
        watch.on_read(at(1030));
        assert_eq!(watch.deadline(&t), Some(at(1040)));
        watch.on_read(at(1031));
        assert_eq!(watch.deadline(&t), Some(at(1040)));
        // On HTTP/2, frames between requests keep the idle clock.
        watch.enter();
        watch.h2.store(true, Ordering::Relaxed);
        watch.end(at(2000));
        watch.on_read(at(2030));
        assert_eq!(watch.deadline(&t), Some(at(2060)));
    }
}
