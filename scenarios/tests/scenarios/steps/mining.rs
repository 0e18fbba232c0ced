//! Mining steps: pool, proxies, miners, share records, blocks.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, Context};
use cucumber::{given, then, when};
use ehash::ShareRecord;
use harness::roles::{MinerLog, MinerOptions};
use harness::wait::wait_until;
use harness::Chain;

use crate::world::{HarnessWorld, DEFAULT_STACK};

/// Time given to miners to produce the shares a step waits for.
const MINING_TIMEOUT: Duration = Duration::from_secs(90);
/// Hashrate of a capped test miner.
pub(crate) const CAPPED_HASHRATE: f64 = 500_000.0;
/// Hashrate of a slow test miner: about one block every 96 s on the private signet, so a
/// scenario that needs the tip to stay put for a few seconds rarely sees it move.
const SLOW_HASHRATE: f64 = 50_000.0;

#[given("a signet stack with a pool")]
pub async fn stack_with_pool(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.start_stack(DEFAULT_STACK, Some(Chain::Signet), true)
        .await?;
    let opts = w.pool_options.clone();
    w.default_stack_mut()?.start_pool(&opts).await?;
    Ok(())
}

#[given(
    expr = "the pool will allow {int} connections per IP, {int} shares per second per channel and {int} ms to set up a connection"
)]
async fn pool_limits(w: &mut HarnessWorld, conns: usize, rate: f64, deadline: u64) {
    w.pool_options.limits.max_connections_per_ip = conns;
    w.pool_options.limits.max_shares_per_sec = rate;
    w.pool_options.limits.share_burst = rate * 2.0;
    w.pool_options.limits.handshake_deadline_ms = deadline;
}

#[given(expr = "a proxy {string} with a locking key")]
async fn proxy_with_key(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack_mut()?
        .start_proxy(&name, true, CAPPED_HASHRATE as f32)
        .await?;
    Ok(())
}

pub(crate) async fn start_miner(
    w: &mut HarnessWorld,
    name: &str,
    proxy: &str,
    behaviour: &str,
    hashrate: Option<f64>,
) -> anyhow::Result<()> {
    let opts = MinerOptions {
        behaviour: behaviour.into(),
        hashrate,
        ..MinerOptions::default()
    };
    w.default_stack_mut()?
        .start_miner(name, proxy, &opts)
        .await?;
    Ok(())
}

#[given(expr = "honest miners {string} and {string} behind proxy {string}")]
async fn two_honest(
    w: &mut HarnessWorld,
    a: String,
    b: String,
    proxy: String,
) -> anyhow::Result<()> {
    start_miner(w, &a, &proxy, "honest", Some(CAPPED_HASHRATE)).await?;
    start_miner(w, &b, &proxy, "honest", Some(CAPPED_HASHRATE)).await
}

#[given(expr = "an honest miner {string} behind proxy {string}")]
async fn honest(w: &mut HarnessWorld, name: String, proxy: String) -> anyhow::Result<()> {
    start_miner(w, &name, &proxy, "honest", Some(CAPPED_HASHRATE)).await
}

#[given(expr = "a slow honest miner {string} behind proxy {string}")]
async fn slow(w: &mut HarnessWorld, name: String, proxy: String) -> anyhow::Result<()> {
    start_miner(w, &name, &proxy, "honest", Some(SLOW_HASHRATE)).await
}

#[given(expr = "an uncapped honest miner {string} behind proxy {string}")]
async fn uncapped(w: &mut HarnessWorld, name: String, proxy: String) -> anyhow::Result<()> {
    start_miner(w, &name, &proxy, "honest", None).await
}

#[given(expr = "a {word} miner {string} mining behind proxy {string}")]
async fn given_misbehaving(
    w: &mut HarnessWorld,
    behaviour: String,
    name: String,
    proxy: String,
) -> anyhow::Result<()> {
    misbehaving(w, behaviour, name, proxy).await
}

#[when(expr = "a {word} miner {string} mines behind proxy {string}")]
async fn misbehaving(
    w: &mut HarnessWorld,
    behaviour: String,
    name: String,
    proxy: String,
) -> anyhow::Result<()> {
    start_miner(w, &name, &proxy, &behaviour, Some(CAPPED_HASHRATE)).await
}

async fn wait_accepted(w: &HarnessWorld, name: &str, at_least: usize) -> anyhow::Result<MinerLog> {
    let miner = w.default_stack()?.miner(name)?;
    let what = format!("miner {name} to have {at_least} accepted shares");
    Ok(wait_until(&what, MINING_TIMEOUT, || {
        let log = miner.log();
        async move {
            if log.accepted.len() >= at_least {
                Ok(log)
            } else {
                Err(format!(
                    "{} accepted, rejected {:?}",
                    log.accepted.len(),
                    log.rejected_by_reason()
                ))
            }
        }
    })
    .await?)
}

