//! The listener: our own accept loop on hyper-util's connection builder (HTTP/1.1, and HTTP/2
//! with prior knowledge), so that what clients can hold is bounded by the `server:` config:
//! - at most `max_connections` client connections are open (the soft open-file limit is raised
//!   to the hard one at start, and the cap lowered to fit under it, see [`connection_cap`]).
//!   At the cap, a new connection is accepted and the connection that has been idle or waiting
//!   for its headers the longest is closed to make room (`slots.rs`); only while every one is
//!   serving a request does the loop stop accepting, and new connections wait in the kernel's
//!   listen backlog, so the process never runs out of file descriptors;
//! - at most `max_connections_per_address` of them from one address (an IPv6 /64) are served
//!   at once, trusted proxies aside: past it, that address's connection idle the longest
//!   makes room, or the new one is parked until one of them ends (`slots.rs`);
//! - a request's headers must arrive within `header_read_timeout` of its first byte (of the
//!   connection, for its first request);
//! - a kept-alive connection with no request in flight is closed after `idle_timeout`; a
//!   request in flight (a long upstream wait, a long stream) is never cut by it;
//! - a response that waits on the client must see the socket take bytes at least every
//!   `write_timeout` (`connection.rs`); HTTP/2 connections are pinged after `write_timeout`
//!   of silence and closed if the ping is not answered within it; an HTTP/2 connection has
//!   at most [`H2_MAX_STREAMS`] requests in flight;
//! - each request carries the body budget and its body's deadline
//!   ([`super::body::BodyLimits`]) for the body readers;
//! - a stopping server lets requests in flight finish for `shutdown_timeout`, then drops
//!   their connections.
//!
//! hyper's own `header_read_timeout` is not used: its clock also runs while a kept-alive
//! connection waits for its next request, where `idle_timeout` applies. Instead each
//! connection's phase is watched (`connection.rs`): the I/O wrapper notes bytes arriving and
//! leaving, the service notes requests starting and their responses ending, and the
//! connection's task closes it when the deadline of its phase passes.

mod connection;
mod phase;
mod slots;

use super::body::BodyBudget;
use crate::config::ServerConfig;
use axum::Router;
use connection::{Held, Stop};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use phase::{Timeouts, Watch};
use slots::Slots;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

/// File descriptors kept for everything but client connections: the database (a few SQLite
/// connections, each with its WAL and shared-memory files), the lock file, the logs, the
/// listener, the runtime's own, stdio, and the clients of webhooks and OAuth.
pub const RESERVED_FDS: u64 = 64;
/// Requests in flight at once on one HTTP/2 connection. Each may hold an upstream connection
/// (HTTP/1.1 upstreams take one per request), so this sets [`FDS_PER_CONNECTION`]; a client
/// that wants more opens more connections, which the caps count.
pub const H2_MAX_STREAMS: u32 = 4;
/// Descriptors one client connection may need: its socket, and an upstream connection for
/// each request it may have in flight.
pub const FDS_PER_CONNECTION: u64 = 1 + H2_MAX_STREAMS as u64;
/// Largest request head (request line and headers) over HTTP/1.1: hyper's read buffer stops
/// growing here (431 past it), which bounds what a slow client's headers hold per connection.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 flow-control windows (the protocol's default): what a client may send on a
/// connection before a handler reads it, outside the body budget. hyper's default of 1 MiB
/// would let `max_connections` clients park a GiB.
const H2_WINDOW: u32 = 65_535;
/// The pause after an accept error other than a failed handshake (such as running out of
/// descriptors anyway, through upstream connections), so the loop does not spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// The kernel's queue of bytes not yet sent on a client socket is kept under this
/// (`TCP_NOTSENT_LOWAT`): a socket counts as writable again, so the connection writes (and
/// shows progress to the write deadline) as soon as a client that reads has taken this much,
/// not once a third of a send buffer of up to 4 MiB has drained; and a client that does not
/// read parks at most this beyond what is in flight to it.
pub(crate) const UNSENT_LOW_WATER: u32 = 128 * 1024;
/// HTTP/2 pings more than a day apart are as good as none (and hyper adds the interval to
/// the clock, which must not overflow).
const MOST_PING_INTERVAL: Duration = Duration::from_secs(86_400);

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
    if let Some(raised) = raised(limit) {
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
        // Refused (some systems cap the soft limit below an unlimited hard one): keep the old.
    }
    Ok(rlim_u64(limit.rlim_cur))
}

