//! Chain reorganisations of the pool's node (an operator's node mines a longer branch from a
//! fork point), and what miners, shares and audits see across them.

use std::time::{Duration, Instant};

use anyhow::Context;
use cucumber::{given, then, when};
use harness::sv2_miner::{ShareAnswer, Tweak};
use harness::wait::scaled;

use super::accounting::client;
use super::mining::share_records;
use crate::world::HarnessWorld;

#[given(expr = "operator node {string} on the pool's chain")]
async fn operator_node(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack_mut()?.start_operator_node(&name).await?;
    Ok(())
}

#[when(expr = "node {string} replaces the pool's last {int} block(s) with a longer branch")]
async fn replace_blocks(w: &mut HarnessWorld, node: String, depth: u64) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let reorg = stack.reorganise(&node, depth).await?;
    println!(
        "[scenario] reorganisation: {} block(s) replaced by {} in {:.1} s",
        reorg.replaced.len(),
        reorg.branch.len(),
        reorg.took.as_secs_f64()
    );
    w.reorg = Some(reorg);
    Ok(())
}

#[then(expr = "every miner gets a job on the branch's tip within {int} second(s) of the switch")]
async fn jobs_on_branch(w: &mut HarnessWorld, secs: u64) -> anyhow::Result<()> {
    let reorg = w.reorg.clone().context("no reorganisation")?;
    let tip = reorg.branch.last().context("no branch")?.to_string();
    let deadline = reorg.switched_at + scaled(Duration::from_secs(secs));
    let stack = w.default_stack()?;
    for m in stack.miners() {
        loop {
            if m.log().tips.contains(&tip) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "miner {} had no job on {tip} {secs} s after the pool's node switched (its tips: {:?})",
                m.name,
                m.log().tips
            );
            // Poll interval of a bounded wait on the miner's log.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[when(expr = "client {string} mines a share on the tip and keeps it")]
async fn keep_share(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let c = client(w, &name)?;
    let share = c.miner.mine(c.channel, Tweak::default()).await?;
    c.kept = Some(share);
    Ok(())
}

#[when(expr = "client {string} submits its kept share")]
async fn submit_kept(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let c = client(w, &name)?;
    let share = c.kept.take().context("no kept share")?;
    let answer = c.miner.submit(&share, None).await?;
    c.tweaked = Some((share, answer));
    Ok(())
}

#[when(expr = "client {string} submits its last accepted share again")]
async fn replay_last(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let c = client(w, &name)?;
    let share = c.accepted.last().cloned().context("no accepted share")?;
    let answer = c.miner.submit(&share, None).await?;
    c.replays = vec![(share.clone(), share.hash.clone(), answer)];
    Ok(())
}

#[then(expr = "the replay is refused with {string} and the share has exactly one record")]
async fn replay_refused(w: &mut HarnessWorld, code: String) -> anyhow::Result<()> {
    let (share, _, answer) = w
        .clients
        .values()
        .find_map(|c| c.replays.last().cloned())
        .context("nothing replayed")?;
    anyhow::ensure!(
        answer == ShareAnswer::Rejected(code.clone()),
        "the replay of {} was answered {answer:?}, expected {code}",
        share.hash
    );
    // `share_records` fails on a hash recorded twice.
    let records = share_records(w).await?;
    anyhow::ensure!(
        records.contains_key(&share.hash),
        "share {} has no record",
        share.hash
    );
    Ok(())
}

#[then(expr = "the templates of {string} include one on a replaced block")]
async fn template_on_replaced(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let reorg = w.reorg.clone().context("no reorganisation")?;
    let parents = super::audit::parents_of(w, &who).await?;
    let replaced: Vec<String> = reorg.replaced.iter().map(|h| h.to_string()).collect();
    anyhow::ensure!(
        parents.iter().any(|p| replaced.contains(p)),
        "no template of {who} builds on a replaced block {replaced:?}: its parents {parents:?}"
    );
    Ok(())
}

#[then(
    expr = "every verdict on a template of {string} on a replaced block was reached after rewinding the audit node"
)]
async fn replaced_verdicts(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let reorg = w.reorg.clone().context("no reorganisation")?;
    let replaced: Vec<String> = reorg.replaced.iter().map(|h| h.to_string()).collect();
    super::audit::verdicts_on(w, &who, |parent| replaced.iter().any(|r| r == parent)).await
}

/// Core's own word on where a (re)started node came back: the height of the last
/// `Loaded best chain` line of its log.
fn loaded_height(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find(|l| l.contains("Loaded best chain:"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("height="))?
        .parse()
        .ok()
}

/// A process of the default stack by its `stack.json` name.
fn named<'a>(
    w: &'a HarnessWorld,
    name: &str,
) -> anyhow::Result<&'a harness::supervisor::Supervised> {
    w.default_stack()?
        .processes()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
        .with_context(|| format!("no process {name}"))
}

