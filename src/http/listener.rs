//! The listener: our own accept loop on hyper-util's connection builder (HTTP/1.1, and HTTP/2
//! with prior knowledge), so that what clients can hold is bounded by the `server:` config:
//! - at most `max_connections` client connections are open; past that the loop stops
//!   accepting and new connections wait in the kernel's listen backlog, so the process never
//!   runs out of file descriptors (the soft open-file limit is raised to the hard one at start,
//!   and the cap lowered to fit under it, see [`connection_cap`]);
//! - a request's headers must arrive within `header_read_timeout` of its first byte (of the
//!   connection, for its first request);
//! - a kept-alive connection with no request in flight is closed after `idle_timeout`; a
//!   request in flight (a long upstream wait, a long stream) is never cut by it;
//! - each request carries the body budget and its body's deadline ([`BodyLimits`]) for the
//!   body readers.
//!
//! hyper's own `header_read_timeout` is not used: its clock also runs while a kept-alive
//! connection waits for its next request, where `idle_timeout` applies. Instead each
//! connection has a [`Watch`]: the I/O wrapper notes bytes arriving, the service notes requests
//! starting and their responses ending, and the connection's task closes it when the deadline
//! of its phase passes.

use super::body::{BodyBudget, BodyLimits};
use crate::config::ServerConfig;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

/// File descriptors kept for everything but client connections: the database (a few SQLite
/// connections, each with its WAL and shared-memory files), the lock file, the logs, the
/// listener, the runtime's own, stdio, and the clients of webhooks and OAuth.
pub const RESERVED_FDS: u64 = 64;
/// Descriptors one client connection may need: its socket, and one upstream connection.
pub const FDS_PER_CONNECTION: u64 = 2;
/// Largest request head (request line and headers) over HTTP/1.1: hyper's read buffer stops
/// growing here (431 past it), which bounds what a slow client's headers hold per connection.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 flow-control windows (the protocol's default): what a client may send on a
/// connection before a handler reads it, outside the body budget. hyper's default of 1 MiB
/// would let `max_connections` clients park a GiB.
const H2_WINDOW: u32 = 65_535;
/// How long a connection closed gracefully (an HTTP/2 one past its deadline, which is sent a
/// GOAWAY, or any one with nothing in flight when the server stops) gets to write what it has
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The pause after an accept error other than a failed handshake (such as running out of
/// descriptors anyway, through upstream connections), so the loop does not spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Raise the soft limit on open files to the hard limit; the soft limit in force after it.
pub fn raise_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
        // Refused (some systems cap the soft limit below an unlimited hard one): keep the old.
    }
    Ok(rlim_u64(limit.rlim_cur))
}

#[allow(clippy::useless_conversion)]
fn rlim_u64(value: libc::rlim_t) -> u64 {
    // rlim_t is u64 on the 64-bit targets and u32 on some 32-bit ones.
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// The connection cap that fits under `file_limit` open files: every client connection may
/// need [`FDS_PER_CONNECTION`] descriptors, after [`RESERVED_FDS`] for the rest of the server.
/// At least 1, so a tiny limit still serves one client at a time.
pub fn connection_cap(max_connections: u32, file_limit: u64) -> u32 {
    let fits = file_limit.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION;
    let fits = u32::try_from(fits).unwrap_or(u32::MAX).max(1);
    max_connections.min(fits)
}

/// `now + d`, or a moment so far ahead that it never comes when that does not fit.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// What every connection shares.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    app: TowerToHyperService<Router>,
    budget: Arc<BodyBudget>,
    timeouts: Timeouts,
    body_read_timeout: Duration,
}

/// The deadlines of a connection's phases.
struct Timeouts {
    header_read: Duration,
    idle: Duration,
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .initial_connection_window_size(H2_WINDOW)
        .initial_stream_window_size(H2_WINDOW);
    builder
}

/// Serve `app` on `listener` within `config`'s limits until `shutdown` resolves; then stop
/// accepting, close connections with nothing in flight (within [`CLOSE_GRACE`]), let requests
/// in flight finish (each connection then closes), and return once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let cap = match raise_file_limit() {
        Ok(files) => {
            let cap = connection_cap(config.max_connections, files);
            if cap < config.max_connections {
                tracing::warn!(
                    max_connections = config.max_connections,
                    cap,
                    open_file_limit = files,
                    "server.max_connections does not fit under the open file limit ({RESERVED_FDS} \
                     descriptors for the server plus {FDS_PER_CONNECTION} per connection); \
                     serving at most {cap} connections at once"
                );
            }
            cap
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open file limit; keeping server.max_connections");
            config.max_connections
        }
    };
    // The semaphore's own ceiling (about 2^61 permits, or 2^29 on 32-bit targets).
    let cap = u32::try_from(Semaphore::MAX_PERMITS).map_or(cap, |most| cap.min(most));
    let budget = usize::try_from(config.max_buffered_bytes.0).unwrap_or(usize::MAX);
    let shared = Arc::new(Shared {
        builder: builder(),
        app: TowerToHyperService::new(app),
        budget: Arc::new(BodyBudget::new(budget)),
        timeouts: Timeouts {
            header_read: config.header_read_timeout.0,
            idle: config.idle_timeout.0,
        },
        body_read_timeout: config.body_read_timeout.0,
    });
    // A connection holds a permit for as long as it is open.
    let permits = Arc::new(Semaphore::new(cap as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(connection(
                    stream,
                    peer,
                    shared.clone(),
                    stop_rx.clone(),
                    permit,
                ));
            }
            Err(e) if is_handshake_error(&e) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot accept a connection");
                drop(permit);
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = &mut shutdown => break,
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every permit back: every connection is closed.
    let _ = permits.acquire_many(cap).await;
    Ok(())
}

/// An error of one connection's handshake, not of the listener.
fn is_handshake_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
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
async fn connection(
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
    fn the_cap_fits_under_the_file_limit() {
        let cases = [
            (1024, 0, 1),
            (1024, RESERVED_FDS, 1),
            (1024, RESERVED_FDS + 2, 1),
            (1024, RESERVED_FDS + 20, 10),
            (1024, 1024, 480),
            (1024, 20_000, 1024),
            (1, 20_000, 1),
            (u32::MAX, u64::MAX, u32::MAX),
            (u32::MAX, 1 << 20, ((1 << 20) - RESERVED_FDS as u32) / 2),
        ];
        for (max, files, cap) in cases {
            assert_eq!(connection_cap(max, files), cap, "{max} under {files}");
        }
    }

    #[test]
    fn the_soft_file_limit_is_raised_to_the_hard_one() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_file_limit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        let hard = limit.rlim_max;
        limit.rlim_cur = hard.min(256);
        // SAFETY: as in raise_file_limit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        assert_eq!(raise_file_limit().unwrap(), rlim_u64(hard));
        // SAFETY: as in raise_file_limit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, hard);
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
