//! Durable share records: a task that appends records to Redis in pipelined batches through
//! the `hashpool_append` function (the template's audit task once, then set-if-absent on the
//! share hash and `XADD`, atomically) and tells each caller what happened. The pool answers a
//! share only from that answer:
//!
//! - Redis ran the function: the record is in (`Recorded`), or the hash was seen before and
//!   nothing was written (`Duplicate`).
//! - Redis refused to run it (out of memory, read-only, ...) or nothing was sent (no
//!   connection): the record is not in and never will be.
//! - The batch was sent but no answer came within `append_timeout_ms` (Redis slow, paused,
//!   or the connection broke): the outcome is unknown. The appends go to the resolver
//!   (`resolve.rs`), which settles each with `hashpool_resolve` as soon as Redis answers: a
//!   hash without an entry is marked refused, so an append still queued in Redis can no
//!   longer land. The share is answered only then.
//!
//! The writer also keeps the seen hashes' expiries: the current tip's is renewed, a tip the
//! pool left gets the short one (see `redis_store.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ehash::{seen_key, FieldRef, AUDIT_TASKS_STREAM, SHARES_STREAM};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::PoolMetrics;
use crate::redis_store::{self, expire_lt, not_run, pair, unix_secs};
use crate::resolve::Resolver;
use crate::template::TemplateRecord;

/// How often the current tip's seen hashes get their idle expiry renewed without shares.
const RENEW_CURRENT_TIP: Duration = Duration::from_secs(3600);

/// One share's records.
#[derive(Debug, Clone)]
pub struct ShareAppend {
    /// Key of the seen share hashes of the tip the share was validated on
    /// (`ehash:seen:<prev hash>`).
    pub seen_key: Arc<str>,
    /// The `ehash:shares` record.
    pub record: ehash::ShareRecord,
    /// The template's audit task: its id, and its fields for the first share of a template.
    pub audit: (u64, Option<Vec<(&'static str, String)>>),
}

/// What Redis did with an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The record (and the audit task, if any) is in the streams.
    Recorded,
    /// The share hash was seen before on this tip: nothing was written.
    Duplicate,
    /// The template has no audit task yet (its first append did not land): not recorded.
    NoAuditTask,
}

/// Why a record is not in Redis.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// Not written, and it never will be (not sent, refused by Redis, or fenced off after
    /// its answer was lost).
    #[error("not recorded: {0}")]
    NotRecorded(String),
    /// The pool stopped before the outcome was known.
    #[error("the pool stopped before the record's outcome was known")]
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

/// An append on its way, with the token that tells its entry from another append's.
pub(crate) struct Pending {
    pub append: ShareAppend,
    pub token: u64,
    /// Unix time (s) before the append was sent.
    pub sent: u64,
    pub done: oneshot::Sender<Result<Appended, AppendError>>,
}

/// Handle to the record writer.
#[derive(Clone)]
pub struct RecordSink {
    tx: mpsc::Sender<Pending>,
    metrics: Arc<PoolMetrics>,
}

/// The writer and resolver tasks, to wait for at shutdown.
pub struct SinkTasks {
    writer: tokio::task::JoinHandle<()>,
    resolver: tokio::task::JoinHandle<()>,
}

impl SinkTasks {
    /// Wait (at most `grace`) until every append handed over was answered or resolved.
    /// Call after every `RecordSink` clone was dropped.
    pub async fn finish(self, grace: Duration) {
        let all = async {
            let _ = self.writer.await;
            let _ = self.resolver.await;
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "share records still unresolved {grace:?} after shutdown: their shares stay unanswered"
            );
        }
    }
}

impl RecordSink {
    /// Start the writer for pool epoch `epoch`; `templates` says which tip is current.
    pub fn spawn(
        config: SinkConfig,
        epoch: u32,
        templates: watch::Receiver<Option<Arc<TemplateRecord>>>,
        metrics: Arc<PoolMetrics>,
    ) -> (Self, SinkTasks) {
        let (tx, rx) = mpsc::channel(config.batch_max * 64);
        let (resolver, resolver_task) = Resolver::spawn(config.clone(), metrics.clone());
        let writer = tokio::spawn(writer(
            config,
            epoch,
            rx,
            templates,
            resolver,
            metrics.clone(),
        ));
        (
            Self { tx, metrics },
            SinkTasks {
                writer,
                resolver: resolver_task,
            },
        )
    }

    /// Append one share's records; returns once Redis has decided (see the module docs).
    pub async fn append(&self, append: ShareAppend) -> Result<Appended, AppendError> {
        let started = Instant::now();
        let (done, wait) = oneshot::channel();
        let pending = Pending {
            append,
            token: 0,
            sent: 0,
            done,
        };
        self.tx
            .send(pending)
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
}

/// Add the `hashpool_append` call of `a` to `pipe`.
pub fn append_cmd(pipe: &mut redis::Pipeline, a: &ShareAppend, token: u64, c: &SinkConfig) {
    let mut marker = [0u8; 48];
    // Sized for a share record, so the command is built without reallocating.
    let mut command = redis::Cmd::with_capacity(40, 512);
    let cmd = command
        .arg("FCALL")
        .arg("hashpool_append")
        .arg(4)
        .arg(&*a.seen_key)
        .arg(SHARES_STREAM)
        .arg(AUDIT_TASKS_STREAM)
        .arg(audit_marker(a.audit.0, &mut marker))
        .arg(&a.record.share_hash)
        .arg(token)
        .arg(c.seen_idle_secs)
        .arg(c.seen_after_new_tip_secs);
    let fields = a.record.field_refs();
    cmd.arg(fields.len() * 2);
    let mut hex = [0u8; 2 * ehash::tlv::LOCKING_PUBKEY_LEN];
    for (k, v) in fields {
        cmd.arg(k);
        match v {
            FieldRef::Str(s) => cmd.arg(s),
            FieldRef::Int(n) => cmd.arg(n),
            FieldRef::Hex(b) => cmd.arg(crate::shares::hex_into(b, &mut hex)),
        };
    }
    for (k, v) in a.audit.1.iter().flatten() {
        cmd.arg(*k).arg(v);
    }
    pipe.add_command(command);
}

/// `ehash:audited:<template id>` (see [`ehash::ids::audit_marker_key`]) written into `buf`.
fn audit_marker(template_id: u64, buf: &mut [u8; 48]) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{}{template_id}", ehash::ids::AUDIT_MARKER_PREFIX);
    let n = cursor.position() as usize;
    &buf[..n]
}

