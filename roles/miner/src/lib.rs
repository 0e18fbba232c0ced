//! A simulated SV1 CPU miner: real SHA-256d over the real jobs a proxy hands out, with
//! behaviours that misbehave on purpose for tests.
//!
//! It logs one line per share result (`share accepted hash=...` / `share rejected hash=...
//! reason=...`) unless quiet, a `stats` line every second, and a final summary on exit.

pub mod hasher;
pub mod sv1;
pub mod work;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use hasher::{Found, Shared, WorkUnit};
use sv1::Inbound;
use work::target_from_difficulty;

/// Longest line the miner accepts from its proxy.
const MAX_LINE: usize = 64 * 1024;
/// One below-target nonce is reported per this many hashes in `below-target` mode.
const MISS_REPORT_INTERVAL: u64 = 200_000;

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
            other => bail!(
                "unknown behaviour {other:?}: honest, below-target, duplicate, stale or malformed"
            ),
        })
    }
}

/// Miner settings.
#[derive(Debug, Clone)]
pub struct MinerConfig {
    /// Proxy's SV1 address.
    pub proxy: String,
    /// Worker name for `mining.authorize`.
    pub user: String,
    /// Hashing threads.
    pub threads: usize,
    /// Total hashes per second (None: as fast as the CPU goes).
    pub hashrate_limit: Option<f64>,
    /// Behaviour.
    pub behaviour: Behaviour,
    /// Log each share result.
    pub log_shares: bool,
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
}

impl MinerReport {
    /// Counts and hashrate (the per-second `stats` line).
    pub fn counts(&self) -> String {
        let rejected: u64 = self.rejected.values().sum();
        let rate = self.hashes as f64 / self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "accepted={} rejected={rejected} hashes={} hashrate={rate:.0}H/s elapsed={:.1}s",
            self.accepted,
            self.hashes,
            self.elapsed.as_secs_f64()
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
            "accepted={} rejected={rejected} reasons=[{}] hashes={} hashrate={:.0}H/s elapsed={:.1}s ack_p50_us={} ack_p99_us={}",
            self.accepted,
            reasons.join(","),
            self.hashes,
            rate,
            self.elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.99)
        )
    }
}

#[derive(Debug)]
struct Pending {
    hash: String,
    job_id: String,
    sent: Instant,
}

struct Session {
    config: MinerConfig,
    shared: Arc<Shared>,
    report: MinerReport,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    extranonce1: Vec<u8>,
    extranonce2_size: usize,
    difficulty: f64,
    job: Option<work::Job>,
    held: Vec<Found>,
    /// Negotiated version-rolling mask (None: not negotiated).
    version_mask: Option<u32>,
    started: Instant,
}

