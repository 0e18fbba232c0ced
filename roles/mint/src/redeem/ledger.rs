//! What the pool can redeem, kept in cdk's database (primary namespace `redeem`) so that a
//! melt quote's terms and a payment's hold survive a crash, with the running sums of
//! [`Tally`] updated in the same transaction as the entries they sum:
//!
//! - `quote/<quote id>` -> [`QuoteTerms`];
//! - `held/<quote id>` -> `<msat>:<ehash>:<unix secs>` while its payment is in flight;
//! - `paid/<quote id>` -> `<msat spent>:<ehash melted>`;
//! - `hash/<payment hash>` -> the quote whose payment was dispatched for it (one per hash:
//!   an invoice is paid by one melt at most);
//! - `refused/<quote id>` -> why its melt was refused or released (for the operator);
//! - `released/<quote id>` -> when its hold was released (unix secs): watched for a day in
//!   case Core Lightning completes the payment after all;
//! - `tally/<name>` -> the sums (`redeemed_msat`, `melted_ehash`, `held_msat`, `payments`);
//!   the quotes' sums are the ehash store's.
//!
//! A hold is written before the payment is dispatched and released only once Core Lightning
//! says the payment can no longer complete (see `mod.rs`), so a crash between the two holds
//! sats back for a while, never pays twice from the same reserve.
//!
//! Matured rewards are counted from bitcoind incrementally ([`super::matured`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context};
use bitcoind_rpc::BitcoinRpc;
use cdk_common::database::DynKVStore;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Mutex;

use super::matured::Scan;
pub use super::tally::{fee_reserve_msat, to_ehash, QuoteTerms, Reserve, Tally};
use crate::store::Store;

pub(super) const NS: &str = "redeem";
/// Confirmations a coinbase needs before it may be spent (consensus).
pub const COINBASE_MATURITY: u64 = 100;
/// Longest wait for one bitcoind answer: a paused node must not hang melts and `/metrics`.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// One held melt, as the resolver sees it.
#[derive(Debug, Clone)]
pub struct Hold {
    /// The melt quote.
    pub quote_id: String,
    /// msat held.
    pub msat: u64,
    /// When the hold was written (Unix seconds).
    pub since: u64,
}

/// A melt quote as `GET /v1/ehash/melt/{id}` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MeltView {
    /// The quote's terms.
    #[serde(flatten)]
    pub terms: QuoteTerms,
    /// What the invoice's ehash is worth beyond the invoice, msat.
    pub rounding_loss_msat: u64,
    /// The same, in parts per million of what the ehash is worth.
    pub rounding_loss_ppm: u64,
    /// `quoted`, `in_flight`, `paid` or `not_paid`.
    pub state: &'static str,
    /// msat spent, once paid.
    pub spent_msat: Option<u64>,
    /// ehash melted, once paid.
    pub melted_ehash: Option<u64>,
    /// Why it was refused or released, with what to do.
    pub reason: Option<String>,
}

/// The redemption ledger.
pub struct Ledger {
    pub(super) kv: DynKVStore,
    rpc: BitcoinRpc,
    pub(super) payout_script: String,
    pool_fee_ppm: u64,
    /// Routing fee reserve: parts per million of the invoice, at least this many msat.
    pub(crate) fee_reserve: (u64, u64),
    store: OnceLock<Arc<Store>>,
    pub(super) scan: Mutex<Scan>,
    /// Held across "check the reserve, then hold" and every change of a hold: two melts
    /// cannot both take the last sats, and a hold is settled or released once.
    pub(crate) hold_lock: Mutex<()>,
}

