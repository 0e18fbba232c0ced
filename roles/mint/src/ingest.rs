//! The mint's readers: consumer group `mint` on `ehash:shares` (one quote per record) and on
//! `audit:results` (verdicts), and the settlement clock. Entries are acknowledged only after
//! the database transaction that holds their effect committed; a crash before that makes the
//! mint re-read them (its own pending entries first), and the effects are idempotent.
//!
//! An entry that can never be processed (it does not parse, or its locking key is no curve
//! point) leaves the group only together with its dead letter in `mint:dead` (one Redis
//! transaction), counted in `hashpool_mint_dead_letters_total`; one of a newer record version
//! stops the reader until the mint is upgraded. Any other failure (the
//! database busy past its timeout, a failed commit, a full disk, Redis gone) fails the whole
//! batch: nothing is acknowledged and the batch is read again after a backoff, so a record the
//! pool acknowledged to its miner always becomes a quote.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cdk::mint::Mint;
use ehash::{AuditResult, ShareRecord, AUDIT_RESULTS_STREAM, MINT_DEAD_STREAM, SHARES_STREAM};
use hashpool_config::pool_side::MintConfig;
use hashpool_streams::{Consumer, Entry};
use tokio_util::sync::CancellationToken;

use crate::metrics::MintMetrics;
use crate::store::{Changed, Store};

/// Consumer group of the mint on both streams.
pub const GROUP: &str = "mint";
/// How long a read blocks waiting for new entries.
const BLOCK: Duration = Duration::from_millis(500);
/// How often entries abandoned by another consumer are looked for.
const RECLAIM_EVERY: Duration = Duration::from_secs(2);
/// Longest sleep of the settlement loop with nothing due (it is woken when a valid template
/// is given its settlement time, and at the next due time).
const SETTLE_IDLE: Duration = Duration::from_secs(10);
/// First pause after a Redis or database error; doubles up to 2 s.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `err` is a record of a version newer than this mint reads.
fn newer_version(err: &ehash::RecordError) -> bool {
    match err {
        ehash::RecordError::Version { found, known } => {
            found.parse::<u32>().is_ok_and(|f| f > *known)
        }
        _ => false,
    }
}

/// Count paid quotes and push their state to NUT-17 subscribers (after commit).
fn notify(mint: &Mint, metrics: &MintMetrics, changed: &Changed) {
    let pubsub = mint.pubsub_manager();
    let now = now_ms();
    metrics
        .quotes
        .with_label_values(&["paid"])
        .inc_by(changed.len() as u64);
    for q in changed {
        if let Some(at) = q
            .extra_json
            .as_ref()
            .and_then(|j| j.get("recorded_at"))
            .and_then(|v| v.as_u64())
        {
            metrics
                .record_to_paid_seconds
                .observe(now.saturating_sub(at) as f64 / 1000.0);
        }
        pubsub.mint_quote_payment(q, q.amount_paid());
    }
}

/// What a reader did with a batch, its effect committed: the quotes to notify, and the
/// entries that can never be processed with why (their dead letters go out with the ack).
struct Handled<'a> {
    changed: Changed,
    dead: Vec<(&'a Entry, String)>,
}

/// What a reader does with a batch. `Err` means nothing was committed: the batch is read again.
#[async_trait::async_trait]
trait Handler: Send + Sync {
    async fn handle<'a>(&self, entries: &'a [Entry]) -> anyhow::Result<Handled<'a>>;
}

struct Shares {
    store: Arc<Store>,
    metrics: Arc<MintMetrics>,
}

