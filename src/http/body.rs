//! Request bodies read whole, within the listener's limits. Every body the handlers read is
//! held in memory (management bodies up to 1 MiB, proxy bodies up to 32 MiB), so two limits
//! bound what clients can make the server hold:
//! - one budget of bytes buffered across all requests at once (`server.max_buffered_bytes`),
//!   charged as the bytes arrive and given back when the last copy of the body is dropped, so a
//!   client that announces 31 MiB and sends slowly holds what it sent, not more; shares of it
//!   are kept from large proxy bodies and from all proxy bodies ([`BodyBudget`]);
//! - a deadline by which the body must have arrived whole (`server.body_read_timeout`, counted
//!   from the request's headers).
//!
//! The listener attaches both to every request ([`BodyLimits`]); [`read`] applies them.

use super::error::ApiError;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header::CONTENT_LENGTH;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Seconds a client refused for want of budget is asked to wait: bodies in flight are read
/// and handed on within moments, or cut off by `body_read_timeout`.
const BUSY_RETRY_SECS: u64 = 1;

/// Which share of the budget a body may use. Management bodies may use what proxy bodies
/// cannot take, so operators can still act while proxy clients fill the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyClass {
    Management,
    Proxy,
}

/// Proxy bodies above this size are "large" (prompts with images): they may fill less of the
/// budget than small ones, so a few slow uploads cannot crowd out ordinary requests.
pub const LARGE_BODY: usize = 1024 * 1024;

/// The bytes of request bodies buffered across all requests at once, against one ceiling.
/// Large proxy bodies may fill 3/4 of it, proxy bodies up to [`LARGE_BODY`] 7/8, and
/// management bodies all of it.
#[derive(Debug)]
pub struct BodyBudget {
    total: usize,
    used: AtomicUsize,
}

impl BodyBudget {
    pub fn new(total: usize) -> Self {
        BodyBudget {
            total,
            used: AtomicUsize::new(0),
        }
    }

    /// The most a body of `class` and `size` bytes (announced, or read so far) may find
    /// buffered, its own bytes included.
    pub fn ceiling(&self, class: BodyClass, size: usize) -> usize {
        match class {
            BodyClass::Management => self.total,
            BodyClass::Proxy if size <= LARGE_BODY => self.total - self.total / 8,
            BodyClass::Proxy => self.total - self.total / 4,
        }
    }

    /// Bytes a body of `class` and `size` could still take now.
    pub fn left(&self, class: BodyClass, size: usize) -> usize {
        self.ceiling(class, size)
            .saturating_sub(self.used.load(Ordering::Acquire))
    }

    /// Bytes held now by the bodies being read or in use.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn try_take(&self, n: usize, ceiling: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&after| after <= ceiling)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What the listener attaches to every request: the shared budget and the moment the body
/// must have arrived by.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    pub budget: Arc<BodyBudget>,
    pub deadline: Instant,
    /// `server.body_read_timeout`, for the message of a 408.
    pub timeout: Duration,
}

/// Budget held by one body, given back when dropped.
struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Held {
    /// Take `n` more bytes for a body of `class` that will then be `size` bytes (or more).
    fn take(&mut self, n: usize, class: BodyClass, size: usize) -> bool {
        let ok = self.budget.try_take(n, self.budget.ceiling(class, size));
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// A body read whole, owning its share of the budget: the share comes back when the last
/// `Bytes` of it is dropped, that is when the handler (and the upstream call it made) is done
/// with it.
struct Buffered {
    data: Bytes,
    _held: Held,
}

impl AsRef<[u8]> for Buffered {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("The body is larger than {limit} bytes"),
    )
}

fn busy() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_busy",
        "The server holds as many request bodies as it may buffer at once; retry shortly",
    )
    .retry_after(BUSY_RETRY_SECS)
}