#[when(expr = "miners {string} and {string} each have {int} accepted shares")]
async fn each_accepted(w: &mut HarnessWorld, a: String, b: String, n: usize) -> anyhow::Result<()> {
    wait_accepted(w, &a, n).await?;
    wait_accepted(w, &b, n).await?;
    Ok(())
}

#[then(expr = "miner {string} has {int} accepted shares")]
async fn then_accepted(w: &mut HarnessWorld, name: String, n: usize) -> anyhow::Result<()> {
    has_accepted(w, name, n).await
}

#[when(expr = "miner {string} has {int} accepted shares")]
async fn has_accepted(w: &mut HarnessWorld, name: String, n: usize) -> anyhow::Result<()> {
    wait_accepted(w, &name, n).await.map(|_| ())
}

#[when("the miners stop")]
async fn miners_stop(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    for m in stack.miners() {
        m.process().stop().await?;
    }
    Ok(())
}

/// Every `ehash:shares` record, keyed by share hash (a hash twice is an error).
pub async fn share_records(w: &HarnessWorld) -> anyhow::Result<HashMap<String, ShareRecord>> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    let mut out = HashMap::new();
    for (_, record) in harness::invariants::share_records(&mut conn).await? {
        if let Some(prev) = out.insert(record.share_hash.clone(), record) {
            anyhow::bail!("share {} has two ehash:shares records", prev.share_hash);
        }
    }
    Ok(out)
}

#[then(
    expr = "every share the miners saw accepted has exactly one ehash:shares record with proxy {string}'s key and the amount its hash is worth"
)]
async fn records_match(w: &mut HarnessWorld, proxy: String) -> anyhow::Result<()> {
    records_of(w, &proxy, None).await
}

#[then(
    expr = "every share miner {string} saw accepted has exactly one ehash:shares record with proxy {string}'s key and the amount its hash is worth"
)]
async fn records_of_miner(
    w: &mut HarnessWorld,
    miner: String,
    proxy: String,
) -> anyhow::Result<()> {
    records_of(w, &proxy, Some(&miner)).await
}

/// Each share accepted by `only` (or by every miner) has one record locked to `proxy`'s key
/// with the amount its hash is worth.
async fn records_of(w: &HarnessWorld, proxy: &str, only: Option<&str>) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let key = stack
        .proxy(proxy)?
        .locking_pubkey
        .ok_or_else(|| anyhow!("proxy {proxy} has no key"))?;
    let min_bits = stack.pool()?.config.min_bits;
    let records = share_records(w).await?;
    let mut checked = 0;
    for miner in stack.miners() {
        if only.is_some_and(|m| m != miner.name) {
            continue;
        }
        for hash in miner.log().accepted {
            let r = records.get(&hash).ok_or_else(|| {
                anyhow!(
                    "share {hash} accepted by miner {} has no record",
                    miner.name
                )
            })?;
            anyhow::ensure!(
                r.locking_pubkey == key,
                "record {hash} is locked to {}, not {key}",
                r.locking_pubkey
            );
            // The oracle reads the hash's hex digits; it shares no code with the pool's rule.
            let expected = harness::invariants::expected_amount(&hash, min_bits)
                .ok_or_else(|| anyhow!("{hash} is below min_bits"))?;
            anyhow::ensure!(
                r.amount == expected,
                "record {hash} has amount {}, its hash is worth {expected}",
                r.amount
            );
            checked += 1;
        }
    }
    anyhow::ensure!(checked > 0, "no accepted shares to check");
    Ok(())
}

#[then("the pool counted as many accepted shares as there are ehash:shares records")]
async fn pool_count_matches(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let records = share_records(w).await?.len() as f64;
    let accepted = w
        .default_stack()?
        .pool()?
        .metrics()
        .await?
        .get("hashpool_pool_shares_accepted_total");
    anyhow::ensure!(
        accepted == records,
        "pool accepted {accepted} shares but Redis holds {records} records"
    );
    Ok(())
}

#[then(expr = "miner {string} has {int} shares rejected with {string}")]
async fn rejected_with(
    w: &mut HarnessWorld,
    name: String,
    n: usize,
    reason: String,
) -> anyhow::Result<()> {
    let miner = w.default_stack()?.miner(&name)?;
    let what = format!("miner {name} to have {n} shares rejected with {reason}");
    wait_until(&what, MINING_TIMEOUT, || {
        let log = miner.log();
        let reason = reason.clone();
        async move {
            let by = log.rejected_by_reason();
            match by.get(&reason) {
                Some(k) if *k >= n => Ok(()),
                _ => Err(format!(
                    "rejections {by:?}, accepted {}",
                    log.accepted.len()
                )),
            }
        }
    })
    .await?;
    Ok(())
}

