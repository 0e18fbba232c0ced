//! The pool's Redis functions: the pool epoch, the share append that records a share hash at
//! most once (set-if-absent on the hash and `XADD` in one function), and the resolution of
//! an append whose outcome the pool did not learn.
//!
//! Keys (see [`ehash::ids`]): `ehash:pool:epoch`; per tip, the hash `ehash:seen:<prev hash>`
//! mapping each share hash to its `ehash:shares` entry id (or `refused`). A tip's hash expires
//! `seen_after_new_tip_secs` after the pool moves to another tip, and `seen_idle_secs` after
//! the last share on a tip that never changes.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

/// The Redis function library (`FUNCTION LOAD REPLACE` at every connect).
pub const LIBRARY: &str = r#"#!lua name=hashpool

-- KEYS: seen hash of the tip, ehash:shares, audit:tasks.
-- ARGV: share hash, idle ttl, superseded ttl, number of record arguments n,
--       n record field/value arguments, then the audit task's field/value arguments (if any).
-- Appends nothing if the share hash was seen on this tip.
local function append(keys, args)
  local seen, hash = keys[1], args[1]
  local found = redis.call('HGET', seen, hash)
  if found then
    return {'duplicate', found}
  end
  local n = tonumber(args[4])
  if #args > 4 + n then
    local audit = {}
    for i = 5 + n, #args do audit[#audit + 1] = args[i] end
    redis.call('XADD', keys[3], '*', unpack(audit))
  end
  local record = {}
  for i = 5, 4 + n do record[#record + 1] = args[i] end
  local id = redis.call('XADD', keys[2], '*', unpack(record))
  redis.call('HSET', seen, hash, id)
  -- A superseded tip (ttl at most the superseded ttl) keeps its short expiry.
  local ttl = redis.call('TTL', seen)
  if ttl < 0 or ttl > tonumber(args[3]) then
    redis.call('EXPIRE', seen, tonumber(args[2]))
  end
  return {'recorded', id}
end

-- KEYS: seen hash of the tip. ARGV: share hash, idle ttl.
-- Settles an append whose answer was lost: marks the hash refused unless the append landed,
-- so an append still queued in Redis can no longer land.
local function resolve(keys, args)
  local seen, hash = keys[1], args[1]
  if redis.call('HSETNX', seen, hash, 'refused') == 1 then
    if redis.call('TTL', seen) < 0 then
      redis.call('EXPIRE', seen, tonumber(args[2]))
    end
    return {'fenced', 'refused'}
  end
  return {'found', redis.call('HGET', seen, hash)}
end

-- KEYS: the epoch key. ARGV: Unix time in seconds. Returns max(last + 1, now).
local function epoch(keys, args)
  local e = redis.call('INCR', keys[1])
  local floor = tonumber(args[1])
  if e < floor then
    redis.call('SET', keys[1], args[1])
    e = floor
  end
  return e
end

redis.register_function('hashpool_append', append)
redis.register_function('hashpool_resolve', resolve)
redis.register_function('hashpool_epoch', epoch)
"#;

/// A Redis failure, with what was being done.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis {what}: {reason}")]
pub struct StoreError {
    /// What the pool was doing.
    pub what: &'static str,
    /// Why it failed.
    pub reason: String,
}

fn err(what: &'static str) -> impl Fn(redis::RedisError) -> StoreError {
    move |e| StoreError {
        what,
        reason: e.to_string(),
    }
}

/// Connect within `timeout` and load the function library. Requests on the connection have no
/// timeout of their own: callers bound them, because an unanswered append must be resolved,
/// not forgotten.
pub async fn connect(url: &str, timeout: Duration) -> Result<MultiplexedConnection, StoreError> {
    let client = redis::Client::open(url).map_err(err("url"))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(None);
    let mut conn = tokio::time::timeout(
        timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| StoreError {
        what: "connect",
        reason: format!("no connection within {timeout:?}"),
    })?
    .map_err(err("connect"))?;
    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD").arg("REPLACE").arg(LIBRARY);
    tokio::time::timeout(timeout, load.query_async::<String>(&mut conn))
        .await
        .map_err(|_| StoreError {
            what: "FUNCTION LOAD",
            reason: format!("no answer within {timeout:?}"),
        })?
        .map_err(err("FUNCTION LOAD (Redis 7 or later is needed)"))?;
    Ok(conn)
}

/// A new pool epoch: larger than every earlier one and at least the Unix time in seconds.
pub async fn new_epoch(conn: &mut MultiplexedConnection) -> Result<u32, StoreError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let epoch: u64 = redis::cmd("FCALL")
        .arg("hashpool_epoch")
        .arg(1)
        .arg(ehash::ids::EPOCH_KEY)
        .arg(now)
        .query_async(conn)
        .await
        .map_err(err("FCALL hashpool_epoch"))?;
    u32::try_from(epoch).map_err(|_| StoreError {
        what: "epoch",
        reason: format!("{epoch} does not fit 32 bits"),
    })
}

/// Give every tip's seen-hash except `current_tip`'s the short expiry (they were left by an
/// earlier pool process, which could not supersede them). Returns how many were found.
pub async fn supersede_stale_tips(
    conn: &mut MultiplexedConnection,
    current_tip: &str,
    ttl_secs: u64,
) -> Result<usize, StoreError> {
    let keep = ehash::seen_key(current_tip);
    let mut cursor: u64 = 0;
    let mut count = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", ehash::ids::SEEN_KEY_PREFIX))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(err("SCAN"))?;
        for key in keys.into_iter().filter(|k| *k != keep) {
            expire_lt(&mut redis::pipe(), &key, ttl_secs)
                .query_async::<()>(conn)
                .await
                .map_err(err("EXPIRE"))?;
            count += 1;
        }
        if next == 0 {
            return Ok(count);
        }
        cursor = next;
    }
}

/// `EXPIRE key ttl LT` (never lengthens an expiry; a key without one gets it).
pub fn expire_lt<'a>(
    pipe: &'a mut redis::Pipeline,
    key: &str,
    ttl_secs: u64,
) -> &'a mut redis::Pipeline {
    pipe.cmd("EXPIRE").arg(key).arg(ttl_secs).arg("LT").ignore()
}

/// What a function returned: `[status, value]`.
pub fn pair(v: &Value) -> Option<(String, String)> {
    let Value::Array(items) = v else {
        return None;
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    match items.as_slice() {
        [a, b] => Some((text(a)?, text(b)?)),
        _ => None,
    }
}
