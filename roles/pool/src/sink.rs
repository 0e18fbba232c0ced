//! Durable share records: a task that appends records to Redis in pipelined batches through
//! the `hashpool_append` function (set-if-absent on the share hash, then `XADD`, atomically)
//! and tells each caller what happened. The pool answers a share only from that answer:
//!
//! - Redis ran the function: the record is in (`Recorded`), or the hash was seen before and
//!   nothing was written (`Duplicate`).
//! - Nothing was sent (no connection): the record is not in and never will be.
//! - The batch was sent but no answer came within `append_timeout_ms` (Redis slow, paused,
//!   or the connection broke): the outcome is unknown. The batch goes to a resolver that
//!   calls `hashpool_resolve` for each share until Redis answers: it marks the hash `refused`
//!   unless the append landed, so an append still queued in Redis can no longer land. The
//!   share is answered only then. A record without an ack, or an ack without a record,
//!   cannot happen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ehash::{seen_key, AUDIT_TASKS_STREAM, SHARES_STREAM};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::PoolMetrics;
use crate::redis_store::{self, expire_lt, pair};

/// Longest pause between two attempts to resolve an unknown outcome.
const MAX_RESOLVE_BACKOFF: Duration = Duration::from_secs(2);

/// One share's records.
#[derive(Debug, Clone)]
pub struct ShareAppend {
    /// Previous block hash (display order) of the tip the share was validated on.
    pub tip: Arc<str>,
    /// The share hash (display order).
    pub share_hash: String,
    /// `ehash:shares` fields.
    pub record: Vec<(&'static str, String)>,
    /// `audit:tasks` fields, for the first share of a template.
    pub audit: Option<Vec<(&'static str, String)>>,
}

/// What Redis did with an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The record (and the audit task, if any) is in the streams.
    Recorded,
    /// The share hash was seen before on this tip: nothing was written.
    Duplicate,
}

/// Why a record is not in Redis.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// Not written, and it never will be (not sent, or fenced off after its answer was lost).
    #[error("not recorded: {0}")]
    NotRecorded(String),
    /// The writer stopped (pool shutting down) before the outcome was known.
    #[error("record writer stopped before the outcome was known")]
    Stopped,
}

/// Redis settings of the writer.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Redis URL.
    pub url: String,
    /// Most appends per pipelined batch.
    pub batch_max: usize,
    /// Time to wait for a batch's answer before resolving its outcome.
    pub timeout: Duration,
    /// Expiry of a tip's seen hashes after its last share.
    pub seen_idle_secs: u64,
    /// Expiry of a tip's seen hashes once the pool moved to another tip.
    pub seen_after_new_tip_secs: u64,
}

enum Command {
    Append(Pending),
    Supersede(String),
}

struct Pending {
    append: ShareAppend,
    done: oneshot::Sender<Result<Appended, AppendError>>,
}

/// Handle to the record writer.
#[derive(Clone)]
pub struct RecordSink {
    tx: mpsc::Sender<Command>,
    metrics: Arc<PoolMetrics>,
}

impl RecordSink {
    /// Start the writer.
    pub fn spawn(config: SinkConfig, metrics: Arc<PoolMetrics>) -> Self {
        let (tx, rx) = mpsc::channel(config.batch_max * 64);
        tokio::spawn(writer(config, rx, metrics.clone()));
        Self { tx, metrics }
    }

