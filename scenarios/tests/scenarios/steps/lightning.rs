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
