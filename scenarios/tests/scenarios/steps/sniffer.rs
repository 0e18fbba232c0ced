//! Steps on the SV2 sniffer between the proxies and the pool: cuts at a chosen message, and the
//! recorded message flows pinned as insta snapshots in `fixtures/snapshots`.

use std::time::Duration;

use anyhow::{anyhow, Context};
use bitcoin::hashes::Hash;
use bitcoin::BlockHash;
use cucumber::{given, then, when};
use harness::sniffer::{render, Captured, Fault};

use crate::steps::mining::share_records;
use crate::world::HarnessWorld;

const FLOW_TIMEOUT: Duration = Duration::from_secs(90);

#[given("the proxies reach the pool through the SV2 sniffer")]
async fn through_sniffer(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.default_stack_mut()?.start_sniffer().await?;
    Ok(())
}

#[when(
    "the sniffer cuts the connection of the next share before the pool's answer reaches the proxy"
)]
async fn cut_before_ack(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let sniffer = w.default_stack()?.sniffer()?;
    sniffer.set_fault(Fault::CutBeforeNextAck);
    let cut = sniffer.cut_share(FLOW_TIMEOUT).await?;
    println!(
        "[sniffer] cut connection {} before the pool's answer to share seq {} on channel {}: {}",
        cut.conn,
        cut.sequence_number,
        cut.channel_id,
        match &cut.refused {
            None => "the pool accepted it".to_string(),
            Some(code) => format!("the pool refused it ({code})"),
        }
    );
    w.cut_share = Some(cut);
    Ok(())
}

#[when(expr = "the sniffer delays every message by {int} ms")]
async fn delay_all(w: &mut HarnessWorld, ms: u64) -> anyhow::Result<()> {
    w.default_stack()?
        .sniffer()?
        .set_fault(Fault::Delay(Duration::from_millis(ms)));
    Ok(())
}

#[when("the sniffer passes every message again")]
async fn pass_all(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.default_stack()?.sniffer()?.set_fault(Fault::Pass);
    Ok(())
}

#[when("the sniffer cuts every connection")]
async fn cut_all(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.default_stack()?.sniffer()?.cut_all();
    Ok(())
}

#[then(expr = "the sniffer saw a share answered only after {int} ms")]
async fn saw_delayed_answer(w: &mut HarnessWorld, ms: u64) -> anyhow::Result<()> {
    // The sniffer holds a share `ms` before the pool sees it, so the pool's answer reaches the
    // sniffer at least `ms` after the share did.
    let sniffer = w.default_stack()?.sniffer()?;
    let gap = Duration::from_millis(ms);
    sniffer
        .wait_until(
            "a share whose answer reached the proxy late",
            FLOW_TIMEOUT,
            |log| render::delayed_answer(log, gap).then_some(()),
        )
        .await
}

#[then(
    expr = "the cut share has one ehash:shares record with proxy {string}'s key if the pool accepted it, and none if it refused it"
)]
async fn cut_share_recorded_once(w: &mut HarnessWorld, proxy: String) -> anyhow::Result<()> {
    let cut = w.cut_share.clone().context("no share was cut")?;
    let key = w
        .default_stack()?
        .proxy(&proxy)?
        .locking_pubkey
        .ok_or_else(|| anyhow!("proxy {proxy} has no key"))?;
    let rolled = hex::encode(&cut.extranonce);
    // `share_records` already fails on a share hash recorded twice.
    let records = share_records(w).await?;
    let matching: Vec<_> = records
        .values()
        .filter(|r| {
            r.channel_id == cut.channel_id
                && r.nonce == cut.nonce
                && r.ntime == cut.ntime
                && r.version == cut.version
                && r.extranonce.ends_with(&rolled)
        })
        .collect();
    match &cut.refused {
        None => {
            anyhow::ensure!(
                matching.len() == 1,
                "the pool accepted the cut share but {} records match it",
                matching.len()
            );
            anyhow::ensure!(
                matching[0].locking_pubkey == key,
                "the cut share's record is locked to {}, not proxy {proxy}'s key",
                matching[0].locking_pubkey
            );
        }
        // A duplicate's record is the earlier share's; every other refusal writes nothing.
        Some(code) if code == "duplicate-share" => anyhow::ensure!(
            matching.len() == 1,
            "the cut share was refused as a duplicate but {} records match it",
            matching.len()
        ),
        Some(code) => anyhow::ensure!(
            matching.is_empty(),
            "the pool refused the cut share ({code}) but it has a record"
        ),
    }
    Ok(())
}

#[then(expr = "the SV2 {string} flow matches its snapshot")]
async fn flow_snapshot(w: &mut HarnessWorld, flow: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let sniffer = stack.sniffer()?;
    type Pick = Box<dyn for<'a> Fn(&'a [Captured]) -> Option<Vec<&'a Captured>> + Send>;
    let (what, pick): (&str, Pick) = match flow.as_str() {
        "extension negotiation" => (
            "SetupConnection and RequestExtensions answered",
            Box::new(|log| render::extension_negotiation(log, 1)),
        ),
        "channel open" => (
            "a channel opened and its first job activated",
            Box::new(|log| render::channel_open(log, 1)),
        ),
        "share" => (
            "an accepted share and its answer",
            Box::new(render::first_accepted_share),
        ),
        "block found" => {
            // The first block above the pre-mined chain, as Bitcoin Core stored it.
            let node = stack.bitcoind()?;
            let height = stack
                .chain()
                .map(harness::Chain::premine_blocks)
                .unwrap_or(0)
                + 1;
            let hash: BlockHash = node.rpc().call("getblockhash", &[height.into()]).await?;
            let block = node.block_json(&hash).await?;
            let nonce = block["nonce"].as_u64().context("block nonce")? as u32;
            let time = block["time"].as_u64().context("block time")? as u32;
            (
                "the share that became the block, its answer and the new tip's job",
                Box::new(move |log| render::block_found(log, nonce, time, hash.to_byte_array())),
            )
        }
        other => anyhow::bail!("no SV2 flow named {other:?}"),
    };
    let text = sniffer
        .wait_until(what, FLOW_TIMEOUT, |log| {
            pick(log).map(|f| render::render(&f))
        })
        .await?;
    let name = format!("sv2_flow_{}", flow.replace(' ', "_"));
    insta::with_settings!({snapshot_path => "../../../../fixtures/snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, text);
    });
    Ok(())
}