#[async_trait::async_trait]
impl Handler for Shares {
    async fn handle<'a>(&self, entries: &'a [Entry]) -> anyhow::Result<Handled<'a>> {
        let mut records = Vec::with_capacity(entries.len());
        let mut dead = Vec::new();
        for e in entries {
            // A newer record version (the pool upgraded first) is not a bad record: wait for
            // this mint to be upgraded rather than set it aside.
            if let Err(err @ ehash::RecordError::Version { .. }) =
                ShareRecord::from_fields(&e.fields)
            {
                if newer_version(&err) {
                    anyhow::bail!("entry {}: {err}: upgrade the mint to read it", e.id);
                }
            }
            // Everything a record could fail on for good is checked here, before the database.
            let checked = ShareRecord::from_fields(&e.fields)
                .map_err(|err| format!("unreadable share record: {err}"))
                .and_then(|r| {
                    cdk_common::PublicKey::from_slice(r.locking_pubkey.as_bytes())
                        .map(|_| r)
                        .map_err(|err| format!("locking key is no secp256k1 point: {err}"))
                });
            match checked {
                Ok(r) => records.push((e.millis(), r)),
                Err(why) => {
                    self.metrics
                        .unreadable
                        .with_label_values(&[SHARES_STREAM])
                        .inc();
                    tracing::error!(entry = %e.id, "{why}: no quote can be made, sent to {MINT_DEAD_STREAM}");
                    dead.push((e, why));
                }
            }
        }
        // A failure here is the database's, never the records': nothing is acknowledged and
        // the whole batch comes again.
        let (created, changed) = self.store.add_shares(&records).await?;
        self.metrics
            .quotes
            .with_label_values(&["created"])
            .inc_by(created as u64);
        let now = now_ms();
        for e in entries {
            self.metrics
                .record_to_quote_seconds
                .observe(now.saturating_sub(e.millis()) as f64 / 1000.0);
        }
        Ok(Handled { changed, dead })
    }
}

struct Verdicts {
    store: Arc<Store>,
    metrics: Arc<MintMetrics>,
    delay_ms: u64,
}

#[async_trait::async_trait]
impl Handler for Verdicts {
    async fn handle<'a>(&self, entries: &'a [Entry]) -> anyhow::Result<Handled<'a>> {
        let mut results = Vec::with_capacity(entries.len());
        let mut dead = Vec::new();
        for e in entries {
            if let Err(err @ ehash::RecordError::Version { .. }) =
                AuditResult::from_fields(&e.fields)
            {
                if newer_version(&err) {
                    anyhow::bail!("entry {}: {err}: upgrade the mint to read it", e.id);
                }
            }
            match AuditResult::from_fields(&e.fields) {
                Ok(r) => {
                    self.metrics
                        .templates
                        .with_label_values(&[r.verdict.as_str()])
                        .inc();
                    results.push(r);
                }
                Err(err) => {
                    self.metrics
                        .unreadable
                        .with_label_values(&[AUDIT_RESULTS_STREAM])
                        .inc();
                    let why = format!("unreadable verdict: {err}");
                    tracing::error!(entry = %e.id, "{why}: sent to {MINT_DEAD_STREAM}");
                    dead.push((e, why));
                }
            }
        }
        let changed = self
            .store
            .add_verdicts(&results, now_ms(), self.delay_ms)
            .await?;
        Ok(Handled { changed, dead })
    }
}

