//! Request bodies read whole, within the listener's limits. Every body the handlers read is
//! held in memory (management bodies up to 1 MiB, proxy bodies up to 32 MiB), so two limits
//! bound what clients can make the server hold:
//! - one budget of bytes buffered across all requests at once (`server.max_buffered_bytes`),
//!   charged as the bytes arrive (in blocks of 64 KiB) and given back when the last copy of the
//!   body is dropped, so a client that announces 31 MiB and sends slowly holds what it sent,
//!   not more; shares of it are kept from large proxy bodies and from all proxy bodies
//!   ([`BodyBudget`]);
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

/// The size of the blocks bodies are read into (see [`Blocks`]): what a body may hold beyond
/// the bytes it sent.
const BLOCK: usize = 64 * 1024;
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

/// The blocks a body's bytes are copied into as they arrive, charged to the budget as each is
/// allocated. hyper's chunks are slices of its read buffer: keeping them would keep that
/// buffer, 8 KiB or more for each byte a client trickles alone; growing one buffer instead
/// copies each byte several times and leaves the freed smaller buffers behind (with slow
/// bodies, resident memory reached 2.6 times the budget).
struct Blocks {
    blocks: Vec<Vec<u8>>,
    /// Bytes received so far.
    size: usize,
    held: Held,
    class: BodyClass,
    announced: usize,
    limit: usize,
}

impl Blocks {
    fn push(&mut self, mut chunk: &[u8]) -> Result<(), ApiError> {
        if self.size.saturating_add(chunk.len()) > self.limit {
            return Err(too_large(self.limit));
        }
        while !chunk.is_empty() {
            if self.blocks.last().is_none_or(|b| b.len() == b.capacity()) {
                // A body's last block is cut to what it announced.
                let want = match self.announced.saturating_sub(self.size) {
                    0 => BLOCK,
                    left => left.min(BLOCK),
                };
                let after = self.size.saturating_add(want).max(self.announced);
                if !self.held.take(want, self.class, after) {
                    return Err(busy());
                }
                self.blocks.push(Vec::with_capacity(want));
            }
            let Some(block) = self.blocks.last_mut() else {
                break;
            };
            let n = (block.capacity() - block.len()).min(chunk.len());
            block.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            self.size += n;
        }
        Ok(())
    }

    /// The body in one piece, holding its share of the budget. Joining several blocks copies
    /// them once, freeing each as it goes.
    fn finish(mut self) -> Bytes {
        let data = match self.blocks.len() {
            0 => Bytes::new(),
            1 => Bytes::from(self.blocks.swap_remove(0)),
            _ => {
                let mut data = Vec::with_capacity(self.size);
                for block in self.blocks.drain(..) {
                    data.extend_from_slice(&block);
                }
                Bytes::from(data)
            }
        };
        Bytes::from_owner(Buffered {
            data,
            _held: self.held,
        })
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
        let mut blocks = Blocks {
            blocks: Vec::new(),
            size: 0,
            held: Held {
                budget: budget.clone(),
                bytes: 0,
            },
            class,
            announced,
            limit,
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("The request body could not be read: {e}"),
                )
            })?;
            if let Ok(chunk) = frame.into_data() {
                blocks.push(&chunk)?;
            }
        }
        Ok(blocks.finish())
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

    fn blocks(budget: &Arc<BodyBudget>, announced: usize, limit: usize) -> Blocks {
        Blocks {
            blocks: Vec::new(),
            size: 0,
            held: Held {
                budget: budget.clone(),
                bytes: 0,
            },
            class: BodyClass::Proxy,
            announced,
            limit,
        }
    }

    #[test]
    fn bodies_are_copied_into_blocks_charged_as_they_are_made() {
        let budget = Arc::new(BodyBudget::new(64 << 20));
        // (announced, 0 when chunked; the sizes of the chunks as they arrive)
        let cases = [
            (0, vec![]),
            (1, vec![1]),
            (BLOCK + 1, vec![1; BLOCK + 1]),
            (3 * BLOCK + 5, vec![BLOCK - 1, 2 * BLOCK, 6]),
            (2 * BLOCK, vec![BLOCK]),
            (0, vec![10, BLOCK, 3]),
            (0, vec![1]),
        ];
        for (announced, chunks) in cases {
            let mut body = blocks(&budget, announced, 32 << 20);
            let mut expected = Vec::new();
            for (i, n) in chunks.iter().enumerate() {
                let chunk = vec![i as u8; *n];
                body.push(&chunk).unwrap();
                expected.extend(chunk);
            }
            // Whole blocks, the last cut to the announcement (if any).
            let mut charged = expected.len().div_ceil(BLOCK) * BLOCK;
            if announced > 0 {
                charged = charged.min(announced);
            }
            assert_eq!(budget.in_use(), charged, "{announced} {chunks:?}");
            let bytes = body.finish();
            assert_eq!(&bytes[..], &expected[..]);
            drop(bytes);
            assert_eq!(budget.in_use(), 0);
        }
    }

    #[test]
    fn a_body_past_its_limit_or_the_budget_is_refused_and_gives_back_what_it_held() {
        let budget = Arc::new(BodyBudget::new(4 * BLOCK));
        let mut body = blocks(&budget, 0, 32 << 20);
        for _ in 0..3 {
            body.push(&[0; BLOCK]).unwrap();
        }
        // 7/8 of four blocks: the fourth does not fit.
        let e = body.push(&[0; 1]).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (503, "server_busy"));
        drop(body);
        assert_eq!(budget.in_use(), 0);
        let mut body = blocks(&budget, 0, 10);
        body.push(&[0; 10]).unwrap();
        let e = body.push(&[0; 1]).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (413, "body_too_large"));
    }
}
