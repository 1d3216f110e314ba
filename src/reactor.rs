//! The poll loop's plumbing: the `mio::Poll`, the token space, the waker, and a deadline heap.
//!
//! Fixed tokens name the singletons (signals, waker, control listener, link, button);
//! dynamic tokens come from each owner's [`TokenPool`] range (control connections, task
//! pipes), so the daemon dispatches an event by the range its token falls in. Each
//! fd-owning module registers its own source and derives its interest from its state; the
//! daemon only dispatches. Time is an input: components report their next deadline and the
//! loop polls with the earliest one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Registry, Token, Waker};

/// The signalfd.
pub const SIGNALS: Token = Token(0);
/// The `mio::Waker` (audio threads, the DNS helper, the state writer).
pub const WAKER: Token = Token(1);
/// The control socket listener.
pub const CONTROL: Token = Token(2);
/// The Realtime WebSocket.
pub const LINK: Token = Token(3);
/// The button fd.
pub const BUTTON: Token = Token(4);
/// Control socket connections: `CONTROL_CLIENTS..TASK_PIPES`.
pub const CONTROL_CLIENTS: usize = 1 << 20;
/// Agent stdout/stderr pipes: `TASK_PIPES..`.
pub const TASK_PIPES: usize = 1 << 24;

/// Tokens for one owner's dynamic fds, from its own range so the daemon can dispatch by range.
#[derive(Debug)]
pub struct TokenPool {
    next: usize,
    end: usize,
    free: Vec<usize>,
}

impl TokenPool {
    pub fn new(start: usize, end: usize) -> TokenPool {
        TokenPool {
            next: start,
            end,
            free: Vec::new(),
        }
    }

    /// A token not in use; give it back with [`TokenPool::release`] after deregistering.
    pub fn take(&mut self) -> Option<Token> {
        if let Some(t) = self.free.pop() {
            return Some(Token(t));
        }
        if self.next >= self.end {
            return None;
        }
        self.next += 1;
        Some(Token(self.next - 1))
    }

    pub fn release(&mut self, token: Token) {
        self.free.push(token.0);
    }
}

pub struct Reactor {
    poll: Poll,
    events: Events,
    waker: Arc<Waker>,
}

impl Reactor {
    pub fn new() -> io::Result<Reactor> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Reactor {
            poll,
            events: Events::with_capacity(256),
            waker,
        })
    }

    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// A handle other threads use to wake the loop.
    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Waits for readiness until `deadline` (or forever when `None`); `EINTR` is a
    /// spurious, empty wake-up, not an error.
    pub fn poll(&mut self, deadline: Option<Instant>, now: Instant) -> io::Result<&Events> {
        // Round up so a deadline 0.3 ms away does not turn into a busy 0 ms poll loop.
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(now);
            if left.is_zero() {
                left
            } else {
                Duration::from_millis(left.as_micros().div_ceil(1000) as u64)
            }
        });
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
            Err(e) => return Err(e),
        }
        Ok(&self.events)
    }
}

/// The earliest of several optional deadlines.
pub fn earliest(deadlines: impl IntoIterator<Item = Option<Instant>>) -> Option<Instant> {
    deadlines.into_iter().flatten().min()
}

/// A min-heap of `(deadline, key)`. Keys are not removed when their timer becomes moot:
/// the owner checks its own state when a key fires and ignores stale ones.
#[derive(Debug)]
pub struct Timers<K: Ord> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
}

impl<K: Ord> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
        }
    }
}

impl<K: Ord> Timers<K> {
    pub fn schedule(&mut self, at: Instant, key: K) {
        self.heap.push(Reverse((at, key)));
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The next key whose deadline is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<K> {
        if self.heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
            self.heap.pop().map(|Reverse((_, k))| k)
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_deadline_order() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.schedule(t0 + Duration::from_millis(30), "c");
        timers.schedule(t0 + Duration::from_millis(10), "a");
        timers.schedule(t0 + Duration::from_millis(20), "b");
        assert_eq!(timers.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(timers.pop_expired(t0), None);
        let later = t0 + Duration::from_millis(25);
        assert_eq!(timers.pop_expired(later), Some("a"));
        assert_eq!(timers.pop_expired(later), Some("b"));
        assert_eq!(timers.pop_expired(later), None);
        assert_eq!(timers.len(), 1);
    }

    #[test]
    fn token_pools_reuse_and_stay_in_range() {
        let mut pool = TokenPool::new(10, 12);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_eq!((a, b), (Token(10), Token(11)));
        assert_eq!(pool.take(), None, "range exhausted");
        pool.release(a);
        assert_eq!(pool.take(), Some(a));
    }

    #[test]
    fn earliest_ignores_none() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(earliest([None, Some(t1), Some(t0)]), Some(t0));
        assert_eq!(earliest([None, None]), None);
    }
}
