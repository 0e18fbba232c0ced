//! One simulated miner: an SV1 connection to the proxy, whose work the shared hashing threads
//! pick up from its slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::hasher::{Found, Slot, WorkUnit};
use crate::sv1::{self, Inbound};
use crate::work::{self, target_from_difficulty};
use crate::{Behaviour, MinerConfig, MinerReport};

/// Longest line the miner accepts from its proxy.
const MAX_LINE: usize = 64 * 1024;
/// One below-target nonce is reported per this many hashes in `below-target` mode.
const MISS_REPORT_INTERVAL: u64 = 200_000;
/// Most submits written to the proxy at once.
const MAX_SUBMITS_PER_WRITE: usize = 256;
/// Longest a write to the proxy may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Live totals over every connection, for the per-second `stats` line.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections whose subscribe was answered.
    pub subscribed: AtomicU64,
    /// Connections with at least one accepted share.
    pub mining: AtomicU64,
    /// Shares accepted.
    pub accepted: AtomicU64,
    /// Shares refused.
    pub rejected: AtomicU64,
}

#[derive(Debug)]
struct Pending {
    hash: String,
    job_id: String,
    sent: Instant,
}

struct Session {
    config: MinerConfig,
    /// Worker name sent with `mining.authorize` and each submit.
    user: String,
    /// ` conn=N` on every log line when the process runs several connections.
    tag: String,
    slot: Arc<Slot>,
    counters: Arc<Counters>,
    report: MinerReport,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    extranonce1: Vec<u8>,
    /// Channels this connection had (subscribe, then each `mining.set_extranonce`).
    channel: u64,
    extranonce2_size: usize,
    difficulty: f64,
    job: Option<work::Job>,
    held: Vec<Found>,
    /// Negotiated version-rolling mask (None: not negotiated).
    version_mask: Option<u32>,
    /// A job has come (the first one is logged even when not clean).
    had_work: bool,
    started: Instant,
}

