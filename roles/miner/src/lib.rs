//! Simulated SV1 CPU miners: real SHA-256d over the real jobs a proxy hands out, with
//! behaviours that misbehave on purpose for tests. One process runs one or many miners (one SV1
//! connection each), hashed by one shared set of threads, so a scenario holds a thousand
//! miners on two cores.
//!
//! It logs one line per share result (`share accepted hash=...` / `share rejected hash=...
//! reason=...`, with ` conn=N` when it runs several connections) unless quiet, a `stats` line
//! every second, and a final summary on exit.

pub mod hasher;
mod session;
pub mod sv1;
pub mod work;

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::watch;

use hasher::Farm;
use session::Counters;

/// Most connections one process runs.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How the miner (mis)behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Submit every share that meets the target, once.
    #[default]
    Honest,
    /// Also submit nonces that miss the target.
    BelowTarget,
    /// Submit every share twice.
    Duplicate,
    /// Hold one share per job back and submit it after the job was replaced by a new block.
    Stale,
    /// Send a line that is not JSON once the first job arrived.
    Malformed,
    /// Mine honestly, with every request id a JSON string (`"sv1-N"`); an answer whose id is
    /// not the string sent ends the miner with an error.
    StringIds,
}

impl FromStr for Behaviour {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "honest" => Behaviour::Honest,
            "below-target" => Behaviour::BelowTarget,
            "duplicate" => Behaviour::Duplicate,
            "stale" => Behaviour::Stale,
            "malformed" => Behaviour::Malformed,
            "string-ids" => Behaviour::StringIds,
            other => bail!(
                "unknown behaviour {other:?}: honest, below-target, duplicate, stale, malformed or string-ids"
            ),
        })
    }
}

/// Miner settings.
#[derive(Debug, Clone)]
pub struct MinerConfig {
    /// Proxy's SV1 address.
    pub proxy: String,
    /// Worker name for `mining.authorize` (`USER.N` for connection N when there are several).
    pub user: String,
    /// Simulated miners: SV1 connections, each its own subscribe, jobs and shares.
    pub connections: usize,
    /// Hashing threads, shared by every connection.
    pub threads: usize,
    /// Total hashes per second over every connection (None: as fast as the CPU goes).
    pub hashrate_limit: Option<f64>,
    /// Behaviour.
    pub behaviour: Behaviour,
    /// Log each share result.
    pub log_shares: bool,
    /// Connect again one second after a connection ends, as real miners do (else that
    /// simulated miner is done).
    pub reconnect: bool,
    /// Difficulty to suggest with `mining.suggest_difficulty` before subscribing.
    pub suggest_difficulty: Option<f64>,
}

/// What the miner did.
#[derive(Debug, Clone, Default)]
pub struct MinerReport {
    /// Shares the proxy accepted.
    pub accepted: u64,
    /// Shares refused, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Hashes computed.
    pub hashes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Why the session ended.
    pub ended: String,
    /// Time from writing each submit to reading its answer, microseconds.
    pub ack_latencies_us: Vec<u32>,
    /// Connections run.
    pub connections: usize,
    /// Connections whose subscribe was answered.
    pub subscribed: u64,
    /// Connections with at least one accepted share.
    pub mining: u64,
    /// Errors that ended a connection, with its index.
    pub errors: Vec<(usize, String)>,
}

impl MinerReport {
    /// Counts and hashrate (the per-second `stats` line).
    pub fn counts(&self) -> String {
        let rejected: u64 = self.rejected.values().sum();
        let rate = self.hashes as f64 / self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "accepted={} rejected={rejected} hashes={} hashrate={rate:.0}H/s elapsed={:.1}s subscribed={} mining={}",
            self.accepted,
            self.hashes,
            self.elapsed.as_secs_f64(),
            self.subscribed,
            self.mining
        )
    }

    /// Everything, with reasons and ack latency percentiles (printed at exit).
    pub fn line(&self) -> String {
        let rejected: u64 = self.rejected.values().sum();
        let reasons: Vec<String> = self
            .rejected
            .iter()
            .map(|(r, n)| format!("{r}:{n}"))
            .collect();
        let rate = self.hashes as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let mut sorted = self.ack_latencies_us.clone();
        sorted.sort_unstable();
        let pct = |p: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        format!(
            "accepted={} rejected={rejected} reasons=[{}] hashes={} hashrate={:.0}H/s elapsed={:.1}s ack_p50_us={} ack_p99_us={} connections={} subscribed={} mining={} errors={}",
            self.accepted,
            reasons.join(","),
            self.hashes,
            rate,
            self.elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.99),
            self.connections,
            self.subscribed,
            self.mining,
            self.errors.len()
        )
    }
}

