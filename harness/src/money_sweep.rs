//! The money part of the invariant sweep, for stacks that redeem over Lightning (and the
//! demo's closing check). Its oracles are not the mint's own tables: Core Lightning's record of
//! what the pool's node paid (`listpays`), Bitcoin Core's active chain (matured coinbases to
//! the payout address, read block by block), each operator wallet's own books (its proofs, its
//! mints and its melts) and the mint's answers to each key's signed lookup:
//!
//! - nothing is held for a payment in flight, and no wallet has a proof a melt holds;
//! - every complete payment of the pool's node is the payment of exactly one PAID melt of some
//!   wallet, and the mint counts exactly those payments and the msat they sent;
//! - per wallet: what it holds plus what its melts took equals what the mint's lookup shows
//!   issued for its key (the wallet's own `minted` counter may lag while a cdk saga is stuck
//!   in recovery; a difference is printed, not failed);
//! - the mint's outstanding ehash is every quote not FAILED of the known keys less what the
//!   wallets' melts took;
//! - the mint's matured rewards are Bitcoin Core's, and the sats paid out stay within them
//!   less the pool fee.

use std::collections::HashMap;

use anyhow::Context;
use serde_json::{json, Value};

use crate::ehash_api::lookup;
use crate::lightning::LightningNode;
use crate::roles::MintRole;
use crate::settlement_sweep::KnownKey;
use crate::Stack;

/// What the sweep found, for a one-line summary.
#[derive(Debug, Default)]
pub struct MoneyReport {
    /// Complete payments of the pool's node.
    pub payments: usize,
    /// msat they sent.
    pub sent_msat: u64,
    /// Matured rewards on the active chain, sats.
    pub matured_sat: u64,
    /// Wallets checked.
    pub wallets: usize,
}

impl std::fmt::Display for MoneyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} redemption(s), {} msat, each one payment of the pool's node and one PAID melt; {} wallet(s) balance (held + melted = minted); within {} sat of matured rewards minus the pool fee",
            self.payments, self.sent_msat, self.wallets, self.matured_sat
        )
    }
}

/// Every complete payment of `node`, by payment hash: msat sent.
pub async fn node_payments(node: &LightningNode) -> anyhow::Result<HashMap<String, u64>> {
    let pays = node.call("listpays", json!({})).await?;
    let mut out = HashMap::new();
    for p in pays["pays"].as_array().into_iter().flatten() {
        if p["status"] == "complete" {
            let hash = p["payment_hash"]
                .as_str()
                .context("payment_hash")?
                .to_string();
            let sent = p["amount_sent_msat"].as_u64().context("amount_sent_msat")?;
            anyhow::ensure!(
                out.insert(hash.clone(), sent).is_none(),
                "{hash} paid twice"
            );
        }
    }
    Ok(out)
}

/// Coinbase outputs to `address` at least 100 blocks deep on the active chain of the node
/// behind `rpc`, sats, read block by block.
pub async fn matured_on_chain(
    rpc: &bitcoind_rpc::BitcoinRpc,
    address: &str,
) -> anyhow::Result<u64> {
    let tip: u64 = rpc.call("getblockcount", &[]).await?;
    let mut sats = 0;
    // A coinbase at height h has tip - h + 1 confirmations.
    for h in 0..(tip + 1).saturating_sub(99) {
        let hash: String = rpc.call("getblockhash", &[json!(h)]).await?;
        let b: Value = rpc.call("getblock", &[json!(hash), json!(2)]).await?;
        for out in b["tx"][0]["vout"].as_array().into_iter().flatten() {
            if out["scriptPubKey"]["address"].as_str() == Some(address) {
                sats += bitcoin::Amount::from_btc(out["value"].as_f64().unwrap_or(0.0))?.to_sat();
            }
        }
    }
    Ok(sats)
}

fn u(v: &Value, key: &str) -> anyhow::Result<u64> {
    v[key].as_u64().with_context(|| format!("no {key} in {v}"))
}

/// The payment hash of a BOLT11 invoice (hex).
fn payment_hash(invoice: &str) -> anyhow::Result<String> {
    let inv: cdk::Bolt11Invoice = invoice
        .parse()
        .map_err(|e| anyhow::anyhow!("invoice {invoice}: {e}"))?;
    Ok(inv.payment_hash().to_string())
}