pub(super) fn kv_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("database: {e}")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The numbers of a `<n>:<m>:...` value.
fn numbers(raw: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(raw)
        .split(':')
        .map(|p| p.parse().unwrap_or(0))
        .collect()
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
            store: OnceLock::new(),
            scan: Mutex::new(Scan::default()),
            hold_lock: Mutex::new(()),
        }
    }

    /// The ehash store whose quote sums set the outstanding ehash (set once it is built).
    pub fn set_store(&self, store: Arc<Store>) {
        let _ = self.store.set(store);
    }

    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        params: &[Value],
    ) -> anyhow::Result<T> {
        Ok(self.rpc.call_timeout(method, params, RPC_TIMEOUT).await?)
    }

    async fn read_tally(&self) -> anyhow::Result<Tally> {
        let mut t = Tally::default();
        for (name, field) in [
            ("redeemed_msat", &mut t.redeemed_msat),
            ("melted_ehash", &mut t.melted_ehash),
            ("held_msat", &mut t.held_msat),
            ("payments", &mut t.payments),
        ] {
            *field = self
                .kv
                .kv_read(NS, "tally", name)
                .await
                .map_err(kv_err)?
                .and_then(|b| numbers(&b).first().copied())
                .unwrap_or(0);
        }
        let store = self.store.get().context("the ehash store is not set yet")?;
        (t.quoted_ehash, t.failed_ehash) = store.tallies().await?;
        Ok(t)
    }

    /// Write the ledger's sums of `t` in `tx`.
    async fn write_tally(
        tx: &mut Box<
            dyn cdk_common::database::KVStoreTransaction<cdk_common::database::Error> + Send + Sync,
        >,
        t: &Tally,
    ) -> anyhow::Result<()> {
        for (name, v) in [
            ("redeemed_msat", t.redeemed_msat),
            ("melted_ehash", t.melted_ehash),
            ("held_msat", t.held_msat),
            ("payments", t.payments),
        ] {
            tx.kv_write(NS, "tally", name, v.to_string().as_bytes())
                .await
                .map_err(kv_err)?;
        }
        Ok(())
    }

    /// The reserve now.
    pub async fn reserve(&self) -> anyhow::Result<Reserve> {
        let (height, matured_sat) = self.matured().await?;
        Ok(self
            .read_tally()
            .await?
            .reserve(height, matured_sat, self.pool_fee_ppm))
    }

    /// The terms an invoice of `invoice_msat` gets now, or why the pool cannot redeem it (the
    /// text an operator reads).
    pub async fn quote(
        &self,
        invoice_msat: u64,
        payment_hash: String,
    ) -> anyhow::Result<(Result<QuoteTerms, String>, Reserve)> {
        let r = self.reserve().await?;
        let fee = fee_reserve_msat(invoice_msat, self.fee_reserve.0, self.fee_reserve.1);
        Ok((r.terms(invoice_msat, fee, payment_hash, now_secs()), r))
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

    /// The quote whose payment was dispatched for `payment_hash`.
    pub async fn quote_of_hash(&self, payment_hash: &str) -> anyhow::Result<Option<String>> {
        let raw = self
            .kv
            .kv_read(NS, "hash", payment_hash)
            .await
            .map_err(kv_err)?;
        Ok(raw.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Hold the quote's msat for a payment about to be dispatched at `terms` (the quote's, or a
    /// lower rate it is paid at), and name it as the quote paying its hash (call under
    /// `hold_lock`). Refused (with the reason) if another quote's payment of the same invoice
    /// is in flight or done.
    pub async fn hold(
        &self,
        quote_id: &str,
        terms: &QuoteTerms,
    ) -> anyhow::Result<Result<(), String>> {
        if let Some(other) = self.quote_of_hash(&terms.payment_hash).await? {
            if other != quote_id
                && (self.is_held(&other).await? || self.paid(&other).await?.is_some())
            {
                return Ok(Err(format!(
                    "this invoice is already being paid, or was paid, by melt quote {other}: ask for a new invoice"
                )));
            }
        }
        let mut tally = self.read_tally().await?;
        tally.hold(terms.held_msat());
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        let ehash = terms.amount_ehash.saturating_add(terms.fee_ehash);
        tx.kv_write(
            NS,
            "held",
            quote_id,
            format!("{}:{ehash}:{}", terms.held_msat(), now_secs()).as_bytes(),
        )
        .await
        .map_err(kv_err)?;
        tx.kv_write(NS, "hash", &terms.payment_hash, quote_id.as_bytes())
            .await
            .map_err(kv_err)?;
        // The rate it is paid at (settled at that rate), and no reason of an earlier refusal.
        tx.kv_write(NS, "quote", quote_id, &serde_json::to_vec(terms)?)
            .await
            .map_err(kv_err)?;
        for stale in ["refused", "released"] {
            tx.kv_remove(NS, stale, quote_id).await.map_err(kv_err)?;
        }
        Self::write_tally(&mut tx, &tally).await?;
        tx.commit().await.map_err(kv_err)?;
        Ok(Ok(()))
    }

    async fn held(&self, quote_id: &str) -> anyhow::Result<Option<Vec<u64>>> {
        Ok(self
            .kv
            .kv_read(NS, "held", quote_id)
            .await
            .map_err(kv_err)?
            .map(|b| numbers(&b)))
    }

    /// Whether the quote's sats are held (its payment was dispatched or about to be).
    pub async fn is_held(&self, quote_id: &str) -> anyhow::Result<bool> {
        Ok(self.held(quote_id).await?.is_some())
    }

    /// Every hold, oldest first.
    pub async fn holds(&self) -> anyhow::Result<Vec<Hold>> {
        let mut out = Vec::new();
        for q in self.kv.kv_list(NS, "held").await.map_err(kv_err)? {
            if let Some(v) = self.held(&q).await? {
                out.push(Hold {
                    quote_id: q,
                    msat: v.first().copied().unwrap_or(0),
                    since: v.get(2).copied().unwrap_or(0),
                });
            }
        }
        out.sort_by_key(|h| h.since);
        Ok(out)
    }

    /// msat spent by the quote's payment, once recorded as paid.
    pub async fn paid(&self, quote_id: &str) -> anyhow::Result<Option<u64>> {
        let raw = self
            .kv
            .kv_read(NS, "paid", quote_id)
            .await
            .map_err(kv_err)?;
        Ok(raw.and_then(|b| numbers(&b).first().copied()))
    }

    /// The payment is final: `spent_msat` moves from held to redeemed and the melt takes
    /// `ehash` (idempotent: a second call changes nothing).
    pub async fn settle(&self, quote_id: &str, spent_msat: u64, ehash: u64) -> anyhow::Result<()> {
        let _g = self.hold_lock.lock().await;
        if self.paid(quote_id).await?.is_some() {
            return Ok(());
        }
        let held = self.held(quote_id).await?;
        let mut tally = self.read_tally().await?;
        tally.settle(
            held.as_ref().and_then(|v| v.first().copied()).unwrap_or(0),
            spent_msat,
            ehash,
        );
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        tx.kv_write(
            NS,
            "paid",
            quote_id,
            format!("{spent_msat}:{ehash}").as_bytes(),
        )
        .await
        .map_err(kv_err)?;
        if held.is_some() {
            tx.kv_remove(NS, "held", quote_id).await.map_err(kv_err)?;
        }
        Self::write_tally(&mut tx, &tally).await?;
        tx.commit().await.map_err(kv_err)
    }

    /// The payment can no longer complete: its hold goes (idempotent), and `why` is kept for
    /// the operator.
    pub async fn release(&self, quote_id: &str, why: &str) -> anyhow::Result<()> {
        let _g = self.hold_lock.lock().await;
        let held = self.held(quote_id).await?;
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        if let Some(v) = held {
            let mut tally = self.read_tally().await?;
            tally.release(v.first().copied().unwrap_or(0));
            tx.kv_remove(NS, "held", quote_id).await.map_err(kv_err)?;
            tx.kv_write(NS, "released", quote_id, now_secs().to_string().as_bytes())
                .await
                .map_err(kv_err)?;
            Self::write_tally(&mut tx, &tally).await?;
        }
        tx.kv_write(NS, "refused", quote_id, why.as_bytes())
            .await
            .map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)
    }

    /// A payment released earlier completed after all: its sats left (counted as redeemed and
    /// paid), though its ehash went back to the operator. Logged as the error it is. Counted
    /// only while, under the hold lock, the quote is neither held again nor paid and its invoice
    /// (`payment_hash`) is still its own (a new try, by it or another melt, settles its own
    /// payment); returns whether it was counted.
    pub async fn paid_after_release(
        &self,
        quote_id: &str,
        payment_hash: &str,
        spent_msat: u64,
    ) -> anyhow::Result<bool> {
        let _g = self.hold_lock.lock().await;
        if self.paid(quote_id).await?.is_some()
            || self.held(quote_id).await?.is_some()
            || self.quote_of_hash(payment_hash).await?.as_deref() != Some(quote_id)
        {
            return Ok(false);
        }
        let mut tally = self.read_tally().await?;
        tally.settle(0, spent_msat, 0);
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        tx.kv_write(NS, "paid", quote_id, format!("{spent_msat}:0").as_bytes())
            .await
            .map_err(kv_err)?;
        tx.kv_remove(NS, "released", quote_id)
            .await
            .map_err(kv_err)?;
        Self::write_tally(&mut tx, &tally).await?;
        tx.commit().await.map_err(kv_err)?;
        tracing::error!(
            quote = quote_id,
            spent_msat,
            "a payment whose hold was released completed: its sats are paid out and its ehash was returned"
        );
        Ok(true)
    }

    /// Every released payment still watched, with when it was released (unix secs).
    pub async fn released(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for q in self.kv.kv_list(NS, "released").await.map_err(kv_err)? {
            let at = self.kv.kv_read(NS, "released", &q).await.map_err(kv_err)?;
            out.push((
                q,
                at.and_then(|b| numbers(&b).first().copied()).unwrap_or(0),
            ));
        }
        Ok(out)
    }

    /// Stop watching the released payment of `quote_id` if it was released at `at` (a later
    /// release of it is watched anew).
    pub async fn unwatch(&self, quote_id: &str, at: u64) -> anyhow::Result<()> {
        let _g = self.hold_lock.lock().await;
        let now = self
            .kv
            .kv_read(NS, "released", quote_id)
            .await
            .map_err(kv_err)?
            .and_then(|b| numbers(&b).first().copied());
        if now != Some(at) {
            return Ok(());
        }
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        tx.kv_remove(NS, "released", quote_id)
            .await
            .map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)
    }

    /// Keep why a melt was refused before anything was held.
    pub async fn refuse(&self, quote_id: &str, why: &str) -> anyhow::Result<()> {
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        tx.kv_write(NS, "refused", quote_id, why.as_bytes())
            .await
            .map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)
    }

    /// A melt quote as the operator may see it, or `None` if the ledger has no such quote.
    pub async fn view(&self, quote_id: &str) -> anyhow::Result<Option<MeltView>> {
        let Some(terms) = self.terms(quote_id).await? else {
            return Ok(None);
        };
        let paid = self
            .kv
            .kv_read(NS, "paid", quote_id)
            .await
            .map_err(kv_err)?
            .map(|b| numbers(&b));
        let reason = self
            .kv
            .kv_read(NS, "refused", quote_id)
            .await
            .map_err(kv_err)?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let state = match (&paid, self.is_held(quote_id).await?, &reason) {
            (Some(_), _, _) => "paid",
            (None, true, _) => "in_flight",
            (None, false, Some(_)) => "not_paid",
            (None, false, None) => "quoted",
        };
        Ok(Some(MeltView {
            rounding_loss_msat: terms.rounding_loss_msat(),
            rounding_loss_ppm: terms.rounding_loss_ppm(),
            spent_msat: paid.as_ref().and_then(|v| v.first().copied()),
            melted_ehash: paid.as_ref().and_then(|v| v.get(1).copied()),
            terms,
            state,
            reason,
        }))
    }
}
