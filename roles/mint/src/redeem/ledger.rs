//! What the pool can redeem: matured rewards counted from bitcoind, minus the pool's fee,
//! minus sats already paid or held for payments in flight; and the terms of each melt quote.
//!
//! Kept in cdk's database (primary namespace `redeem`), so a melt quote's terms and a
//! payment's hold survive a crash: `quote/<quote id>` -> [`QuoteTerms`],
//! `held/<quote id>` -> `<msat>:<ehash>` held while its payment is in flight,
//! `paid/<quote id>` -> msat spent (amount + routing fee), `hash/<payment hash>` -> the quote
//! being paid (written with its hold).
//!
//! A hold (and the hash's quote) is written before the payment is dispatched and released only
//! when Lightning says the payment failed, so a crash between the two can only hold sats back,
//! never pay twice from the same reserve; a payment hash no hold names was never dispatched.

use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, Context};
use bitcoind_rpc::BitcoinRpc;
use cdk::mint::Mint;
use cdk_common::database::DynKVStore;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;

const NS: &str = "redeem";
/// Confirmations a coinbase needs before it may be spent (consensus).
pub const COINBASE_MATURITY: u64 = 100;

/// The fixed terms of one melt quote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuoteTerms {
    /// The invoice's amount, msat.
    pub invoice_msat: u64,
    /// Routing fee reserve, msat.
    pub fee_reserve_msat: u64,
    /// The rate's numerator: redeemable msat when quoted.
    pub rate_msat: u64,
    /// The rate's denominator: ehash outstanding when quoted.
    pub rate_ehash: u64,
    /// ehash the invoice costs.
    pub amount_ehash: u64,
    /// ehash the fee reserve costs.
    pub fee_ehash: u64,
    /// The invoice's payment hash (hex).
    pub payment_hash: String,
    /// When the quote was made (Unix seconds).
    pub created_at: u64,
}

impl QuoteTerms {
    /// msat converted to ehash at the quote's rate, rounded up.
    pub fn to_ehash(&self, msat: u64) -> u64 {
        to_ehash(msat, self.rate_msat, self.rate_ehash)
    }

    /// Whether `reserve` pays less per ehash than this quote (the quote is then stale).
    pub fn rate_above(&self, reserve: &Reserve) -> bool {
        u128::from(reserve.available_msat) * u128::from(self.rate_ehash)
            < u128::from(self.rate_msat) * u128::from(reserve.outstanding_ehash)
    }
}

/// msat converted at `rate_msat / rate_ehash`, rounded up (the pool never gives away a part).
pub fn to_ehash(msat: u64, rate_msat: u64, rate_ehash: u64) -> u64 {
    if rate_msat == 0 {
        return u64::MAX;
    }
    let n = u128::from(msat) * u128::from(rate_ehash);
    u64::try_from(n.div_ceil(u128::from(rate_msat))).unwrap_or(u64::MAX)
}

/// The reserve as the mint sees it now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reserve {
    /// Tip height the rewards were counted at.
    pub height: u64,
    /// Coinbase outputs to the payout address at least 100 blocks deep, sats.
    pub matured_sat: u64,
    /// The pool's fee on them, sats.
    pub pool_fee_sat: u64,
    /// Paid out over Lightning (amount + routing fees), msat.
    pub redeemed_msat: u64,
    /// Held for payments in flight, msat.
    pub held_msat: u64,
    /// ehash of the melts in flight (their inputs are still unspent at cdk).
    pub held_ehash: u64,
    /// Redemptions paid (one Lightning payment each).
    pub payments: u64,
    /// What may still be redeemed, msat.
    pub available_msat: u64,
    /// ehash owed and not melted: issued and unspent, plus PAID quotes not minted yet, less
    /// the melts in flight.
    pub outstanding_ehash: u64,
}

impl Reserve {
    /// msat per ehash, as a decimal string (0 when nothing is outstanding).
    pub fn rate_msat_per_ehash(&self) -> f64 {
        if self.outstanding_ehash == 0 {
            0.0
        } else {
            self.available_msat as f64 / self.outstanding_ehash as f64
        }
    }
}

