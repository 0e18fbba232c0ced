//! The pool's Redis functions: the pool epoch, the share append that records a share hash at
//! most once (set-if-absent on the hash and `XADD` in one function), and the resolution of
//! an append whose outcome the pool did not learn.
//!
//! Keys (see [`ehash::ids`]): `ehash:pool:epoch`; per tip, the hash `ehash:seen:<prev hash>`
//! mapping each share hash to `<entry id> <append token>` (or `refused`), plus `.created`;
//! per template, `ehash:audited:<template id>` once its audit task is in. A tip's hash
//! expires `seen_idle_secs` after its last share while it is the pool's tip (renewed while it
//! stays so), and `seen_after_new_tip_secs` after the pool moved to another tip.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

/// The Redis function library (loaded with `FUNCTION LOAD REPLACE` when a call finds it
/// missing; Redis keeps functions in its append-only file).
pub const LIBRARY: &str = r#"#!lua name=hashpool

-- KEYS: seen hash of the tip, ehash:shares, audit:tasks, the template's audit marker.
-- ARGV: share hash, append token, idle ttl, superseded ttl, number of record arguments n,
--       n record field/value arguments, then the audit task's field/value arguments (if any).
-- Writes the audit task once per template; refuses a record whose template has no audit
-- task; appends nothing if the share hash was seen on this tip.
local function append(keys, args)
  local seen, hash, idle, short = keys[1], args[1], tonumber(args[3]), tonumber(args[4])
  local n = tonumber(args[5])
  if #args > 5 + n then
    if redis.call('SET', keys[4], '1', 'NX', 'EX', idle) then
      local audit = {}
      for i = 6 + n, #args do audit[#audit + 1] = args[i] end
      redis.call('XADD', keys[3], '*', unpack(audit))
    end
  end
  if redis.call('EXISTS', keys[4]) == 0 then
    return {'no-audit', ''}
  end
  local found = redis.call('HGET', seen, hash)
  if found then
    return {'duplicate', found}
  end
  local record = {}
  for i = 6, 5 + n do record[#record + 1] = args[i] end
  local id = redis.call('XADD', keys[2], '*', unpack(record))
  local ttl = redis.call('TTL', seen)
  if ttl == -2 then
    -- A new seen hash remembers when it was created, for hashpool_resolve.
    redis.call('HSET', seen, '.created', redis.call('TIME')[1])
  end
  redis.call('HSET', seen, hash, id .. ' ' .. args[2])
  if ttl >= 0 and ttl <= short then
    -- A superseded tip keeps a short expiry (restarted by each late share).
    redis.call('EXPIRE', seen, short)
  else
    redis.call('EXPIRE', seen, idle)
  end
  redis.call('EXPIRE', keys[4], idle)
  return {'recorded', id}
end

-- KEYS: seen hash of the tip, ehash:shares.
-- ARGV: idle ttl, the Unix time (s) before which the appends were sent, then share hashes.
-- Settles appends whose answer was lost: a hash without an entry is marked refused, so an
-- append still queued in Redis can no longer land. If the seen hash was (re)created after the
-- appends were sent, an expiry may have dropped their entries: the stream is searched from
-- that time before anything is refused. Returns the value for each hash ('refused' or
-- '<entry id> <token>', or '<entry id> found' for a record found in the stream).
local function resolve(keys, args)
  local seen, sent = keys[1], tonumber(args[2])
  local created = tonumber(redis.call('HGET', seen, '.created') or '0')
  local scanned = nil
  local out = {}
  for i = 3, #args do
    local hash = args[i]
    local v = redis.call('HGET', seen, hash)
    if not v and (created == 0 or created >= sent) then
      if not scanned then
        scanned = {}
        local from = tostring((sent - 5) * 1000)
        while true do
          local page = redis.call('XRANGE', keys[2], from, '+', 'COUNT', 1000)
          if #page == 0 then break end
          for _, e in ipairs(page) do
            local f = e[2]
            for j = 1, #f, 2 do
              if f[j] == 'share_hash' then scanned[f[j + 1]] = e[1] end
            end
          end
          from = '(' .. page[#page][1]
        end
      end
      if scanned[hash] then
        v = scanned[hash] .. ' found'
        redis.call('HSET', seen, hash, v)
      end
    end
    if not v then
      if redis.call('EXISTS', seen) == 0 then
        redis.call('HSET', seen, '.created', redis.call('TIME')[1])
      end
      v = 'refused'
      redis.call('HSET', seen, hash, v)
    end
    if redis.call('TTL', seen) < 0 then
      redis.call('EXPIRE', seen, tonumber(args[1]))
    end
    out[#out + 1] = v
  end
  return out
end

-- KEYS: the epoch key. ARGV: Unix time in seconds. Returns max(last + 1, now), refusing
-- values that do not fit 32 bits (template ids keep the epoch in their high half).
local function epoch(keys, args)
  local last = tonumber(redis.call('GET', keys[1]) or '0')
  local e = math.max(last + 1, tonumber(args[1]))
  if e > 4294967295 then
    return redis.error_reply('pool epoch ' .. e .. ' does not fit 32 bits')
  end
  redis.call('SET', keys[1], string.format('%d', e))
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

/// Connect within `timeout`. Requests on the connection have no timeout of their own:
/// callers bound them, because an unanswered append must be resolved, not forgotten.
pub async fn connect(url: &str, timeout: Duration) -> Result<MultiplexedConnection, StoreError> {
    let client = redis::Client::open(url).map_err(err("url"))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(None);
    tokio::time::timeout(
        timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| StoreError {
        what: "connect",
        reason: format!("no connection within {timeout:?}"),
    })?
    .map_err(err("connect"))
}

/// `FUNCTION LOAD REPLACE` the pool's library (at start-up, and when a call finds it missing).
pub async fn load_library(
    conn: &mut MultiplexedConnection,
    timeout: Duration,
) -> Result<(), StoreError> {
    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD").arg("REPLACE").arg(LIBRARY);
    tokio::time::timeout(timeout, load.query_async::<String>(conn))
        .await
        .map_err(|_| StoreError {
            what: "FUNCTION LOAD",
            reason: format!("no answer within {timeout:?}"),
        })?
        .map_err(err("FUNCTION LOAD (Redis 7 or later is needed)"))?;
    Ok(())
}

/// Connect, check that Redis keeps every key (no eviction) and load the library.
pub async fn prepare(url: &str, timeout: Duration) -> Result<MultiplexedConnection, StoreError> {
    let mut conn = connect(url, timeout).await?;
    let policy: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut conn)
        .await;
    match policy.as_deref() {
        Ok([_, p]) if p == "noeviction" => {}
        Ok([_, p]) => {
            return Err(StoreError {
                what: "maxmemory-policy",
                reason: format!(
                    "is {p}: evicting keys would forget seen share hashes; set it to noeviction"
                ),
            })
        }
        _ => tracing::warn!(
            "cannot read Redis's maxmemory-policy; it must be noeviction (seen share hashes must never be evicted)"
        ),
    }
    load_library(&mut conn, timeout).await?;
    Ok(conn)
}

/// Whether a Redis error reply means the function did not run at all (nothing was written).
pub fn not_run(error: &str) -> bool {
    [
        "OOM",
        "NOSCRIPT",
        "READONLY",
        "BUSY",
        "NOPERM",
        "MISCONF",
        "LOADING",
        "Function not found",
    ]
    .iter()
    .any(|p| error.contains(p))
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new pool epoch: larger than every earlier one and at least the Unix time in seconds.
pub async fn new_epoch(conn: &mut MultiplexedConnection) -> Result<u32, StoreError> {
    let now = unix_secs();
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
            let mut pipe = redis::pipe();
            expire_lt(&mut pipe, &key, ttl_secs);
            pipe.query_async::<()>(conn).await.map_err(err("EXPIRE"))?;
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
