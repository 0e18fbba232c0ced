//! Hashing threads shared by every connection of the process. A thread takes the connections
//! in turn and hashes one window of `BATCH` nonces of each one's current job, so one thread
//! serves a thousand simulated miners as well as one; the hashrate cap is for all of them.
//!
//! Each thread numbers its windows: window `t` of thread `i` hashes extranonce2 `i` followed
//! by the counter `(t >> 20) + 1` (big-endian, in the remaining bytes) and nonces
//! `(t & 0xfffff) * BATCH ..`, so no two windows of one process repeat a header (with at most
//! 256 threads and extranonce2 sizes of 2 or more, which the session checks, until the
//! counter wraps: after 2^40 nonces per thread at size 2, 2^96 at size 9 and more), and one
//! connection moves to a new extranonce2 only every 2^32 nonces.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::work::{meets_target, HeaderHasher, Job};

/// Nonces hashed per turn on one connection (then the thread looks at the next).
const BATCH: u32 = 4096;
/// Windows per extranonce2: 2^20 windows of 4096 nonces cover the 2^32 nonces.
const WINDOWS_PER_EXTRANONCE2: u64 = 1 << 20;

/// What the hashing threads work on.
#[derive(Debug, Clone)]
pub struct WorkUnit {
    /// The job.
    pub job: Job,
    /// From `mining.subscribe`.
    pub extranonce1: Vec<u8>,
    /// Counts the channels (subscribe, then each `mining.set_extranonce`) of the connection:
    /// a job id may repeat on a new channel, even with the same extranonce1.
    pub channel: u64,
    /// From `mining.subscribe`.
    pub extranonce2_size: usize,
    /// Share target, big-endian.
    pub target: [u8; 32],
    /// Also report one nonce per this many hashes that misses the target (0 = never).
    pub report_misses_every: u64,
}

/// A nonce a thread found (or picked, for below-target behaviour).
#[derive(Debug, Clone)]
pub struct Found {
    /// Job it belongs to.
    pub job_id: String,
    /// The channel it was hashed for ([`WorkUnit::channel`]).
    pub channel: u64,
    /// Extranonce2 used.
    pub extranonce2: Vec<u8>,
    /// Header time used.
    pub ntime: u32,
    /// The nonce.
    pub nonce: u32,
    /// Header hash, internal byte order.
    pub hash: [u8; 32],
    /// Whether it meets the share target.
    pub meets_target: bool,
}

/// One connection's work, as its session publishes it.
#[derive(Debug)]
pub struct Slot {
    work: RwLock<Option<Arc<WorkUnit>>>,
    found: UnboundedSender<Found>,
}

impl Slot {
    /// Publish new work (None: nothing to hash until the next job).
    pub fn set_work(&self, work: Option<WorkUnit>) {
        if let Ok(mut w) = self.work.write() {
            *w = work.map(Arc::new);
        }
    }

    fn current(&self) -> Option<Arc<WorkUnit>> {
        self.work.read().ok().and_then(|w| w.clone())
    }
}

/// Every connection's slot, and what the threads share.
#[derive(Debug)]
pub struct Farm {
    slots: Vec<Arc<Slot>>,
    /// Set to stop the threads.
    pub stop: AtomicBool,
    /// Hashes computed by all threads.
    pub hashes: AtomicU64,
}

impl Farm {
    /// A farm of `connections` slots, with the receiver of each slot's found nonces.
    pub fn new(connections: usize) -> (Arc<Self>, Vec<UnboundedReceiver<Found>>) {
        let (slots, receivers) = (0..connections)
            .map(|_| {
                let (tx, rx) = unbounded_channel();
                let slot = Arc::new(Slot {
                    work: RwLock::new(None),
                    found: tx,
                });
                (slot, rx)
            })
            .unzip();
        let farm = Self {
            slots,
            stop: AtomicBool::new(false),
            hashes: AtomicU64::new(0),
        };
        (Arc::new(farm), receivers)
    }

    /// Slot `index`.
    pub fn slot(&self, index: usize) -> Arc<Slot> {
        self.slots[index].clone()
    }
}

/// Start `threads` hashing threads sharing `rate_limit` hashes per second (None: unlimited).
pub fn spawn_threads(
    farm: Arc<Farm>,
    threads: usize,
    rate_limit: Option<f64>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let per_thread = rate_limit.map(|r| (r / threads as f64).max(1.0));
    (0..threads)
        .map(|index| {
            let farm = farm.clone();
            std::thread::Builder::new()
                .name(format!("hash-{index}"))
                .spawn(move || hash_loop(index as u8, farm, per_thread))
        })
        .collect()
}

