//! Redemption under faults: the operator's node down, the pool's node killed mid-payment.

use std::time::Duration;

use anyhow::Context;
use cucumber::{then, when};

use super::redemption::{channel_sat, u, BeforeRedemption, REDEEM_TIMEOUT};
use crate::world::HarnessWorld;

#[when(expr = "lightning node {string} stops")]
async fn node_stops(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack_mut()?.stop_lightning(&name).await
}

#[when(expr = "lightning node {string} is killed with SIGKILL")]
async fn node_killed(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    // cdk's mint logs the payment it can no longer follow at ERROR (and keeps it pending).
    w.expected_log_errors.extend([
        "payment status check failed; quote and proofs remain pending".to_string(),
        "Background melt completion failed for quote".to_string(),
        "Failed to check payment status for quote".to_string(),
        // Its peers' gossipd may get a message connectd read from the killed node after it
        // learned the peer was gone (a race in lightningd's gossipd.c, the message is dropped).
        "from unknown peer".to_string(),
    ]);
    w.default_stack_mut()?.kill_lightning(&name).await
}

#[when(expr = "lightning node {string} starts again and the pool's node reconnects to it")]
async fn node_back(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let stack = w.default_stack_mut()?;
    stack.restart_lightning(&name).await?;
    let (pool, node) = (stack.lightning("pool")?, stack.lightning(&name)?);
    pool.connect(node).await?;
    pool.wait_channel_normal(&node.id, Duration::from_secs(60))
        .await?;
    node.wait_channel_normal(&pool.id, Duration::from_secs(60))
        .await
}

#[when(expr = "{string} makes an invoice of {int} sat on its node")]
async fn invoice_made(w: &mut HarnessWorld, who: String, sats: u64) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let invoice = stack
        .lightning(&who)?
        .invoice(sats, &format!("kept-{who}-{}", w.redemptions.len()))
        .await?;
    let channel = channel_sat(w, &who).await?;
    w.channel_before.insert(who.clone(), channel);
    w.invoices.insert(who, (invoice, sats));
    Ok(())
}

#[when(expr = "{string} redeems against that invoice while its node is down")]
async fn redeem_while_down(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    // cdk's mint logs the failed payment at ERROR.
    super::redemption::redeem_kept_invoice_unpaid(
        w,
        &who,
        &["Background melt completion failed for quote"],
    )
    .await
}

#[then(expr = "the redemption does not complete and {string}'s wallet gets every ehash back")]
async fn not_lost(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let before = super::redemption::before_last(w, &who)?;
    super::redemption::wallet_holds(w, &who, before.held).await
}

#[when(expr = "{string} redeems that invoice again")]
async fn redeem_again(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let (invoice, sats) = w.invoices.get(&who).cloned().context("no invoice")?;
    let reserve = stack.mint()?.redemption_reserve().await?;
    let before = BeforeRedemption {
        channel_sat: channel_sat(w, &who).await?,
        held: stack.proxy(&who)?.wallet_status().await?.held,
        outstanding: u(&reserve, "outstanding_ehash")?,
        available_msat: u(&reserve, "available_msat")?,
        invoice_sat: sats,
    };
    let r = stack
        .proxy(&who)?
        .redeem(&invoice, harness::wait::scaled(REDEEM_TIMEOUT))
        .await?
        .map_err(|e| anyhow::anyhow!("the redemption of {who} failed: {e}"))?;
    w.redemptions.push((who, before, Some(r)));
    Ok(())
}

#[when(expr = "lightning node {string} is paused")]
async fn node_paused(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack()?.lightning(&name)?.process().pause()
}

#[when(expr = "{string} starts redeeming that invoice")]
async fn start_redeeming(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let (invoice, sats) = w.invoices.get(&who).cloned().context("no invoice")?;
    let reserve = stack.mint()?.redemption_reserve().await?;
    // The payee's node may be paused: its channel was read when it made the invoice.
    let before = BeforeRedemption {
        channel_sat: *w
            .channel_before
            .get(&who)
            .context("no channel remembered")?,
        held: stack.proxy(&who)?.wallet_status().await?.held,
        outstanding: u(&reserve, "outstanding_ehash")?,
        available_msat: u(&reserve, "available_msat")?,
        invoice_sat: sats,
    };
    let addr = stack
        .proxy(&who)?
        .wallet_addr
        .clone()
        .context("no wallet")?;
    w.reserve_before = Some(reserve);
    w.redemptions.push((who.clone(), before, None));
    let body = serde_json::json!({ "invoice": invoice }).to_string();
    w.redeem_in_flight = Some(tokio::spawn(async move {
        harness::http::post_json(
            &addr,
            "/wallet/redeem",
            &body,
            harness::wait::scaled(Duration::from_secs(300)),
        )
        .await
        .map_err(|e| format!("{e:#}"))
    }));
    Ok(())
}

async fn payment_hash(w: &HarnessWorld, who: &str) -> anyhow::Result<String> {
    let (invoice, _) = w.invoices.get(who).cloned().context("no invoice")?;
    // Decoded by the pool's node: the payee's may be paused.
    let d = w
        .default_stack()?
        .lightning("pool")?
        .call("decode", serde_json::json!({ "string": invoice }))
        .await?;
    Ok(d["payment_hash"]
        .as_str()
        .context("payment_hash")?
        .to_string())
}

