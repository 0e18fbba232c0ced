//! Stream trimming: the mint and the auditor remove what every reader acknowledged, and keep
//! what a reader has not read. The oracle is Redis's own account of each stream (`XRANGE`,
//! and `XINFO STREAM`'s deleted mark), beside the harness's copy of every entry.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use cucumber::{given, then, when};
use ehash::{AUDIT_RESULTS_STREAM, AUDIT_TASKS_STREAM, SHARES_STREAM};
use harness::invariants::stream_entries;
use harness::roles::archived_streams;
use harness::stream_archive::{self, StreamCounters};
use harness::wait::wait_until;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

use crate::world::HarnessWorld;

/// Trimming runs every 2 s on entries 10 s old: a few rounds.
const TRIM_TIMEOUT: Duration = Duration::from_secs(60);

#[given(expr = "the mint trims what its readers acknowledged at once, reader {string} among them")]
async fn mint_waits_for(w: &mut HarnessWorld, group: String) {
    let mut streams = archived_streams();
    streams.readers.push(group);
    streams.trim_min_age_secs = 0;
    w.mint_options.streams = Some(streams);
}

#[given("the mint and the auditors trim nothing")]
async fn no_trim(w: &mut HarnessWorld) {
    let off = hashpool_config::pool_side::StreamsSection {
        trim_interval_secs: 0,
        ..archived_streams()
    };
    w.mint_options.streams = Some(off.clone());
    w.auditor_streams = Some(off);
}

/// The streams the mint reads (and trims).
const MINT_STREAMS: [&str; 2] = [SHARES_STREAM, AUDIT_RESULTS_STREAM];

#[given(expr = "reader {string} joins the share and verdict streams from their start")]
async fn reader_joins(w: &mut HarnessWorld, group: String) -> anyhow::Result<()> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    for stream in MINT_STREAMS {
        let _: () = conn.xgroup_create_mkstream(stream, &group, "0").await?;
    }
    Ok(())
}

