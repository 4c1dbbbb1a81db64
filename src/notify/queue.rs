//! The bounded queue between the producers of events (the request path, the jobs) and one
//! webhook's delivery task. A producer never waits: it takes a short lock and returns; when the
//! queue is full the oldest event is dropped, counted, and a warning is logged at most once a
//! minute. (`tokio::sync::mpsc` cannot drop its oldest item, hence this small type.)

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The shortest time between two warnings about dropped events.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A queue of at most `capacity` items for one consumer; the oldest make room for new ones.
pub struct DropQueue<T> {
    capacity: usize,
    state: Mutex<State<T>>,
    /// Wakes the consumer; it keeps a permit when nobody waits, so no push is missed.
    ready: Notify,
    dropped: AtomicU64,
    /// What the warning names (the webhook's origin).
    name: String,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    last_warning: Option<Instant>,
}

impl<T> DropQueue<T> {
    pub fn new(capacity: usize, name: impl Into<String>) -> DropQueue<T> {
        DropQueue {
            capacity: capacity.max(1),
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.max(1)),
                closed: false,
                last_warning: None,
            }),
            ready: Notify::new(),
            dropped: AtomicU64::new(0),
            name: name.into(),
        }
    }

    /// Add `item` without waiting; when full, the oldest item is dropped and counted. Items
    /// pushed after [`DropQueue::close`] are discarded (the server is stopping).
    pub fn push(&self, item: T) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.closed {
            return;
        }
        if state.items.len() >= self.capacity {
            state.items.pop_front();
            let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let now = Instant::now();
            if state
                .last_warning
                .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
            {
                state.last_warning = Some(now);
                tracing::warn!(
                    webhook = %self.name, dropped = total,
                    "the webhook's queue is full: the oldest events are dropped"
                );
            }
        }
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
    }

    /// The next item, waiting for one; `None` once the queue is closed (what is still queued
    /// then is dropped).
    pub async fn pop(&self) -> Option<T> {
        loop {
            {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if state.closed {
                    return None;
                }
                if let Some(item) = state.items.pop_front() {
                    return Some(item);
                }
            }
            self.ready.notified().await;
        }
    }

    /// Stop the queue: the consumer's next [`DropQueue::pop`] answers `None`.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.closed = true;
        state.items.clear();
        drop(state);
        self.ready.notify_one();
    }

    /// Items dropped to make room since the queue was made.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Items waiting.
    pub fn waiting(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .items
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_and_counts_it() {
        let q = DropQueue::new(3, "test");
        for i in 0..5 {
            q.push(i);
        }
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.waiting(), 3);
        assert_eq!(q.pop().await, Some(2));
        assert_eq!(q.pop().await, Some(3));
        assert_eq!(q.pop().await, Some(4));
        q.push(5);
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.pop().await, Some(5));
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_and_close_ends_it() {
        let q = std::sync::Arc::new(DropQueue::new(2, "test"));
        let consumer = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(i) = q.pop().await {
                    got.push(i);
                    if got.len() == 2 {
                        break;
                    }
                }
                let after_close = q.pop().await;
                (got, after_close)
            })
        };
        q.push(1);
        q.push(2);
        // The consumer stops after two, then waits on the closed queue.
        let deadline = Instant::now() + Duration::from_secs(10);
        while q.waiting() > 0 {
            assert!(
                Instant::now() < deadline,
                "the consumer never took its items"
            );
            tokio::task::yield_now().await;
        }
        q.close();
        q.push(3);
        let (got, after_close) = tokio::time::timeout(Duration::from_secs(10), consumer)
            .await
            .expect("the consumer ends")
            .expect("no panic");
        assert_eq!(got, vec![1, 2]);
        assert_eq!(after_close, None);
        assert_eq!(q.waiting(), 0);
    }
}
