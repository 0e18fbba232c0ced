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
