//! Melt quotes made now and paid later: what a quote costs and loses to rounding, a quote the
//! rate moved away from, and the reserve across a reorganisation that removes a matured
//! reward. The matured rewards' oracle is Bitcoin Core's active chain, read block by block.

use anyhow::Context;
use cucumber::{then, when};
use serde_json::{json, Value};

use super::redemption::{u, BeforeRedemption, REDEEM_TIMEOUT};
use crate::world::HarnessWorld;

#[when(expr = "{string} gets a melt quote for an invoice of its node for {int} sat")]
async fn gets_quote(w: &mut HarnessWorld, who: String, sats: u64) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let label = format!("quoted-{who}-{}", w.redemptions.len());
    let invoice = stack.lightning(&who)?.invoice(sats, &label).await?;
    let q = stack
        .proxy(&who)?
        .melt_quote(&invoice)
        .await?
        .map_err(|e| anyhow::anyhow!("{who}'s melt quote was refused: {e}"))?;
    println!("[scenario] {who}'s melt quote: {q}");
    w.melt_quote = Some((who, q));
    Ok(())
}

#[when(
    expr = "{string} tries to redeem against an invoice of its node that loses over {int} % to rounding"
)]
async fn tries_lossy(w: &mut HarnessWorld, who: String, pct: u64) -> anyhow::Result<()> {
    // The smallest invoice that loses at least twice `pct` % at the mint's rate now (nothing
    // mines meanwhile, so the quote gets the same rate): an invoice costs whole ehash, and
    // what they are worth beyond it is lost.
    let r = w.default_stack()?.mint()?.redemption_reserve().await?;
    let (msat, ehash) = (
        u128::from(u(&r, "redeemable_msat")?),
        u128::from(u(&r, "outstanding_ehash")?.max(1)),
    );
    let loss = |sats: u64| {
        let invoice = u128::from(sats) * 1000;
        let cost = (invoice * ehash).div_ceil(msat.max(1));
        (cost * msat / ehash).saturating_sub(invoice)
    };
    let sats = (1..=100_000u64)
        .find(|&s| loss(s) * 100 >= u128::from(2 * pct) * u128::from(s) * 1000)
        .with_context(|| format!("no invoice loses {pct} % at {msat} msat over {ehash} ehash"))?;
    println!(
        "[scenario] an invoice of {sats} sat loses about {} msat to rounding",
        loss(sats)
    );
    super::redemption::try_redeem(w, who, sats).await
}

#[then(
    expr = "the quote shows what it costs in ehash and the sats rounding loses, at most one ehash's worth"
)]
async fn quote_shows_loss(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let (_, q) = w.melt_quote.clone().context("no melt quote")?;
    let (amount, rate, loss) = (
        u(&q, "amount_ehash")?,
        u(&q, "rate_msat_per_ehash")?,
        u(&q, "rounding_loss_msat")?,
    );
    let invoice_msat = u(&q, "invoice_sat")? * 1000;
    // What the ehash is worth at the quote's rate, beyond the invoice; under one ehash.
    anyhow::ensure!(amount > 0, "the quote costs no ehash: {q}");
    anyhow::ensure!(
        loss <= rate && amount * (rate + 1) >= invoice_msat,
        "the quote's rounding loss {loss} msat does not fit {amount} ehash at {rate} msat each for {invoice_msat} msat: {q}"
    );
    Ok(())
}

