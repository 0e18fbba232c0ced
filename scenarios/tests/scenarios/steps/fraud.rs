//! Template fraud steps: operators' own nodes, declaring proxies (honest or with a fraud
//! kind), and what the pool, the auditor, Bitcoin Core and the mint made of their templates.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{anyhow, Context};
use bitcoin::Amount;
use cucumber::{given, then, when};
use ehash::{AUDIT_DEAD_STREAM, SHARES_STREAM};
use harness::invariants::stream_entries;
use harness::wait::wait_until;

use super::mining::CAPPED_HASHRATE;
use super::settlement::quotes_of;
use crate::world::HarnessWorld;

/// Time for an uncapped CPU miner to find a share at the network target (about 4.8 million
/// hashes on the private signet) and for the pool to submit it.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// Time for a declaration round (allocate, declare, transactions) to be answered.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(30);

#[given(expr = "operator nodes {string} and {string} on the pool's chain")]
async fn operator_nodes(w: &mut HarnessWorld, a: String, b: String) -> anyhow::Result<()> {
    let stack = w.default_stack_mut()?;
    stack.start_operator_node(&a).await?;
    stack.start_operator_node(&b).await?;
    let info = stack.bitcoind()?.chain_info().await?;
    w.tip_before = Some((info.blocks, info.bestblockhash));
    Ok(())
}

#[given("a faucet payment in the mempool of every node")]
async fn payment_everywhere(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let node = stack.bitcoind()?;
    let to = stack.faucet()?.address().clone();
    let payment = stack
        .faucet()?
        .send(node.rpc(), &to, Amount::from_sat(100_000))
        .await?;
    for name in stack.operator_node_names() {
        let rpc = stack.operator_node(&name)?.rpc();
        let what = format!(
            "payment {} to reach the node of operator {name} over P2P",
            payment.txid
        );
        wait_until(&what, Duration::from_secs(30), || async {
            rpc.call::<serde_json::Value>("getmempoolentry", &[serde_json::json!(payment.txid)])
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await?;
    }
    w.payment = Some(payment);
    Ok(())
}

#[given(expr = "a proxy {string} with a locking key declaring templates from node {string}")]
async fn declaring_proxy(w: &mut HarnessWorld, name: String, node: String) -> anyhow::Result<()> {
    w.default_stack_mut()?
        .start_proxy_declaring(&name, true, CAPPED_HASHRATE as f32, Some((&node, None)))
        .await?;
    Ok(())
}

#[given(
    expr = "a proxy {string} with a locking key declaring templates from node {string} with fraud {string}"
)]
async fn fraudulent_proxy(
    w: &mut HarnessWorld,
    name: String,
    node: String,
    fraud: String,
) -> anyhow::Result<()> {
    w.default_stack_mut()?
        .start_proxy_declaring(
            &name,
            true,
            CAPPED_HASHRATE as f32,
            Some((&node, Some(&fraud))),
        )
        .await?;
    Ok(())
}

/// Template ids of the share records locked to `who`'s key.
async fn templates_of(w: &HarnessWorld, who: &str) -> anyhow::Result<HashSet<u64>> {
    let stack = w.default_stack()?;
    let key = stack.proxy(who)?.locking_pubkey.context("no locking key")?;
    let mut conn = stack.redis()?.connect().await?;
    Ok(stream_entries(&mut conn, SHARES_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| ehash::ShareRecord::from_fields(&f).ok())
        .filter(|r| r.locking_pubkey == key)
        .map(|r| r.template_id)
        .collect())
}

#[when(expr = "the pool refuses a block built on a template of {string}")]
async fn block_refused(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let pool = stack.pool()?;
    let reasons = wait_until(
        &format!("the pool to submit a block of {who}'s templates and bitcoind to refuse it"),
        BLOCK_TIMEOUT,
        || async {
            let m = pool.metrics().await.map_err(|e| e.to_string())?;
            let refused: BTreeMap<String, f64> =
                m.0.iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix("hashpool_pool_blocks_rejected_total{reason=\"")
                            .and_then(|r| r.strip_suffix("\"}"))
                            .map(|r| (r.to_string(), *v))
                    })
                    .collect();
            if refused.is_empty() {
                Err(format!(
                    "no block refused yet ({} accepted)",
                    m.get("hashpool_pool_blocks_found_total")
                ))
            } else {
                Ok(refused)
            }
        },
    )
    .await?;
    w.refused_blocks = reasons;
    Ok(())
}

