//! The resolver: appends whose answer was lost are settled here with `hashpool_resolve`, one
//! call per tip, retried on one connection until Redis answers. Each is fenced whether or not
//! anyone still waits for it (the miner may have gone), so no append lands after the pool
//! decided it did not.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ehash::SHARES_STREAM;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::mpsc;

use crate::metrics::PoolMetrics;
use crate::redis_store;
use crate::sink::{AppendError, Appended, Pending, SinkConfig};

/// First pause between two attempts to reach Redis; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Handle to the resolver task.
#[derive(Clone)]
pub(crate) struct Resolver {
    tx: mpsc::UnboundedSender<Pending>,
    metrics: Arc<PoolMetrics>,
}

impl Resolver {
    /// Start the resolver.
    pub fn spawn(
        config: SinkConfig,
        metrics: Arc<PoolMetrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(config, rx, metrics.clone()));
        (Self { tx, metrics }, task)
    }

    /// Settle `p`'s outcome, then answer it.
    pub fn resolve(&self, p: Pending) {
        self.metrics.redis_unknown_outcomes.inc();
        if let Err(e) = self.tx.send(p) {
            // Only when the runtime is going away: the share stays unanswered.
            let _ = e.0.done.send(Err(AppendError::Stopped));
        }
    }
}

async fn run(
    config: SinkConfig,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    metrics: Arc<PoolMetrics>,
) {
    let mut queue: Vec<Pending> = Vec::new();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut backoff = MIN_BACKOFF;
    let mut attempts = 0u32;
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(p) => queue.push(p),
                None => return,
            }
        }
        while let Ok(p) = rx.try_recv() {
            queue.push(p);
        }
        match attempt(&mut conn, &config, &mut queue, &metrics).await {
            Ok(()) if queue.is_empty() => {
                backoff = MIN_BACKOFF;
                attempts = 0;
                continue;
            }
            Ok(()) => {}
            Err(e) => {
                conn = None;
                attempts += 1;
                if attempts == 1 || attempts.is_multiple_of(20) {
                    tracing::warn!(
                        "cannot resolve {} share record(s) yet (attempt {attempts}): {e}",
                        queue.len()
                    );
                }
            }
        }
        // Backoff between attempts to reach Redis.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One try: a `hashpool_resolve` call per tip for everything queued. Settled appends are
/// answered and removed from `queue`.
async fn attempt(
    conn: &mut Option<MultiplexedConnection>,
    config: &SinkConfig,
    queue: &mut Vec<Pending>,
    metrics: &PoolMetrics,
) -> Result<(), redis_store::StoreError> {
    if conn.is_none() {
        *conn = Some(redis_store::connect(&config.url, config.timeout).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Ok(());
    };
    let mut by_tip: BTreeMap<Arc<str>, Vec<Pending>> = BTreeMap::new();
    for p in queue.drain(..) {
        by_tip.entry(p.append.seen_key.clone()).or_default().push(p);
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (seen, group) in &by_tip {
        let sent = group.iter().map(|p| p.sent).min().unwrap_or(0);
        let cmd = pipe
            .cmd("FCALL")
            .arg("hashpool_resolve")
            .arg(2)
            .arg(&**seen)
            .arg(SHARES_STREAM)
            .arg(config.seen_idle_secs)
            .arg(sent);
        for p in group {
            cmd.arg(&p.append.record.share_hash);
        }
    }
    let answer = tokio::time::timeout(config.timeout, pipe.query_async::<Vec<Value>>(c)).await;
    let values = match answer {
        Ok(Ok(v)) if v.len() == by_tip.len() => v,
        other => {
            let reason = match other {
                Ok(Ok(v)) => format!("{} answers for {} calls", v.len(), by_tip.len()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", config.timeout),
            };
            queue.extend(by_tip.into_values().flatten());
            return Err(redis_store::StoreError {
                what: "FCALL hashpool_resolve",
                reason,
            });
        }
    };
    let mut reload = false;
    for ((_, group), v) in by_tip.into_iter().zip(values) {
        let items = match &v {
            Value::Array(items) if items.len() == group.len() => items.clone(),
            other => {
                reload |= format!("{other:?}").contains("Function not found");
                tracing::warn!("unexpected answer to hashpool_resolve: {other:?}");
                queue.extend(group);
                continue;
            }
        };
        for (p, item) in group.into_iter().zip(items) {
            let value = match item {
                Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                Value::SimpleString(s) => s,
                other => format!("{other:?}"),
            };
            let result = outcome(&value, p.token);
            let label = match &result {
                Ok(Appended::Recorded) => "recorded",
                Ok(_) => "duplicate",
                Err(_) => "refused",
            };
            metrics.redis_resolved.with_label_values(&[label]).inc();
            tracing::info!(share = %p.append.record.share_hash, "unknown append outcome resolved: {label}");
            let _ = p.done.send(result);
        }
    }
    if reload {
        redis_store::load_library(c, config.timeout).await?;
    }
    Ok(())
}

/// What the seen-hash value says of the append that carried `token`.
fn outcome(value: &str, token: u64) -> Result<Appended, AppendError> {
    match value.split_once(' ') {
        None => Err(AppendError::NotRecorded(
            "Redis did not answer in time; the record was fenced off".into(),
        )),
        Some((_, "found")) => Ok(Appended::Recorded),
        Some((_, t)) if t.parse() == Ok(token) => Ok(Appended::Recorded),
        // Another append of the same share hash landed, not this one.
        Some(_) => Ok(Appended::Duplicate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_values_settle_appends() {
        assert!(matches!(
            outcome("refused", 71),
            Err(AppendError::NotRecorded(_))
        ));
        assert!(matches!(outcome("1795-0 71", 71), Ok(Appended::Recorded)));
        assert!(matches!(
            outcome("1795-0 found", 71),
            Ok(Appended::Recorded)
        ));
        assert!(matches!(outcome("1795-0 72", 71), Ok(Appended::Duplicate)));
    }
}