/// The limit to ask for instead of `limit`: its soft limit raised to its hard one, if lower.
fn raised(limit: libc::rlimit) -> Option<libc::rlimit> {
    (limit.rlim_cur < limit.rlim_max).then_some(libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    })
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

/// Keep the kernel's queue of unsent bytes on a client socket short ([`UNSENT_LOW_WATER`]).
/// Best effort: without it the write deadline still holds, counted in larger steps.
fn limit_unsent(stream: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::fd::AsRawFd;
        let low = libc::c_int::try_from(UNSENT_LOW_WATER).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes at the pointer, which is `low`,
        // alive for the call; the descriptor is the stream's own, open while it is borrowed.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&raw const low).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

/// What every connection shares.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    app: TowerToHyperService<Router>,
    budget: Arc<BodyBudget>,
    timeouts: Timeouts,
    body_read_timeout: Duration,
}

fn builder(write_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let ping = write_timeout.min(MOST_PING_INTERVAL);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .initial_connection_window_size(H2_WINDOW)
        .initial_stream_window_size(H2_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .timer(TokioTimer::new())
        .keep_alive_interval(ping)
        .keep_alive_timeout(ping);
    builder
}

/// The connection cap in force: `server.max_connections`, lowered to fit under the open-file
/// limit (raised first).
fn effective_cap(config: &ServerConfig) -> u32 {
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
    u32::try_from(Semaphore::MAX_PERMITS).map_or(cap, |most| cap.min(most))
}

/// Where the next connection's descriptors come from.
enum Room {
    /// A free permit.
    Free(OwnedSemaphorePermit),
    /// At the cap, with a connection to evict for it.
    Evict,
}

/// Serve `app` on `listener` within `config`'s limits until `shutdown` resolves; then stop
/// accepting, close connections with nothing in flight (within a second), let requests in
/// flight finish for up to `shutdown_timeout` (each connection then closes), drop the
/// connections still open after it, and return once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let cap = effective_cap(config);
    let budget = usize::try_from(config.max_buffered_bytes.0).unwrap_or(usize::MAX);
    let shared = Arc::new(Shared {
        builder: builder(config.write_timeout.0),
        app: TowerToHyperService::new(app),
        budget: Arc::new(BodyBudget::new(budget)),
        timeouts: Timeouts {
            header_read: config.header_read_timeout.0,
            idle: config.idle_timeout.0,
            write: config.write_timeout.0,
        },
        body_read_timeout: config.body_read_timeout.0,
    });
    let freed = Arc::new(Notify::new());
    let slots = Arc::new(Slots::new(
        config.max_connections_per_address,
        config.trusted_proxies.clone(),
        freed.clone(),
    ));
    // A connection holds a permit for as long as its socket is open.
    let permits = Arc::new(Semaphore::new(cap as usize));
    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
    tokio::pin!(shutdown);
    loop {
        let room = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => Room::Free(p),
                Err(_) => break,
            },
            () = slots.evictable() => Room::Evict,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_handshake_error(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "cannot accept a connection");
                drop(room);
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let watch = Arc::new(Watch::new(Instant::now(), freed.clone()));
        let admitted = slots.admit(peer.ip(), &watch);
        let permit = match room {
            Room::Free(permit) => Some(permit),
            // Its address's own eviction gives a permit back.
            Room::Evict if admitted.evicted => tokio::select! {
                permit = permits.clone().acquire_owned() => permit.ok(),
                () = &mut shutdown => break,
            },
            Room::Evict => tokio::select! {
                room = make_room(&permits, &slots, admitted.slot.id()) => match room {
                    Made::Permit(permit) => Some(permit),
                    // The new connection was parked and itself the one to close: closed.
                    Made::NewOneClosed => continue,
                    Made::Closed => None,
                },
                () = &mut shutdown => break,
            },
        };
        let Some(permit) = permit else { break };
        let held = Held {
            _permit: permit,
            _slot: admitted.slot,
        };
        tokio::spawn(connection::serve(
            stream,
            peer,
            watch,
            shared.clone(),
            stop_rx.clone(),
            admitted.turn,
            held,
        ));
    }
    drop(listener);
    let _ = stop_tx.send(Stop::Graceful);
    // Every permit back: every connection is closed.
    let limit = config.shutdown_timeout.0;
    if tokio::time::timeout(limit, permits.acquire_many(cap))
        .await
        .is_err()
    {
        tracing::warn!(
            open = (cap as usize).saturating_sub(permits.available_permits()),
            "connections with requests in flight after server.shutdown_timeout ({}): dropping them",
            humantime::format_duration(limit)
        );
        let _ = stop_tx.send(Stop::Now);
        let _ = permits.acquire_many(cap).await;
    }
    Ok(())
}

