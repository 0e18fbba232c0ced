//! Redemptions whose payment goes wrong (an expired invoice, the pool's node down or paused,
//! the mint killed mid-melt) and the rate while a melt is in flight or ehash awaits its
//! audit. Nothing may stay held or PENDING without an operator; the oracles are the
//! operator's wallet, Core Lightning's records and the mint's reserve as it reports it.

use std::time::Duration;

use anyhow::Context;
use cucumber::{then, when};
use serde_json::{json, Value};

use super::redemption::u;
use crate::world::HarnessWorld;

/// The rate the reserve reports as an exact fraction (msat, ehash): what a melt quote is
/// priced at.
fn rate_of(reserve: &Value) -> anyhow::Result<(u128, u128)> {
    let msat = reserve
        .get("redeemable_msat")
        .or_else(|| reserve.get("available_msat"))
        .and_then(Value::as_u64)
        .with_context(|| format!("no redeemable or available msat in {reserve}"))?;
    Ok((
        u128::from(msat),
        u128::from(u(reserve, "outstanding_ehash")?),
    ))
}

/// The ehash a melt quote for `invoice` costs (amount and fee reserve), asked of the mint
/// directly (NUT-05, any client may ask).
async fn melt_quote_cost(w: &HarnessWorld, invoice: &str) -> anyhow::Result<u64> {
    let mint = w.default_stack()?.mint()?;
    let body = json!({"request": invoice, "unit": "ehash"}).to_string();
    let (code, answer) = harness::http::post_json(
        &mint.addr,
        "/v1/melt/quote/bolt11",
        &body,
        Duration::from_secs(10),
    )
    .await?;
    anyhow::ensure!(code == 200, "melt quote answered {code}: {answer}");
    let v: Value = serde_json::from_str(&answer)?;
    Ok(u(&v, "amount")? + u(&v, "fee_reserve")?)
}

