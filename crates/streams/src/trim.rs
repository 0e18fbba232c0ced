//! Trimming a stream up to what every reader has acknowledged.
//!
//! One script (`EVAL`, atomic in Redis) reads each required group's state and trims below the
//! oldest entry any of them may still need: the smallest id a group holds pending, or the
//! entry after the last one it was handed. Entries younger than a minimum age stay too. A required group that does
//! not exist holds the whole stream (it would read from the start).

use std::future::Future;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::{connect, StreamError};

/// KEYS: the stream. ARGV: minimum age (ms), then the groups that must have acknowledged.
/// Returns {entries removed, what holds the first kept entry ('age', a group name,
/// 'missing:<group>', 'limit' or 'empty'), entries kept}.
///
/// Ids are compared and counted as strings (digits by length, then lexically), never as Lua
/// numbers, so no id rounds. A group's bound is the lower of its smallest pending id and the
/// id after its last delivered one, so a group moved back with `XGROUP SETID` still holds
/// what it will read again. Whole macro nodes go first
/// (`~`, at most `LIMIT` entries a round), then the rest of a partial node exactly, so one
/// round never blocks Redis for long behind a big backlog.
const TRIM: &str = r#"
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return {0, 'empty', 0} end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function less(a_ms, a_seq, b_ms, b_seq)
  if #a_ms ~= #b_ms then return #a_ms < #b_ms end
  if a_ms ~= b_ms then return a_ms < b_ms end
  if #a_seq ~= #b_seq then return #a_seq < #b_seq end
  return a_seq < b_seq
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local age_ms = now_ms - tonumber(ARGV[1])
if age_ms < 0 then age_ms = 0 end
local bound_ms, bound_seq = string.format('%d', age_ms), '0'
local holder = 'age'
-- A decimal string plus one.
local function succ(digits)
  local out, carry = {}, 1
  for i = #digits, 1, -1 do
    local d = string.byte(digits, i) - 48 + carry
    if d == 10 then d, carry = 0, 1 else carry = 0 end
    out[i] = string.char(48 + d)
  end
  local s = table.concat(out)
  if carry == 1 then s = '1' .. s end
  return s
end
local function lower_to(ms, seq, who)
  if less(ms, seq, bound_ms, bound_seq) then
    bound_ms, bound_seq, holder = ms, seq, who
  end
end
local function lower(id, who)
  local ms, seq = parse(id)
  if ms then lower_to(ms, seq, who) end
end
-- Below the entry after `id`: `id` itself may go.
local function lower_after(id, who)
  local ms, seq = parse(id)
  if not ms then return end
  if seq == '18446744073709551615' then
    lower_to(succ(ms), '0', who)
  else
    lower_to(ms, succ(seq), who)
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
  if pending[1] > 0 then lower(pending[2], name) end
  lower_after(info['last-delivered-id'], name)
end
local bound = bound_ms .. '-' .. bound_seq
local removed = redis.call('XTRIM', stream, 'MINID', '~', bound, 'LIMIT', 10000)
if removed < 10000 then
  removed = removed + redis.call('XTRIM', stream, 'MINID', bound)
else
  holder = 'limit'
end
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
    /// it, `missing:<group>` (a required group that does not exist), `limit` (more to remove
    /// next round), or `empty`.
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
    invocation.arg(u64::try_from(min_age.as_millis()).unwrap_or(u64::MAX));
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
    let mut warned_connect: Option<Instant> = None;
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
                    if warned_connect.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        warned_connect = Some(Instant::now());
                        tracing::warn!(
                            "stream trim cannot reach Redis, retried every {:?}: {e}",
                            schedule.interval
                        );
                    }
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
                        || (t.kept >= schedule.warn_kept
                            && !matches!(t.held_by.as_str(), "age" | "limit"));
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