/// Pause before a miner with `reconnect` connects again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// One simulated miner: [`run_connection`], and with `config.reconnect` a new connection one
/// second after each one ends (however it ended), as a real miner does, until `shutdown`.
/// Reports every connection's results together; a connection error ends it only without
/// `reconnect`.
pub async fn run_miner(
    index: usize,
    config: MinerConfig,
    slot: Arc<Slot>,
    mut found_rx: mpsc::UnboundedReceiver<Found>,
    counters: Arc<Counters>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<MinerReport> {
    let reconnect = config.reconnect;
    let mut all = MinerReport::default();
    loop {
        let one = run_connection(
            index,
            config.clone(),
            slot.clone(),
            &mut found_rx,
            counters.clone(),
            shutdown.clone(),
        )
        .await;
        let why = match one {
            Ok(r) => {
                let why = r.ended.clone();
                all.merge(r);
                all.ended = why.clone();
                why
            }
            Err(e) if reconnect => format!("{e:#}"),
            Err(e) => return Err(e),
        };
        if !reconnect || *shutdown.borrow() {
            return Ok(all);
        }
        println!("connection ended ({why}); connecting again in {RECONNECT_PAUSE:?}");
        tokio::select! {
            // A real miner's pause before it connects again.
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            _ = stopped(&mut shutdown) => {
                all.ended = "shutdown".into();
                return Ok(all);
            }
        }
        // Shares found for the old connection's jobs are worthless on the new one.
        while found_rx.try_recv().is_ok() {}
    }
}

/// One connection: connect, subscribe, authorize and mine until `shutdown` turns true or the
/// proxy closes the connection. Returns what happened on it.
pub async fn run_connection(
    index: usize,
    config: MinerConfig,
    slot: Arc<Slot>,
    found_rx: &mut mpsc::UnboundedReceiver<Found>,
    counters: Arc<Counters>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<MinerReport> {
    let several = config.connections > 1;
    let stream = tokio::select! {
        s = TcpStream::connect(&config.proxy) => s
            .with_context(|| format!("cannot connect to the proxy at {}", config.proxy))?,
        _ = stopped(&mut shutdown) => return Ok(MinerReport {
            ended: "shutdown".into(),
            ..MinerReport::default()
        }),
    };
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut s = Session {
        user: if several {
            format!("{}.{index}", config.user)
        } else {
            config.user.clone()
        },
        tag: if several {
            format!(" conn={index}")
        } else {
            String::new()
        },
        config,
        slot,
        counters,
        report: MinerReport::default(),
        next_id: 10,
        pending: HashMap::new(),
        extranonce1: Vec::new(),
        channel: 0,
        extranonce2_size: 0,
        difficulty: 1.0,
        job: None,
        held: Vec::new(),
        version_mask: None,
        had_work: false,
        started: Instant::now(),
    };
    let mut hello = vec![sv1::configure(1)];
    if let Some(d) = s.config.suggest_difficulty {
        // Before the subscribe, which opens the proxy's pool channel.
        hello.push(sv1::suggest_difficulty(5, d));
    }
    hello.extend([
        sv1::subscribe(2),
        sv1::authorize(3, &s.user),
        sv1::extranonce_subscribe(4),
    ]);
    let hello = s.outbound(hello);
    // However this connection ends, the threads stop hashing for it.
    let _clear = ClearOnDrop(s.slot.clone());
    // A lost connection ends it with a reason (exit 0); what the proxy says that this miner
    // cannot take (a line it cannot parse, one over MAX_LINE, a refused subscribe) is an error.
    if let Err(e) = send(&mut write, &hello).await {
        return Ok(s.end(format!("connection error: {e:#}")));
    }
    let mut buf = Vec::new();
    let ended = loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break "shutdown".to_string(),
            read = read_line(&mut lines, &mut buf) => match read {
                Ok(None) => break "connection closed by the proxy".to_string(),
                Ok(Some(line)) => {
                    let out = s.handle_line(&line)?;
                    if let Err(e) = send(&mut write, &out).await {
                        break format!("connection error: {e:#}");
                    }
                }
                Err(LineError::TooLong) => anyhow::bail!("a line from the proxy is over {MAX_LINE} bytes"),
                Err(LineError::Io(e)) => break format!("connection error: {e}"),
            },
            Some(found) = found_rx.recv() => {
                // Whatever else the threads found meanwhile goes out in the same write.
                let mut out = s.on_found(found);
                while out.len() < MAX_SUBMITS_PER_WRITE {
                    match found_rx.try_recv() {
                        Ok(more) => out.extend(s.on_found(more)),
                        Err(_) => break,
                    }
                }
                let out = s.outbound(out);
                if let Err(e) = send(&mut write, &out).await {
                    break format!("connection error: {e:#}");
                }
            }
        }
    };
    Ok(s.end(ended))
}

/// The extranonce2 sizes this miner rolls: 1 byte of thread index and at least 1 of counter,
/// at most 32 bytes (SV2's largest extranonce).
fn check_extranonce2_size(size: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (2..=32).contains(&size),
        "extranonce2_size {size} from the proxy: this miner needs 2..=32"
    );
    Ok(())
}

/// Clears a connection's slot when its session ends, however it ends.
struct ClearOnDrop(Arc<Slot>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.set_work(None);
    }
}

enum LineError {
    TooLong,
    Io(std::io::Error),
}

