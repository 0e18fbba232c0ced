//! Audits whose tip is gone: the auditor stopped or slowed across blocks, templates on a
//! parent its node never learns. Verdicts are read from `audit:results` and quotes from the
//! mint's signed lookup; whether a template's parent is still the tip is Bitcoin Core's
//! answer on the pool's node.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use cucumber::{given, then, when};
use ehash::{AuditResult, AuditTask, AUDIT_RESULTS_STREAM, AUDIT_TASKS_STREAM, SHARES_STREAM};
use harness::invariants::stream_entries;
use harness::roles::AuditorOptions;
use harness::wait::wait_until;

use super::settlement::{quotes_of, SETTLE_TIMEOUT};
use crate::world::HarnessWorld;

#[when(expr = "auditor {string} stops")]
async fn auditor_stops(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    stack.auditor(&name)?.process().stop().await?;
    // What it audited before it stopped was audited on the tip of that time: a later check of
    // verdicts reached by rewinding leaves those out.
    let mut conn = stack.redis()?.connect().await?;
    let audited: HashSet<u64> = stream_entries(&mut conn, AUDIT_RESULTS_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| AuditResult::from_fields(&f).ok())
        .map(|r| r.template_id)
        .collect();
    w.audited_before_stop.extend(audited);
    Ok(())
}

#[when(expr = "auditor {string} starts again")]
async fn auditor_again(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack()?
        .auditor(&name)?
        .process()
        .start_again()
        .await
}

#[given(expr = "auditor {string} with {int} worker(s), reaching its node through a fault proxy")]
async fn auditor_behind_proxy(
    w: &mut HarnessWorld,
    name: String,
    workers: usize,
) -> anyhow::Result<()> {
    let opts = AuditorOptions {
        through_fault_proxy: true,
        ..AuditorOptions::new(workers)
    };
    w.default_stack_mut()?
        .start_auditor_with(&name, &opts)
        .await?;
    Ok(())
}

#[given(
    expr = "auditor {string} with {int} worker(s), giving up on an unknown parent after {int} seconds"
)]
async fn auditor_impatient(
    w: &mut HarnessWorld,
    name: String,
    workers: usize,
    secs: u64,
) -> anyhow::Result<()> {
    let opts = AuditorOptions {
        unknown_parent_wait_ms: secs * 1000,
        ..AuditorOptions::new(workers)
    };
    w.default_stack_mut()?
        .start_auditor_with(&name, &opts)
        .await?;
    Ok(())
}

#[when(expr = "every auditor's node answers {int} ms late")]
async fn nodes_slow(w: &mut HarnessWorld, ms: u64) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let names = stack.audit_node_proxy_names();
    anyhow::ensure!(
        !names.is_empty(),
        "no auditor reaches its node through a fault proxy"
    );
    for name in names {
        stack
            .audit_node_proxy(&name)?
            .set_delay(Duration::from_millis(ms));
    }
    Ok(())
}

#[when("every auditor's node answers at once again")]
async fn nodes_fast(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    for name in stack.audit_node_proxy_names() {
        stack.audit_node_proxy(&name)?.set_delay(Duration::ZERO);
    }
    Ok(())
}

/// Whether miner `name` has an accepted share recorded on a template whose parent is the
/// pool node's tip now (read again at every look: the miners may find a block meanwhile).
async fn share_on_tip(w: &HarnessWorld, name: &str) -> Result<(), String> {
    let stack = w.default_stack().map_err(|e| e.to_string())?;
    let tip: String = stack
        .bitcoind()
        .map_err(|e| e.to_string())?
        .rpc()
        .call("getbestblockhash", &[])
        .await
        .map_err(|e| e.to_string())?;
    let accepted: HashSet<String> = stack
        .miner(name)
        .map_err(|e| e.to_string())?
        .log()
        .accepted
        .into_iter()
        .collect();
    let conn = stack
        .redis()
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let entries = |stream: &'static str| {
        let mut conn = conn.clone();
        async move {
            stream_entries(&mut conn, stream)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let templates: HashSet<u64> = entries(SHARES_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| ehash::ShareRecord::from_fields(&f).ok())
        .filter(|r| accepted.contains(&r.share_hash))
        .map(|r| r.template_id)
        .collect();
    let on_tip = entries(AUDIT_TASKS_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| AuditTask::from_fields(&f).ok())
        .any(|t| templates.contains(&t.template_id) && t.prev_hash == tip);
    if on_tip {
        Ok(())
    } else {
        Err(format!(
            "{} accepted share(s), none recorded on a template on {tip}",
            accepted.len()
        ))
    }
}

#[when(
    expr = "bitcoind mines {int} blocks, one after each of miners {string} and {string} has a share recorded on the tip"
)]
async fn blocks_between_shares(
    w: &mut HarnessWorld,
    n: u64,
    a: String,
    b: String,
) -> anyhow::Result<()> {
    blocks_between(w, n, &[a, b]).await
}