#[then(expr = "no ehash:shares record has a hash miner {string} saw rejected")]
async fn rejected_not_recorded(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let log = w.default_stack()?.miner(&name)?.log();
    anyhow::ensure!(!log.rejected.is_empty(), "miner {name} saw no rejections");
    check_rejected_unrecorded(w, &log).await
}

#[then(expr = "the miners saw {int} share(s) rejected with {string}, none of them recorded")]
async fn any_rejected_not_recorded(
    w: &mut HarnessWorld,
    n: usize,
    reason: String,
) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let what = format!("the miners to have {n} shares rejected with {reason}");
    let logs = wait_until(&what, MINING_TIMEOUT, || {
        let logs: Vec<MinerLog> = stack.miners().map(|m| m.log()).collect();
        let reason = reason.clone();
        async move {
            let count: usize = logs
                .iter()
                .map(|l| l.rejected_by_reason().get(&reason).copied().unwrap_or(0))
                .sum();
            if count >= n {
                Ok(logs)
            } else {
                Err(format!("{count} so far"))
            }
        }
    })
    .await?;
    for log in &logs {
        check_rejected_unrecorded(w, log).await?;
    }
    Ok(())
}

/// No share `log` saw rejected (except duplicates of accepted ones) has a record.
async fn check_rejected_unrecorded(w: &HarnessWorld, log: &MinerLog) -> anyhow::Result<()> {
    let records = share_records(w).await?;
    for (hash, reason) in &log.rejected {
        // A duplicate's first submission rightly has a record. (The miner may not have logged
        // its acceptance: the pool refuses the copy as soon as it sees the hash, and answers the
        // first only once its record is stored, so a miner stopped at once can miss that ack.)
        if reason == "duplicate-share" {
            anyhow::ensure!(
                records.contains_key(hash),
                "duplicate {hash} has no record of its first submission"
            );
            continue;
        }
        anyhow::ensure!(
            !records.contains_key(hash),
            "rejected share {hash} ({reason}) has a record"
        );
    }
    Ok(())
}

#[when("a block is mined by bitcoind")]
async fn bitcoind_mines(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let to = stack.faucet()?.address().clone();
    stack.bitcoind()?.generate_to_address(1, &to).await?;
    Ok(())
}

#[when("the pool finds a block")]
async fn pool_finds_block(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let pool = stack.pool()?;
    // The baseline is the pre-mined chain: the uncapped miner may find a block before this
    // step even starts.
    let start = stack.chain().map(Chain::premine_blocks).unwrap_or(0);
    wait_until(
        "the pool to submit a block bitcoind accepts",
        MINING_TIMEOUT,
        || async {
            match pool.metrics().await {
                Ok(m) if m.get("hashpool_pool_blocks_found_total") >= 1.0 => Ok(()),
                Ok(m) => Err(format!(
                    "blocks found {}, rejected {}",
                    m.get("hashpool_pool_blocks_found_total"),
                    m.sum("hashpool_pool_blocks_rejected_total")
                )),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    let info = stack.bitcoind()?.chain_info().await?;
    anyhow::ensure!(
        info.blocks > start,
        "height {} did not rise above {start}",
        info.blocks
    );
    w.tip_before = Some((info.blocks, info.bestblockhash));
    Ok(())
}

#[then("the new block's coinbase pays the pool's payout address")]
async fn coinbase_pays_pool(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let (_, hash) = w.tip_before.context("no block remembered")?;
    let stack = w.default_stack()?;
    let payout = stack.pool()?.payout_address.to_string();
    let block = stack.bitcoind()?.block_json(&hash).await?;
    let outs = block["tx"][0]["vout"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let paid: f64 = outs
        .iter()
        .filter(|o| o["scriptPubKey"]["address"].as_str() == Some(&payout))
        .map(|o| o["value"].as_f64().unwrap_or(0.0))
        .sum();
    anyhow::ensure!(
        paid > 0.0,
        "coinbase of {hash} pays nothing to {payout}: {outs:?}"
    );
    Ok(())
}

#[then("every miner got work on the new tip")]
async fn miners_on_new_tip(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let (height, hash) = w.tip_before.context("no block remembered")?;
    let stack = w.default_stack()?;
    let rpc = stack.bitcoind()?.rpc();
    for miner in stack.miners() {
        // The new tip, or a later one if the pool found another block within one poll.
        let what = format!(
            "miner {} to get a job on tip {hash} (height {height}) or a later tip",
            miner.name
        );
        wait_until(&what, Duration::from_secs(10), || {
            let tips = miner.log().tips;
            async move {
                for tip in tips.iter().rev() {
                    let header: Result<serde_json::Value, _> =
                        rpc.call("getblockheader", &[serde_json::json!(tip)]).await;
                    if let Ok(h) = header {
                        if h["height"].as_u64().unwrap_or(0) >= height {
                            return Ok(());
                        }
                    }
                }
                Err(format!("tips seen: {tips:?}"))
            }
        })
        .await?;
    }
    Ok(())
}
