//! Redis stream consumer groups, the way every pool-side reader uses them: a consumer first
//! re-reads its own pending entries (it crashed before acknowledging them), claims entries a
//! dead consumer left pending for longer than an idle limit (`XAUTOCLAIM`), then reads new
//! ones; it acknowledges (`XACK`) only after their effect is durable.
//!
//! Each consumer has its own connection: a blocking `XREADGROUP` holds the connection.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

mod trim;
pub use trim::{run_trimmer, trim_acknowledged, TrimSchedule, TrimTarget, Trimmed};

/// A Redis failure, with what was being done.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis {what}: {reason}")]
pub struct StreamError {
    /// The operation.
    pub what: &'static str,
    /// Why it failed.
    pub reason: String,
}

/// One stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Entry id (`<ms>-<seq>`).
    pub id: String,
    /// Field values (as strings).
    pub fields: HashMap<String, String>,
}

impl Entry {
    /// Unix time (ms) Redis gave the entry (the first half of its id).
    pub fn millis(&self) -> u64 {
        self.id
            .split('-')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }
}

/// A member of a consumer group on one stream.
pub struct Consumer {
    conn: MultiplexedConnection,
    stream: String,
    group: String,
    name: String,
    timeout: Duration,
    /// Own pending entries are re-read until none is left.
    own_pending_done: bool,
    /// Where the re-read of own pending entries goes on (past those already handed out, so
    /// an entry left pending on purpose does not come back until it is claimed again).
    pending_cursor: String,
}

fn failed(what: &'static str) -> impl Fn(redis::RedisError) -> StreamError {
    move |e| StreamError {
        what,
        reason: e.to_string(),
    }
}

/// Connect with a connection timeout and no response timeout (blocking reads set their own).
pub async fn connect(url: &str, timeout: Duration) -> Result<MultiplexedConnection, StreamError> {
    let client = redis::Client::open(url).map_err(failed("url"))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(None);
    tokio::time::timeout(
        timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| StreamError {
        what: "connect",
        reason: format!("no connection to {url} within {timeout:?}"),
    })?
    .map_err(failed("connect"))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Entries of an `[[id, [field, value, ...]], ...]` array (deleted entries skipped).
fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = text(pair.first()?)?;
            let Value::Array(kv) = pair.get(1)? else {
                return None;
            };
            let fields = kv
                .chunks(2)
                .filter_map(|c| Some((text(c.first()?)?, text(c.get(1)?)?)))
                .collect();
            Some(Entry { id, fields })
        })
        .collect()
}

impl Consumer {
    /// Join (creating it if needed, from the stream's start) group `group` on `stream` as
    /// `name`.
    pub async fn join(
        url: &str,
        stream: &str,
        group: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Self, StreamError> {
        let mut conn = connect(url, timeout).await?;
        let created: Result<String, _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if !e.to_string().contains("BUSYGROUP") {
                return Err(failed("XGROUP CREATE")(e));
            }
        }
        Ok(Self {
            conn,
            stream: stream.into(),
            group: group.into(),
            name: name.into(),
            timeout,
            own_pending_done: false,
            pending_cursor: "0".into(),
        })
    }

    /// The next entries to work on: own pending ones first (after a restart), then new ones
    /// (blocking up to `block`). Empty when nothing came.
    pub async fn next(&mut self, count: usize, block: Duration) -> Result<Vec<Entry>, StreamError> {
        if !self.own_pending_done {
            let cursor = self.pending_cursor.clone();
            let got = self.read(&cursor, count, None).await?;
            if let Some(last) = got.last() {
                self.pending_cursor = last.id.clone();
                return Ok(got);
            }
            self.own_pending_done = true;
        }
        self.read(">", count, Some(block)).await
    }