/// msat of the routing fee reserve for an invoice of `invoice_msat`.
pub fn fee_reserve_msat(invoice_msat: u64, ppm: u64, min_msat: u64) -> u64 {
    let fee = u128::from(invoice_msat) * u128::from(ppm) / 1_000_000;
    u64::try_from(fee).unwrap_or(u64::MAX).max(min_msat)
}

#[derive(Debug, Default)]
struct Scan {
    /// Heights below this are counted.
    next: u64,
    matured_sat: u64,
}

/// The redemption ledger.
pub struct Ledger {
    kv: DynKVStore,
    rpc: BitcoinRpc,
    payout_script: String,
    pool_fee_ppm: u64,
    /// Routing fee reserve: parts per million of the invoice, at least this many msat.
    pub(crate) fee_reserve: (u64, u64),
    mint: OnceLock<Arc<Mint>>,
    scan: Mutex<Scan>,
    /// Held across "check the reserve, then hold": two melts cannot both take the last sats.
    pub(crate) hold_lock: Mutex<()>,
}

fn kv_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("database: {e}")
}

impl Ledger {
    /// A ledger over `kv`, counting coinbases that pay `payout_script` (hex).
    pub fn new(
        kv: DynKVStore,
        rpc: BitcoinRpc,
        payout_script: String,
        pool_fee_ppm: u64,
        fee_reserve: (u64, u64),
    ) -> Self {
        Self {
            kv,
            rpc,
            payout_script,
            pool_fee_ppm,
            fee_reserve,
            mint: OnceLock::new(),
            scan: Mutex::new(Scan::default()),
            hold_lock: Mutex::new(()),
        }
    }

    /// The mint whose outstanding ehash sets the rate (set once it is built).
    pub fn set_mint(&self, mint: Arc<Mint>) {
        let _ = self.mint.set(mint);
    }

    /// Matured rewards: coinbase outputs to the payout script with 100 confirmations, counted
    /// incrementally from bitcoind.
    async fn matured(&self) -> anyhow::Result<(u64, u64)> {
        let tip: u64 = self.rpc.call("getblockcount", &[]).await?;
        let mut scan = self.scan.lock().await;
        // A coinbase at height h has tip - h + 1 confirmations.
        let last_mature = (tip + 1).checked_sub(COINBASE_MATURITY);
        if let Some(last) = last_mature {
            while scan.next <= last {
                let hash: String = self
                    .rpc
                    .call("getblockhash", &[Value::from(scan.next)])
                    .await?;
                let block: Value = self
                    .rpc
                    .call("getblock", &[Value::from(hash), Value::from(2)])
                    .await?;
                let coinbase = &block["tx"][0];
                for out in coinbase["vout"].as_array().into_iter().flatten() {
                    if out["scriptPubKey"]["hex"].as_str() == Some(&self.payout_script) {
                        let sats = bitcoin::Amount::from_btc(out["value"].as_f64().unwrap_or(0.0))
                            .context("coinbase output value")?
                            .to_sat();
                        scan.matured_sat += sats;
                    }
                }
                scan.next += 1;
            }
        }
        Ok((tip, scan.matured_sat))
    }

