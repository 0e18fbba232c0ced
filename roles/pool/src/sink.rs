//! Durable share records: a task that appends records to Redis streams in pipelined batches
//! and tells each caller when its record is in. The pool acknowledges a share only after
//! that; if Redis is unreachable or slow, the caller gets an error and refuses the share.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::metrics::PoolMetrics;

/// Why a record was not appended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// Redis refused, dropped the connection or was not reachable.
    #[error("redis: {0}")]
    Redis(String),
    /// No answer within the append timeout.
    #[error("redis did not confirm the record within {0:?}")]
    Timeout(Duration),
    /// The writer task is gone (pool shutting down).
    #[error("record writer stopped")]
    Stopped,
}

struct Append {
    stream: &'static str,
    fields: Vec<(&'static str, String)>,
    done: oneshot::Sender<Result<String, AppendError>>,
}

/// Handle to the record writer.
#[derive(Clone)]
pub struct RecordSink {
    tx: mpsc::Sender<Append>,
    timeout: Duration,
    metrics: std::sync::Arc<PoolMetrics>,
}

impl RecordSink {
    /// Start the writer for `url`.
    pub fn spawn(
        url: String,
        batch_max: usize,
        timeout: Duration,
        metrics: std::sync::Arc<PoolMetrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(batch_max * 64);
        tokio::spawn(writer(url, batch_max, timeout, rx));
        Self {
            tx,
            timeout,
            metrics,
        }
    }

    /// Append `fields` to `stream`; returns the entry id once Redis has it.
    pub async fn append(
        &self,
        stream: &'static str,
        fields: Vec<(&'static str, String)>,
    ) -> Result<String, AppendError> {
        let started = Instant::now();
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Append {
                stream,
                fields,
                done,
            })
            .await
            .map_err(|_| AppendError::Stopped)?;
        let result = match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(AppendError::Stopped),
            Err(_) => Err(AppendError::Timeout(self.timeout)),
        };
        if result.is_ok() {
            self.metrics
                .redis_append_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }
}

async fn connect(
    url: &str,
    timeout: Duration,
) -> Result<redis::aio::MultiplexedConnection, AppendError> {
    let client = redis::Client::open(url).map_err(|e| AppendError::Redis(e.to_string()))?;
    match tokio::time::timeout(timeout, client.get_multiplexed_async_connection()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(AppendError::Redis(e.to_string())),
        Err(_) => Err(AppendError::Timeout(timeout)),
    }
}

async fn writer(url: String, batch_max: usize, timeout: Duration, mut rx: mpsc::Receiver<Append>) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut batch: Vec<Append> = Vec::with_capacity(batch_max);
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        // Drop requests whose caller already gave up (timed out): never write a record
        // for a share that was refused.
        batch.retain(|a| !a.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        let result = async {
            if conn.is_none() {
                conn = Some(connect(&url, timeout).await?);
            }
            let c = conn.as_mut().ok_or(AppendError::Stopped)?;
            let mut pipe = redis::pipe();
            for a in &batch {
                let cmd = pipe.cmd("XADD").arg(a.stream).arg("*");
                for (k, v) in &a.fields {
                    cmd.arg(*k).arg(v);
                }
            }
            match tokio::time::timeout(timeout, pipe.query_async::<Vec<String>>(c)).await {
                Ok(Ok(ids)) => Ok(ids),
                Ok(Err(e)) => Err(AppendError::Redis(e.to_string())),
                Err(_) => Err(AppendError::Timeout(timeout)),
            }
        }
        .await;
        match result {
            Ok(ids) => {
                for (a, id) in batch.drain(..).zip(ids) {
                    let _ = a.done.send(Ok(id));
                }
            }
            Err(e) => {
                tracing::warn!("appending {} record(s) to redis failed: {e}", batch.len());
                conn = None; // reconnect on the next batch
                for a in batch.drain(..) {
                    let _ = a.done.send(Err(e.clone()));
                }
            }
        }
    }
}
