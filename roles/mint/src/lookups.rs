//! The replay guard of signed lookups: the last timestamp the mint accepted for each key, kept
//! in memory only while the key could still replay it. A lookup's timestamp must be within the
//! window of the mint's clock, so once a key's last one has left the window no replay of it can
//! be fresh and the key needs no state; and after a restart only timestamps after the mint's
//! start are taken. Nothing is written to disk, whatever keys look up.
//!
//! Entries leave in time order (a queue of (key, timestamp)), so expiring them costs nothing
//! per lookup however many keys are live. A key that looks up again leaves its earlier entry
//! behind in the queue; once the queue holds twice the live keys (and a margin), the entries
//! that are no key's last are dropped, so it stays within 2 x [`MAX_LOOKUP_KEYS`] + 1024 entries and a
//! key within the window is never forgotten however often others look up.

use std::collections::{HashMap, VecDeque};

/// Keys the guard holds at most, all within the window: past it, lookups from keys it does not
/// hold are refused until the window moves on.
pub const MAX_LOOKUP_KEYS: usize = 1_000_000;
/// Stale queue entries tolerated beyond twice the live keys before the queue is rebuilt.
const COMPACT_MARGIN: usize = 1024;

/// Why a signed lookup's timestamp is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupRefused {
    /// Not after the key's last accepted timestamp.
    Replayed {
        /// The last one accepted.
        last: u64,
    },
    /// Not after the mint's start (what came before is forgotten).
    BeforeStart {
        /// When the mint started (ms).
        start: u64,
    },
    /// Too many distinct keys looked up within the window.
    Full,
    /// The guard is unusable (a panic while it was held): refused rather than unchecked.
    Unavailable,
}

/// The last accepted lookup timestamp of each key seen within the window.
#[derive(Debug)]
pub struct LookupGuard {
    /// Timestamps at or before this are refused (the mint's start).
    floor: u64,
    window_ms: u64,
    last: HashMap<String, u64>,
    /// (key, timestamp) in the order accepted: expiry pops the front.
    order: VecDeque<(String, u64)>,
}

impl LookupGuard {
    /// A guard for a mint started at `floor` (ms) taking lookups within `window_ms` of its
    /// clock.
    pub fn new(floor: u64, window_ms: u64) -> Self {
        Self {
            floor,
            window_ms,
            last: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Accept `timestamp` for `pubkey` at `now` (ms), or say why not.
    pub fn bump(&mut self, pubkey: &str, timestamp: u64, now: u64) -> Result<(), LookupRefused> {
        self.expire(now);
        if timestamp <= self.floor {
            return Err(LookupRefused::BeforeStart { start: self.floor });
        }
        match self.last.get(pubkey) {
            Some(last) if *last >= timestamp => {
                return Err(LookupRefused::Replayed { last: *last });
            }
            None if self.last.len() >= MAX_LOOKUP_KEYS => return Err(LookupRefused::Full),
            _ => {}
        }
        self.last.insert(pubkey.to_string(), timestamp);
        self.order.push_back((pubkey.to_string(), timestamp));
        if self.order.len() > 2 * self.last.len() + COMPACT_MARGIN {
            self.compact();
        }
        Ok(())
    }

    /// Keep in the queue only each live key's last entry (in place, order kept).
    fn compact(&mut self) {
        let last = &self.last;
        self.order.retain(|(k, t)| last.get(k) == Some(t));
    }

    /// Forget keys whose last timestamp left the window: anything they could replay is stale.
    fn expire(&mut self, now: u64) {
        let horizon = now.saturating_sub(self.window_ms);
        while let Some((key, ts)) = self.order.front() {
            // Timestamps come within the window of `now`, so the queue is in time order up to
            // that window (an entry a little ahead of its neighbours only expires a little
            // later): only what left the window is popped.
            if *ts >= horizon {
                break;
            }
            if self.last.get(key) == Some(ts) {
                self.last.remove(key);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_refused_and_keys_past_the_window_are_forgotten() {
        let mut g = LookupGuard::new(1_000, 60_000);
        assert_eq!(
            g.bump("a", 1_000, 2_000),
            Err(LookupRefused::BeforeStart { start: 1_000 })
        );
        assert_eq!(g.bump("a", 1_500, 2_000), Ok(()));
        assert_eq!(
            g.bump("a", 1_500, 2_000),
            Err(LookupRefused::Replayed { last: 1_500 })
        );
        assert_eq!(g.bump("a", 1_501, 2_000), Ok(()));
        // 100,000 fresh keys over five minutes: only the last minute's stay.
        let start = 10_000_000u64;
        for i in 0..100_000u64 {
            let now = start + i * 3;
            assert_eq!(g.bump(&format!("k{i}"), now, now), Ok(()));
        }
        let held = g.last.len();
        assert!(held <= 20_001, "{held} keys held");
        assert!(!g.last.contains_key("a"));
        assert!(g.order.len() <= held + 20_001);
        // A key still in the window is still guarded.
        let last = start + 99_999 * 3;
        assert_eq!(
            g.bump("k99999", last, last),
            Err(LookupRefused::Replayed { last })
        );
    }

    #[test]
    fn a_key_looking_up_often_neither_grows_the_queue_nor_evicts_another_key() {
        let mut g = LookupGuard::new(0, 60_000);
        assert_eq!(g.bump("quiet", 1_000, 1_000), Ok(()));
        for i in 0..50_000u64 {
            assert_eq!(g.bump("busy", 1_001 + i, 1_001), Ok(()));
            assert!(g.order.len() <= 2 * g.last.len() + COMPACT_MARGIN + 1);
        }
        assert_eq!(
            g.bump("quiet", 1_000, 1_001),
            Err(LookupRefused::Replayed { last: 1_000 })
        );
    }
}
