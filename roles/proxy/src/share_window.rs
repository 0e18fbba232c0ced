//! The proxy's window of shares sent to the pool and not answered yet, and its share counts.
//!
//! Over one pool connection a proxy's miners may have at most `max_shares_in_flight` shares
//! waiting for the pool's answer; a share past that is refused at once with `upstream-busy`.
//! The pool refuses a connection's shares past 4,096 waiting on their records anyway, after
//! decrypting and reading each: refused here instead, an overloaded pool spends its time on
//! shares it can record (`mining_e2e`: at twice the pool's capacity offered, accepted shares
//! per second held at the peak's level instead of falling by a quarter).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;

/// What the proxy did with its miners' shares, since it started (`GET /shares`).
#[derive(Debug, Default)]
pub struct ShareCounts {
    /// Accepted by the pool.
    pub accepted: AtomicU64,
    /// Refused by the pool (any reason).
    pub rejected_by_pool: AtomicU64,
    /// Refused here: the window of shares waiting for the pool was full.
    pub refused_upstream_busy: AtomicU64,
    /// Refused here: no pool connection.
    pub refused_upstream_disconnected: AtomicU64,
}

/// A snapshot of [`ShareCounts`].
#[derive(Debug, Clone, Serialize)]
pub struct ShareCountsView {
    /// Accepted by the pool.
    pub accepted: u64,
    /// Refused by the pool.
    pub rejected_by_pool: u64,
    /// Refused with `upstream-busy`.
    pub refused_upstream_busy: u64,
    /// Refused with `upstream-disconnected`.
    pub refused_upstream_disconnected: u64,
}

impl ShareCounts {
    /// Add one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn view(&self) -> ShareCountsView {
        ShareCountsView {
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected_by_pool: self.rejected_by_pool.load(Ordering::Relaxed),
            refused_upstream_busy: self.refused_upstream_busy.load(Ordering::Relaxed),
            refused_upstream_disconnected: self
                .refused_upstream_disconnected
                .load(Ordering::Relaxed),
        }
    }
}

/// What became of a share for the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareSent {
    /// On its way to the pool.
    Sent,
    /// Not sent: as many shares as the window holds wait for the pool's answer (the pool or
    /// Redis behind it is not keeping up). Refused at once, where a refusal costs least.
    Busy,
    /// Not sent: the connection is gone.
    Gone,
}

/// Shares sent on one pool connection and not answered yet, all its channels together.
#[derive(Debug)]
pub struct ShareWindow {
    waiting: AtomicUsize,
    max: usize,
}

impl ShareWindow {
    /// A window of `max` shares.
    pub fn new(max: usize) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            max,
        }
    }

    /// Shares waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// One channel's part of its connection's [`ShareWindow`]; gives its shares back when
/// dropped (the channel or its connection is gone, and so are its answers).
#[derive(Debug)]
pub struct ShareSlots {
    window: Arc<ShareWindow>,
    mine: AtomicUsize,
}

impl ShareSlots {
    /// A channel's slots in `window`.
    pub fn new(window: Arc<ShareWindow>) -> Self {
        Self {
            window,
            mine: AtomicUsize::new(0),
        }
    }

    pub(crate) fn take(&self) -> bool {
        let taken = self
            .window
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < self.window.max).then_some(w + 1)
            })
            .is_ok();
        if taken {
            self.mine.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    pub(crate) fn give_back(&self, n: usize) {
        // Never more than this channel took: an answer to a share it never counted (a
        // duplicate answer) cannot open the window for others.
        let n = self
            .mine
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| Some(m - n.min(m)))
            .map(|m| n.min(m))
            .unwrap_or(0);
        self.window.waiting.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Drop for ShareSlots {
    fn drop(&mut self) {
        let mine = *self.mine.get_mut();
        self.window.waiting.fetch_sub(mine, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_window_refuses_and_a_dropped_channel_gives_its_shares_back() {
        let w = Arc::new(ShareWindow::new(3));
        let a = ShareSlots::new(w.clone());
        let b = ShareSlots::new(w.clone());
        assert!(a.take() && a.take() && b.take());
        assert!(!b.take(), "the window holds 3");
        assert_eq!(w.waiting(), 3);
        // b answers more than it took: only its own share comes back.
        b.give_back(5);
        assert_eq!(w.waiting(), 2);
        assert!(b.take());
        drop(a);
        assert_eq!(w.waiting(), 1, "a's two shares went with it");
        drop(b);
        assert_eq!(w.waiting(), 0);
    }
}
