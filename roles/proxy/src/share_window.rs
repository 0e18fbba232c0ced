//! The proxy's window of shares sent to the pool and not answered yet, and its share counts.
//!
//! Over one pool connection a proxy's miners may have at most `max_shares_in_flight` shares
//! waiting for the pool's answer; a share past that is refused at once with `upstream-busy`.
//! The pool refuses a connection's shares past 4,096 waiting on their records anyway, after
//! decrypting and reading each: refused here instead, an overloaded pool spends its time on
//! shares it can record (`mining_e2e`, one run each: accepted shares/s at 40,000 offered were
//! 0.82 of the runs' peak before, 0.92 after).
//!
//! What it costs: the window counts a share from when it is sent until its answer arrives, so
//! one proxy gets at most `max_shares_in_flight` / (answer latency) shares/s accepted (4,096
//! at 200 ms is about 20,000/s): raise it for a distant pool. It is enforced only with a pool
//! that speaks ehash (ours answers every share); another may confirm shares in batches and
//! leave a few unanswered until more come, so its shares are counted, never refused. A pool
//! that stops answering keeps the window full, and the proxy refuses every share (logging
//! why every 10 s) until that connection ends.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;

/// What the proxy did with its miners' shares, since it started (`GET /shares`).
#[derive(Debug)]
pub struct ShareCounts {
    /// The window of shares waiting for the pool.
    pub window: Arc<ShareWindow>,
    /// Accepted by the pool.
    pub accepted: AtomicU64,
    /// Refused by the pool (any reason).
    pub rejected_by_pool: AtomicU64,
    /// Refused here: the window of shares waiting for the pool was full.
    pub refused_upstream_busy: AtomicU64,
    /// Answered `upstream-disconnected` here: no pool connection when the share came, or
    /// the connection was lost before the pool answered it.
    pub refused_upstream_disconnected: AtomicU64,
}

/// A snapshot of [`ShareCounts`].
#[derive(Debug, Clone, Serialize)]
pub struct ShareCountsView {
    /// Shares sent to the pool and not answered yet.
    pub in_flight: usize,
    /// Most that may be (`max_shares_in_flight`).
    pub max_in_flight: usize,
    /// Accepted by the pool.
    pub accepted: u64,
    /// Refused by the pool.
    pub rejected_by_pool: u64,
    /// Refused with `upstream-busy`.
    pub refused_upstream_busy: u64,
    /// Answered `upstream-disconnected`.
    pub refused_upstream_disconnected: u64,
}

impl ShareCounts {
    /// Counts from zero, with `window`.
    pub fn new(window: Arc<ShareWindow>) -> Self {
        Self {
            window,
            accepted: AtomicU64::default(),
            rejected_by_pool: AtomicU64::default(),
            refused_upstream_busy: AtomicU64::default(),
            refused_upstream_disconnected: AtomicU64::default(),
        }
    }

    /// Add one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// Add `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn view(&self) -> ShareCountsView {
        ShareCountsView {
            in_flight: self.window.waiting(),
            max_in_flight: self.window.max(),
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
    /// Unix second of the last warning about a full window.
    warned_at: AtomicU64,
}

impl ShareWindow {
    /// A window of `max` shares.
    pub fn new(max: usize) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            max,
            warned_at: AtomicU64::new(0),
        }
    }

    /// A share was refused for a full window: say so in the log, at most every 10 s.
    pub fn refused(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.warned_at.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                waiting = self.waiting(),
                "{} shares wait for the pool's answer (max_shares_in_flight): refusing new shares with upstream-busy until it answers; a pool that never answers keeps them refused until its connection ends",
                self.max
            );
        }
    }

    /// Shares waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Its size.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// One channel's part of its connection's [`ShareWindow`]; gives its shares back when
/// dropped (the channel or its connection is gone, and so are its answers).
#[derive(Debug)]
pub struct ShareSlots {
    window: Arc<ShareWindow>,
    mine: AtomicUsize,
    /// Refuse past the window's size (else only count).
    enforce: bool,
}

impl ShareSlots {
    /// A channel's slots in `window`; with `enforce` false its shares are counted but never
    /// refused.
    pub fn new(window: Arc<ShareWindow>, enforce: bool) -> Self {
        Self {
            window,
            mine: AtomicUsize::new(0),
            enforce,
        }
    }

    pub(crate) fn take(&self) -> bool {
        let max = if self.enforce {
            self.window.max
        } else {
            usize::MAX
        };
        let taken = self
            .window
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max).then_some(w + 1)
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
        let a = ShareSlots::new(w.clone(), true);
        let b = ShareSlots::new(w.clone(), true);
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

    #[test]
    fn a_channel_not_enforcing_is_counted_but_never_refused() {
        let w = Arc::new(ShareWindow::new(1));
        let strict = ShareSlots::new(w.clone(), true);
        let lax = ShareSlots::new(w.clone(), false);
        assert!(lax.take() && lax.take());
        assert!(!strict.take(), "the window is full");
        assert_eq!(w.waiting(), 2);
        drop(lax);
        assert!(strict.take());
    }
}