#[when(expr = "the miners mine until the mint's rate is {int} % below the quote's")]
async fn mine_until_rate_falls(w: &mut HarnessWorld, pct: u64) -> anyhow::Result<()> {
    let (_, q) = w.melt_quote.clone().context("no melt quote")?;
    let quoted = u(&q, "rate_msat_per_ehash")? as f64;
    let target = quoted * (100 - pct.min(100)) as f64 / 100.0;
    let mint = w.default_stack()?.mint()?;
    harness::wait::wait_until(
        &format!("the mint's rate to fall to {target:.0} msat per ehash ({pct} % below the quote's {quoted:.0}) as shares come in"),
        std::time::Duration::from_secs(180),
        || async {
            let r = mint.redemption_reserve().await.map_err(|e| e.to_string())?;
            let (msat, ehash) = (
                r["redeemable_msat"].as_u64().unwrap_or(0) as f64,
                r["outstanding_ehash"].as_u64().unwrap_or(0).max(1) as f64,
            );
            if msat / ehash <= target {
                Ok(())
            } else {
                Err(format!("{:.0} msat per ehash", msat / ehash))
            }
        },
    )
    .await?;
    Ok(())
}

#[when(expr = "{string} pays that quote")]
async fn pays_quote(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let (_, q) = w.melt_quote.clone().context("no melt quote")?;
    let stack = w.default_stack()?;
    let before = BeforeRedemption {
        channel_sat: 0,
        held: stack.proxy(&who)?.wallet_status().await?.held,
        outstanding: 0,
        available_msat: 0,
        invoice_sat: u(&q, "invoice_sat")?,
    };
    let out = stack
        .proxy(&who)?
        .redeem_with(
            json!({ "quote": q["quote"] }),
            harness::wait::scaled(REDEEM_TIMEOUT),
        )
        .await?;
    match out {
        Ok(r) if r["state"] == "PAID" => {
            w.redemptions.push((who, before, Some(r)));
        }
        Ok(r) => {
            w.last_error = Some(format!(
                "state {}: {}",
                r["state"],
                r["reason"].as_str().unwrap_or("(no reason)")
            ));
            w.redemptions.push((who, before, None));
        }
        Err(e) => {
            w.last_error = Some(e);
            w.redemptions.push((who, before, None));
        }
    }
    Ok(())
}

#[when(
    expr = "{string} redeems ehash against an invoice of its node for {int} sat, accepting the loss to rounding"
)]
async fn redeems_accepting(w: &mut HarnessWorld, who: String, sats: u64) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let label = format!("accepted-{who}-{}", w.redemptions.len());
    let invoice = stack.lightning(&who)?.invoice(sats, &label).await?;
    let before = BeforeRedemption {
        channel_sat: super::redemption::channel_sat(w, &who).await?,
        held: stack.proxy(&who)?.wallet_status().await?.held,
        outstanding: 0,
        available_msat: 0,
        invoice_sat: sats,
    };
    let r = stack
        .proxy(&who)?
        .redeem_with(
            json!({ "invoice": invoice, "accept_loss": true }),
            harness::wait::scaled(REDEEM_TIMEOUT),
        )
        .await?
        .map_err(|e| anyhow::anyhow!("the redemption of {who} failed: {e}"))?;
    w.redemptions.push((who, before, Some(r)));
    Ok(())
}

#[then(
    expr = "the payment is refused with {string} and {string}, and {string}'s wallet holds what it held"
)]
async fn payment_refused(
    w: &mut HarnessWorld,
    first: String,
    second: String,
    who: String,
) -> anyhow::Result<()> {
    let err = w.last_error.clone().context("no refusal")?;
    anyhow::ensure!(
        err.contains(&first) && err.contains(&second),
        "the refusal says {err:?}"
    );
    let before = super::redemption::before_last(w, &who)?;
    super::redemption::wallet_holds(w, &who, before.held).await?;
    Ok(())
}

/// Matured rewards of the stack's pool on Bitcoin Core's active chain: coinbase outputs to
/// the payout address 100 blocks deep or more, read block by block.
async fn matured_on_chain(w: &HarnessWorld) -> anyhow::Result<u64> {
    let stack = w.default_stack()?;
    let rpc = stack.bitcoind()?.rpc();
    let payout = stack
        .rewards()
        .context("no rewards chain")?
        .pool_address
        .clone();
    let tip: u64 = rpc.call("getblockcount", &[]).await?;
    let mut sats = 0;
    for h in 0..=(tip + 1).saturating_sub(100) {
        if h + 100 > tip + 1 {
            break;
        }
        let hash: String = rpc.call("getblockhash", &[json!(h)]).await?;
        let b: Value = rpc.call("getblock", &[json!(hash), json!(2)]).await?;
        for out in b["tx"][0]["vout"].as_array().into_iter().flatten() {
            if out["scriptPubKey"]["address"].as_str() == Some(payout.as_str()) {
                sats += bitcoin::Amount::from_btc(out["value"].as_f64().unwrap_or(0.0))?.to_sat();
            }
        }
    }
    Ok(sats)
}