#[then(expr = "the pool's node has the payment to {string} in flight")]
async fn in_flight(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let hash = payment_hash(w, &who).await?;
    let pool = w.default_stack()?.lightning("pool")?;
    // In flight: an HTLC for it committed to (signed for) on the channel, not only offered;
    // an HTLC only offered (SENT_ADD_HTLC) is forgotten by a node killed then, and its
    // payment stays pending with nothing on the wire.
    let state = harness::wait::wait_until(
        &format!("the pool's node to have signed for an HTLC of payment {hash}"),
        Duration::from_secs(30),
        || async {
            let c = pool
                .call("listpeerchannels", serde_json::json!({}))
                .await
                .map_err(|e| e.to_string())?;
            let htlcs = c["channels"][0]["htlcs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            htlcs
                .iter()
                .find(|h| {
                    h["payment_hash"] == hash.as_str()
                        && h["direction"] == "out"
                        && h["state"] != "SENT_ADD_HTLC"
                })
                .map(|h| h["state"].to_string())
                .ok_or_else(|| format!("htlcs {}", serde_json::Value::Array(htlcs.clone())))
        },
    )
    .await?;
    eprintln!("[redemption] the HTLC is in state {state} when the pool's node is killed");
    Ok(())
}

#[when(expr = "lightning node {string} starts again and lightning node {string} resumes")]
async fn pool_back(w: &mut HarnessWorld, pool: String, payee: String) -> anyhow::Result<()> {
    let stack = w.default_stack_mut()?;
    stack.restart_lightning(&pool).await?;
    stack.lightning(&payee)?.process().resume()?;
    let (p, n) = (stack.lightning(&pool)?, stack.lightning(&payee)?);
    p.connect(n).await?;
    p.wait_channel_normal(&n.id, Duration::from_secs(60))
        .await?;
    n.wait_channel_normal(&p.id, Duration::from_secs(60)).await
}

#[then(
    expr = "the redemption of {string} completes exactly once at the quoted rate and no ehash is lost"
)]
async fn completes_once(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let hash = payment_hash(w, &who).await?;
    let before = super::redemption::before_last(w, &who)?;
    let reserve = w.reserve_before.clone().context("no reserve remembered")?;
    let stack = w.default_stack()?;
    let pool = stack.lightning("pool")?;
    // Lightning's word: one complete payment for the invoice.
    let sent = harness::wait::wait_until(
        &format!("the pool's node to complete payment {hash}"),
        Duration::from_secs(60),
        || async {
            let p = pool
                .call("listpays", serde_json::json!({ "payment_hash": hash }))
                .await
                .map_err(|e| e.to_string())?;
            let pays = p["pays"].as_array().cloned().unwrap_or_default();
            let complete: Vec<_> = pays.iter().filter(|p| p["status"] == "complete").collect();
            match complete.as_slice() {
                [one] => one["amount_sent_msat"]
                    .as_u64()
                    .ok_or_else(|| "no amount_sent_msat".to_string()),
                [] => {
                    let htlcs = pool
                        .call("listpeerchannels", serde_json::json!({}))
                        .await
                        .map(|c| c["channels"][0]["htlcs"].to_string())
                        .unwrap_or_default();
                    Err(format!(
                        "pays {}, htlcs {htlcs}",
                        serde_json::Value::Array(pays)
                    ))
                }
                more => Err(format!("{} complete payments", more.len())),
            }
        },
    )
    .await?;
    let want_channel = before.channel_sat + before.invoice_sat;
    harness::wait::wait_until(
        &format!(
            "{who}'s channel to hold {want_channel} sat ({} before, a {} sat invoice)",
            before.channel_sat, before.invoice_sat
        ),
        Duration::from_secs(30),
        || async {
            let now = channel_sat(w, &who).await.map_err(|e| e.to_string())?;
            if now == want_channel {
                Ok(())
            } else {
                Err(format!("{now} sat"))
            }
        },
    )
    .await?;
    // The wallet ends with what it held less what was spent, at the rate quoted before the
    // payment: ceil(sent msat * outstanding / available).
    let (avail, outstanding) = (
        u(&reserve, "available_msat")?,
        u(&reserve, "outstanding_ehash")?,
    );
    let melted = (u128::from(sent) * u128::from(outstanding)).div_ceil(u128::from(avail)) as u64;
    let want = before.held - melted;
    let proxy = stack.proxy(&who)?;
    harness::wait::wait_until(
        &format!("{who}'s wallet to hold {want} ehash (melted {melted})"),
        Duration::from_secs(60),
        || async {
            let held = proxy.wallet_status().await.map_err(|e| e.to_string())?.held;
            if held == want {
                Ok(())
            } else {
                Err(format!("{held} ehash"))
            }
        },
    )
    .await?;
    let now = stack.mint()?.redemption_reserve().await?;
    anyhow::ensure!(
        u(&now, "redeemed_msat")? == sent && u(&now, "held_msat")? == 0,
        "the mint counts {} msat redeemed and {} held, the pool's node sent {sent}",
        now["redeemed_msat"],
        now["held_msat"]
    );
    if let Some(task) = w.redeem_in_flight.take() {
        let answer = task.await?;
        eprintln!("[redemption] the interrupted redemption's own answer: {answer:?}");
    }
    Ok(())
}