#[when(
    expr = "bitcoind is killed with SIGKILL while its peer {string} is paused, and comes back without its newest blocks"
)]
async fn node_forgets(w: &mut HarnessWorld, peer: String) -> anyhow::Result<()> {
    // The peer is held off so the node comes back alone, behind, for as long as the next
    // step watches (otherwise it reconnects within a second and the race decides).
    named(w, &peer)?.pause()?;
    let stack = w.default_stack()?;
    let node = stack.bitcoind()?;
    let before = node.chain_info().await?;
    let tips_before = stack
        .miners()
        .map(|m| (m.name.clone(), m.log().tips.len()))
        .collect();
    // Killed and held down, then started as a service manager would: no `-reindex` (the
    // supervisor's own crash restart adds one, and Core then reads every block back from its
    // block files), so the node comes back with the block index it last wrote.
    let p = node.process();
    p.crash().await?;
    p.start_again().await?;
    let log = std::fs::read_to_string(p.spec().stdout_log())?;
    let loaded = loaded_height(&log).context("bitcoind's log has no `Loaded best chain` line")?;
    // Core writes its block index to disk about hourly: a node killed minutes after its start
    // comes back with the chain it started with. Anything else cannot show the case.
    anyhow::ensure!(
        loaded < before.blocks,
        "bitcoind came back at height {loaded}, not below the {} it had: it kept its newest blocks, so this run cannot show a node that forgot them",
        before.blocks
    );
    println!(
        "[scenario] bitcoind killed at height {}, came back at {loaded}",
        before.blocks
    );
    w.tip_before = Some((before.blocks, before.bestblockhash));
    w.tips_at_crash = tips_before;
    w.paused_peer = Some(peer);
    Ok(())
}

#[then(expr = "for {int} seconds miner {string} gets no job on a block below that tip")]
async fn watch_no_job_below(w: &mut HarnessWorld, secs: u64, name: String) -> anyhow::Result<()> {
    // An observation window, not a wait: unscaled, and well inside the pool's 30 s.
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        no_job_below(w, name.clone()).await?;
        // Poll interval of a bounded watch over the miner's log.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[when("the paused peer is resumed")]
async fn resume_peer(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let peer = w.paused_peer.take().context("no peer paused")?;
    named(w, &peer)?.resume()
}

#[then("bitcoind gets the tip it had again from its peer")]
async fn node_catches_up(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let (height, hash) = w.tip_before.context("no tip remembered")?;
    let node = w.default_stack()?.bitcoind()?;
    harness::wait::wait_until(
        &format!("bitcoind to have block {hash} (height {height}) in its chain again"),
        Duration::from_secs(90),
        || async {
            let h: serde_json::Value = node
                .rpc()
                .call("getblockheader", &[serde_json::json!(hash)])
                .await
                .map_err(|e| e.to_string())?;
            match h["confirmations"].as_i64() {
                Some(c) if c >= 1 => Ok(()),
                c => Err(format!("not in its active chain (confirmations {c:?})")),
            }
        },
    )
    .await?;
    Ok(())
}

#[then(expr = "miner {string} got no job on a block below that tip after the crash")]
async fn no_job_below_step(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    no_job_below(w, name.clone()).await?;
    println!(
        "[scenario] miner {name}: {} job tip(s) since the crash, none below the tip bitcoind had",
        w.jobs_since_crash
    );
    Ok(())
}

async fn no_job_below(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let (height, hash) = w.tip_before.context("no tip remembered")?;
    let stack = w.default_stack()?;
    let node = stack.bitcoind()?;
    let from = w.tips_at_crash.get(&name).copied().unwrap_or(0);
    let tips = stack.miner(&name)?.log().tips;
    // A job sent again on the tip the node had is the tip itself, whether the node has it
    // back yet or not.
    for tip in tips.iter().skip(from).filter(|t| **t != hash.to_string()) {
        // Any other block a job was on: the pool's node had it (stale ones too).
        let h: serde_json::Value = node
            .rpc()
            .call("getblockheader", &[serde_json::json!(tip)])
            .await
            .with_context(|| format!("miner {name} got a job on {tip}, unknown to bitcoind"))?;
        let at = h["height"].as_u64().context("header height")?;
        anyhow::ensure!(
            at >= height,
            "miner {name} got a job on block {tip} at height {at}, below the tip {height} bitcoind had before the crash (Bitcoin Core: {} confirmation(s))",
            h["confirmations"]
        );
    }
    w.jobs_since_crash = tips.len().saturating_sub(from);
    Ok(())
}