    /// Append one share's records; returns once Redis has decided (see the module docs).
    pub async fn append(&self, append: ShareAppend) -> Result<Appended, AppendError> {
        let started = Instant::now();
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Append(Pending { append, done }))
            .await
            .map_err(|_| AppendError::NotRecorded("record writer stopped".into()))?;
        let result = wait.await.unwrap_or(Err(AppendError::Stopped));
        if result.is_ok() {
            self.metrics
                .redis_append_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// The pool moved on from tip `prev_hash`: its seen hashes get the short expiry.
    pub fn supersede(&self, prev_hash: String) {
        // Best effort: a lost supersede only leaves the hash to its idle expiry.
        let _ = self.tx.try_send(Command::Supersede(prev_hash));
    }
}

fn append_cmd(pipe: &mut redis::Pipeline, a: &ShareAppend, c: &SinkConfig) {
    let cmd = pipe
        .cmd("FCALL")
        .arg("hashpool_append")
        .arg(3)
        .arg(seen_key(&a.tip))
        .arg(SHARES_STREAM)
        .arg(AUDIT_TASKS_STREAM)
        .arg(&a.share_hash)
        .arg(c.seen_idle_secs)
        .arg(c.seen_after_new_tip_secs)
        .arg(a.record.len() * 2);
    for (k, v) in &a.record {
        cmd.arg(*k).arg(v);
    }
    for (k, v) in a.audit.iter().flatten() {
        cmd.arg(*k).arg(v);
    }
}

/// The answer of `hashpool_append`, or `None` if it is not one (outcome unknown).
fn appended(v: &Value) -> Option<Appended> {
    match pair(v)?.0.as_str() {
        "recorded" => Some(Appended::Recorded),
        "duplicate" => Some(Appended::Duplicate),
        _ => None,
    }
}

async fn writer(config: SinkConfig, mut rx: mpsc::Receiver<Command>, metrics: Arc<PoolMetrics>) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut superseded: Vec<String> = Vec::new();
    let mut commands = Vec::with_capacity(config.batch_max);
    while rx.recv_many(&mut commands, config.batch_max).await > 0 {
        let mut batch = Vec::with_capacity(commands.len());
        for c in commands.drain(..) {
            match c {
                Command::Append(p) => batch.push(p),
                Command::Supersede(tip) => superseded.push(tip),
            }
        }
        if conn.is_none() {
            match redis_store::connect(&config.url, config.timeout).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    // Nothing of this batch was sent.
                    metrics.set_redis_ok(false);
                    if !batch.is_empty() {
                        tracing::warn!("{} share record(s) not appended: {e}", batch.len());
                    }
                    for p in batch {
                        let _ = p.done.send(Err(AppendError::NotRecorded(e.to_string())));
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for tip in &superseded {
            expire_lt(&mut pipe, &seen_key(tip), config.seen_after_new_tip_secs);
        }
        for p in &batch {
            append_cmd(&mut pipe, &p.append, &config);
        }
        let answer = tokio::time::timeout(config.timeout, pipe.query_async::<Vec<Value>>(c)).await;
        match answer {
            Ok(Ok(values)) if values.len() == batch.len() => {
                metrics.set_redis_ok(true);
                superseded.clear();
                let mut unknown = Vec::new();
                for (p, v) in batch.into_iter().zip(values) {
                    match appended(&v) {
                        Some(a) => {
                            let _ = p.done.send(Ok(a));
                        }
                        None => {
                            tracing::warn!(share = %p.append.share_hash, "unexpected answer to hashpool_append: {v:?}");
                            unknown.push(p);
                        }
                    }
                }
                if !unknown.is_empty() {
                    spawn_resolver(config.clone(), unknown, metrics.clone());
                }
            }
            other => {
                let why = match other {
                    Ok(Ok(v)) => format!("{} answers for {} appends", v.len(), batch.len()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {:?}", config.timeout),
                };
                metrics.set_redis_ok(false);
                conn = None; // a fresh connection for the next batch
                if !batch.is_empty() {
                    tracing::warn!(
                        "{} share record(s) sent, outcome unknown ({why}): resolving before answering",
                        batch.len()
                    );
                    spawn_resolver(config.clone(), batch, metrics.clone());
                }
            }
        }
    }
}

fn spawn_resolver(config: SinkConfig, batch: Vec<Pending>, metrics: Arc<PoolMetrics>) {
    metrics.redis_unknown_outcomes.inc_by(batch.len() as u64);
    tokio::spawn(resolve(config, batch, metrics));
}

/// Settle each append of `batch` with `hashpool_resolve`, retrying until Redis answers.
async fn resolve(config: SinkConfig, batch: Vec<Pending>, metrics: Arc<PoolMetrics>) {
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0u32;
    loop {
        if batch.iter().all(|p| p.done.is_closed()) {
            return; // nobody is waiting for the answer any more (pool stopping)
        }
        attempts += 1;
        let answer = async {
            let mut c = redis_store::connect(&config.url, config.timeout).await?;
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for p in &batch {
                pipe.cmd("FCALL")
                    .arg("hashpool_resolve")
                    .arg(1)
                    .arg(seen_key(&p.append.tip))
                    .arg(&p.append.share_hash)
                    .arg(config.seen_idle_secs);
            }
            match tokio::time::timeout(config.timeout, pipe.query_async::<Vec<Value>>(&mut c)).await
            {
                Ok(Ok(v)) if v.len() == batch.len() => Ok(v),
                Ok(Ok(v)) => Err(format!(
                    "{} answers for {} resolutions",
                    v.len(),
                    batch.len()
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", config.timeout)),
            }
            .map_err(|reason| redis_store::StoreError {
                what: "FCALL hashpool_resolve",
                reason,
            })
        }
        .await;
        let values = match answer {
            Ok(v) if v.iter().all(|v| pair(v).is_some()) => v,
            other => {
                if attempts == 1 || attempts.is_multiple_of(20) {
                    let why = other
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "malformed answer".into());
                    tracing::warn!(
                        "cannot resolve {} share record(s) yet (attempt {attempts}): {why}",
                        batch.len()
                    );
                }
                // Backoff between attempts to reach Redis.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RESOLVE_BACKOFF);
                continue;
            }
        };
        for (p, v) in batch.into_iter().zip(values) {
            let (status, value) = pair(&v).unwrap_or_default();
            let result = if status == "found" && value != ehash::ids::REFUSED_MARK {
                Ok(Appended::Recorded)
            } else {
                Err(AppendError::NotRecorded(
                    "Redis did not answer in time; the record was fenced off".into(),
                ))
            };
            let label = if result.is_ok() {
                "recorded"
            } else {
                "refused"
            };
            metrics.redis_resolved.with_label_values(&[label]).inc();
            tracing::info!(share = %p.append.share_hash, "unknown append outcome resolved: {label}");
            let _ = p.done.send(result);
        }
        return;
    }
}