/// How one `hashpool_append` answer settles its share: `None` means unknown.
fn settle(v: &Value) -> Option<Result<Appended, AppendError>> {
    if let Value::ServerError(e) = v {
        let text = format!("{e:?}");
        return not_run(&text).then(|| Err(AppendError::NotRecorded(format!("redis: {text}"))));
    }
    match pair(v)?.0.as_str() {
        "recorded" => Some(Ok(Appended::Recorded)),
        "duplicate" => Some(Ok(Appended::Duplicate)),
        "no-audit" => Some(Ok(Appended::NoAuditTask)),
        _ => None,
    }
}

/// Tip expiry bookkeeping: the tip whose seen hashes were last renewed, and tips to supersede.
#[derive(Default)]
struct Tips {
    renewed: Option<(Arc<str>, Instant)>,
    superseded: Vec<Arc<str>>,
}

impl Tips {
    /// Note the pool's current tip; returns whether expiry commands are due.
    fn observe(&mut self, current: Option<Arc<str>>) -> bool {
        let Some(current) = current else {
            return !self.superseded.is_empty();
        };
        match &self.renewed {
            Some((tip, at)) if *tip == current => {
                at.elapsed() >= RENEW_CURRENT_TIP || !self.superseded.is_empty()
            }
            Some((old, _)) => {
                let old = old.clone();
                self.superseded.retain(|t| *t != current);
                self.superseded.push(old);
                self.renewed = Some((current, Instant::now() - RENEW_CURRENT_TIP));
                true
            }
            None => {
                self.renewed = Some((current, Instant::now() - RENEW_CURRENT_TIP));
                true
            }
        }
    }

    fn add_commands(&self, pipe: &mut redis::Pipeline, c: &SinkConfig) {
        for tip in &self.superseded {
            expire_lt(pipe, &seen_key(tip), c.seen_after_new_tip_secs);
        }
        if let Some((tip, _)) = &self.renewed {
            pipe.cmd("EXPIRE")
                .arg(seen_key(tip))
                .arg(c.seen_idle_secs)
                .ignore();
        }
    }

    fn done(&mut self) {
        self.superseded.clear();
        if let Some((_, at)) = &mut self.renewed {
            *at = Instant::now();
        }
    }
}

async fn writer(
    config: SinkConfig,
    epoch: u32,
    mut rx: mpsc::Receiver<Pending>,
    mut templates: watch::Receiver<Option<Arc<TemplateRecord>>>,
    resolver: Resolver,
    metrics: Arc<PoolMetrics>,
) {
    static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
    let mut conn: Option<MultiplexedConnection> = None;
    let mut tips = Tips::default();
    let mut batch = Vec::with_capacity(config.batch_max);
    let mut source_open = true;
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, config.batch_max) => if n == 0 { break },
            changed = templates.changed(), if source_open => source_open = changed.is_ok(),
            // Renew the current tip's expiry even when no share comes.
            _ = tokio::time::sleep(RENEW_CURRENT_TIP) => {}
        }
        let current = templates
            .borrow_and_update()
            .as_ref()
            .map(|t| Arc::<str>::from(t.prev_hash_display.as_str()));
        let expiries_due = tips.observe(current);
        if batch.is_empty() && !expiries_due {
            continue;
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
                    for p in batch.drain(..) {
                        let _ = p.done.send(Err(AppendError::NotRecorded(e.to_string())));
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent = unix_secs();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if expiries_due {
            tips.add_commands(&mut pipe, &config);
        }
        for p in batch.iter_mut() {
            // Epoch in the high half: two pool processes never share a token.
            p.token = (u64::from(epoch) << 32)
                | (NEXT_TOKEN.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff);
            p.sent = sent;
            append_cmd(&mut pipe, &p.append, p.token, &config);
        }
        let answer = tokio::time::timeout(config.timeout, pipe.query_async::<Vec<Value>>(c)).await;
        match answer {
            Ok(Ok(values)) if values.len() == batch.len() => {
                metrics.set_redis_ok(true);
                tips.done();
                let mut reload = false;
                for (p, v) in batch.drain(..).zip(values) {
                    match settle(&v) {
                        Some(result) => {
                            reload |= matches!(&result, Err(AppendError::NotRecorded(e)) if e.contains("Function not found"));
                            let _ = p.done.send(result);
                        }
                        None => {
                            tracing::warn!(share = %p.append.record.share_hash, "unexpected answer to hashpool_append ({v:?}): resolving");
                            resolver.resolve(p);
                        }
                    }
                }
                if reload {
                    if let Err(e) = redis_store::load_library(c, config.timeout).await {
                        tracing::warn!("cannot load the pool's Redis functions: {e}");
                    }
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
                    for p in batch.drain(..) {
                        resolver.resolve(p);
                    }
                }
            }
        }
    }
}