/// Read `stream` in group `mint` until `stop`: own pending first, then abandoned entries of
/// dead consumers, then new ones.
async fn read_loop(
    config: MintConfig,
    stream: &'static str,
    handler: Arc<dyn Handler>,
    mint: Arc<Mint>,
    metrics: Arc<MintMetrics>,
    stop: CancellationToken,
) {
    let timeout = Duration::from_millis(config.redis.append_timeout_ms);
    let mut backoff = MIN_BACKOFF;
    let mut consumer: Option<Consumer> = None;
    let mut last_reclaim = Instant::now();
    while !stop.is_cancelled() {
        let result = async {
            if consumer.is_none() {
                consumer = Some(
                    Consumer::join(&config.redis.url, stream, GROUP, &config.consumer, timeout)
                        .await?,
                );
            }
            let Some(c) = consumer.as_mut() else {
                return Ok(());
            };
            let mut entries = Vec::new();
            if last_reclaim.elapsed() >= RECLAIM_EVERY {
                last_reclaim = Instant::now();
                entries = c
                    .claim_abandoned(
                        Duration::from_millis(config.reclaim_idle_ms),
                        config.batch_max,
                    )
                    .await?;
                if !entries.is_empty() {
                    tracing::info!(
                        stream,
                        n = entries.len(),
                        "claimed entries a dead consumer left pending"
                    );
                }
            }
            if entries.is_empty() {
                entries = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    e = c.next(config.batch_max, BLOCK) => e?,
                };
            }
            if entries.is_empty() {
                metrics
                    .backlog
                    .with_label_values(&[stream])
                    .set(c.backlog().await? as i64);
                return Ok(());
            }
            let handled = handler.handle(&entries).await?;
            // Committed: tell subscribers now (a failed ack must not lose the push).
            notify(&mint, &metrics, &handled.changed);
            let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
            let dropped = c
                .ack_with_dead_letters(
                    &ids,
                    MINT_DEAD_STREAM,
                    &handled.dead,
                    config.streams.dead_letters_max,
                )
                .await?;
            metrics
                .dead_letters
                .with_label_values(&[stream])
                .inc_by(handled.dead.len() as u64);
            if dropped > 0 {
                metrics.dead_letters_dropped.inc_by(dropped);
                tracing::warn!(
                    "{MINT_DEAD_STREAM} is full (streams.dead_letters_max = {}): its {dropped} oldest entries went",
                    config.streams.dead_letters_max
                );
            }
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => backoff = MIN_BACKOFF,
            Err(e) => {
                metrics.batch_failures.with_label_values(&[stream]).inc();
                tracing::warn!(
                    stream,
                    "a batch failed, nothing acknowledged; reading it again in {backoff:?}: {e:#}"
                );
                consumer = None;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    // Backoff after a Redis or database error.
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Pay valid templates whose settlement time has come, until `stop`: it wakes at the next
/// due time, when a valid template is given its time, or after `SETTLE_IDLE`.
async fn settle_loop(
    store: Arc<Store>,
    mint: Arc<Mint>,
    metrics: Arc<MintMetrics>,
    stop: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let wait = match store.settle_due(now_ms()).await {
            Ok((changed, next)) => {
                notify(&mint, &metrics, &changed);
                backoff = MIN_BACKOFF;
                next.map(|at| Duration::from_millis(at.saturating_sub(now_ms())))
                    .unwrap_or(SETTLE_IDLE)
                    .min(SETTLE_IDLE)
            }
            Err(e) => {
                tracing::warn!("settlement failed, retrying in {backoff:?}: {e:#}");
                backoff = (backoff * 2).min(Duration::from_secs(2));
                backoff
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            // The settlement clock: the next due template, or a new one given its time.
            _ = tokio::time::sleep(wait) => {}
            _ = store.settlement_scheduled() => {}
        }
    }
}

/// Start the readers and the settlement clock.
pub fn spawn(
    config: &MintConfig,
    store: Arc<Store>,
    mint: Arc<Mint>,
    metrics: Arc<MintMetrics>,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let shares: Arc<dyn Handler> = Arc::new(Shares {
        store: store.clone(),
        metrics: metrics.clone(),
    });
    let verdicts: Arc<dyn Handler> = Arc::new(Verdicts {
        store: store.clone(),
        metrics: metrics.clone(),
        delay_ms: config.settlement_delay_secs * 1000,
    });
    vec![
        tokio::spawn(read_loop(
            config.clone(),
            SHARES_STREAM,
            shares,
            mint.clone(),
            metrics.clone(),
            stop.clone(),
        )),
        tokio::spawn(read_loop(
            config.clone(),
            AUDIT_RESULTS_STREAM,
            verdicts,
            mint.clone(),
            metrics.clone(),
            stop.clone(),
        )),
        tokio::spawn(settle_loop(store, mint, metrics.clone(), stop.clone())),
        tokio::spawn(trim_loop(config.clone(), metrics, stop)),
    ]
}

/// Trim `ehash:shares` and `audit:results` of what group `mint` (and every reader of
/// `streams.readers`) has acknowledged, until `stop`.
async fn trim_loop(config: MintConfig, metrics: Arc<MintMetrics>, stop: CancellationToken) {
    let s = &config.streams;
    if s.trim_interval_secs == 0 {
        return;
    }
    let targets = [SHARES_STREAM, AUDIT_RESULTS_STREAM]
        .into_iter()
        .map(|stream| hashpool_streams::TrimTarget {
            stream: stream.into(),
            groups: s.groups(GROUP),
        })
        .collect();
    let schedule = hashpool_streams::TrimSchedule {
        interval: Duration::from_secs(s.trim_interval_secs),
        min_age: Duration::from_secs(s.trim_min_age_secs),
        timeout: Duration::from_millis(config.redis.append_timeout_ms),
        warn_kept: TRIM_WARN_KEPT,
    };
    let report = |stream: &str, t: &hashpool_streams::Trimmed| {
        metrics
            .trimmed
            .with_label_values(&[stream])
            .inc_by(t.removed);
        metrics.trim_rounds.with_label_values(&[stream]).inc();
        metrics
            .stream_entries
            .with_label_values(&[stream])
            .set(t.kept as i64);
    };
    hashpool_streams::run_trimmer(
        config.redis.url.clone(),
        targets,
        schedule,
        report,
        stop.cancelled(),
    )
    .await;
}

/// Entries a stream may keep, held by a reader, before the mint warns.
const TRIM_WARN_KEPT: u64 = 100_000;