    async fn read(
        &mut self,
        from: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, StreamError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(from);
        let wait = self.timeout + block.unwrap_or_default();
        let reply: Value = tokio::time::timeout(wait, cmd.query_async(&mut self.conn))
            .await
            .map_err(|_| StreamError {
                what: "XREADGROUP",
                reason: format!("no answer within {wait:?}"),
            })?
            .map_err(failed("XREADGROUP"))?;
        // [[stream, entries]] or nil.
        let Value::Array(streams) = reply else {
            return Ok(Vec::new());
        };
        Ok(streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) => pair.get(1).map(entries),
                _ => None,
            })
            .flatten()
            .collect())
    }

    /// Claim up to `count` entries other consumers left pending for over `min_idle`.
    pub async fn claim_abandoned(
        &mut self,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, StreamError> {
        let reply: Value = tokio::time::timeout(
            self.timeout,
            redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.name)
                .arg(min_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.conn),
        )
        .await
        .map_err(|_| StreamError {
            what: "XAUTOCLAIM",
            reason: format!("no answer within {:?}", self.timeout),
        })?
        .map_err(failed("XAUTOCLAIM"))?;
        // [next cursor, entries, deleted ids]
        match reply {
            Value::Array(parts) => Ok(parts.get(1).map(entries).unwrap_or_default()),
            _ => Ok(Vec::new()),
        }
    }

    /// Acknowledge `ids` and, in the same transaction (`MULTI`), append each entry of `dead`
    /// (an entry that can never be processed) to `dead_stream` with its fields, its stream,
    /// its entry id and the reason: an entry leaves the group only with its dead letter.
    /// `dead_stream` keeps its newest `dead_max` entries; returns how many older ones went.
    pub async fn ack_with_dead_letters(
        &mut self,
        ids: &[String],
        dead_stream: &str,
        dead: &[(&Entry, String)],
        dead_max: u64,
    ) -> Result<u64, StreamError> {
        if dead.is_empty() {
            return self.ack(ids).await.map(|()| 0);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XLEN").arg(dead_stream);
        for (entry, reason) in dead {
            let cmd = pipe
                .cmd("XADD")
                .arg(dead_stream)
                .arg("MAXLEN")
                .arg(dead_max)
                .arg("*");
            let mut fields: Vec<(&String, &String)> = entry.fields.iter().collect();
            fields.sort();
            for (k, v) in fields {
                cmd.arg(k).arg(v);
            }
            cmd.arg("dead_stream")
                .arg(&self.stream)
                .arg("dead_entry")
                .arg(&entry.id)
                .arg("dead_reason")
                .arg(reason)
                .ignore();
        }
        pipe.cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(ids)
            .ignore();
        let (before,): (u64,) =
            tokio::time::timeout(self.timeout, pipe.query_async(&mut self.conn))
                .await
                .map_err(|_| StreamError {
                    what: "XADD dead letters + XACK",
                    reason: format!("no answer within {:?}", self.timeout),
                })?
                .map_err(failed("XADD dead letters + XACK"))?;
        Ok((before + dead.len() as u64).saturating_sub(dead_max))
    }

    /// Acknowledge `ids` (their effect is durable).
    pub async fn ack(&mut self, ids: &[String]) -> Result<(), StreamError> {
        if ids.is_empty() {
            return Ok(());
        }
        tokio::time::timeout(
            self.timeout,
            redis::cmd("XACK")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(ids)
                .query_async::<u64>(&mut self.conn),
        )
        .await
        .map_err(|_| StreamError {
            what: "XACK",
            reason: format!("no answer within {:?}", self.timeout),
        })?
        .map_err(failed("XACK"))?;
        Ok(())
    }

    /// Entries of the stream not yet delivered to the group plus those delivered but not
    /// acknowledged (`XINFO GROUPS`: lag + pending).
    pub async fn backlog(&mut self) -> Result<u64, StreamError> {
        let reply: Value = tokio::time::timeout(
            self.timeout,
            redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&self.stream)
                .query_async(&mut self.conn),
        )
        .await
        .map_err(|_| StreamError {
            what: "XINFO GROUPS",
            reason: format!("no answer within {:?}", self.timeout),
        })?
        .map_err(failed("XINFO GROUPS"))?;
        let Value::Array(groups) = reply else {
            return Ok(0);
        };
        for g in groups {
            let fields: HashMap<String, Value> = match g {
                Value::Array(kv) => kv
                    .chunks(2)
                    .filter_map(|c| Some((text(c.first()?)?, c.get(1)?.clone())))
                    .collect(),
                Value::Map(kv) => kv
                    .into_iter()
                    .filter_map(|(k, v)| Some((text(&k)?, v)))
                    .collect(),
                _ => continue,
            };
            if fields.get("name").and_then(text).as_deref() == Some(self.group.as_str()) {
                let n = |k: &str| {
                    fields
                        .get(k)
                        .and_then(text)
                        .and_then(|t| t.parse::<u64>().ok())
                };
                return Ok(n("lag").unwrap_or(0) + n("pending").unwrap_or(0));
            }
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_entries_and_skips_deleted_ones() {
        let v = Value::Array(vec![
            Value::Array(vec![b("1-0"), Value::Array(vec![b("a"), b("1")])]),
            Value::Array(vec![b("2-0"), Value::Nil]),
        ]);
        let e = entries(&v);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].id, "1-0");
        assert_eq!(e[0].fields["a"], "1");
        assert_eq!(e[0].millis(), 1);
    }
}
