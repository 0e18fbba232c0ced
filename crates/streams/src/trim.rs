//! Trimming a stream up to what every reader has acknowledged.
//!
//! One script (`EVAL`, atomic in Redis) reads each required group's state and trims below the
//! oldest entry any of them still needs: the smallest id a group holds pending, or the entry
//! after the last one it was handed. Entries younger than a minimum age stay too. A required
//! group that does not exist holds the whole stream (it would read from the start).

use std::future::Future;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::{connect, StreamError};

/// KEYS: the stream. ARGV: minimum age (ms), then the groups that must have acknowledged.
/// Returns {entries removed, what holds the first kept entry ('age', a group name, or
/// 'missing:<group>'), entries kept}.
const TRIM: &str = r#"
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return {0, 'empty', 0} end
local t = redis.call('TIME')
local bound_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
local bound_seq = 0
local holder = 'age'
local function lower(id, next, who)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq) + next
  if ms < bound_ms or (ms == bound_ms and seq < bound_seq) then
    bound_ms, bound_seq, holder = ms, seq, who
  end
end
local groups = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  groups[info['name']] = info
end
for i = 2, #ARGV do
  local name = ARGV[i]
  local info = groups[name]
  if not info then return {0, 'missing:' .. name, redis.call('XLEN', stream)} end
  local pending = redis.call('XPENDING', stream, name)
  if pending[1] > 0 then
    lower(pending[2], 0, name)
  else
    lower(info['last-delivered-id'], 1, name)
  end
end
if bound_ms < 0 then bound_ms, bound_seq = 0, 0 end
local removed = redis.call('XTRIM', stream, 'MINID', string.format('%d-%d', bound_ms, bound_seq))
return {removed, holder, redis.call('XLEN', stream)}
"#;

/// What one trim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// Entries removed.
    pub removed: u64,
    /// Entries kept.
    pub kept: u64,
    /// What keeps the oldest kept entry: `age`, the name of a group that has not acknowledged
    /// it, `missing:<group>` (a required group that does not exist), or `empty`.
    pub held_by: String,
}

/// Remove the entries of `stream` older than `min_age` that every group of `groups` has
/// acknowledged (nothing while one of them does not exist).
pub async fn trim_acknowledged(
    conn: &mut MultiplexedConnection,
    stream: &str,
    groups: &[String],
    min_age: Duration,
    timeout: Duration,
) -> Result<Trimmed, StreamError> {
    let script = redis::Script::new(TRIM);
    let mut invocation = script.key(stream);
    invocation.arg(min_age.as_millis() as u64);
    for g in groups {
        invocation.arg(g);
    }
    let (removed, held_by, kept): (u64, String, u64) =
        tokio::time::timeout(timeout, invocation.invoke_async(conn))
            .await
            .map_err(|_| StreamError {
                what: "XTRIM script",
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| StreamError {
                what: "XTRIM script",
                reason: e.to_string(),
            })?;
    Ok(Trimmed {
        removed,
        kept,
        held_by,
    })
}

/// One stream to keep trimmed, and the groups that must acknowledge its entries first.
#[derive(Debug, Clone)]
pub struct TrimTarget {
    /// The stream.
    pub stream: String,
    /// Groups that must have acknowledged an entry.
    pub groups: Vec<String>,
}

/// How a trimmer runs.
#[derive(Debug, Clone)]
pub struct TrimSchedule {
    /// Time between trims.
    pub interval: Duration,
    /// Acknowledged entries younger than this stay.
    pub min_age: Duration,
    /// Redis command timeout.
    pub timeout: Duration,
    /// Kept entries above which a stream held by a group is logged (at most every 10 min).
    pub warn_kept: u64,
}

/// How often a held stream is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(600);

/// Trim every target each `schedule.interval` until `stop` resolves, reporting each result to
/// `report` (for metrics). Redis failures are logged and retried at the next round.
pub async fn run_trimmer(
    url: String,
    targets: Vec<TrimTarget>,
    schedule: TrimSchedule,
    mut report: impl FnMut(&str, &Trimmed) + Send,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut conn: Option<MultiplexedConnection> = None;
    let mut warned: Vec<Option<Instant>> = vec![None; targets.len()];
    loop {
        tokio::select! {
            _ = &mut stop => return,
            // The trim period: trimming is housekeeping, nothing waits on it.
            _ = tokio::time::sleep(schedule.interval) => {}
        }
        if conn.is_none() {
            match connect(&url, schedule.timeout).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::debug!("stream trim: {e}");
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        for (target, warned) in targets.iter().zip(warned.iter_mut()) {
            match trim_acknowledged(
                c,
                &target.stream,
                &target.groups,
                schedule.min_age,
                schedule.timeout,
            )
            .await
            {
                Ok(t) => {
                    if t.removed > 0 {
                        tracing::debug!(
                            stream = %target.stream,
                            "trimmed {} acknowledged entries, {} kept (held by {})",
                            t.removed,
                            t.kept,
                            t.held_by
                        );
                    }
                    let held = t.held_by.starts_with("missing:")
                        || (t.kept >= schedule.warn_kept && t.held_by != "age");
                    if held && warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        *warned = Some(Instant::now());
                        tracing::warn!(
                            stream = %target.stream,
                            "{} entries kept: held by {} (an entry goes only once every group of {:?} has acknowledged it)",
                            t.kept,
                            t.held_by,
                            target.groups
                        );
                    }
                    report(&target.stream, &t);
                }
                Err(e) => {
                    tracing::warn!(stream = %target.stream, "stream trim failed, retried in {:?}: {e}", schedule.interval);
                    conn = None;
                    break;
                }
            }
        }
    }
}