#[then(expr = "bitcoind refused it with {string} and no node's chain moved")]
async fn refused_with(w: &mut HarnessWorld, reason: String) -> anyhow::Result<()> {
    anyhow::ensure!(
        w.refused_blocks.keys().all(|r| *r == reason),
        "bitcoind refused blocks with {:?}, expected only {reason:?}",
        w.refused_blocks
    );
    let stack = w.default_stack()?;
    let (height, tip) = w.tip_before.context("no tip remembered")?;
    let found = stack
        .pool()?
        .metrics()
        .await?
        .get("hashpool_pool_blocks_found_total");
    anyhow::ensure!(found == 0.0, "the pool had {found} block(s) accepted");
    let mut nodes = vec![("pool".to_string(), stack.bitcoind()?.rpc())];
    for name in stack.operator_node_names() {
        nodes.push((name.clone(), stack.operator_node(&name)?.rpc()));
    }
    for (name, rpc) in nodes {
        let best: String = rpc.call("getbestblockhash", &[]).await?;
        let count: u64 = rpc.call("getblockcount", &[]).await?;
        anyhow::ensure!(
            best == tip.to_string() && count == height,
            "node {name} is at {count} {best}, it was at {height} {tip}"
        );
    }
    Ok(())
}

#[then(expr = "every quote of {string} ends FAILED with {string} and its wallet mints nothing")]
async fn all_failed(w: &mut HarnessWorld, who: String, reason: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    let templates = templates_of(w, &who).await?;
    anyhow::ensure!(!templates.is_empty(), "{who} has no share record");
    wait_until(
        &format!("every quote of {who} to be FAILED with {reason}"),
        Duration::from_secs(60),
        || async {
            let q = quotes_of(w, &who).await.map_err(|e| e.to_string())?;
            let s = proxy.wallet_status().await.map_err(|e| e.to_string())?;
            let bad: Vec<_> = q
                .iter()
                .filter(|q| {
                    q.audit_status != "FAILED"
                        || q.reason.as_deref() != Some(reason.as_str())
                        || q.state != "UNPAID"
                })
                .collect();
            if !q.is_empty() && bad.is_empty() && s.failed > 0 {
                Ok(())
            } else {
                Err(format!(
                    "{} quote(s), not FAILED yet: {bad:?}; wallet {s:?}",
                    q.len()
                ))
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

/// The audit:dead entries of `who`'s templates.
async fn dead_of(
    w: &HarnessWorld,
    who: &str,
) -> anyhow::Result<Vec<std::collections::HashMap<String, String>>> {
    let templates = templates_of(w, who).await?;
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    Ok(stream_entries(&mut conn, AUDIT_DEAD_STREAM)
        .await?
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| {
            f.get("template_id")
                .and_then(|t| t.parse::<u64>().ok())
                .is_some_and(|t| templates.contains(&t))
        })
        .collect())
}

#[then(expr = "every template of {string} is in audit:dead as a declared template with {string}")]
async fn all_dead(w: &mut HarnessWorld, who: String, reason: String) -> anyhow::Result<()> {
    wait_until(
        &format!("every template of {who} in audit:dead, declared, with {reason}"),
        Duration::from_secs(30),
        || async {
            let templates = templates_of(w, &who).await.map_err(|e| e.to_string())?;
            let dead = dead_of(w, &who).await.map_err(|e| e.to_string())?;
            let covered: HashSet<u64> = dead
                .iter()
                .filter(|f| {
                    f.get("reason") == Some(&reason)
                        && f.get("kind").map(String::as_str) == Some("declared")
                        && f.get("block").is_some_and(|b| !b.is_empty())
                })
                .filter_map(|f| f.get("template_id")?.parse().ok())
                .collect();
            let missing: Vec<_> = templates.difference(&covered).collect();
            if missing.is_empty() && !templates.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "templates {missing:?} not covered; audit:dead holds {:?}",
                    dead.iter()
                        .map(|f| (f.get("template_id"), f.get("kind"), f.get("reason")))
                        .collect::<Vec<_>>()
                ))
            }
        },
    )
    .await?;
    Ok(())
}