/// The first and last ids of `stream` in the harness's copy (every entry it ever had).
async fn first_and_last(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<(String, String)> {
    let all = stream_entries(conn, stream).await?;
    let first = all
        .first()
        .with_context(|| format!("{stream} never had an entry"))?;
    let last = all.last().context("no entry")?;
    Ok((first.0.clone(), last.0.clone()))
}

/// Wait until Redis says it deleted `id` of `stream` and no longer holds it, reading the
/// harness's copy on each look (so the harness's group acknowledges what it has copied).
async fn wait_trimmed(
    conn: &MultiplexedConnection,
    stream: &'static str,
    id: &str,
) -> anyhow::Result<StreamCounters> {
    let counters = wait_until(
        &format!("Redis to trim {stream} up to entry {id}"),
        TRIM_TIMEOUT,
        || {
            let mut conn = conn.clone();
            async move {
                stream_entries(&mut conn, stream)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let c = stream_archive::counters(&mut conn, stream)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let held = stream_archive::in_redis(&mut conn, stream)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                if c.deleted(id) && !held.iter().any(|(e, _)| e == id) {
                    Ok(c)
                } else {
                    Err(format!("{} entries held, {c:?}", held.len()))
                }
            }
        },
    )
    .await?;
    Ok(counters)
}

#[then("Redis trims the audit tasks every reader acknowledged")]
async fn tasks_trimmed(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    let (first, _) = first_and_last(&mut conn, AUDIT_TASKS_STREAM).await?;
    wait_trimmed(&conn, AUDIT_TASKS_STREAM, &first).await?;
    Ok(())
}

#[then("Redis trims the share records and verdicts every reader acknowledged")]
async fn shares_trimmed(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let conn = w.default_stack()?.redis()?.connect().await?;
    anyhow::ensure!(!w.late_reader_last.is_empty(), "no late reader read");
    for (stream, last) in w.late_reader_last.clone() {
        wait_trimmed(&conn, stream, &last).await?;
    }
    Ok(())
}

/// Whether group `group` of `stream` was handed every entry and holds none pending (Redis's
/// own account).
async fn caught_up(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> anyhow::Result<Result<(), String>> {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let text = |g: &HashMap<String, redis::Value>, k: &str| -> String {
        g.get(k)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .unwrap_or_default()
    };
    let last = stream_archive::counters(conn, stream).await?.last_generated;
    let Some(g) = groups.iter().find(|g| text(g, "name") == group) else {
        return Ok(Err(format!("no group {group} on {stream}")));
    };
    let (delivered, pending) = (text(g, "last-delivered-id"), text(g, "pending"));
    Ok(
        if stream_archive::order(&delivered) == last && pending == "0" {
            Ok(())
        } else {
            Err(format!(
            "{stream}: group {group} at {delivered} with {pending} pending, the stream at {last:?}"
        ))
        },
    )
}

/// The mint's trim rounds so far, all streams together.
async fn trim_rounds(w: &HarnessWorld) -> Result<f64, String> {
    let m = w
        .default_stack()
        .and_then(|s| s.mint())
        .map_err(|e| e.to_string())?
        .metrics()
        .await
        .map_err(|e| e.to_string())?;
    Ok(m.sum("hashpool_mint_stream_trim_rounds_total"))
}

/// Every share record and verdict the harness ever saw is still in Redis after two of the
/// mint's trim rounds that came once the mint's group and the harness's had acknowledged all
/// of them: only the reader that has not read them keeps them.
#[then(expr = "Redis still holds every share record and verdict, none read by reader {string}")]
async fn shares_held(w: &mut HarnessWorld, group: String) -> anyhow::Result<()> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    for stream in MINT_STREAMS {
        stream_entries(&mut conn, stream).await?;
        for g in ["mint", stream_archive::GROUP] {
            let c = conn.clone();
            wait_until(
                &format!("group {g} to acknowledge all of {stream}"),
                TRIM_TIMEOUT,
                || {
                    let mut conn = c.clone();
                    async move {
                        caught_up(&mut conn, stream, g)
                            .await
                            .map_err(|e| format!("{e:#}"))?
                    }
                },
            )
            .await?;
        }
    }
    let rounds = trim_rounds(w).await.map_err(anyhow::Error::msg)?;
    wait_until(
        "two more trim rounds of the mint on each stream",
        TRIM_TIMEOUT,
        || async {
            let now = trim_rounds(w).await?;
            if now >= rounds + 2.0 * MINT_STREAMS.len() as f64 {
                Ok(())
            } else {
                Err(format!("{now} rounds, {rounds} before"))
            }
        },
    )
    .await?;
    for stream in MINT_STREAMS {
        let copied = stream_entries(&mut conn, stream).await?;
        let held: HashSet<String> = stream_archive::in_redis(&mut conn, stream)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let counters = stream_archive::counters(&mut conn, stream).await?;
        for (id, _) in &copied {
            anyhow::ensure!(
                held.contains(id) && !counters.deleted(id),
                "{stream} entry {id} was trimmed though reader {group} never read it ({counters:?})"
            );
        }
        tracing::info!(
            "{stream}: all {} entries kept for reader {group}",
            copied.len()
        );
    }
    Ok(())
}

#[when(expr = "reader {string} reads and acknowledges every share record and verdict")]
async fn reader_catches_up(w: &mut HarnessWorld, group: String) -> anyhow::Result<()> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    let mut lasts = Vec::new();
    for stream in MINT_STREAMS {
        let opts = redis::streams::StreamReadOptions::default()
            .group(&group, "late-1")
            .count(100_000);
        let reply: Option<redis::streams::StreamReadReply> =
            conn.xread_options(&[stream], &[">"], &opts).await?;
        let ids: Vec<String> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|e| e.id)
            .collect();
        let last = ids
            .last()
            .with_context(|| format!("reader {group} read nothing of {stream}"))?
            .clone();
        let _: u64 = conn.xack(stream, &group, &ids).await?;
        lasts.push((stream, last));
    }
    w.late_reader_last = lasts;
    Ok(())
}
