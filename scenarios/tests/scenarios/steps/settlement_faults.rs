//! Settlement under faults (the mint, an auditor or Redis killed, and what must survive) and at its edges (a template whose first share is itself a block).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use cucumber::{then, when};
use ehash::{AuditResult, AUDIT_RESULTS_STREAM, AUDIT_TASKS_STREAM};
use harness::invariants::stream_entries;
use harness::stream_archive;
use harness::wait::wait_until;

use super::settlement::{quotes_of, SETTLE_TIMEOUT};
use crate::world::HarnessWorld;

#[when(expr = "the mint is killed with SIGKILL")]
async fn kill_mint(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.expect_exit("mint");
    let p = w.default_stack()?.mint()?.process();
    let restarts = p.status().restarts;
    let generation = p.kill9().await?;
    w.restarts_before = Some(restarts);
    w.killed_generation = Some(generation);
    Ok(())
}

#[then("the supervisor restarts the mint")]
async fn mint_restarted(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let generation = w.killed_generation.context("nothing killed")?;
    let before = w.restarts_before.context("no restart count")?;
    let status = w
        .default_stack()?
        .mint()?
        .process()
        .wait_ready_after(generation, Duration::from_secs(60))
        .await?;
    anyhow::ensure!(status.restarts == before + 1, "{status:?}");
    Ok(())
}