/// Run `config.connections` miners until `shutdown` resolves or every connection ended.
/// Returns what they did together. An error that ends one connection is kept in
/// [`MinerReport::errors`]; the others mine on.
pub async fn run(
    config: MinerConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<MinerReport> {
    // A thread's index is the first byte of its extranonce2.
    anyhow::ensure!(
        (1..=256).contains(&config.threads),
        "threads must be 1..=256, got {}",
        config.threads
    );
    anyhow::ensure!(
        (1..=MAX_CONNECTIONS).contains(&config.connections),
        "connections must be 1..={MAX_CONNECTIONS}, got {}",
        config.connections
    );
    if config.connections > 1 {
        // One socket per connection: past the common soft limit of 1024, raise it.
        hashpool_config::role_main::raise_descriptor_limit();
    }
    let started = Instant::now();
    let (farm, receivers) = Farm::new(config.connections);
    let threads = hasher::spawn_threads(farm.clone(), config.threads, config.hashrate_limit)?;
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sessions = tokio::task::JoinSet::new();
    for (index, found_rx) in receivers.into_iter().enumerate() {
        let one = session::run_miner(
            index,
            config.clone(),
            farm.slot(index),
            found_rx,
            counters.clone(),
            stop_rx.clone(),
        );
        sessions.spawn(async move { (index, one.await) });
    }
    let mut report = MinerReport {
        connections: config.connections,
        ..MinerReport::default()
    };
    let mut ended: BTreeMap<String, usize> = BTreeMap::new();
    let mut stats = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                let _ = stop_tx.send(true);
            }
            _ = stats.tick() => {
                let live = MinerReport {
                    accepted: counters.accepted.load(Ordering::Relaxed),
                    hashes: farm.hashes.load(Ordering::Relaxed),
                    elapsed: started.elapsed(),
                    subscribed: counters.subscribed.load(Ordering::Relaxed),
                    mining: counters.mining.load(Ordering::Relaxed),
                    rejected: BTreeMap::from([(
                        "all".to_string(),
                        counters.rejected.load(Ordering::Relaxed),
                    )]),
                    ..MinerReport::default()
                };
                println!("stats {}", live.counts());
            }
            joined = sessions.join_next() => match joined {
                None => break,
                Some(Ok((_, Ok(one)))) => {
                    *ended.entry(one.ended.clone()).or_default() += 1;
                    report.merge(one);
                }
                Some(Ok((index, Err(e)))) => {
                    let message = format!("{e:#}");
                    *ended.entry("error".into()).or_default() += 1;
                    report.errors.push((index, message));
                }
                Some(Err(e)) => bail!("a connection task failed: {e}"),
            },
        }
    }
    farm.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    report.hashes = farm.hashes.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    report.subscribed = counters.subscribed.load(Ordering::Relaxed);
    report.mining = counters.mining.load(Ordering::Relaxed);
    report.ended = match ended.len() {
        1 => ended.into_keys().next().unwrap_or_default(),
        _ => ended
            .iter()
            .map(|(why, n)| format!("{why} x{n}"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    Ok(report)
}

impl MinerReport {
    /// Add one connection's results.
    pub(crate) fn merge(&mut self, one: MinerReport) {
        self.accepted += one.accepted;
        for (reason, n) in one.rejected {
            *self.rejected.entry(reason).or_default() += n;
        }
        self.ack_latencies_us.extend(one.ack_latencies_us);
    }
}
