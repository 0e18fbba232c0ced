//! One miner: its SV1 connection and its SV2 channel upstream. Malformed SV1 input closes only
//! this miner's connection. A lost upstream is reopened with backoff; the miner gets the new
//! extranonce (`mining.set_extranonce`) if it subscribed to it, else it is disconnected.

use crate::share_window::{ShareCounts, ShareSent};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stratum_apps::stratum_core::binary_sv2::B032Owned;
use stratum_apps::stratum_core::mining_sv2::{
    NewExtendedMiningJobOwned, SetCustomMiningJobOwned, SetNewPrevHashOwned,
    SubmitSharesExtendedOwned,
};
use stratum_apps::stratum_core::parsers_sv2::MiningOwned;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::declare::{self, DeclaredWork};
use crate::sv1::{self, Request};
use crate::upstream::{self, Upstream};
use crate::ProxyShared;

mod channel;
use channel::recv_declared;

/// Longest SV1 line accepted from a miner.
const MAX_LINE: usize = 16 * 1024;
/// Longest one write to a miner may take: a miner that does not read is closed, rather than
/// holding its session (and the pool messages queued for it) forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Jobs remembered per miner (shares on older ones are answered `invalid-job-id` by the pool).
const KEPT_JOBS: usize = 32;
/// SV1 refusal of a share sent while the pool connection's window of shares waiting for the
/// pool's answer is full (`max_shares_in_flight`).
pub const UPSTREAM_BUSY: &str = "upstream-busy";

struct Session {
    id: u64,
    write: OwnedWriteHalf,
    upstream: Option<Upstream>,
    channel_id: u32,
    extranonce1: Vec<u8>,
    extranonce2_size: usize,
    target: [u8; 32],
    jobs: BTreeMap<u32, NewExtendedMiningJobOwned>,
    prev_hash: Option<SetNewPrevHashOwned>,
    seq: u32,
    pending: HashMap<u32, sv1::Id>,
    subscribe_id: Option<sv1::Id>,
    subscribed: bool,
    authorized: Option<String>,
    wants_extranonce: bool,
    version_mask: Option<u32>,
    accepted: u64,
    rejected: u64,
    /// Declared jobs from this session's declarer (`template_source = "miner"`).
    declared: Option<mpsc::Receiver<DeclaredWork>>,
    declarer: Option<tokio::task::JoinHandle<()>>,
    /// Custom jobs sent, by request id, waiting for the pool's answer.
    custom_pending: HashMap<u32, SetCustomMiningJobOwned>,
    next_request: u32,
    /// Why the pool refused this proxy: a subscribe is answered with it, then the miner closed.
    refused: Option<String>,
    /// The miner sent `mining.subscribe` (its pool channel is opened from then on).
    asked_to_subscribe: bool,
    /// Easiest target the miner asked for with `mining.suggest_difficulty` (little-endian).
    suggested_target: Option<[u8; 32]>,
    /// When a suggestion last went to the pool as `UpdateChannel`.
    suggest_sent_at: Option<Instant>,
    shared: Arc<ProxyShared>,
}

/// How long a miner the pool refused may stay connected without subscribing.
const REFUSED_GRACE: Duration = Duration::from_secs(5);

/// Why the session ended.
fn log_end(id: u64, peer: SocketAddr, why: &str, s: &Session) {
    tracing::info!(miner = id, %peer, accepted = s.accepted, rejected = s.rejected, "miner connection closed: {why}");
}

