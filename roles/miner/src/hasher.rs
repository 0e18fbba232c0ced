//! Hashing threads: each scans its own extranonce2 space of the current job and reports
//! nonces to the connection task, paced to the configured hashrate cap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::work::{meets_target, HeaderHasher, Job};

/// Nonces hashed between two looks at the shared state (new job, stop flag, pacing).
const BATCH: u32 = 4096;

/// What the hashing threads work on.
#[derive(Debug, Clone)]
pub struct WorkUnit {
    /// The job.
    pub job: Job,
    /// From `mining.subscribe`.
    pub extranonce1: Vec<u8>,
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

/// State shared by the connection task and the hashing threads.
#[derive(Debug, Default)]
pub struct Shared {
    /// Current work, replaced on every notify/set_difficulty.
    pub work: RwLock<Option<Arc<WorkUnit>>>,
    /// Bumped whenever `work` changes.
    pub generation: AtomicU64,
    /// Set to stop the threads.
    pub stop: AtomicBool,
    /// Hashes computed by all threads.
    pub hashes: AtomicU64,
}

impl Shared {
    /// Publish new work.
    pub fn set_work(&self, work: Option<WorkUnit>) {
        if let Ok(mut w) = self.work.write() {
            *w = work.map(Arc::new);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn current(&self) -> (u64, Option<Arc<WorkUnit>>) {
        let gen = self.generation.load(Ordering::SeqCst);
        let work = self.work.read().ok().and_then(|w| w.clone());
        (gen, work)
    }
}

/// Start `threads` hashing threads sharing `rate_limit` hashes per second (None: unlimited).
pub fn spawn_threads(
    shared: Arc<Shared>,
    threads: usize,
    rate_limit: Option<f64>,
    found: UnboundedSender<Found>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let per_thread = rate_limit.map(|r| (r / threads as f64).max(1.0));
    (0..threads)
        .map(|index| {
            let shared = shared.clone();
            let found = found.clone();
            std::thread::Builder::new()
                .name(format!("hash-{index}"))
                .spawn(move || hash_loop(index as u8, shared, per_thread, found))
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

fn hash_loop(index: u8, shared: Arc<Shared>, rate: Option<f64>, found: UnboundedSender<Found>) {
    let started = Instant::now();
    let mut done: u64 = 0;
    let mut counter: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let (gen, work) = shared.current();
        let Some(work) = work else {
            // Waiting for the first job: poll interval of an idle thread.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        counter += 1;
        let en2 = extranonce2(index, counter, work.extranonce2_size);
        let root = work.job.merkle_root(&work.extranonce1, &en2);
        let header = work.job.header(&root, work.job.version, work.job.ntime, 0);
        let mut hasher = HeaderHasher::new(&header);
        let mut nonce: u32 = 0;
        'scan: loop {
            for _ in 0..BATCH {
                let hash = hasher.hash(nonce);
                let meets = meets_target(&hash, &work.target);
                done += 1;
                let report_miss = !meets
                    && work.report_misses_every > 0
                    && done.is_multiple_of(work.report_misses_every);
                if meets || report_miss {
                    let f = Found {
                        job_id: work.job.job_id.clone(),
                        extranonce2: en2.clone(),
                        ntime: work.job.ntime,
                        nonce,
                        hash,
                        meets_target: meets,
                    };
                    if found.send(f).is_err() {
                        return;
                    }
                }
                nonce = nonce.wrapping_add(1);
                if nonce == 0 {
                    break 'scan; // 2^32 nonces: next extranonce2
                }
            }
            shared.hashes.fetch_add(u64::from(BATCH), Ordering::Relaxed);
            if shared.stop.load(Ordering::Relaxed)
                || shared.generation.load(Ordering::SeqCst) != gen
            {
                break;
            }
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
}