#[when(expr = "auditor {string} is paused and the next audit task is delivered to it")]
async fn deliver_to_paused(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let a = stack.auditor(&name)?;
    a.process().pause()?;
    let consumer = format!("auditor-{name}-0");
    // What Redis does for a reader blocked in XREADGROUP: the next task is assigned to the
    // paused auditor's worker and sits in its pending list. (A read the auditor left blocked
    // when it was paused may take it first; either way it lands in the same list.)
    let mut reader = stack.redis()?.connect_blocking().await?;
    let read = {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("auditors")
                .arg(consumer)
                .arg("COUNT")
                .arg(10)
                .arg("BLOCK")
                .arg(120_000)
                .arg("STREAMS")
                .arg(AUDIT_TASKS_STREAM)
                .arg(">")
                .query_async::<redis::Value>(&mut reader)
                .await
        })
    };
    let conn = stack.redis()?.connect().await?;
    let held = wait_until(
        &format!("an audit task pending on {consumer}"),
        Duration::from_secs(120),
        || {
            let (mut conn, consumer) = (conn.clone(), consumer.clone());
            async move {
                let n: redis::Value = redis::cmd("XPENDING")
                    .arg(AUDIT_TASKS_STREAM)
                    .arg("auditors")
                    .arg("-")
                    .arg("+")
                    .arg(10)
                    .arg(&consumer)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                match n {
                    redis::Value::Array(v) if !v.is_empty() => Ok(v.len()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    read.abort();
    held?;
    Ok(())
}

#[when(expr = "auditor {string} is killed with SIGKILL")]
async fn kill_auditor(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.expect_exit(&format!("auditor-{name}"));
    let p = w.default_stack()?.auditor(&name)?.process();
    let restarts = p.status().restarts;
    let generation = p.kill9().await?;
    w.restarts_before = Some(restarts);
    w.killed_generation = Some(generation);
    Ok(())
}

#[then("every audit task gets exactly one verdict and none stays pending")]
async fn one_verdict_each(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let mut conn = stack.redis()?.connect().await?;
    wait_until(
        "every audit task to be acknowledged",
        SETTLE_TIMEOUT,
        || {
            let mut conn = conn.clone();
            async move {
                let pending: redis::Value = redis::cmd("XPENDING")
                    .arg(AUDIT_TASKS_STREAM)
                    .arg("auditors")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                match pending {
                    redis::Value::Array(ref v)
                        if matches!(v.first(), Some(redis::Value::Int(0))) =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await?;
    let tasks: HashSet<u64> = stream_entries(&mut conn, AUDIT_TASKS_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| f.get("template_id").and_then(|t| t.parse().ok()))
        .collect();
    let mut verdicts: HashMap<u64, usize> = HashMap::new();
    for (_, f) in stream_entries(&mut conn, AUDIT_RESULTS_STREAM).await? {
        *verdicts
            .entry(AuditResult::from_fields(&f)?.template_id)
            .or_default() += 1;
    }
    for t in &tasks {
        anyhow::ensure!(
            verdicts.get(t) == Some(&1),
            "template {t} has {:?} verdict(s)",
            verdicts.get(t)
        );
    }
    Ok(())
}

const REMEMBERED: [&str; 3] = [
    ehash::SHARES_STREAM,
    AUDIT_TASKS_STREAM,
    AUDIT_RESULTS_STREAM,
];

#[when("the share, task and verdict streams are remembered")]
async fn remember_streams(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    let mut before = Vec::new();
    w.stream_counters_before.clear();
    for stream in REMEMBERED {
        // Straight from Redis, and what Redis counts: the harness's copy would hide a loss.
        for (id, fields) in stream_archive::in_redis(&mut conn, stream).await? {
            let mut f: Vec<(String, String)> = fields.into_iter().collect();
            f.sort();
            before.push((format!("{stream} {id}"), f));
        }
        let counters = stream_archive::counters(&mut conn, stream).await?;
        w.stream_counters_before
            .insert(stream.to_string(), counters);
    }
    anyhow::ensure!(!before.is_empty(), "nothing to remember");
    w.stream_before = before;
    Ok(())
}

/// After Redis restarted from its append-only file, each stream still counts every entry it
/// was given, and every remembered entry is there unchanged (the scenario's roles trim
/// nothing).
#[then("the share, task and verdict streams still hold every remembered entry")]
async fn streams_kept(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    let mut now = HashMap::new();
    let mut counters = HashMap::new();
    for stream in REMEMBERED {
        for (id, fields) in stream_archive::in_redis(&mut conn, stream).await? {
            let mut f: Vec<(String, String)> = fields.into_iter().collect();
            f.sort();
            now.insert(format!("{stream} {id}"), f);
        }
        let after = stream_archive::counters(&mut conn, stream).await?;
        let before = w
            .stream_counters_before
            .get(stream)
            .context("streams not remembered")?;
        anyhow::ensure!(
            after.entries_added >= before.entries_added
                && after.last_generated >= before.last_generated,
            "{stream} went back across the Redis restart: {before:?} before, {after:?} after"
        );
        counters.insert(stream, after);
    }
    for (key, fields) in &w.stream_before {
        let stream = key.split_once(' ').context("remembered key")?.0;
        anyhow::ensure!(
            now.get(key) == Some(fields),
            "entry {key} was lost or changed across the Redis restart ({:?})",
            counters[stream]
        );
    }
    Ok(())
}

#[then(expr = "every quote of client {string} becomes PAID with its template's verdict {string}")]
async fn client_quotes_paid(
    w: &mut HarnessWorld,
    who: String,
    reason: String,
) -> anyhow::Result<()> {
    let quotes = wait_until(
        &format!("every quote of client {who} to be PAID"),
        SETTLE_TIMEOUT,
        || async {
            let q = quotes_of(w, &who).await.map_err(|e| e.to_string())?;
            if !q.is_empty() && q.iter().all(|q| q.audit_status == "PAID") {
                Ok(q)
            } else {
                Err(format!("{q:?}"))
            }
        },
    )
    .await?;
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    for q in quotes {
        let verdict = harness::invariants::stream_entries(&mut conn, AUDIT_RESULTS_STREAM)
            .await?
            .into_iter()
            .filter_map(|(_, f)| AuditResult::from_fields(&f).ok())
            .find(|r| r.template_id == q.template_id)
            .context("no verdict for the quote's template")?;
        // `a | b`: either reason (which one can depend on when the audit ran).
        anyhow::ensure!(
            reason.split(" | ").any(|r| verdict.reason == r),
            "template {} was judged {:?} ({}), expected {reason}",
            q.template_id,
            verdict.verdict,
            verdict.reason
        );
    }
    Ok(())
}

#[then("the pool found a block")]
async fn pool_found_block(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let pool = w.default_stack()?.pool()?;
    wait_until(
        "the pool to have a block accepted",
        SETTLE_TIMEOUT,
        || async {
            let m = pool.metrics().await.map_err(|e| e.to_string())?;
            match m.get("hashpool_pool_blocks_found_total") {
                n if n >= 1.0 => Ok(()),
                _ => Err(format!(
                    "none yet (refused: {})",
                    m.sum("hashpool_pool_blocks_rejected_total")
                )),
            }
        },
    )
    .await?;
    Ok(())
}
