//! The harness's own copy of the streams the roles trim (`ehash:shares`, `audit:tasks`,
//! `audit:results`).
//!
//! The mint and the auditor trim an entry once every group they are told to wait for has
//! acknowledged it. A stack's roles wait for group `harness` too, and reading one of those
//! streams here reads group `harness` to its end into a copy kept in this process, then
//! acknowledges: the checks see every entry the pool, auditor or a step ever appended, however
//! much the roles trimmed since. Entries are acknowledged only once copied, and an entry handed
//! out but not acknowledged (the harness stopped between the two) is read again first.
//!
//! The copy is keyed by an id the first read stores in Redis (`harness:archive-id`), so a
//! restarted Redis (same data) keeps its copy and another stack's Redis gets its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};

use anyhow::Context;
use ehash::{AUDIT_RESULTS_STREAM, AUDIT_TASKS_STREAM, SHARES_STREAM};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;

/// The harness's consumer group on each archived stream.
pub const GROUP: &str = "harness";
/// The streams the roles trim, and the harness copies.
pub const ARCHIVED: [&str; 3] = [SHARES_STREAM, AUDIT_TASKS_STREAM, AUDIT_RESULTS_STREAM];
/// Where the archive's id lives in Redis.
const ID_KEY: &str = "harness:archive-id";
/// Entries read per round.
const PAGE: usize = 5_000;

type Fields = HashMap<String, String>;
/// One stream's copy, in entry order.
type Copy = BTreeMap<(u64, u64), (String, Fields)>;

/// One Redis's copies, by stream.
type Archive = Arc<tokio::sync::Mutex<HashMap<String, Copy>>>;

/// Every archive of this process, by the id stored in its Redis.
static ARCHIVES: LazyLock<Mutex<HashMap<String, Archive>>> = LazyLock::new(Default::default);

/// A stream entry id `<ms>-<seq>` as numbers, for ordering.
pub fn order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Copy what is new in every archived stream (so the roles can trim it), returning nothing.
pub async fn copy_new(conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
    let archive = archive_of(conn).await?;
    let mut archive = archive.lock().await;
    for stream in ARCHIVED {
        let copy = archive.entry(stream.to_string()).or_default();
        drain(conn, stream, copy)
            .await
            .with_context(|| format!("reading {stream} as group {GROUP}"))?;
    }
    Ok(())
}

/// This Redis's archive (its id stored in Redis by the first reader).
async fn archive_of(conn: &mut MultiplexedConnection) -> anyhow::Result<Archive> {
    let _: bool = conn.set_nx(ID_KEY, random_id()).await?;
    let id: String = conn.get(ID_KEY).await?;
    Ok(ARCHIVES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id)
        .or_default()
        .clone())
}

