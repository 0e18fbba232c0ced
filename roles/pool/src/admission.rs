//! Who may connect: sources (an IPv4 address, or an IPv6 /64, since one host commonly holds a
//! whole /64), new connections per second per source, the total connection cap (never above
//! what the descriptor limit leaves), and logging refusals at a bounded rate.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::limits::TokenBucket;

/// The source a connection is counted under: an IPv4 address (also when it arrives
/// IPv4-mapped), or the /64 prefix of an IPv6 address.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What the accept loop keeps of a live connection, to make room at the total cap: whether it
/// holds a channel (the connection updates it), and a token that closes it.
#[derive(Debug, Clone, Default)]
pub struct Tracked {
    /// The connection has at least one open channel.
    pub has_channel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled to close the connection (`Close::Evicted`).
    pub evict: stratum_apps::tokio_util::sync::CancellationToken,
}

/// A token bucket per source, with when it was last used.
type Buckets = HashMap<IpAddr, (TokenBucket, Instant)>;

/// New connections per second per source: a token bucket each, forgotten once full again.
#[derive(Debug)]
pub struct ConnectionRate {
    rate: f64,
    burst: f64,
    /// Buckets by source, and when idle ones were last forgotten.
    buckets: Mutex<(Buckets, Instant)>,
}

impl ConnectionRate {
    /// `rate` new connections per second per source, `burst` at once.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::new((HashMap::new(), Instant::now())),
        }
    }

    /// Whether `source` may open one more connection now.
    pub fn allow(&self, source: IpAddr) -> bool {
        let Ok(mut guard) = self.buckets.lock() else {
            return false;
        };
        let (b, pruned) = &mut *guard;
        let now = Instant::now();
        // Bounded memory: a bucket idle long enough to be full again is the same as none.
        // Forgotten at most once per refill period, so a flood of sources does not make every
        // accept walk the whole map.
        let refill = Duration::from_secs_f64(self.burst / self.rate.max(f64::MIN_POSITIVE));
        if b.len() > 4096 && now.duration_since(*pruned) >= refill {
            b.retain(|_, (_, last)| now.duration_since(*last) < refill);
            *pruned = now;
        }
        let (bucket, last) = b
            .entry(source)
            .or_insert_with(|| (TokenBucket::new(self.rate, self.burst), now));
        *last = now;
        bucket.take()
    }
}

/// Logs a kind of event at most once per `every`, with how many were not logged in between.
#[derive(Debug)]
pub struct LogGate {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogGate {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::default(),
        }
    }

    /// `Some(n)` when this event should be logged (`n` like it were not since the last line).
    pub fn pass(&self) -> Option<u64> {
        let mut s = self.state.lock().ok()?;
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let skipped = s.1;
                *s = (Some(now), 0);
                Some(skipped)
            }
        }
    }
}

/// Descriptors kept for everything but mining connections: job declaration (up to 64
/// connections), bitcoind RPC, Redis, `/health` and `/metrics`, the listeners, logs.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// The total connection cap: `configured`, lowered so that client connections can never take
/// the descriptors the pool needs for bitcoind, Redis and `/health` (the descriptor limit
/// `soft` minus [`RESERVED_DESCRIPTORS`]).
pub fn connection_cap(configured: usize, soft: Option<u64>) -> usize {
    match soft {
        Some(soft) => configured.min(soft.saturating_sub(RESERVED_DESCRIPTORS).max(1) as usize),
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_are_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_of(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rate_is_per_source() {
        let r = ConnectionRate::new(0.001, 2.0);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(r.allow(a) && r.allow(a));
        assert!(!r.allow(a), "third in a burst of 2");
        assert!(r.allow(b), "another source has its own bucket");
    }

    #[test]
    fn log_gate_counts_what_it_held_back() {
        let g = LogGate::new(Duration::from_secs(3600));
        assert_eq!(g.pass(), Some(0));
        assert_eq!(g.pass(), None);
        assert_eq!(g.pass(), None);
        let mut s = g.state.lock().unwrap();
        s.0 = Some(Instant::now() - Duration::from_secs(7200));
        drop(s);
        assert_eq!(g.pass(), Some(2));
    }

    #[test]
    fn cap_leaves_room_for_the_pool_itself() {
        assert_eq!(connection_cap(usize::MAX, Some(1024)), 1024 - 128);
        assert_eq!(connection_cap(3, Some(1024)), 3);
        assert_eq!(connection_cap(3, None), 3);
        assert_eq!(connection_cap(5000, Some(100)), 1);
    }
}
