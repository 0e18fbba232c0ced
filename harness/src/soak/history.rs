//! What happened during a soak, as the harness saw it from outside: each fault with the
//! times it was really applied and undone, samples of the stack every two seconds (each
//! process's phase, the pool's accepted shares, each wallet's balances, the mint's reserve),
//! and notes. Written to `history.json`; the report is drawn from it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::schedule::{Fault, Schedule};
use crate::Stack;

/// A sample of one wallet.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalletSample {
    /// ehash held.
    pub held: u64,
    /// ehash minted so far.
    pub minted: u64,
    /// ehash melted so far.
    pub melted: u64,
    /// ehash of PENDING quotes.
    pub pending: u64,
    /// ehash of FAILED quotes.
    pub failed: u64,
}

/// The stack at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// ms from the start.
    pub t_ms: u64,
    /// Each process's phase: `up`, `down`, `paused`, `starting`, `failed`.
    pub phases: BTreeMap<String, String>,
    /// The pool's accepted-shares counter (None when it did not answer in time).
    pub shares_accepted: Option<f64>,
    /// Per operator.
    pub wallets: BTreeMap<String, WalletSample>,
    /// sats the pool's node paid for redemptions, per the mint.
    pub redeemed_sat: Option<u64>,
    /// sats the mint could pay now.
    pub available_sat: Option<u64>,
}

/// One fault's application or undoing, as it really happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    /// Index in the schedule.
    pub index: usize,
    /// `apply` or `undo`.
    pub what: &'static str,
    /// The fault.
    pub fault: String,
    /// Its process or resource.
    pub resource: String,
    /// When it started and ended, ms from the start.
    pub from_ms: u64,
    /// When it ended.
    pub to_ms: u64,
    /// What it did, or why it could not.
    pub result: Result<String, String>,
}

impl FaultEvent {
    /// Fault `index` applied (`what` = "apply") or undone ("undo") between `from` and `to`.
    pub fn new(
        index: usize,
        what: &'static str,
        fault: &Fault,
        from: Duration,
        to: Duration,
        r: anyhow::Result<String>,
    ) -> Self {
        FaultEvent {
            index,
            what,
            fault: fault.describe(),
            resource: fault.resource(),
            from_ms: from.as_millis() as u64,
            to_ms: to.as_millis() as u64,
            result: r.map_err(|e| format!("{e:#}")),
        }
    }
}

/// The whole history of a run.
#[derive(Debug, Clone, Serialize)]
pub struct History {
    /// Seed of the schedule.
    pub seed: u64,
    /// Planned duration, ms.
    pub duration_ms: u64,
    /// Samples, in time order.
    pub samples: Vec<Sample>,
    /// Faults applied and undone, in order.
    pub faults: Vec<FaultEvent>,
    /// Notes: (ms, text).
    pub notes: Vec<(u64, String)>,
}

/// Longest a sample waits for one answer (a paused role never answers).
const SAMPLE_TIMEOUT: Duration = Duration::from_millis(800);

impl History {
    /// An empty history for `schedule`.
    pub fn new(schedule: &Schedule) -> Self {
        History {
            seed: schedule.seed,
            duration_ms: schedule.duration_ms,
            samples: Vec::new(),
            faults: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Record a fault event, and log it.
    pub fn fault(&mut self, e: FaultEvent) {
        let r = match &e.result {
            Ok(s) => s.clone(),
            Err(s) => format!("FAILED: {s}"),
        };
        println!(
            "[soak {:>6.1} s] {} {}: {r}",
            e.from_ms as f64 / 1000.0,
            e.what,
            e.fault
        );
        self.faults.push(e);
    }

    /// Record a note, and log it.
    pub fn note(&mut self, started: Instant, text: String) {
        let t = started.elapsed().as_millis() as u64;
        println!("[soak {:>6.1} s] {text}", t as f64 / 1000.0);
        self.notes.push((t, text));
    }

    /// Sample the stack now.
    pub async fn sample(&mut self, stack: &Stack, started: Instant) {
        let s = Self::snapshot(stack, started).await;
        self.samples.push(s);
    }

    /// The stack now: each process's phase, and what the pool, the wallets and the mint say
    /// (each answer bounded: a paused role never answers).
    pub async fn snapshot(stack: &Stack, started: Instant) -> Sample {
        use crate::supervisor::Phase;
        let mut s = Sample {
            t_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        };
        for (name, p) in stack.processes() {
            let phase = match p.status().phase {
                Phase::Ready => "up",
                Phase::Starting => "starting",
                Phase::Stopped => "down",
                Phase::Paused => "paused",
                Phase::Failed(_) => "failed",
            };
            s.phases.insert(name, phase.to_string());
        }
        // Every answer at once, each bounded: a paused role never answers.
        let pool = async {
            match stack.pool() {
                Ok(pool) => tokio::time::timeout(SAMPLE_TIMEOUT, pool.metrics())
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            }
        };
        let wallets = futures::future::join_all(stack.proxies().map(|(name, proxy)| async move {
            match tokio::time::timeout(SAMPLE_TIMEOUT, proxy.wallet_status()).await {
                Ok(Ok(w)) => Some((name.clone(), w)),
                _ => None,
            }
        }));
        let reserve = async {
            match stack.mint() {
                Ok(mint) => tokio::time::timeout(SAMPLE_TIMEOUT, mint.redemption_reserve())
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            }
        };
        // The harness's copy of the trimmed streams kept up (so the roles trim during the
        // soak, under its faults); a drain cut short goes on at the next sample.
        let copy = async {
            if let Ok(redis) = stack.redis() {
                let _ = tokio::time::timeout(SAMPLE_TIMEOUT, async {
                    let mut conn = redis.connect().await?;
                    crate::stream_archive::copy_new(&mut conn).await
                })
                .await;
            }
        };
        let (metrics, wallets, reserve, ()) = tokio::join!(pool, wallets, reserve, copy);
        s.shares_accepted = metrics.map(|m| m.sum("hashpool_pool_shares_accepted_total"));
        for (name, w) in wallets.into_iter().flatten() {
            s.wallets.insert(
                name,
                WalletSample {
                    held: w.held,
                    minted: w.minted,
                    melted: w.melted,
                    pending: w.pending,
                    failed: w.failed,
                },
            );
        }
        if let Some(r) = reserve {
            s.redeemed_sat = r["redeemed_msat"].as_u64().map(|m| m / 1000);
            s.available_sat = r["available_sat"].as_u64();
        }
        s
    }
}