/// Read a whole body of at most `limit` bytes within the request's [`BodyLimits`]: 413 past
/// `limit`, 503 `server_busy` (with `Retry-After`) as soon as it does not fit in the budget,
/// 408 `body_timeout` past the deadline. A body not read to its end makes hyper close the
/// connection after the answer.
pub async fn read(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let Some(limits) = req.extensions().get::<BodyLimits>().cloned() else {
        // Fail closed: only the listener knows the budget and the deadline.
        return Err(ApiError::internal(
            &"a request reached a body reader without the listener's limits",
        ));
    };
    let class = req
        .extensions()
        .get::<BodyClass>()
        .copied()
        .unwrap_or(BodyClass::Proxy);
    let announced = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let budget = &limits.budget;
    let announced = announced.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
    if announced > limit {
        return Err(too_large(limit));
    }
    let ceiling = budget.ceiling(class, announced);
    if announced > ceiling {
        return Err(too_large(ceiling));
    }
    // Refused at once rather than read until the budget runs out.
    if announced > budget.left(class, announced) {
        return Err(busy());
    }
    let mut body = req.into_body();
    let collect = async {
        let mut held = Held {
            budget: budget.clone(),
            bytes: 0,
        };
        // The chunks as hyper hands them over, joined once at the end: growing one buffer
        // as they came copied each byte several times and left the freed smaller buffers
        // behind, about twice the budget in resident memory with slow bodies.
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut size = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("The request body could not be read: {e}"),
                )
            })?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            size = size.saturating_add(chunk.len());
            if size > limit {
                return Err(too_large(limit));
            }
            if !held.take(chunk.len(), class, size.max(announced)) {
                return Err(busy());
            }
            chunks.push(chunk);
        }
        let data = if chunks.len() == 1 {
            chunks.swap_remove(0)
        } else {
            let mut data = Vec::with_capacity(size);
            for chunk in chunks.drain(..) {
                data.extend_from_slice(&chunk);
            }
            Bytes::from(data)
        };
        Ok(Bytes::from_owner(Buffered { data, _held: held }))
    };
    match tokio::time::timeout_at(limits.deadline, collect).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "The request body did not arrive whole within {}",
                humantime::format_duration(limits.timeout)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_bodies_leave_room_for_small_ones_and_proxy_bodies_for_management() {
        let small = LARGE_BODY;
        let large = LARGE_BODY + 1;
        for total in [1 << 20, 8, 256 << 20, usize::MAX] {
            let b = BodyBudget::new(total);
            let (m, s, l) = (
                b.ceiling(BodyClass::Management, large),
                b.ceiling(BodyClass::Proxy, small),
                b.ceiling(BodyClass::Proxy, large),
            );
            assert_eq!(m, total);
            assert!(l <= s && s <= m);
            assert_eq!(b.ceiling(BodyClass::Proxy, 0), s);
            assert!(b.try_take(l, l));
            assert!(!b.try_take(1, l));
            assert_eq!(b.left(BodyClass::Proxy, large), 0);
            assert_eq!(b.left(BodyClass::Proxy, small), s - l);
            assert!(b.try_take(s - l, s));
            assert!(!b.try_take(1, s));
            assert_eq!(b.left(BodyClass::Management, small), m - s);
            assert!(b.try_take(m - s, m));
            assert!(!b.try_take(1, m));
            // A take that would overflow is refused, not wrapped.
            assert!(!b.try_take(usize::MAX, usize::MAX));
            b.give_back(total);
            assert_eq!(b.in_use(), 0);
        }
    }

    #[test]
    fn a_held_share_comes_back_with_the_last_copy() {
        let budget = Arc::new(BodyBudget::new(1000));
        let mut held = Held {
            budget: budget.clone(),
            bytes: 0,
        };
        assert!(held.take(300, BodyClass::Proxy, 300));
        assert!(held.take(500, BodyClass::Proxy, 800));
        assert!(!held.take(200, BodyClass::Proxy, 1000), "past 7/8 of 1000");
        let bytes = Bytes::from_owner(Buffered {
            data: Bytes::from(vec![0; 800]),
            _held: held,
        });
        let copy = bytes.slice(10..20);
        assert_eq!(budget.in_use(), 800);
        drop(bytes);
        assert_eq!(budget.in_use(), 800);
        drop(copy);
        assert_eq!(budget.in_use(), 0);
    }
}