#[then("the mint's matured rewards are what Bitcoin Core counts on the active chain")]
async fn matured_follow_chain(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let oracle = matured_on_chain(w).await?;
    let mint = w.default_stack()?.mint()?;
    let reserve = mint.redemption_reserve().await?;
    anyhow::ensure!(
        u(&reserve, "matured_sat")? == oracle,
        "the mint counts {} sat of matured rewards, Bitcoin Core's active chain {oracle}",
        reserve["matured_sat"]
    );
    w.matured_remembered.get_or_insert(oracle);
    Ok(())
}

#[when("the mint is stopped")]
async fn mint_stopped(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.default_stack()?.mint()?.process().stop().await?;
    Ok(())
}

#[when("the mint is started again, and its reserve is read")]
async fn mint_started(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let log = stack.bitcoind()?.process().spec().stdout_log();
    let from = std::fs::metadata(&log)?.len();
    let mint = stack.mint()?;
    mint.process().start_again().await?;
    mint.redemption_reserve().await?;
    w.node_log_from = Some(from);
    Ok(())
}

#[then(expr = "bitcoind served at most {int} block(s) since the mint started again")]
async fn blocks_served(w: &mut HarnessWorld, most: usize) -> anyhow::Result<()> {
    let from = w.node_log_from.context("the mint was not started again")?;
    let log = std::fs::read(w.default_stack()?.bitcoind()?.process().spec().stdout_log())?;
    let since = String::from_utf8_lossy(log.get(from as usize..).unwrap_or_default()).to_string();
    // Bitcoin Core's own log of each call (`-debug=rpc`); `getblock` itself, not getblockhash
    // or getblockheader.
    let served = since
        .lines()
        .filter(|l| l.contains("ThreadRPCServer method=getblock user="))
        .count();
    // The trace is there at all: the restarted mint looks its last counted block up.
    anyhow::ensure!(
        since.contains("ThreadRPCServer method=getblockheader user="),
        "bitcoind's log shows no getblockheader since the mint started again: is -debug=rpc on?"
    );
    anyhow::ensure!(
        served <= most,
        "bitcoind served {served} getblock calls since the mint started again (at most {most}): the mint read the chain again instead of going on from its count"
    );
    println!("[scenario] bitcoind served {served} getblock call(s) since the mint started again");
    Ok(())
}

#[then("the matured rewards fell by the reward the reorganisation removed")]
async fn matured_fell(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let before = w
        .matured_remembered
        .context("no matured rewards remembered")?;
    let now = matured_on_chain(w).await?;
    anyhow::ensure!(
        now + harness::lightning::REWARD_SATS == before,
        "matured rewards went from {before} to {now} sat; the fork removes one reward of {} sat",
        harness::lightning::REWARD_SATS
    );
    Ok(())
}

#[when(
    expr = "node {string} moves the pool's chain onto the pre-mined fork that drops the last reward"
)]
async fn onto_fork(w: &mut HarnessWorld, node: String) -> anyhow::Result<()> {
    let reorg = w
        .default_stack()?
        .reorganise_onto_rewards_fork(&node)
        .await?;
    println!(
        "[scenario] reorganisation onto the rewards fork: {} block(s) replaced by {} in {:.1} s",
        reorg.replaced.len(),
        reorg.branch.len(),
        reorg.took.as_secs_f64()
    );
    w.reorg = Some(reorg);
    Ok(())
}
