//! Lightning redemption steps: ehash melted against invoices of the operators' own nodes,
//! paid by the pool's node; the oracles are Core Lightning's own records (channel balances,
//! `listpays`) and the rewards Bitcoin Core counted when the rewards chain was checked.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use cucumber::{given, then, when};
use serde_json::Value;

use crate::world::{HarnessWorld, DEFAULT_STACK};

/// The pool's fee in redemption stacks (2 %).
const POOL_FEE_PPM: u64 = 20_000;

/// Time a redemption may take (quote, melt, Lightning payment).
pub(crate) const REDEEM_TIMEOUT: Duration = Duration::from_secs(60);

/// What one step saw before a redemption, to compare after it.
#[derive(Debug, Clone)]
pub struct BeforeRedemption {
    pub(crate) channel_sat: u64,
    pub(crate) held: u64,
    pub(crate) outstanding: u64,
    pub(crate) available_msat: u64,
    pub(crate) invoice_sat: u64,
}

#[given("a signet stack with matured rewards and the pool side redeeming over Lightning")]
async fn redemption_stack(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = harness::Stack::builder(DEFAULT_STACK, &w.config)
        .rewards()
        .redis()
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    w.stacks.insert(DEFAULT_STACK.to_string(), stack);
    w.pool_options.min_bits = harness::lightning::REDEMPTION_MIN_BITS;
    let (pool, mint) = (w.pool_options.clone(), w.mint_options.clone());
    w.default_stack_mut()?
        .start_redemption_side(&pool, &mint, POOL_FEE_PPM)
        .await
}

#[given(
    expr = "the mint waits {int} s on a payment call, checks held payments every {int} s, releases an orphaned payment after {int} s and a failed or unknown one after {int} s"
)]
async fn hold_timing(
    w: &mut HarnessWorld,
    pay: u64,
    check: u64,
    orphan: u64,
    never_sent: u64,
) -> anyhow::Result<()> {
    w.mint_options.hold_timing = Some((pay, check, orphan, never_sent));
    Ok(())
}

pub(crate) fn u(v: &Value, key: &str) -> anyhow::Result<u64> {
    v[key].as_u64().with_context(|| format!("no {key} in {v}"))
}

/// What `who` held before its last redemption.
pub(crate) fn before_last(w: &HarnessWorld, who: &str) -> anyhow::Result<BeforeRedemption> {
    w.redemptions
        .iter()
        .rev()
        .find(|(n, _, _)| n == who)
        .map(|(_, before, _)| before.clone())
        .with_context(|| format!("no redemption of {who}"))
}

/// Wait until `who`'s wallet holds `held` ehash (again).
pub(crate) async fn wallet_holds(w: &HarnessWorld, who: &str, held: u64) -> anyhow::Result<()> {
    let proxy = w.default_stack()?.proxy(who)?;
    harness::wait::wait_until(
        &format!("{who}'s wallet to hold its {held} ehash"),
        std::time::Duration::from_secs(30),
        || async {
            let now = proxy.wallet_status().await.map_err(|e| e.to_string())?.held;
            if now == held {
                Ok(())
            } else {
                Err(format!("{now} ehash"))
            }
        },
    )
    .await?;
    Ok(())
}

/// Redeem the invoice `who` kept, which must not be paid: the outcome becomes `last_error`
/// (its state, or the proxy's error), and `expected_errors` the log lines it may cause.
pub(crate) async fn redeem_kept_invoice_unpaid(
    w: &mut HarnessWorld,
    who: &str,
    expected_errors: &[&str],
) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let (invoice, sats) = w.invoices.get(who).cloned().context("no invoice")?;
    let before = BeforeRedemption {
        channel_sat: 0,
        held: stack.proxy(who)?.wallet_status().await?.held,
        outstanding: 0,
        available_msat: 0,
        invoice_sat: sats,
    };
    let out = stack
        .proxy(who)?
        .redeem(&invoice, harness::wait::scaled(REDEEM_TIMEOUT))
        .await?;
    w.expected_log_errors
        .extend(expected_errors.iter().map(|e| e.to_string()));
    match out {
        Ok(r) if r["state"] == "PAID" => anyhow::bail!("{who}'s redemption was paid: {r}"),
        Ok(r) => w.last_error = Some(format!("state {}", r["state"])),
        Err(e) => w.last_error = Some(e),
    }
    w.redemptions.push((who.to_string(), before, None));
    Ok(())
}

pub(crate) async fn channel_sat(w: &HarnessWorld, who: &str) -> anyhow::Result<u64> {
    Ok(w.default_stack()?.lightning(who)?.balances().await?.1)
}

async fn redeem(
    w: &mut HarnessWorld,
    who: &str,
    sats: u64,
) -> anyhow::Result<(BeforeRedemption, Result<Value, String>)> {
    let stack = w.default_stack()?;
    let label = format!("redeem-{who}-{}", w.redemptions.len());
    let invoice = stack.lightning(who)?.invoice(sats, &label).await?;
    let reserve = stack.mint()?.redemption_reserve().await?;
    let before = BeforeRedemption {
        channel_sat: channel_sat(w, who).await?,
        held: stack.proxy(who)?.wallet_status().await?.held,
        outstanding: u(&reserve, "outstanding_ehash")?,
        available_msat: u(&reserve, "available_msat")?,
        invoice_sat: sats,
    };
    let out = stack
        .proxy(who)?
        .redeem(&invoice, harness::wait::scaled(REDEEM_TIMEOUT))
        .await?;
    Ok((before, out))
}