#[when(expr = "{string} makes an invoice of {int} sat on its node that expires in {int} second(s)")]
async fn expiring_invoice(
    w: &mut HarnessWorld,
    who: String,
    sats: u64,
    secs: u64,
) -> anyhow::Result<()> {
    let label = format!("expiring-{who}-{}", w.redemptions.len());
    let node = w.default_stack()?.lightning(&who)?;
    let r = node
        .call(
            "invoice",
            json!({"amount_msat": sats * 1000, "label": label, "description": label, "expiry": secs}),
        )
        .await?;
    let invoice = r["bolt11"].as_str().context("bolt11")?.to_string();
    harness::wait::wait_until(
        &format!("{who}'s node to call invoice {label} expired"),
        Duration::from_secs(secs + 30),
        || async {
            match node.invoice_status(&label).await {
                Ok(s) if s == "expired" => Ok(()),
                Ok(s) => Err(s),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    w.invoices.insert(who, (invoice, sats));
    Ok(())
}

#[when(expr = "{string} tries to redeem that invoice")]
async fn try_kept_invoice(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    // cdk's mint logs a melt that did not complete at ERROR.
    super::redemption::redeem_kept_invoice_unpaid(
        w,
        &who,
        &[
            "Background melt completion failed for quote",
            "Failed to check payment status for quote",
            "payment status check failed; quote and proofs remain pending",
        ],
    )
    .await
}

#[then(
    expr = "the redemption ends UNPAID, {string}'s wallet gets every ehash back and the mint holds nothing"
)]
async fn ends_unpaid(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let before = super::redemption::before_last(w, &who)?;
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    let mint = stack.mint()?;
    harness::wait::wait_until(
        &format!(
            "{who}'s wallet to hold its {} ehash again and the mint to hold no sats",
            before.held
        ),
        Duration::from_secs(120),
        || async {
            let held = proxy.wallet_status().await.map_err(|e| e.to_string())?.held;
            let reserve = mint.redemption_reserve().await.map_err(|e| e.to_string())?;
            let held_msat = reserve["held_msat"].as_u64().unwrap_or(u64::MAX);
            if held == before.held && held_msat == 0 {
                Ok(())
            } else {
                Err(format!(
                    "wallet holds {held} ehash, the mint holds {held_msat} msat"
                ))
            }
        },
    )
    .await?;
    if let Some(task) = w.redeem_in_flight.take() {
        let answer = task.await?;
        eprintln!("[redemption] the interrupted redemption's own answer: {answer:?}");
    }
    Ok(())
}

#[when(expr = "lightning node {string} resumes")]
async fn node_resumes(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack()?.lightning(&name)?.process().resume()
}

#[then("the mint holds sats for a payment")]
async fn mint_holds(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let mint = w.default_stack()?.mint()?;
    harness::wait::wait_until(
        "the mint to hold sats for a payment it is sending",
        Duration::from_secs(30),
        || async {
            let r = mint.redemption_reserve().await.map_err(|e| e.to_string())?;
            match r["held_msat"].as_u64() {
                Some(h) if h > 0 => Ok(()),
                _ => Err(format!("{r}")),
            }
        },
    )
    .await?;
    Ok(())
}

#[when(expr = "lightning node {string} starts again and reconnects to {string}")]
async fn node_back_to(w: &mut HarnessWorld, name: String, peer: String) -> anyhow::Result<()> {
    let stack = w.default_stack_mut()?;
    stack.restart_lightning(&name).await?;
    let (a, b) = (stack.lightning(&name)?, stack.lightning(&peer)?);
    a.connect(b).await?;
    a.wait_channel_normal(&b.id, Duration::from_secs(60))
        .await?;
    b.wait_channel_normal(&a.id, Duration::from_secs(60)).await
}

#[when(
    expr = "the mint's redemption rate and the cost of a melt quote for {int} sat of {string} are remembered"
)]
async fn remember_rate_and_cost(
    w: &mut HarnessWorld,
    sats: u64,
    who: String,
) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let node = stack.lightning(&who)?;
    let first = node.invoice(sats, &format!("probe-{who}-1")).await?;
    let second = node.invoice(sats, &format!("probe-{who}-2")).await?;
    let cost = melt_quote_cost(w, &first).await?;
    let rate = rate_of(&stack.mint()?.redemption_reserve().await?)?;
    w.rate_remembered = Some(rate);
    w.probe = Some((second, cost));
    Ok(())
}

#[when("the mint's redemption rate is remembered")]
async fn remember_rate(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let reserve = w.default_stack()?.mint()?.redemption_reserve().await?;
    w.rate_remembered = Some(rate_of(&reserve)?);
    Ok(())
}

#[then(expr = "the mint's redemption rate is no {word} than remembered")]
async fn rate_compared(w: &mut HarnessWorld, how: String) -> anyhow::Result<()> {
    let (m0, e0) = w.rate_remembered.context("no rate remembered")?;
    let reserve = w.default_stack()?.mint()?.redemption_reserve().await?;
    let (m1, e1) = rate_of(&reserve)?;
    // m1/e1 against m0/e0, exactly.
    let (now, then) = (m1 * e0, m0 * e1);
    let ok = match how.as_str() {
        "higher" => now <= then,
        "lower" => now >= then,
        other => anyhow::bail!("no {other} comparison"),
    };
    anyhow::ensure!(
        ok,
        "the rate is {m1} msat over {e1} ehash ({:.0} msat each), remembered {m0} over {e0} ({:.0}): it is {how}",
        m1 as f64 / e1.max(1) as f64,
        m0 as f64 / e0.max(1) as f64
    );
    Ok(())
}

#[then("a melt quote for the same amount costs no less ehash than remembered")]
async fn probe_cost(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let (invoice, cost) = w.probe.clone().context("no melt quote remembered")?;
    let now = melt_quote_cost(w, &invoice).await?;
    anyhow::ensure!(
        now >= cost,
        "a melt quote for the same amount costs {now} ehash now, {cost} before"
    );
    Ok(())
}