/// What [`make_room`] made.
enum Made {
    Permit(OwnedSemaphorePermit),
    /// The connection evictable the longest was the new one itself (parked at its address's
    /// share, holding no permit): it is closed, and needs none.
    NewOneClosed,
    /// The semaphore is closed (it never is).
    Closed,
}

/// A permit for the new connection `new` at the cap: evict the connection idle or waiting for
/// headers the longest and take its permit once its task has closed it; while every
/// connection serves a request, wait for one to end or to become evictable.
async fn make_room(permits: &Arc<Semaphore>, slots: &Slots, new: u64) -> Made {
    let made = |permit: Result<OwnedSemaphorePermit, _>| permit.map_or(Made::Closed, Made::Permit);
    loop {
        if let Ok(permit) = permits.clone().try_acquire_owned() {
            return Made::Permit(permit);
        }
        match slots.evict_oldest() {
            Some(id) if id == new => return Made::NewOneClosed,
            Some(_) => return made(permits.clone().acquire_owned().await),
            None => {}
        }
        tokio::select! {
            permit = permits.clone().acquire_owned() => return made(permit),
            () = slots.evictable() => {}
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_under_the_file_limit() {
        let per = FDS_PER_CONNECTION;
        let cases = [
            (1024, 0, 1),
            (1024, RESERVED_FDS, 1),
            (1024, RESERVED_FDS + per, 1),
            (1024, RESERVED_FDS + 2 * per - 1, 1),
            (1024, RESERVED_FDS + 10 * per, 10),
            (1024, 1024, ((1024 - RESERVED_FDS) / per) as u32),
            (1024, 20_000, 1024),
            (1, 20_000, 1),
            (u32::MAX, u64::MAX, u32::MAX),
            (u32::MAX, 1 << 20, (((1 << 20) - RESERVED_FDS) / per) as u32),
        ];
        for (max, files, cap) in cases {
            assert_eq!(connection_cap(max, files), cap, "{max} under {files}");
        }
        // Under `ulimit -n 1024`, as the README says.
        assert_eq!(connection_cap(1024, 1024), 192);
    }

    #[test]
    fn the_soft_file_limit_is_raised_to_the_hard_one() {
        let limit = |cur, max| libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        let infinity = libc::RLIM_INFINITY;
        for (cur, max, want) in [
            (0, 0, None),
            (256, 1024, Some(1024)),
            (1023, 1024, Some(1024)),
            (1024, 1024, None),
            (1024, infinity, Some(infinity)),
            (infinity, infinity, None),
        ] {
            let got = raised(limit(cur, max)).map(|l| (l.rlim_cur, l.rlim_max));
            assert_eq!(got, want.map(|w| (w, w)), "{cur} under {max}");
        }
        assert_eq!(rlim_u64(infinity), u64::MAX);
        assert_eq!(connection_cap(1024, rlim_u64(infinity)), 1024);
    }

    #[test]
    fn after_raising_the_soft_limit_is_the_one_reported() {
        // Only ever raises (never lowers) the test process's own limit.
        let files = raise_file_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_file_limit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(files, rlim_u64(limit.rlim_cur));
    }
}