/// Serve one miner until it disconnects, sends malformed input, or the upstream cannot be had.
pub async fn serve(shared: Arc<ProxyShared>, tcp: TcpStream, peer: SocketAddr, id: u64) {
    let (read, write) = tcp.into_split();
    let mut lines = sv1::LineReader::new(read, MAX_LINE);
    let mut s = Session {
        id,
        write,
        upstream: None,
        channel_id: 0,
        extranonce1: Vec::new(),
        extranonce2_size: 0,
        target: [0xff; 32],
        jobs: BTreeMap::new(),
        prev_hash: None,
        seq: 0,
        pending: HashMap::new(),
        subscribe_id: None,
        subscribed: false,
        authorized: None,
        wants_extranonce: false,
        version_mask: None,
        accepted: 0,
        rejected: 0,
        declared: None,
        declarer: None,
        custom_pending: HashMap::new(),
        next_request: 0,
        refused: None,
        asked_to_subscribe: false,
        suggested_target: None,
        suggest_sent_at: None,
        shared: shared.clone(),
    };
    let cfg = &shared.config;
    let mut backoff = Duration::from_millis(cfg.reconnect_min_ms);
    // The pool channel is opened once the miner subscribes: a socket that says nothing costs
    // the pool nothing, and is closed at the subscribe deadline.
    let mut reconnect_at: Option<tokio::time::Instant> = None;
    let subscribe_deadline =
        tokio::time::Instant::now() + Duration::from_millis(cfg.subscribe_timeout_ms);
    let mut waiting_since = Instant::now();
    let mut refused_close: Option<tokio::time::Instant> = None;
    let why = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(refused_close.unwrap_or_else(tokio::time::Instant::now)), if refused_close.is_some() => {
                break s.refused.clone().unwrap_or_default();
            }
            _ = tokio::time::sleep_until(subscribe_deadline), if !s.asked_to_subscribe => {
                break format!("no mining.subscribe within {} ms", cfg.subscribe_timeout_ms);
            }
            line = lines.next_line() => match line {
                Ok(Some(line)) if line.trim().is_empty() => {}
                Ok(Some(line)) => match sv1::parse_request(&line) {
                    Ok(req) => {
                        if let Err(e) = s.on_request(req).await { break e }
                        if s.asked_to_subscribe && s.upstream.is_none() && reconnect_at.is_none() && refused_close.is_none() {
                            reconnect_at = Some(tokio::time::Instant::now());
                            waiting_since = Instant::now();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(miner = id, %peer, "malformed SV1 input ({e}): closing this miner's connection");
                        break format!("malformed input: {e}");
                    }
                },
                Ok(None) => break "miner disconnected".into(),
                Err(e) => {
                    tracing::warn!(miner = id, %peer, "{e}: closing this miner's connection");
                    break e;
                }
            },
            Some(work) = recv_declared(&mut s.declared), if s.declared.is_some() => {
                if let Err(e) = s.on_declared(work) { break e }
            }
            msg = recv_upstream(&mut s.upstream), if s.upstream.is_some() => match msg {
                Some(m) => if let Err(e) = s.on_upstream(m).await { break e },
                None => {
                    tracing::warn!(miner = id, "upstream connection lost: reconnecting");
                    if let Err(e) = s.upstream_lost().await { break e }
                    waiting_since = Instant::now();
                    backoff = Duration::from_millis(cfg.reconnect_min_ms);
                    reconnect_at = Some(tokio::time::Instant::now() + backoff);
                }
            },
            _ = tokio::time::sleep_until(reconnect_at.unwrap_or_else(tokio::time::Instant::now)), if reconnect_at.is_some() && s.upstream.is_none() => {
                let mut params = shared.open_params(id);
                if let Some(t) = s.suggested_target {
                    params.max_target = t;
                }
                match shared.upstream.open_channel(&params).await {
                    Ok(up) => {
                        reconnect_at = None;
                        if let Err(e) = s.on_channel(up).await { break e }
                    }
                    Err(e) => {
                        // A miner waiting for its subscribe answer learns why there is no work.
                        let gave_up = waiting_since.elapsed() > Duration::from_secs(cfg.upstream_wait_secs);
                        if let Some(refused) = e.downcast_ref::<upstream::Refused>() {
                            // Retrying will not help: the miner's subscribe (now, or when it
                            // comes) is answered with why, then its connection is closed.
                            let why = format!("pool refused this proxy: {refused}");
                            tracing::warn!(miner = id, "{why}");
                            if s.subscribe_id.is_some() {
                                s.refuse_subscribe(&why).await;
                                break why;
                            }
                            s.refused = Some(why);
                            reconnect_at = None;
                            refused_close = Some(tokio::time::Instant::now() + REFUSED_GRACE);
                            continue;
                        } else if gave_up {
                            s.refuse_subscribe(&format!("no pool connection: {e:#}")).await;
                        }
                        if gave_up {
                            break format!("no upstream channel for {}s: {e:#}", cfg.upstream_wait_secs);
                        }
                        tracing::warn!(miner = id, "cannot open an upstream channel ({e:#}); retrying in {backoff:?}");
                        reconnect_at = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(cfg.reconnect_max_ms));
                    }
                }
            }
        }
    };
    if let Some(d) = s.declarer.take() {
        d.abort();
    }
    log_end(id, peer, &why, &s);
}