#[when(
    expr = "bitcoind mines {int} block(s), one after miner {string} has a share recorded on the tip"
)]
async fn blocks_between_one(w: &mut HarnessWorld, n: u64, a: String) -> anyhow::Result<()> {
    blocks_between(w, n, &[a]).await
}

#[when(expr = "miner {string} has a share recorded on the tip")]
async fn one_share_on_tip(w: &mut HarnessWorld, a: String) -> anyhow::Result<()> {
    blocks_between(w, 0, &[a]).await
}

/// Mine `n` blocks on the pool's node, each once every miner of `miners` has a share
/// recorded on the tip; then wait for a share of each on the final tip.
async fn blocks_between(w: &mut HarnessWorld, n: u64, miners: &[String]) -> anyhow::Result<()> {
    for i in 0..=n {
        for m in miners {
            wait_until(
                &format!("miner {m} to have a share recorded on a template on the tip"),
                Duration::from_secs(60),
                || share_on_tip(w, m),
            )
            .await?;
        }
        // The last round only waits for shares on the final tip.
        if i < n {
            let stack = w.default_stack()?;
            let to = stack.faucet()?.address().clone();
            let hashes = stack.bitcoind()?.generate_to_address(1, &to).await?;
            w.mined.extend(hashes);
        }
    }
    // Every node of the stack (the audit nodes too) has the final tip before what follows:
    // an auditor started next audits the older templates on a node past their parents.
    let stack = w.default_stack()?;
    let tip: bitcoin::BlockHash = stack
        .bitcoind()?
        .rpc()
        .call("getbestblockhash", &[])
        .await?;
    stack.wait_all_nodes_at(&tip).await?;
    Ok(())
}

/// The audit tasks and verdicts of the templates of `who`'s share records.
async fn audits_of(
    w: &HarnessWorld,
    who: &str,
) -> anyhow::Result<(Vec<AuditTask>, HashMap<u64, AuditResult>)> {
    let stack = w.default_stack()?;
    let key = stack.proxy(who)?.locking_pubkey.context("no locking key")?;
    let mut conn = stack.redis()?.connect().await?;
    let templates: HashSet<u64> = stream_entries(&mut conn, SHARES_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| ehash::ShareRecord::from_fields(&f).ok())
        .filter(|r| r.locking_pubkey == key)
        .map(|r| r.template_id)
        .collect();
    let tasks = stream_entries(&mut conn, AUDIT_TASKS_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| AuditTask::from_fields(&f).ok())
        .filter(|t| templates.contains(&t.template_id))
        .collect();
    let verdicts = stream_entries(&mut conn, AUDIT_RESULTS_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| AuditResult::from_fields(&f).ok())
        .filter(|r| templates.contains(&r.template_id))
        .map(|r| (r.template_id, r))
        .collect();
    Ok((tasks, verdicts))
}

#[then(expr = "the templates of {string} have at least {int} different parents")]
async fn parents(w: &mut HarnessWorld, who: String, n: usize) -> anyhow::Result<()> {
    let (tasks, _) = audits_of(w, &who).await?;
    let parents: BTreeSet<&str> = tasks.iter().map(|t| t.prev_hash.as_str()).collect();
    anyhow::ensure!(
        parents.len() >= n,
        "{who}'s {} template(s) build on {} parent(s): {parents:?}",
        tasks.len(),
        parents.len()
    );
    Ok(())
}