fn extranonce2(index: u8, counter: u64, size: usize) -> Vec<u8> {
    let mut en2 = vec![0u8; size];
    let counter_bytes = counter.to_be_bytes();
    let n = size.saturating_sub(1).min(8);
    en2[size - n..].copy_from_slice(&counter_bytes[8 - n..]);
    if size > 0 {
        en2[0] = index;
    }
    en2
}

/// Extranonce2 and first nonce of window `t` of thread `index`.
fn window_of(index: u8, t: u64, extranonce2_size: usize) -> (Vec<u8>, u32) {
    let en2 = extranonce2(index, t / WINDOWS_PER_EXTRANONCE2 + 1, extranonce2_size);
    (en2, (t % WINDOWS_PER_EXTRANONCE2) as u32 * BATCH)
}

fn hash_loop(index: u8, farm: Arc<Farm>, rate: Option<f64>) {
    let started = Instant::now();
    let slots = farm.slots.len();
    let mut done: u64 = 0;
    let mut window: u64 = 0;
    let mut next = usize::from(index);
    let mut idle = 0usize;
    while !farm.stop.load(Ordering::Relaxed) && slots > 0 {
        let slot = &farm.slots[next % slots];
        next = next.wrapping_add(1);
        let Some(work) = slot.current() else {
            idle += 1;
            if idle >= slots {
                // No connection has work yet: poll interval of an idle thread.
                std::thread::sleep(Duration::from_millis(5));
                idle = 0;
            }
            continue;
        };
        idle = 0;
        let (en2, first) = window_of(index, window, work.extranonce2_size);
        window += 1;
        let root = work.job.merkle_root(&work.extranonce1, &en2);
        let header = work.job.header(&root, work.job.version, work.job.ntime, 0);
        let mut hasher = HeaderHasher::new(&header);
        for nonce in first..=first + (BATCH - 1) {
            let hash = hasher.hash(nonce);
            let meets = meets_target(&hash, &work.target);
            done += 1;
            let report_miss = !meets
                && work.report_misses_every > 0
                && done.is_multiple_of(work.report_misses_every);
            if meets || report_miss {
                // A session that ended dropped its receiver: its nonces go nowhere.
                let _ = slot.found.send(Found {
                    job_id: work.job.job_id.clone(),
                    channel: work.channel,
                    extranonce2: en2.clone(),
                    ntime: work.job.ntime,
                    nonce,
                    hash,
                    meets_target: meets,
                });
            }
        }
        farm.hashes.fetch_add(u64::from(BATCH), Ordering::Relaxed);
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(done as f64 / rate);
            let elapsed = started.elapsed();
            if due > elapsed {
                // Pacing to the hashrate cap, not synchronisation.
                std::thread::sleep(due - elapsed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_get_disjoint_extranonce2() {
        assert_eq!(extranonce2(1, 5, 4), vec![1, 0, 0, 5]);
        assert_ne!(extranonce2(0, 5, 8), extranonce2(1, 5, 8));
        assert_eq!(extranonce2(2, 1, 12).len(), 12);
    }

    #[test]
    fn windows_tile_the_nonce_space_then_move_the_extranonce2() {
        let last = WINDOWS_PER_EXTRANONCE2 - 1;
        assert_eq!(window_of(3, 0, 8), (vec![3, 0, 0, 0, 0, 0, 0, 1], 0));
        assert_eq!(window_of(3, 1, 8).1, BATCH);
        // The last window of an extranonce2 ends on nonce 2^32 - 1 ...
        let (en2, first) = window_of(3, last, 8);
        assert_eq!(u64::from(first) + u64::from(BATCH), 1u64 << 32);
        // ... and the next one starts nonce 0 of the next extranonce2.
        let (next, zero) = window_of(3, last + 1, 8);
        assert_eq!((zero, next[7]), (0, en2[7] + 1));
        // No two windows of two threads share (extranonce2, nonces).
        let mut seen = std::collections::HashSet::new();
        for index in 0..4u8 {
            for t in (0..3).chain(last - 1..last + 3) {
                assert!(
                    seen.insert(window_of(index, t, 2)),
                    "thread {index} window {t}"
                );
            }
        }
    }
}