#[then(expr = "the verdict on {string} matches its snapshot")]
async fn verdict_snapshot(w: &mut HarnessWorld, fraud: String) -> anyhow::Result<()> {
    let dead = dead_of(w, "mallory").await?;
    let first = dead.first().ok_or_else(|| anyhow!("no audit:dead entry"))?;
    let mut pinned = BTreeMap::new();
    pinned.insert("fraud", fraud.clone());
    pinned.insert("task_kind", first.get("kind").cloned().unwrap_or_default());
    pinned.insert(
        "audit_reason",
        first.get("reason").cloned().unwrap_or_default(),
    );
    pinned.insert(
        "submitblock_reason",
        w.refused_blocks
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(","),
    );
    // Saved for a replay by hand: `harness audit <file>` against `just up --bare`, which
    // starts from the same cached chain tip these templates build on.
    let dir = scenarios::report_dir().join("fraud");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{fraud}.json"));
    let task: BTreeMap<&String, &String> = first
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "reason" | "audited_at" | "task_entry"))
        .collect();
    std::fs::write(&file, serde_json::to_vec_pretty(&task)?)?;
    insta::with_settings!({snapshot_path => "../../../../fixtures/snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_yaml_snapshot!(format!("fraud_verdict_{fraud}"), pinned);
    });
    Ok(())
}

#[then("no ehash was minted for a template without a valid verdict")]
async fn sweep_holds(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let problems = w.settlement_problems().await?;
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[then(expr = "proxy {string} gets its {word} refused with {string}, as the pool counts them")]
async fn refused_inline(
    w: &mut HarnessWorld,
    who: String,
    what: String,
    code: String,
) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    let pool = stack.pool()?;
    let (metric, custom) = match what.as_str() {
        "declarations" => ("hashpool_pool_declarations_total", false),
        "custom-jobs" => ("hashpool_pool_custom_jobs_total", true),
        other => anyhow::bail!("refusals of {other:?}: declarations or custom-jobs"),
    };
    let metric = format!("{metric}{{result=\"{code}\"}}");
    wait_until(
        &format!("{who}'s {what} to be refused with {code}"),
        DECLARE_TIMEOUT,
        || async {
            let s = proxy.declarations().await.map_err(|e| e.to_string())?;
            let counted = pool
                .metrics()
                .await
                .map_err(|e| e.to_string())?
                .get(&metric);
            let seen = if custom {
                &s.custom_jobs_refused
            } else {
                &s.refused
            };
            if seen.get(&code).copied().unwrap_or(0) >= 1 && counted >= 1.0 {
                Ok(())
            } else {
                Err(format!("proxy says {s:?}, the pool counted {counted}"))
            }
        },
    )
    .await?;
    let s = proxy.declarations().await?;
    anyhow::ensure!(
        s.custom_jobs == 0
            && s.refused
                .keys()
                .chain(s.custom_jobs_refused.keys())
                .all(|c| *c == code),
        "{who} should have no custom job accepted and only {code} refusals: {s:?}"
    );
    Ok(())
}

#[then(expr = "miner {string} has no accepted share and {string} has no quote")]
async fn nothing_earned(w: &mut HarnessWorld, miner: String, who: String) -> anyhow::Result<()> {
    let log = w.default_stack()?.miner(&miner)?.log();
    anyhow::ensure!(
        log.accepted.is_empty(),
        "miner {miner} had {} share(s) accepted",
        log.accepted.len()
    );
    let q = quotes_of(w, &who).await?;
    anyhow::ensure!(q.is_empty(), "{who} has {} quote(s)", q.len());
    anyhow::ensure!(
        templates_of(w, &who).await?.is_empty(),
        "{who} has share records"
    );
    Ok(())
}

#[then("the pool refused no job declaration connection")]
async fn no_jd_refusal(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let key = "hashpool_pool_connections_refused_total{reason=\"job-declaration-connections\"}";
    let refused = w.default_stack()?.pool()?.metrics().await?.get(key);
    anyhow::ensure!(
        refused == 0.0,
        "the pool refused {refused} job declaration connections"
    );
    Ok(())
}
