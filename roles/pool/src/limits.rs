//! Per-client limits: connections per IP and a share-rate token bucket per channel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Counts open connections per source IP.
#[derive(Debug, Default)]
pub struct IpLimiter {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it releases the slot.
#[derive(Debug)]
pub struct IpSlot {
    limiter: Arc<IpLimiter>,
    ip: IpAddr,
}

impl IpLimiter {
    /// Take a slot for `ip` if fewer than `max` are open.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.limiter.open.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Take one token; false when the bucket is empty.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_slots_are_counted_and_released() {
        let l = Arc::new(IpLimiter::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = l.acquire(ip, 2).unwrap();
        let _b = l.acquire(ip, 2).unwrap();
        assert!(l.acquire(ip, 2).is_none());
        drop(a);
        assert!(l.acquire(ip, 2).is_some());
    }

    #[test]
    fn bucket_allows_a_burst_then_refuses() {
        let mut b = TokenBucket::new(0.001, 3.0);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
    }
}
