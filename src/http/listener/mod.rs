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
//! - each request carries the body budget and its body's deadline
//!   ([`super::body::BodyLimits`]) for the body readers.
//!
//! hyper's own `header_read_timeout` is not used: its clock also runs while a kept-alive
//! connection waits for its next request, where `idle_timeout` applies. Instead each
//! connection's phase is watched (`connection.rs`): the I/O wrapper notes bytes arriving, the
//! service notes requests starting and their responses ending, and the connection's task
//! closes it when the deadline of its phase passes.

mod connection;

use super::body::BodyBudget;
use crate::config::ServerConfig;
use axum::Router;
use connection::Timeouts;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

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

/// What every connection shares.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    app: TowerToHyperService<Router>,
    budget: Arc<BodyBudget>,
    timeouts: Timeouts,
    body_read_timeout: Duration,
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
/// accepting, close connections with nothing in flight (within a second), let requests in
/// flight finish (each connection then closes), and return once every connection is closed.
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
                tokio::spawn(connection::serve(
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
}