#[then(expr = "every quote of {string} becomes PAID, none FAILED, and its wallet mints it")]
async fn all_paid_none_failed(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    let key = proxy.locking_pubkey.context("no key")?;
    let mut conn = stack.redis()?.connect().await?;
    let expected = stream_entries(&mut conn, SHARES_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| ehash::ShareRecord::from_fields(&f).ok())
        .filter(|r| r.locking_pubkey == key)
        .count();
    anyhow::ensure!(expected > 0, "{who} has no share record");
    let failed = wait_until(
        &format!("each of the {expected} quote(s) of {who} PAID and minted, or one FAILED"),
        SETTLE_TIMEOUT,
        || async {
            let q = quotes_of(w, &who).await.map_err(|e| e.to_string())?;
            let failed: Vec<String> = q
                .iter()
                .filter(|q| q.audit_status == "FAILED")
                .map(|q| {
                    format!(
                        "template {} FAILED: {}",
                        q.template_id,
                        q.reason.clone().unwrap_or_default()
                    )
                })
                .collect();
            if !failed.is_empty() {
                return Ok(failed);
            }
            let s = proxy.wallet_status().await.map_err(|e| e.to_string())?;
            let unminted = q.iter().filter(|q| q.state != "ISSUED").count();
            if q.len() >= expected && unminted == 0 && s.paid_unminted == 0 && s.pending == 0 {
                Ok(Vec::new())
            } else {
                Err(format!(
                    "{unminted} of {} quote(s) not minted; wallet {s:?}",
                    q.len()
                ))
            }
        },
    )
    .await?;
    anyhow::ensure!(
        failed.is_empty(),
        "honest quotes of {who} FAILED: {}",
        failed.join("; ")
    );
    Ok(())
}

#[then(
    expr = "every verdict on a template of {string} whose parent is no longer the tip was reached after rewinding the audit node"
)]
async fn rewound_verdicts(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let best: String = w
        .default_stack()?
        .bitcoind()?
        .rpc()
        .call("getbestblockhash", &[])
        .await?;
    verdicts_on(w, &who, |parent| parent != best).await
}

/// The parents (display order) of `who`'s templates.
pub(crate) async fn parents_of(w: &HarnessWorld, who: &str) -> anyhow::Result<BTreeSet<String>> {
    let (tasks, _) = audits_of(w, who).await?;
    Ok(tasks.into_iter().map(|t| t.prev_hash).collect())
}

/// Every verdict on a template of `who` whose parent `pick` selects says it was reached after
/// rewinding the audit node (and there is at least one such template), leaving out templates
/// already audited when an auditor was stopped (on the tip of that time).
pub(crate) async fn verdicts_on(
    w: &HarnessWorld,
    who: &str,
    pick: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let (tasks, verdicts) = audits_of(w, who).await?;
    let picked: Vec<&AuditTask> = tasks
        .iter()
        .filter(|t| pick(&t.prev_hash) && !w.audited_before_stop.contains(&t.template_id))
        .collect();
    anyhow::ensure!(!picked.is_empty(), "no template of {who} on such a parent");
    for t in picked {
        let v = verdicts
            .get(&t.template_id)
            .with_context(|| format!("template {} has no verdict", t.template_id))?;
        anyhow::ensure!(
            v.reason.contains("after rewinding"),
            "template {} on {} got {} ({}), not a verdict reached after rewinding",
            t.template_id,
            t.prev_hash,
            v.verdict.as_str(),
            v.reason
        );
    }
    Ok(())
}

#[then(
    expr = "every quote of {string} ends FAILED with Bitcoin Core's {string} and its wallet mints nothing"
)]
async fn all_failed_core(w: &mut HarnessWorld, who: String, reason: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    wait_until(
        &format!("every quote of {who} to be FAILED with a reason starting {reason}"),
        SETTLE_TIMEOUT,
        || async {
            let q = quotes_of(w, &who).await.map_err(|e| e.to_string())?;
            let bad: Vec<_> = q
                .iter()
                .filter(|q| {
                    q.audit_status != "FAILED"
                        || !q.reason.as_deref().unwrap_or("").starts_with(&reason)
                        || q.state != "UNPAID"
                })
                .collect();
            if !q.is_empty() && bad.is_empty() {
                Ok(())
            } else {
                Err(format!("{} quote(s), not FAILED so: {bad:?}", q.len()))
            }
        },
    )
    .await?;
    let s = proxy.wallet_status().await?;
    anyhow::ensure!(
        s.minted == 0 && s.held == 0 && s.paid_unminted == 0,
        "{who}'s wallet minted from FAILED quotes: {s:?}"
    );
    Ok(())
}

#[then(expr = "the auditors counted at least {int} {word} audit(s)")]
async fn auditors_counted(w: &mut HarnessWorld, n: u64, what: String) -> anyhow::Result<()> {
    let metric = match what.as_str() {
        "rewound" => "hashpool_auditor_rewound_audits_total",
        "unknown-parent" => "hashpool_auditor_unknown_parent_total",
        other => anyhow::bail!("no auditor count of {other} audits"),
    };
    let stack = w.default_stack()?;
    let mut total = 0.0;
    for name in stack.auditor_names() {
        total += stack.auditor(&name)?.metrics().await?.get(metric);
    }
    anyhow::ensure!(
        total >= n as f64,
        "{metric} sums to {total} over the auditors, expected at least {n}"
    );
    Ok(())
}