/// The next line from the proxy (`None` at end of stream), at most `MAX_LINE` bytes. Safe to
/// cancel in `select!`: what was read of a line stays in `buf` for the next call.
async fn read_line(
    lines: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    buf: &mut Vec<u8>,
) -> Result<Option<String>, LineError> {
    use tokio::io::AsyncReadExt;
    loop {
        let room = (MAX_LINE + 1).saturating_sub(buf.len());
        if room == 0 {
            return Err(LineError::TooLong);
        }
        let n = (&mut *lines)
            .take(room as u64)
            .read_until(b'\n', buf)
            .await
            .map_err(LineError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        if buf.ends_with(b"\n") {
            let line = String::from_utf8_lossy(buf).trim_end().to_string();
            buf.clear();
            return Ok(Some(line));
        }
    }
}
/// Resolves once the process stops (or its stop sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Write lines to the proxy, each with its newline, within `WRITE_TIMEOUT`.
async fn send(write: &mut tokio::net::tcp::OwnedWriteHalf, lines: &[String]) -> anyhow::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut out = String::new();
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    tokio::time::timeout(WRITE_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .map_err(|_| anyhow!("the proxy did not read for {WRITE_TIMEOUT:?}"))?
        .context("write to the proxy")
}

impl Session {
    /// The report of this connection, ending for `why`.
    fn end(mut self, why: String) -> MinerReport {
        self.report.elapsed = self.started.elapsed();
        self.report.ended = why;
        self.report
    }

    fn handle_line(&mut self, line: &str) -> anyhow::Result<Vec<String>> {
        let out = if self.config.behaviour == Behaviour::StringIds {
            let line = sv1::from_string_id(line).map_err(|e| anyhow!("{e}"))?;
            self.handle_sv1(&line)?
        } else {
            self.handle_sv1(line)?
        };
        Ok(self.outbound(out))
    }

    /// Lines as this miner writes them: with `string-ids`, each request id a string.
    fn outbound(&self, lines: Vec<String>) -> Vec<String> {
        if self.config.behaviour == Behaviour::StringIds {
            lines.iter().map(|l| sv1::with_string_id(l)).collect()
        } else {
            lines
        }
    }

    fn handle_sv1(&mut self, line: &str) -> anyhow::Result<Vec<String>> {
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
                self.channel += 1;
                self.extranonce2_size = arr.get(2).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
                check_extranonce2_size(self.extranonce2_size)?;
                println!(
                    "subscribed extranonce1={en1} extranonce2_size={}{}",
                    self.extranonce2_size, self.tag
                );
                self.counters.subscribed.fetch_add(1, Ordering::Relaxed);
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
            Inbound::Response {
                id: 5,
                result,
                error,
            } => {
                anyhow::ensure!(
                    result.as_bool() == Some(true),
                    "suggest_difficulty refused: {error}"
                );
            }
            Inbound::Response { id, result, error } => {
                if let Some(p) = self.pending.remove(&id) {
                    let micros = p.sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    self.report.ack_latencies_us.push(micros);
                    if result.as_bool() == Some(true) {
                        self.report.accepted += 1;
                        if self.report.accepted == 1 {
                            self.counters.mining.fetch_add(1, Ordering::Relaxed);
                        }
                        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        if self.config.log_shares {
                            println!(
                                "share accepted hash={} job={}{}",
                                p.hash, p.job_id, self.tag
                            );
                        }
                    } else {
                        let reason = sv1::error_reason(&error);
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        if self.config.log_shares {
                            println!(
                                "share rejected hash={} job={} reason={reason}{}",
                                p.hash, p.job_id, self.tag
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
                check_extranonce2_size(size)?;
                println!(
                    "extranonce changed extranonce1={} extranonce2_size={size}{}",
                    hex::encode(&en1),
                    self.tag
                );
                self.extranonce1 = en1;
                self.channel += 1;
                self.extranonce2_size = size;
                self.job = None; // a notify follows
                self.slot.set_work(None);
            }
            Inbound::SetVersionMask(_) | Inbound::Other(_) => {}
            Inbound::Notify(job) => {
                let clean = job.clean;
                if clean {
                    let mut prev = job.prev_hash;
                    prev.reverse();
                    println!(
                        "new tip work job={} prevhash={}{}",
                        job.job_id,
                        hex::encode(prev),
                        self.tag
                    );
                } else if !self.had_work {
                    println!("first work job={}{}", job.job_id, self.tag);
                }
                self.had_work = true;
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
        self.slot.set_work(Some(WorkUnit {
            job,
            extranonce1: self.extranonce1.clone(),
            channel: self.channel,
            extranonce2_size: self.extranonce2_size,
            target: target_from_difficulty(self.difficulty),
            report_misses_every: report,
        }));
    }

    fn on_found(&mut self, f: Found) -> Vec<String> {
        if f.channel != self.channel {
            return Vec::new(); // hashed for the channel before a mining.set_extranonce
        }
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
            &self.user,
            &f.job_id,
            &f.extranonce2,
            f.ntime,
            f.nonce,
            version_bits,
        )
    }
}