/// The next message from the pool; pending forever without an upstream.
async fn recv_upstream(up: &mut Option<Upstream>) -> Option<MiningOwned> {
    match up {
        Some(u) => u.inbound.recv().await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn line(&mut self, line: String) -> Result<(), String> {
        tokio::time::timeout(
            WRITE_TIMEOUT,
            self.write.write_all(format!("{line}\n").as_bytes()),
        )
        .await
        .map_err(|_| format!("the miner read nothing for {WRITE_TIMEOUT:?}"))?
        .map_err(|e| format!("write to miner: {e}"))
    }

    async fn on_request(&mut self, r: Request) -> Result<(), String> {
        match r.method.as_str() {
            "mining.configure" => {
                let wants_rolling = r
                    .params
                    .first()
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|e| e == "version-rolling"));
                let mut result = json!({});
                if wants_rolling {
                    let requested = r
                        .params
                        .get(1)
                        .and_then(|p| p.get("version-rolling.mask"))
                        .and_then(Value::as_str)
                        .and_then(|m| u32::from_str_radix(m, 16).ok())
                        .unwrap_or(sv1::VERSION_ROLLING_MASK);
                    let mask = requested & sv1::VERSION_ROLLING_MASK;
                    self.version_mask = Some(mask);
                    result = json!({"version-rolling": true, "version-rolling.mask": format!("{mask:08x}")});
                }
                self.line(sv1::ok(&r.id, result)).await
            }
            "mining.subscribe" => {
                self.subscribe_id = Some(r.id.clone());
                self.asked_to_subscribe = true;
                if let Some(why) = self.refused.clone() {
                    self.refuse_subscribe(&why).await;
                    return Err(why);
                }
                if self.upstream.is_some() {
                    self.answer_subscribe().await?;
                }
                Ok(())
            }
            "mining.extranonce.subscribe" => {
                self.wants_extranonce = true;
                self.line(sv1::ok(&r.id, json!(true))).await
            }
            "mining.authorize" => {
                let user = r
                    .params
                    .first()
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                self.authorized = Some(user);
                self.line(sv1::ok(&r.id, json!(true))).await
            }
            "mining.submit" => self.on_submit(r).await,
            "mining.suggest_difficulty" => self.on_suggest_difficulty(r).await,
            other => {
                self.line(sv1::error(
                    &r.id,
                    20,
                    &format!("unsupported method {other}"),
                ))
                .await
            }
        }
    }

    /// Answer a waiting `mining.subscribe` with an SV1 error saying why there is no work.
    async fn refuse_subscribe(&mut self, why: &str) {
        if let Some(id) = self.subscribe_id.take() {
            let _ = self.line(sv1::error(&id, 20, why)).await;
        }
    }

    async fn answer_subscribe(&mut self) -> Result<(), String> {
        let Some(id) = self.subscribe_id.take() else {
            return Ok(());
        };
        self.subscribed = true;
        self.line(sv1::ok(
            &id,
            sv1::subscribe_result(&self.extranonce1, self.extranonce2_size),
        ))
        .await?;
        self.line(sv1::set_difficulty(&self.target)).await?;
        self.send_current_job(true).await
    }

    async fn send_current_job(&mut self, clean: bool) -> Result<(), String> {
        let Some(snph) = self.prev_hash.clone() else {
            return Ok(());
        };
        let job = self
            .jobs
            .values()
            .rev()
            .find(|j| !j.is_future())
            .or_else(|| self.jobs.get(&snph.job_id))
            .cloned();
        match job {
            Some(job) if self.subscribed => self.line(sv1::notify(&snph, &job, clean)?).await,
            _ => Ok(()),
        }
    }

    async fn on_submit(&mut self, r: Request) -> Result<(), String> {
        if !self.subscribed || self.authorized.is_none() {
            return self
                .line(sv1::error(&r.id, 24, "unauthorized-worker"))
                .await;
        }
        let sub = match sv1::parse_submit(&r.params) {
            Ok(s) => s,
            Err(e) => return self.line(sv1::error(&r.id, 20, &e)).await,
        };
        let Some(up) = &self.upstream else {
            self.rejected += 1;
            ShareCounts::bump(&self.shared.shares.refused_upstream_disconnected);
            return self
                .line(sv1::error(&r.id, 20, "upstream-disconnected"))
                .await;
        };
        let job_version = self.jobs.get(&sub.job_id).map(|j| j.version).unwrap_or(0);
        let version = match (sub.version_bits, self.version_mask) {
            (Some(bits), Some(mask)) => (job_version & !mask) | (bits & mask),
            _ => job_version,
        };
        self.seq = self.seq.wrapping_add(1);
        let share = SubmitSharesExtendedOwned {
            channel_id: self.channel_id,
            sequence_number: self.seq,
            job_id: sub.job_id,
            nonce: sub.nonce,
            ntime: sub.ntime,
            version,
            extranonce: B032Owned::try_from(sub.extranonce2)
                .map_err(|e| format!("extranonce: {e:?}"))?,
        };
        let counts = &self.shared.shares;
        let why = match up.send_share(share) {
            ShareSent::Sent => None,
            ShareSent::Busy => {
                counts.window.refused();
                Some((UPSTREAM_BUSY, &counts.refused_upstream_busy))
            }
            ShareSent::Gone => Some((
                "upstream-disconnected",
                &counts.refused_upstream_disconnected,
            )),
        };
        if let Some((why, counter)) = why {
            ShareCounts::bump(counter);
            self.rejected += 1;
            return self.line(sv1::error(&r.id, 20, why)).await;
        }
        if self.pending.insert(self.seq, r.id).is_some() {
            // The sequence number wrapped onto a share never answered: that one is given up.
            up.answered(1);
        }
        Ok(())
    }

    /// One of this miner's shares was answered by the pool: its slot in the window is free.
    fn share_answered(&self) {
        if let Some(up) = &self.upstream {
            up.answered(1);
        }
    }

    async fn on_upstream(&mut self, m: MiningOwned) -> Result<(), String> {
        match m {
            MiningOwned::NewExtendedMiningJob(job) => {
                let future = job.is_future();
                self.jobs.insert(job.job_id, job);
                while self.jobs.len() > KEPT_JOBS {
                    self.jobs.pop_first();
                }
                if !future {
                    self.send_current_job(false).await?;
                }
            }
            MiningOwned::SetNewPrevHash(snph) => {
                let job_id = snph.job_id;
                self.prev_hash = Some(snph);
                if let (Some(job), Some(snph)) =
                    (self.jobs.get(&job_id).cloned(), self.prev_hash.clone())
                {
                    if self.subscribed {
                        self.line(sv1::notify(&snph, &job, true)?).await?;
                    }
                }
                // The activated job is no longer future.
                let min = self.prev_hash.as_ref().map(|p| p.min_ntime).unwrap_or(0);
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    job.set_no_future(min);
                }
            }
            MiningOwned::SetTarget(t) => {
                self.target = t.maximum_target.to_array();
                if self.subscribed {
                    self.line(sv1::set_difficulty(&self.target)).await?;
                }
            }
            MiningOwned::SubmitSharesSuccess(ok) => {
                let seqs: Vec<u32> = if ok.new_submits_accepted_count == 1 {
                    vec![ok.last_sequence_number]
                } else {
                    self.pending
                        .keys()
                        .copied()
                        .filter(|s| *s <= ok.last_sequence_number)
                        .collect()
                };
                for seq in seqs {
                    if let Some(id) = self.pending.remove(&seq) {
                        self.share_answered();
                        ShareCounts::bump(&self.shared.shares.accepted);
                        self.accepted += 1;
                        self.line(sv1::ok(&id, json!(true))).await?;
                    }
                }
            }
            MiningOwned::SubmitSharesError(e) => {
                let code = String::from_utf8_lossy(e.error_code.as_bytes()).into_owned();
                if let Some(id) = self.pending.remove(&e.sequence_number) {
                    self.share_answered();
                    ShareCounts::bump(&self.shared.shares.rejected_by_pool);
                    self.rejected += 1;
                    tracing::info!(
                        miner = self.id,
                        channel = e.channel_id,
                        seq = e.sequence_number,
                        "share rejected by the pool: {code}"
                    );
                    self.line(sv1::error(&id, sv1::sv1_code(&code), &code))
                        .await?;
                }
            }
            MiningOwned::SetCustomMiningJobSuccess(ok) => {
                let Some(set) = self.custom_pending.remove(&ok.request_id) else {
                    return Ok(());
                };
                declare::count(&self.shared.declarations, |s| s.custom_jobs += 1);
                self.on_custom_job(set, ok.job_id).await?;
            }
            MiningOwned::SetCustomMiningJobError(e) => {
                self.custom_pending.remove(&e.request_id);
                let code = String::from_utf8_lossy(e.error_code.as_bytes()).into_owned();
                tracing::warn!(miner = self.id, "custom job refused by the pool: {code}");
                declare::count(&self.shared.declarations, |s| {
                    *s.custom_jobs_refused.entry(code.clone()).or_default() += 1;
                    s.last_error = Some(code);
                });
            }
            MiningOwned::CloseChannel(c) => {
                return Err(format!(
                    "pool closed the channel: {}",
                    String::from_utf8_lossy(c.reason_code.as_bytes())
                ));
            }
            MiningOwned::UpdateChannelError(e) => tracing::warn!(
                miner = self.id,
                "the pool refused the suggested difficulty: {}",
                String::from_utf8_lossy(e.error_code.as_bytes())
            ),
            other => tracing::debug!(miner = self.id, "ignoring {other:?}"),
        }
        Ok(())
    }
}