    /// (entries, sum of the first numbers, sum of the second numbers) of a secondary
    /// namespace whose values are `<n>` or `<n>:<m>`.
    async fn sum(&self, secondary: &str) -> anyhow::Result<(u64, u64, u64)> {
        let keys = self.kv.kv_list(NS, secondary).await.map_err(kv_err)?;
        let (mut first, mut second) = (0u64, 0u64);
        for k in &keys {
            if let Some(v) = self.kv.kv_read(NS, secondary, k).await.map_err(kv_err)? {
                let v = String::from_utf8_lossy(&v).into_owned();
                let mut parts = v.split(':');
                first += parts
                    .next()
                    .and_then(|p| p.parse::<u64>().ok())
                    .unwrap_or(0);
                second += parts
                    .next()
                    .and_then(|p| p.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Ok((keys.len() as u64, first, second))
    }

    async fn outstanding(&self) -> anyhow::Result<u64> {
        let mint = self.mint.get().context("the mint is not built yet")?;
        let issued: u64 = mint
            .total_issued()
            .await
            .map_err(|e| anyhow!("{e}"))?
            .values()
            .map(|a| u64::from(*a))
            .sum();
        let redeemed: u64 = mint
            .total_redeemed()
            .await
            .map_err(|e| anyhow!("{e}"))?
            .values()
            .map(|a| u64::from(*a))
            .sum();
        // PAID quotes not minted yet are owed as much as minted ehash.
        let unminted: u64 = mint
            .localstore()
            .get_mint_quotes()
            .await
            .map_err(|e| anyhow!("{e}"))?
            .iter()
            .map(|q| {
                q.amount_paid()
                    .value()
                    .saturating_sub(q.amount_issued().value())
            })
            .sum();
        Ok(issued.saturating_sub(redeemed).saturating_add(unminted))
    }

    /// The reserve now.
    pub async fn reserve(&self) -> anyhow::Result<Reserve> {
        let (height, matured_sat) = self.matured().await?;
        // Rounded up: the pool's fee never gives a fraction away.
        let pool_fee_sat = u64::try_from(
            (u128::from(matured_sat) * u128::from(self.pool_fee_ppm)).div_ceil(1_000_000),
        )
        .unwrap_or(u64::MAX)
        .min(matured_sat);
        // Held before paid: a payment settling in between is then counted (as paid), never
        // missed.
        let (_, held_msat, held_ehash) = self.sum("held").await?;
        let (payments, redeemed_msat, _) = self.sum("paid").await?;
        let available_msat = (matured_sat - pool_fee_sat)
            .saturating_mul(1000)
            .saturating_sub(redeemed_msat)
            .saturating_sub(held_msat);
        Ok(Reserve {
            height,
            matured_sat,
            pool_fee_sat,
            redeemed_msat,
            held_msat,
            held_ehash,
            payments,
            available_msat,
            outstanding_ehash: self.outstanding().await?.saturating_sub(held_ehash),
        })
    }

    /// The terms an invoice of `invoice_msat` gets now, or why the pool cannot redeem it (the
    /// text an operator reads).
    pub async fn quote(
        &self,
        invoice_msat: u64,
        payment_hash: String,
    ) -> anyhow::Result<(Result<QuoteTerms, String>, Reserve)> {
        let r = self.reserve().await?;
        if invoice_msat == 0 {
            return Ok((
                Err("the invoice has no amount: ask for one with an amount".into()),
                r,
            ));
        }
        if r.outstanding_ehash == 0 {
            return Ok((Err("no ehash is outstanding: nothing to redeem".into()), r));
        }
        let fee_reserve_msat =
            fee_reserve_msat(invoice_msat, self.fee_reserve.0, self.fee_reserve.1);
        let needed = invoice_msat.saturating_add(fee_reserve_msat);
        if needed > r.available_msat {
            let why = format!(
                "{}: the invoice asks {} sat plus a {} sat routing fee reserve, the pool can pay at most {} sat now (matured rewards {} sat - pool fee {} sat - redeemed {} sat - held {} sat)",
                super::OVER_RESERVE,
                invoice_msat / 1000,
                fee_reserve_msat.div_ceil(1000),
                r.available_msat / 1000,
                r.matured_sat,
                r.pool_fee_sat,
                r.redeemed_msat / 1000,
                r.held_msat / 1000,
            );
            return Ok((Err(why), r));
        }
        let (rate_msat, rate_ehash) = (r.available_msat, r.outstanding_ehash);
        let terms = QuoteTerms {
            invoice_msat,
            fee_reserve_msat,
            rate_msat,
            rate_ehash,
            amount_ehash: to_ehash(invoice_msat, rate_msat, rate_ehash),
            fee_ehash: to_ehash(fee_reserve_msat, rate_msat, rate_ehash),
            payment_hash,
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        Ok((Ok(terms), r))
    }

    /// Store a quote's terms.
    pub async fn put_terms(&self, quote_id: &str, terms: &QuoteTerms) -> anyhow::Result<()> {
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        tx.kv_write(NS, "quote", quote_id, &serde_json::to_vec(terms)?)
            .await
            .map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)
    }

    /// A quote's terms.
    pub async fn terms(&self, quote_id: &str) -> anyhow::Result<Option<QuoteTerms>> {
        let raw = self
            .kv
            .kv_read(NS, "quote", quote_id)
            .await
            .map_err(kv_err)?;
        raw.map(|b| serde_json::from_slice(&b).context("quote terms"))
            .transpose()
    }

    /// The quote paying `payment_hash`.
    pub async fn quote_of_hash(&self, payment_hash: &str) -> anyhow::Result<Option<String>> {
        let raw = self
            .kv
            .kv_read(NS, "hash", payment_hash)
            .await
            .map_err(kv_err)?;
        Ok(raw.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Hold the quote's msat (and count its ehash as melting) for a payment about to be
    /// dispatched, and name it as the quote paying its hash (call under `hold_lock`).
    pub async fn hold(&self, quote_id: &str, terms: &QuoteTerms) -> anyhow::Result<()> {
        let msat = terms.invoice_msat.saturating_add(terms.fee_reserve_msat);
        let ehash = terms.amount_ehash.saturating_add(terms.fee_ehash);
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        tx.kv_write(NS, "held", quote_id, format!("{msat}:{ehash}").as_bytes())
            .await
            .map_err(kv_err)?;
        tx.kv_write(NS, "hash", &terms.payment_hash, quote_id.as_bytes())
            .await
            .map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)
    }

    /// Whether the quote's sats are held (its payment was dispatched or about to be).
    pub async fn is_held(&self, quote_id: &str) -> anyhow::Result<bool> {
        Ok(self
            .kv
            .kv_read(NS, "held", quote_id)
            .await
            .map_err(kv_err)?
            .is_some())
    }

    /// Whether the quote's payment has been recorded as paid.
    pub async fn paid(&self, quote_id: &str) -> anyhow::Result<Option<u64>> {
        let raw = self
            .kv
            .kv_read(NS, "paid", quote_id)
            .await
            .map_err(kv_err)?;
        Ok(raw.map(|b| String::from_utf8_lossy(&b).parse().unwrap_or(0)))
    }

    /// The payment is final: `spent_msat` moves from held to redeemed (idempotent).
    pub async fn settle(&self, quote_id: &str, spent_msat: u64) -> anyhow::Result<()> {
        let _g = self.hold_lock.lock().await;
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        tx.kv_write_if_absent(NS, "paid", quote_id, spent_msat.to_string().as_bytes())
            .await
            .map_err(kv_err)?;
        tx.kv_remove(NS, "held", quote_id).await.map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)
    }

    /// The payment definitely failed: its hold is released.
    pub async fn release(&self, quote_id: &str) -> anyhow::Result<()> {
        let _g = self.hold_lock.lock().await;
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        tx.kv_remove(NS, "held", quote_id).await.map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)
    }
}

#[cfg(test)]
mod tests {
    use super::to_ehash;

    #[test]
    fn conversion_rounds_up_and_never_divides_by_zero() {
        // 1000 msat per ehash.
        assert_eq!(to_ehash(1000, 10_000, 10), 1);
        assert_eq!(to_ehash(1001, 10_000, 10), 2);
        assert_eq!(to_ehash(0, 10_000, 10), 0);
        assert_eq!(to_ehash(1, 0, 10), u64::MAX);
        // 150 BTC over 3 ehash: 10,000 sat costs one whole ehash.
        assert_eq!(to_ehash(10_000_000, 15_000_000_000_000, 3), 1);
    }
}