#[when(expr = "{string} redeems ehash against an invoice of its node for {int} sat")]
async fn redeems(w: &mut HarnessWorld, who: String, sats: u64) -> anyhow::Result<()> {
    let (before, out) = redeem(w, &who, sats).await?;
    let r = out.map_err(|e| anyhow::anyhow!("the redemption of {who} failed: {e}"))?;
    w.redemptions.push((who, before, Some(r)));
    Ok(())
}

#[when(expr = "{string} tries to redeem against an invoice of its node for {int} sat")]
async fn tries(w: &mut HarnessWorld, who: String, sats: u64) -> anyhow::Result<()> {
    try_redeem(w, who, sats).await
}

/// Redeem `sats` for `who`, which must not go through: the error becomes `last_error`.
pub(crate) async fn try_redeem(w: &mut HarnessWorld, who: String, sats: u64) -> anyhow::Result<()> {
    let (before, out) = redeem(w, &who, sats).await?;
    match out {
        Ok(r) => anyhow::bail!("the redemption of {who} for {sats} sat went through: {r}"),
        Err(e) => {
            w.last_error = Some(e);
            w.redemptions.push((who, before, None));
        }
    }
    Ok(())
}

/// Sats about a tenth of what `who`'s ehash is worth at the mint's rate now: share amounts
/// vary a lot, so a fixed invoice could be beyond one operator's share of the reserve. Ehash
/// are whole, so of the invoices worth a twentieth to a tenth, the one rounding loses least
/// on is taken (the wallet refuses to lose more than 1 % unless told to accept it).
pub(crate) async fn tenth_of_worth(w: &HarnessWorld, who: &str) -> anyhow::Result<u64> {
    let stack = w.default_stack()?;
    let held = stack.proxy(who)?.wallet_status().await?.held;
    let r = stack.mint()?.redemption_reserve().await?;
    harness::roles::invoice_sats_worth(&r, held, (50, 100))?
        .with_context(|| format!("{who}'s {held} ehash are too little to redeem a tenth ({r})"))
}

#[when(
    expr = "{string} and {string} redeem at the same time, a tenth of what each one's ehash is worth"
)]
async fn concurrent(w: &mut HarnessWorld, a: String, b: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let mut prepared = Vec::new();
    for who in [&a, &b] {
        let sats = tenth_of_worth(w, who).await?;
        let invoice = stack
            .lightning(who)?
            .invoice(sats, &format!("redeem-{who}-concurrent"))
            .await?;
        // Two at once: each quote's rate depends on which came first, so the rate is not
        // checked here (the sweep checks the totals).
        let before = BeforeRedemption {
            channel_sat: channel_sat(w, who).await?,
            held: stack.proxy(who)?.wallet_status().await?.held,
            outstanding: 0,
            available_msat: 0,
            invoice_sat: sats,
        };
        prepared.push((who.clone(), invoice, before));
    }
    let timeout = harness::wait::scaled(REDEEM_TIMEOUT);
    let (pa, pb) = (stack.proxy(&a)?, stack.proxy(&b)?);
    let (ra, rb) = tokio::join!(
        pa.redeem(&prepared[0].1, timeout),
        pb.redeem(&prepared[1].1, timeout)
    );
    for ((who, _, before), r) in prepared.into_iter().zip([ra?, rb?]) {
        let r = r.map_err(|e| anyhow::anyhow!("the redemption of {who} failed: {e}"))?;
        w.redemptions.push((who, before, Some(r)));
    }
    Ok(())
}

