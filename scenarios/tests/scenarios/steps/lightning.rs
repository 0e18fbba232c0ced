//! Lightning steps: nodes on the stack's chain, funding, channels, invoices.

use std::time::Duration;

use cucumber::{given, then, when};

use crate::world::HarnessWorld;

/// Time for a channel to reach CHANNELD_NORMAL once its funding block is mined.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(60);

#[given(expr = "lightning nodes {string} and {string}")]
async fn nodes(w: &mut HarnessWorld, a: String, b: String) -> anyhow::Result<()> {
    let stack = w.default_stack_mut()?;
    stack.start_lightning(&a, None).await?;
    stack.start_lightning(&b, None).await?;
    Ok(())
}

#[when(expr = "lightning node {string} gets {int} sat from the faucet")]
async fn funded(w: &mut HarnessWorld, name: String, sats: u64) -> anyhow::Result<()> {
    w.default_stack()?.fund_lightning(&name, sats).await
}

#[when(expr = "lightning node {string} opens a {int} sat channel to {string}")]
async fn open(w: &mut HarnessWorld, from: String, sats: u64, to: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let (a, b) = (stack.lightning(&from)?, stack.lightning(&to)?);
    a.connect(b).await?;
    a.fund_channel(b, sats).await?;
    // One confirmation (the nodes run with --funding-confirms=1).
    stack.mine_blocks(1).await
}

#[then(expr = "the channel between {string} and {string} is normal")]
async fn normal(w: &mut HarnessWorld, a: String, b: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let (na, nb) = (stack.lightning(&a)?, stack.lightning(&b)?);
    na.wait_channel_normal(&nb.id, CHANNEL_TIMEOUT).await?;
    nb.wait_channel_normal(&na.id, CHANNEL_TIMEOUT).await
}

#[when(expr = "{string} invoices {int} sat and {string} pays it")]
async fn pays(w: &mut HarnessWorld, payee: String, sats: u64, payer: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let bolt11 = stack.lightning(&payee)?.invoice(sats, "harness-1").await?;
    let sent = stack.lightning(&payer)?.pay(&bolt11).await?;
    anyhow::ensure!(
        sent >= sats * 1000,
        "sent {sent} msat for a {sats} sat invoice"
    );
    Ok(())
}

#[then(expr = "the invoice is paid and {string} holds {int} sat in its channel")]
async fn holds(w: &mut HarnessWorld, who: String, sats: u64) -> anyhow::Result<()> {
    let node = w.default_stack()?.lightning(&who)?;
    anyhow::ensure!(node.invoice_status("harness-1").await? == "paid");
    harness::wait::wait_until(
        &format!("{who} to hold {sats} sat in its channel"),
        Duration::from_secs(10),
        || async {
            let (_, channel) = node.balances().await.map_err(|e| e.to_string())?;
            if channel == sats {
                Ok(())
            } else {
                Err(format!("{channel} sat"))
            }
        },
    )
    .await?;
    Ok(())
}

#[then("bitcoind's fee estimate was answered by the proxy")]
async fn fee_answered(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let node = w.default_stack()?.lightning("pool")?;
    anyhow::ensure!(
        node.fee_proxy().fee_answers() > 0,
        "lightningd never asked for a fee estimate"
    );
    Ok(())
}

#[given("a signet stack with matured rewards for the pool's Lightning node")]
async fn rewards_stack(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = harness::Stack::builder(crate::world::DEFAULT_STACK, &w.config)
        .rewards()
        .redis()
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    w.stacks
        .insert(crate::world::DEFAULT_STACK.to_string(), stack);
    w.default_stack_mut()?.start_pool_lightning().await?;
    Ok(())
}

#[given(expr = "lightning node {string}")]
async fn one_node(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack_mut()?.start_lightning(&name, None).await?;
    Ok(())
}

/// Matured coinbase outputs paying `address`, as bitcoind's UTXO set shows them (sat).
pub(crate) async fn matured_coinbases(
    rpc: &harness::bitcoind::BitcoinRpc,
    address: &str,
) -> anyhow::Result<u64> {
    let tip: u64 = rpc.call("getblockcount", &[]).await?;
    let scan: serde_json::Value = rpc
        .call(
            "scantxoutset",
            &[
                serde_json::json!("start"),
                serde_json::json!([format!("addr({address})")]),
            ],
        )
        .await?;
    let sats = scan["unspents"]
        .as_array()
        .map(|u| {
            u.iter()
                .filter(|u| u["coinbase"] == true)
                .filter(|u| u["height"].as_u64().is_some_and(|h| tip + 1 - h >= 100))
                .filter_map(|u| u["amount"].as_f64())
                .map(|btc| (btc * 1e8).round() as u64)
                .sum()
        })
        .unwrap_or(0);
    Ok(sats)
}

#[then(
    "the pool's Lightning node holds every matured reward, as Bitcoin Core counts coinbases 100 blocks deep that pay it"
)]
async fn holds_rewards(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let rewards = stack
        .rewards()
        .ok_or_else(|| anyhow::anyhow!("no rewards chain"))?;
    let matured = matured_coinbases(stack.bitcoind()?.rpc(), &rewards.pool_address).await?;
    anyhow::ensure!(
        matured == rewards.rewards_sats && matured > 0,
        "Bitcoin Core counts {matured} sat of matured coinbases for {}, the cache says {}",
        rewards.pool_address,
        rewards.rewards_sats
    );
    let (onchain, _) = stack.lightning("pool")?.balances().await?;
    anyhow::ensure!(
        onchain >= matured,
        "the pool node counts {onchain} sat on chain, Bitcoin Core {matured}"
    );
    Ok(())
}
