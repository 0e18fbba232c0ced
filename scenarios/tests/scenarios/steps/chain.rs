//! Chain steps: stacks on a chain, mining, the faucet.

use std::time::Duration;

use anyhow::{anyhow, Context};
use bitcoin::secp256k1::{rand, Secp256k1};
use bitcoin::{Address, Amount, CompressedPublicKey};
use cucumber::{given, then, when};
use harness::wait::wait_until;
use serde_json::{json, Value};

use super::ChainParam;
use crate::world::{HarnessWorld, DEFAULT_STACK};

#[given(expr = "a {chain} stack")]
async fn a_stack(w: &mut HarnessWorld, chain: ChainParam) -> anyhow::Result<()> {
    w.start_stack(DEFAULT_STACK, Some(chain.0), true).await
}

#[given(expr = "a {chain} stack {string}")]
async fn a_named_stack(
    w: &mut HarnessWorld,
    chain: ChainParam,
    name: String,
) -> anyhow::Result<()> {
    w.start_stack(&name, Some(chain.0), true).await
}

fn new_address(w: &mut HarnessWorld) -> anyhow::Result<Address> {
    let chain = w
        .default_stack()?
        .chain()
        .ok_or_else(|| anyhow!("no chain"))?;
    let secp = Secp256k1::new();
    let (_, pk) = secp.generate_keypair(&mut rand::thread_rng());
    let address = Address::p2wpkh(&CompressedPublicKey(pk), chain.network());
    w.address = Some(address.clone());
    Ok(address)
}

#[then(expr = "the chain is {string} at the pre-mined height")]
async fn chain_is(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let info = stack.bitcoind()?.chain_info().await?;
    let expected = stack.chain().map(|c| c.premine_blocks());
    anyhow::ensure!(
        info.chain == name,
        "bitcoind reports chain {:?}, expected {name:?}",
        info.chain
    );
    anyhow::ensure!(
        Some(info.blocks) == expected,
        "height {} but the cache has {expected:?}",
        info.blocks
    );
    anyhow::ensure!(
        !info.initialblockdownload,
        "bitcoind is in initial block download"
    );
    w.tip_before = Some((info.blocks, info.bestblockhash));
    Ok(())
}

#[given(expr = "{int} block(s) was/were mined to a new address")]
async fn given_mined(w: &mut HarnessWorld, n: u64) -> anyhow::Result<()> {
    mine_to_new_address(w, n).await
}

#[when(expr = "{int} block(s) is/are mined to a new address")]
async fn mine_to_new_address(w: &mut HarnessWorld, n: u64) -> anyhow::Result<()> {
    let address = new_address(w)?;
    let bitcoind = w.default_stack()?.bitcoind()?;
    let info = bitcoind.chain_info().await?;
    let mined = bitcoind.generate_to_address(n, &address).await?;
    w.tip_before = Some((info.blocks, info.bestblockhash));
    w.mined = mined;
    Ok(())
}

#[when(expr = "{int} block(s) is/are mined")]
async fn mine(w: &mut HarnessWorld, n: u64) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let to = stack.faucet()?.address().clone();
    w.mined = stack.bitcoind()?.generate_to_address(n, &to).await?;
    Ok(())
}

#[then(expr = "the height has risen by {int}")]
async fn height_risen(w: &mut HarnessWorld, n: u64) -> anyhow::Result<()> {
    let (before, _) = w.tip_before.context("no height remembered")?;
    let now = w.default_stack()?.bitcoind()?.height().await?;
    anyhow::ensure!(now == before + n, "height {now}, expected {before} + {n}");
    Ok(())
}

#[then("each new block's coinbase pays the new address")]
async fn coinbase_pays(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let address = w.address.clone().context("no address")?;
    let bitcoind = w.default_stack()?.bitcoind()?;
    anyhow::ensure!(!w.mined.is_empty(), "no blocks were mined");
    for hash in &w.mined {
        let block = bitcoind.block_json(hash).await?;
        let coinbase = &block["tx"][0];
        anyhow::ensure!(
            coinbase["vin"][0].get("coinbase").is_some(),
            "first tx of {hash} is not a coinbase"
        );
        let pays = coinbase["vout"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|out| {
                out["scriptPubKey"]["address"].as_str() == Some(&address.to_string())
                    && out["value"].as_f64().unwrap_or(0.0) > 0.0
            });
        anyhow::ensure!(
            pays,
            "coinbase of {hash} does not pay {address}: {}",
            coinbase["vout"]
        );
    }
    Ok(())
}

#[when(expr = "the faucet sends {float} BTC to a new address")]
async fn faucet_sends(w: &mut HarnessWorld, btc: f64) -> anyhow::Result<()> {
    let address = new_address(w)?;
    let stack = w.default_stack()?;
    let amount = Amount::from_btc(btc)?;
    let payment = stack
        .faucet()?
        .send(stack.bitcoind()?.rpc(), &address, amount)
        .await?;
    w.payment = Some(payment);
    Ok(())
}

async fn txout(w: &HarnessWorld) -> anyhow::Result<Value> {
    let p = w.payment.as_ref().context("no faucet payment")?;
    let rpc = w.default_stack()?.bitcoind()?.rpc();
    Ok(rpc
        .call(
            "gettxout",
            &[json!(p.txid.to_string()), json!(p.vout), json!(true)],
        )
        .await?)
}

#[then("the payment is in the mempool")]
async fn payment_in_mempool(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let out = txout(w).await?;
    anyhow::ensure!(out["confirmations"] == json!(0), "gettxout: {out}");
    Ok(())
}

#[then(expr = "the payment is confirmed with {int} confirmation(s)")]
async fn payment_confirmed(w: &mut HarnessWorld, confirmations: u64) -> anyhow::Result<()> {
    let p = w.payment.clone().context("no faucet payment")?;
    let address = w.address.clone().context("no address")?;
    let out = txout(w).await?;
    anyhow::ensure!(
        out["confirmations"] == json!(confirmations),
        "gettxout: {out}"
    );
    let value = Amount::from_btc(out["value"].as_f64().unwrap_or(-1.0))
        .map_err(|e| anyhow!("{e}: {out}"))?;
    anyhow::ensure!(
        value == p.amount,
        "gettxout value {value}, sent {}",
        p.amount
    );
    anyhow::ensure!(
        out["scriptPubKey"]["address"].as_str() == Some(&address.to_string()),
        "gettxout pays {}, not {address}",
        out["scriptPubKey"]["address"]
    );
    Ok(())
}

#[then(expr = "stack {string} is at height {int} above the pre-mined chain")]
async fn stack_height(w: &mut HarnessWorld, name: String, above: u64) -> anyhow::Result<()> {
    let stack = w.stack(&name)?;
    let expected = stack.chain().map(|c| c.premine_blocks()).unwrap_or(0) + above;
    let bitcoind = stack.bitcoind()?;
    wait_until(
        &format!("stack {name} at height {expected}"),
        Duration::from_secs(5),
        || async {
            match bitcoind.height().await {
                Ok(h) if h == expected => Ok(()),
                Ok(h) => Err(format!("height {h}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    Ok(())
}

#[when(expr = "{int} block(s) is/are mined on stack {string}")]
async fn mine_on(w: &mut HarnessWorld, n: u64, name: String) -> anyhow::Result<()> {
    let stack = w.stack(&name)?;
    let to = stack.faucet()?.address().clone();
    stack.bitcoind()?.generate_to_address(n, &to).await?;
    Ok(())
}