#[then(
    expr = "the redemption of {string} is PAID: its node holds the invoice's sats more in its channel and its wallet holds what was melted less"
)]
async fn paid(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let (_, before, r) = w
        .redemptions
        .iter()
        .rev()
        .find(|(n, _, _)| *n == who)
        .cloned()
        .context("no redemption")?;
    let r = r.context("that redemption was refused")?;
    anyhow::ensure!(r["state"] == "PAID", "the redemption is {}", r["state"]);
    let stack = w.default_stack()?;
    let node = stack.lightning(&who)?;
    let want = before.channel_sat + before.invoice_sat;
    harness::wait::wait_until(
        &format!("{who}'s channel to hold {want} sat"),
        Duration::from_secs(10),
        || async {
            let now = node.balances().await.map_err(|e| e.to_string())?.1;
            if now == want {
                Ok(())
            } else {
                Err(format!("{now} sat"))
            }
        },
    )
    .await?;
    let melted = u(&r, "amount_ehash")? + u(&r, "fee_paid_ehash")?;
    if before.outstanding > 0 {
        // The rate, from what the pool's node says it sent and the reserve read before the
        // quote: ceil(msat sent * ehash outstanding / msat available).
        let preimage = hex::decode(r["preimage"].as_str().context("preimage")?)?;
        use bitcoin::hashes::{sha256, Hash};
        let hash = sha256::Hash::hash(&preimage).to_string();
        let sent = *pool_payments(w)
            .await?
            .get(&hash)
            .context("no complete payment of the pool's node for this redemption")?;
        let want = (u128::from(sent) * u128::from(before.outstanding))
            .div_ceil(u128::from(before.available_msat)) as u64;
        anyhow::ensure!(
            melted == want,
            "{melted} ehash melted for {sent} msat sent; at {} msat over {} ehash it costs {want}",
            before.available_msat,
            before.outstanding
        );
    }
    anyhow::ensure!(
        u(&r, "held_after")? == before.held - melted,
        "{who}'s wallet held {} ehash, melted {melted}, the redemption says it holds {}",
        before.held,
        r["held_after"]
    );
    let proxy = stack.proxy(&who)?;
    let want = before.held - melted;
    harness::wait::wait_until(
        &format!("{who}'s wallet status to report {want} ehash held"),
        Duration::from_secs(10),
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
    Ok(())
}

#[then("the mint's outstanding ehash fell by what was melted")]
async fn outstanding_fell(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let (_, before, r) = w.redemptions.last().cloned().context("no redemption")?;
    let r = r.context("that redemption was refused")?;
    let melted = u(&r, "amount_ehash")? + u(&r, "fee_paid_ehash")?;
    let now = u(
        &w.default_stack()?.mint()?.redemption_reserve().await?,
        "outstanding_ehash",
    )?;
    anyhow::ensure!(
        now == before.outstanding - melted,
        "outstanding ehash was {}, {melted} melted, now {now}",
        before.outstanding
    );
    Ok(())
}

#[then(
    expr = "the redemption is refused with {string} and {string}'s wallet and node are unchanged"
)]
async fn refused(w: &mut HarnessWorld, text: String, who: String) -> anyhow::Result<()> {
    let err = w.last_error.clone().context("no refusal")?;
    anyhow::ensure!(err.contains(&text), "the refusal says {err:?}");
    let before = before_last(w, &who)?;
    let stack = w.default_stack()?;
    let held = stack.proxy(&who)?.wallet_status().await?.held;
    let channel = channel_sat(w, &who).await?;
    anyhow::ensure!(
        held == before.held && channel == before.channel_sat,
        "{who} held {} ehash and {} sat, now {held} ehash and {channel} sat",
        before.held,
        before.channel_sat
    );
    Ok(())
}

/// Every complete payment of the pool's node, by payment hash: msat sent.
async fn pool_payments(w: &HarnessWorld) -> anyhow::Result<HashMap<String, u64>> {
    harness::money_sweep::node_payments(w.default_stack()?.lightning("pool")?).await
}

#[then(
    "every PAID redemption is one payment of the pool's node, and the sats redeemed never exceed the matured rewards minus the pool fee"
)]
async fn accounted(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let rewards = stack.rewards().context("no rewards chain")?;
    let pays = pool_payments(w).await?;
    let paid: Vec<&Value> = w
        .redemptions
        .iter()
        .filter_map(|(_, _, r)| r.as_ref())
        .filter(|r| r["state"] == "PAID")
        .collect();
    // The redemptions' preimages hash to payments the node completed, one each.
    let mut hashes = std::collections::HashSet::new();
    for r in &paid {
        let preimage = hex::decode(r["preimage"].as_str().context("preimage")?)?;
        use bitcoin::hashes::{sha256, Hash};
        let hash = sha256::Hash::hash(&preimage).to_string();
        anyhow::ensure!(
            pays.contains_key(&hash),
            "no complete payment for preimage of {hash}"
        );
        anyhow::ensure!(hashes.insert(hash.clone()), "two redemptions paid {hash}");
    }
    anyhow::ensure!(
        pays.len() == paid.len(),
        "the pool's node completed {} payments, {} redemptions were PAID",
        pays.len(),
        paid.len()
    );
    let sent: u64 = pays.values().sum();
    let reserve = stack.mint()?.redemption_reserve().await?;
    anyhow::ensure!(
        u(&reserve, "redeemed_msat")? == sent,
        "the mint counts {} msat redeemed, the pool's node sent {sent}",
        reserve["redeemed_msat"]
    );
    // Rewards as Bitcoin Core counted them when the rewards chain was checked (the pool's
    // own blocks in a scenario are far from maturity).
    anyhow::ensure!(
        u(&reserve, "matured_sat")? == rewards.rewards_sats,
        "the mint counts {} sat matured, Bitcoin Core {}",
        reserve["matured_sat"],
        rewards.rewards_sats
    );
    let ceiling = rewards.rewards_sats * 1000 / 1_000_000 * (1_000_000 - POOL_FEE_PPM);
    anyhow::ensure!(
        sent <= ceiling,
        "{sent} msat redeemed, more than matured rewards minus the pool fee ({ceiling} msat)"
    );
    Ok(())
}