/// Every entry `stream` ever had (an archived stream: from the copy, after reading the rest),
/// in order, as field maps.
pub async fn entries(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<Vec<(String, Fields)>> {
    let archive = archive_of(conn).await?;
    let mut archive = archive.lock().await;
    let copy = archive.entry(stream.to_string()).or_default();
    // Counted before the drain: entries appended meanwhile may or may not be copied.
    create_group(conn, stream).await?;
    let added = counters(conn, stream).await?.entries_added;
    drain(conn, stream, copy)
        .await
        .with_context(|| format!("reading {stream} as group {GROUP}"))?;
    anyhow::ensure!(
        copy.len() as u64 >= added,
        "the harness's copy of {stream} has {} entries, Redis gave out {added}: entries were \
         trimmed before group {GROUP} read them (start the mint and auditors with \
         harness::roles::archived_streams, or read this stack's streams with \
         stream_archive::in_redis)",
        copy.len()
    );
    Ok(copy.values().cloned().collect())
}

/// Drop this Redis's copy (its stack is stopping).
pub async fn forget(conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
    let id: Option<String> = conn.get(ID_KEY).await?;
    if let Some(id) = id {
        ARCHIVES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    Ok(())
}

/// Create group `harness` on every archived stream (from its start): until it exists the
/// roles trim nothing.
pub async fn join(conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
    for stream in ARCHIVED {
        create_group(conn, stream).await?;
    }
    Ok(())
}

async fn create_group(conn: &mut MultiplexedConnection, stream: &str) -> anyhow::Result<()> {
    let created: Result<(), _> = conn.xgroup_create_mkstream(stream, GROUP, "0").await;
    match created {
        Err(e) if !e.to_string().contains("BUSYGROUP") => Err(e.into()),
        _ => Ok(()),
    }
}

/// Copy what group `harness` was handed and never acknowledged, then everything new,
/// acknowledging each page once copied.
async fn drain(
    conn: &mut MultiplexedConnection,
    stream: &str,
    copy: &mut Copy,
) -> anyhow::Result<()> {
    create_group(conn, stream).await?;
    let mut from = "0".to_string();
    loop {
        // A task holds its whole block: smaller pages.
        let page = if stream == AUDIT_TASKS_STREAM {
            PAGE / 10
        } else {
            PAGE
        };
        let opts = StreamReadOptions::default()
            .group(GROUP, "harness")
            .count(page);
        let reply: Option<StreamReadReply> = conn
            .xread_options(&[stream], &[from.as_str()], &opts)
            .await?;
        let ids: Vec<_> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        let Some(last) = ids.last().map(|e| e.id.clone()) else {
            if from == ">" {
                return Ok(());
            }
            // Nothing left pending: read new entries.
            from = ">".into();
            continue;
        };
        let acked: Vec<String> = ids.iter().map(|e| e.id.clone()).collect();
        for e in ids {
            if e.map.is_empty() {
                // Handed out, then deleted: nothing to copy (a copy already made stays).
                continue;
            }
            let fields = e
                .map
                .into_iter()
                .map(|(k, v)| Ok((k, redis::from_redis_value(v)?)))
                .collect::<Result<Fields, redis::RedisError>>()?;
            copy.insert(order(&e.id), (e.id, fields));
        }
        let _: u64 = conn.xack(stream, GROUP, &acked).await?;
        if from != ">" {
            from = last;
        }
    }
}

fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Every entry `stream` holds in Redis now (what the roles have not trimmed), in order.
pub async fn in_redis(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<Vec<(String, Fields)>> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).await?;
    reply
        .ids
        .into_iter()
        .map(|e| {
            let fields = e
                .map
                .into_iter()
                .map(|(k, v)| Ok((k, redis::from_redis_value(v)?)))
                .collect::<Result<_, redis::RedisError>>()?;
            Ok((e.id, fields))
        })
        .collect()
}

/// What Redis itself counts of a stream (`XINFO STREAM`), restored with its data after a
/// restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCounters {
    /// Entries it holds.
    pub length: u64,
    /// Entries ever appended.
    pub entries_added: u64,
    /// The newest id Redis gave, as (ms, seq).
    pub last_generated: (u64, u64),
    /// The oldest entry it holds, as (ms, seq).
    pub first: (u64, u64),
}

impl StreamCounters {
    /// Whether Redis removed entry `id`, one it gave out (trimming removes the oldest
    /// entries, so below the first it holds, or every one when it holds none).
    pub fn deleted(&self, id: &str) -> bool {
        let id = order(id);
        id <= self.last_generated && (self.length == 0 || id < self.first)
    }
}

/// `XINFO STREAM` of `stream`.
pub async fn counters(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<StreamCounters> {
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await
        .with_context(|| format!("XINFO STREAM {stream}"))?;
    let text = |k: &str| -> anyhow::Result<String> {
        let v = info
            .get(k)
            .with_context(|| format!("XINFO STREAM {stream} has no {k} (Redis 7 or later?)"))?;
        Ok(redis::from_redis_value_ref(v)?)
    };
    Ok(StreamCounters {
        length: text("length")?.parse()?,
        entries_added: text("entries-added")?.parse()?,
        last_generated: order(&text("last-generated-id")?),
        first: order(&text("recorded-first-entry-id")?),
    })
}