/// Check the money invariants of `stack` (see the module docs): `mint` redeems through
/// `node`, paying the rewards of `payout_address`, at a fee of `pool_fee_ppm`; `keys` are the
/// operator keys the caller knows. Returns the report, or the first broken invariant.
pub async fn sweep_money(
    stack: &Stack,
    mint: &MintRole,
    node: &LightningNode,
    payout_address: &str,
    pool_fee_ppm: u64,
    keys: &[KnownKey],
) -> anyhow::Result<MoneyReport> {
    let pays = node_payments(node).await?;
    let sent: u64 = pays.values().sum();
    let reserve = mint.redemption_reserve().await?;
    anyhow::ensure!(
        u(&reserve, "held_msat")? == 0,
        "{} msat still held for payments in flight once the stack is quiet",
        reserve["held_msat"]
    );
    anyhow::ensure!(
        u(&reserve, "payments")? == pays.len() as u64 && u(&reserve, "redeemed_msat")? == sent,
        "the mint counts {} redemption(s) and {} msat, the pool's node completed {} payment(s) of {sent} msat",
        reserve["payments"],
        reserve["redeemed_msat"],
        pays.len()
    );
    // Each wallet's books, and every complete payment matched to one PAID melt.
    let mut paid_by: HashMap<String, String> = HashMap::new();
    let mut melted_total = 0u64;
    let mut wallets = 0;
    for (name, proxy) in stack.proxies() {
        if proxy.wallet_addr.is_none() {
            continue;
        }
        wallets += 1;
        let st = proxy.fresh_wallet_status().await?;
        anyhow::ensure!(
            st.melting == 0,
            "wallet of {name}: {} ehash in proofs a melt still holds once the stack is quiet",
            st.melting
        );
        for m in proxy.wallet_melts().await? {
            if m["state"] != "PAID" {
                continue;
            }
            let invoice = m["invoice"].as_str().context("melt invoice")?;
            let hash = payment_hash(invoice)?;
            anyhow::ensure!(
                pays.contains_key(&hash),
                "wallet of {name}: melt {} is PAID, the pool's node completed no payment of {hash}",
                m["quote"]
            );
            if let Some(other) = paid_by.insert(hash.clone(), format!("{name} {}", m["quote"])) {
                anyhow::bail!(
                    "payment {hash} is claimed by two PAID melts: {other} and {name} {}",
                    m["quote"]
                );
            }
        }
        melted_total += st.melted;
        // What was minted is what the mint shows issued to the wallet's key (the wallet's own
        // counter is its self-report, checked below).
        let minted = match &proxy.locking_secret {
            Some(secret) => lookup(&mint.addr, secret)
                .await?
                .iter()
                .filter(|q| q.state == "ISSUED")
                .map(|q| q.amount)
                .sum(),
            None => st.minted,
        };
        anyhow::ensure!(
            st.held + st.melted == minted,
            "wallet of {name}: holds {} + melted {} != {minted} the mint issued to its key",
            st.held,
            st.melted,
        );
        if st.minted != minted {
            // cdk 0.18.3: a batch mint whose saga recovery hangs (see the README) keeps its
            // quotes reserved, so the wallet cannot mark them issued until it finishes.
            println!(
                "[sweep] note: wallet of {name} reports {} ehash minted, the mint issued {minted} (held + melted agree with the mint)",
                st.minted
            );
        }
    }
    for hash in pays.keys() {
        anyhow::ensure!(
            paid_by.contains_key(hash),
            "the pool's node completed payment {hash}, which no wallet's PAID melt made"
        );
    }
    // Outstanding: every quote not FAILED of the known keys, less what melts took.
    let mut owed = 0u64;
    for k in keys {
        owed += lookup(&mint.addr, &k.secret)
            .await?
            .iter()
            .filter(|q| q.audit_status != "FAILED")
            .map(|q| q.amount)
            .sum::<u64>();
    }
    anyhow::ensure!(
        u(&reserve, "outstanding_ehash")? == owed.saturating_sub(melted_total),
        "the mint counts {} ehash outstanding; the known keys' quotes not FAILED are {owed} and the wallets' melts took {melted_total}",
        reserve["outstanding_ehash"]
    );
    let matured = matured_on_chain(stack.bitcoind()?.rpc(), payout_address).await?;
    anyhow::ensure!(
        u(&reserve, "matured_sat")? == matured,
        "the mint counts {} sat of matured rewards, Bitcoin Core's active chain {matured}",
        reserve["matured_sat"]
    );
    let fee = (u128::from(matured) * u128::from(pool_fee_ppm)).div_ceil(1_000_000) as u64;
    anyhow::ensure!(
        u128::from(sent) <= u128::from(matured - fee.min(matured)) * 1000,
        "{sent} msat paid out, more than the matured rewards {matured} sat minus the pool fee {fee} sat"
    );
    Ok(MoneyReport {
        payments: pays.len(),
        sent_msat: sent,
        matured_sat: matured,
        wallets,
    })
}