/// Connect, subscribe, authorize and mine until `shutdown` resolves or the proxy closes the
/// connection. Returns what happened.
pub async fn run(
    config: MinerConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<MinerReport> {
    anyhow::ensure!(config.threads > 0, "threads must be at least 1");
    let stream = TcpStream::connect(&config.proxy)
        .await
        .with_context(|| format!("cannot connect to the proxy at {}", config.proxy))?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);

    let shared = Arc::new(Shared::default());
    let (found_tx, mut found_rx) = mpsc::unbounded_channel();
    let threads = hasher::spawn_threads(
        shared.clone(),
        config.threads,
        config.hashrate_limit,
        found_tx,
    )?;
    let mut s = Session {
        config,
        shared: shared.clone(),
        report: MinerReport::default(),
        next_id: 10,
        pending: HashMap::new(),
        extranonce1: Vec::new(),
        extranonce2_size: 0,
        difficulty: 1.0,
        job: None,
        held: Vec::new(),
        version_mask: None,
        started: Instant::now(),
    };
    for line in [
        sv1::configure(1),
        sv1::subscribe(2),
        sv1::authorize(3, &s.config.user),
        sv1::extranonce_subscribe(4),
    ] {
        write.write_all(format!("{line}\n").as_bytes()).await?;
    }

    let mut stats = tokio::time::interval(Duration::from_secs(1));
    let mut buf = String::new();
    tokio::pin!(shutdown);
    let ended = loop {
        tokio::select! {
            _ = &mut shutdown => break "shutdown".to_string(),
            _ = stats.tick() => {
                s.report.hashes = shared.hashes.load(Ordering::Relaxed);
                s.report.elapsed = s.started.elapsed();
                println!("stats {}", s.report.counts());
            }
            read = read_line(&mut lines, &mut buf) => match read {
                Ok(0) => break "connection closed by the proxy".to_string(),
                Ok(_) => {
                    let line = buf.trim_end().to_string();
                    buf.clear();
                    let out = s.handle_line(&line)?;
                    for l in out {
                        write.write_all(format!("{l}\n").as_bytes()).await?;
                    }
                }
                Err(e) => break format!("connection error: {e}"),
            },
            Some(found) = found_rx.recv() => {
                for l in s.on_found(found) {
                    if write.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    shared.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    s.report.hashes = shared.hashes.load(Ordering::Relaxed);
    s.report.elapsed = s.started.elapsed();
    s.report.ended = ended;
    Ok(s.report)
}

async fn read_line(
    lines: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    buf: &mut String,
) -> std::io::Result<usize> {
    let n = lines.read_line(buf).await?;
    if buf.len() > MAX_LINE {
        return Err(std::io::Error::other(format!("line over {MAX_LINE} bytes")));
    }
    Ok(n)
}

impl Session {
    fn handle_line(&mut self, line: &str) -> anyhow::Result<Vec<String>> {
        let msg = sv1::parse(line).map_err(|e| anyhow!("bad line from the proxy: {e}"))?;
        let mut out = Vec::new();
        match msg {
            Inbound::Response { id: 1, result, .. } => {
                let rolling = result
                    .get("version-rolling")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                let mask = result.get("version-rolling.mask").and_then(|v| v.as_str());
                self.version_mask = match (rolling, mask) {
                    (true, Some(m)) => {
                        Some(u32::from_str_radix(m, 16).context("bad version-rolling.mask")?)
                    }
                    _ => None,
                };
            }
            Inbound::Response {
                id: 2,
                result,
                error,
            } => {
                let arr = result
                    .as_array()
                    .ok_or_else(|| anyhow!("subscribe refused: {error}"))?;
                let en1 = arr
                    .get(1)
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| anyhow!("subscribe result lacks extranonce1"))?;
                self.extranonce1 = hex::decode(en1).context("extranonce1 is not hex")?;
                self.extranonce2_size = arr.get(2).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
                anyhow::ensure!(
                    self.extranonce2_size >= 2,
                    "extranonce2_size {} is too small",
                    self.extranonce2_size
                );
                println!(
                    "subscribed extranonce1={en1} extranonce2_size={}",
                    self.extranonce2_size
                );
                self.publish();
            }
            Inbound::Response {
                id: 3,
                result,
                error,
            } => {
                anyhow::ensure!(result.as_bool() == Some(true), "authorize refused: {error}");
            }
            Inbound::Response { id: 4, .. } => {}
            Inbound::Response { id, result, error } => {
                if let Some(p) = self.pending.remove(&id) {
                    let micros = p.sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    self.report.ack_latencies_us.push(micros);
                    if result.as_bool() == Some(true) {
                        self.report.accepted += 1;
                        if self.config.log_shares {
                            println!("share accepted hash={} job={}", p.hash, p.job_id);
                        }
                    } else {
                        let reason = sv1::error_reason(&error);
                        if self.config.log_shares {
                            println!(
                                "share rejected hash={} job={} reason={reason}",
                                p.hash, p.job_id
                            );
                        }
                        *self.report.rejected.entry(reason).or_default() += 1;
                    }
                }
            }
            Inbound::SetDifficulty(d) => {
                self.difficulty = d;
                self.publish();
            }
            Inbound::SetExtranonce(en1, size) => {
                println!(
                    "extranonce changed extranonce1={} extranonce2_size={size}",
                    hex::encode(&en1)
                );
                self.extranonce1 = en1;
                self.extranonce2_size = size;
                self.job = None; // a notify follows
                self.shared.set_work(None);
            }
            Inbound::SetVersionMask(_) | Inbound::Other(_) => {}
            Inbound::Notify(job) => {
                let clean = job.clean;
                if clean {
                    let mut prev = job.prev_hash;
                    prev.reverse();
                    println!(
                        "new tip work job={} prevhash={}",
                        job.job_id,
                        hex::encode(prev)
                    );
                }
                self.job = Some(job);
                self.publish();
                if clean && self.config.behaviour == Behaviour::Stale {
                    // Shares held from jobs of the previous tip: now stale.
                    let current = self.job.as_ref().map(|j| j.job_id.clone());
                    let held: Vec<Found> = std::mem::take(&mut self.held);
                    for f in held
                        .into_iter()
                        .filter(|f| Some(&f.job_id) != current.as_ref())
                    {
                        out.push(self.submit(&f));
                    }
                }
                if self.config.behaviour == Behaviour::Malformed {
                    out.push(
                        "{\"id\": 99, \"method\": \"mining.submit\", \"params\": [this is not json"
                            .to_string(),
                    );
                }
            }
        }
        Ok(out)
    }

    fn publish(&mut self) {
        let Some(job) = self.job.clone() else { return };
        if self.extranonce2_size == 0 {
            return;
        }
        let report = if self.config.behaviour == Behaviour::BelowTarget {
            MISS_REPORT_INTERVAL
        } else {
            0
        };
        self.shared.set_work(Some(WorkUnit {
            job,
            extranonce1: self.extranonce1.clone(),
            extranonce2_size: self.extranonce2_size,
            target: target_from_difficulty(self.difficulty),
            report_misses_every: report,
        }));
    }

    fn on_found(&mut self, f: Found) -> Vec<String> {
        let current = self.job.as_ref().map(|j| j.job_id.as_str());
        if current != Some(f.job_id.as_str()) && self.config.behaviour != Behaviour::Stale {
            return Vec::new(); // found on a job replaced meanwhile
        }
        match self.config.behaviour {
            Behaviour::Duplicate if f.meets_target => vec![self.submit(&f), self.submit(&f)],
            Behaviour::Stale
                if f.meets_target && !self.held.iter().any(|h| h.job_id == f.job_id) =>
            {
                self.held.push(f);
                Vec::new()
            }
            _ => vec![self.submit(&f)],
        }
    }

    fn submit(&mut self, f: &Found) -> String {
        let id = self.next_id;
        self.next_id += 1;
        let mut display = f.hash;
        display.reverse();
        self.pending.insert(
            id,
            Pending {
                hash: hex::encode(display),
                job_id: f.job_id.clone(),
                sent: Instant::now(),
            },
        );
        // No rolling: the bits under the mask stay as the job has them.
        let version = self.job.as_ref().map(|j| j.version).unwrap_or(0);
        let version_bits = self.version_mask.map(|m| version & m);
        sv1::submit(
            id,
            &self.config.user,
            &f.job_id,
            &f.extranonce2,
            f.ntime,
            f.nonce,
            version_bits,
        )
    }
}
