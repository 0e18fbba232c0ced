//! Redemption: ehash melted (NUT-05) against a BOLT11 invoice of the operator's own node.
//!
//! A melt quote fixes the rate; `GET /v1/ehash/melt/{id}` on the mint tells what the quote's
//! ehash is worth beyond the invoice (ehash are whole: rounding up loses a part of one), and the
//! wallet refuses a melt that would lose more than `max_rounding_loss_ppm` of its value unless
//! told to accept it. A melt the mint refuses or cannot pay comes back with the mint's reason
//! and what to do; its proofs are back in the wallet.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use cdk::nuts::PaymentMethod;
use cdk::wallet::Wallet;
use serde::{Deserialize, Serialize};

use super::OperatorWallet;

/// How long a redemption waits for a payment the mint reports pending.
const PENDING_MELT_WAIT: Duration = Duration::from_secs(30);

/// What a redemption is told.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RedeemOptions {
    /// A BOLT11 invoice with an amount, from the operator's own node (a new quote is made).
    #[serde(default)]
    pub invoice: Option<String>,
    /// A melt quote made earlier (`wallet quote`) to pay instead.
    #[serde(default)]
    pub quote: Option<String>,
    /// Melt even if rounding loses more than the wallet's limit.
    #[serde(default)]
    pub accept_loss: bool,
}

/// A melt quote as the operator sees it before paying (`wallet quote`, `POST /wallet/quote`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeltQuoteView {
    /// The mint's melt quote.
    pub quote: String,
    /// The invoice's amount, sats.
    pub invoice_sat: u64,
    /// ehash the invoice costs at the quote's rate.
    pub amount_ehash: u64,
    /// ehash set aside for routing fees (the unused part comes back).
    pub fee_reserve_ehash: u64,
    /// The quote's rate, msat per ehash.
    pub rate_msat_per_ehash: u64,
    /// What the invoice's ehash is worth beyond the invoice, msat: lost to rounding up.
    pub rounding_loss_msat: u64,
    /// The same, in parts per million of what that ehash is worth.
    pub rounding_loss_ppm: u64,
    /// Unix time the quote expires.
    pub expiry: u64,
}

/// What a redemption did (`POST /wallet/redeem`, `hashpool-proxy wallet redeem`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Redemption {
    /// The mint's melt quote.
    pub quote: String,
    /// `PAID`, `PENDING`, `UNPAID`, `FAILED` or `UNKNOWN` (NUT-05).
    pub state: String,
    /// The invoice's amount, sats.
    pub invoice_sat: u64,
    /// ehash the invoice cost at the quote's rate.
    pub amount_ehash: u64,
    /// ehash set aside for routing fees.
    pub fee_reserve_ehash: u64,
    /// ehash the routing fees cost.
    pub fee_paid_ehash: u64,
    /// What rounding lost, msat (see [`MeltQuoteView`]).
    pub rounding_loss_msat: u64,
    /// The payment's preimage, once paid.
    pub preimage: Option<String>,
    /// ehash held before and after.
    pub held_before: u64,
    /// ehash held after.
    pub held_after: u64,
    /// Why it was not paid, and what to do (the mint's word).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One melt as the wallet recorded it (`GET /wallet/melts`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeltRecord {
    /// The mint's melt quote.
    pub quote: String,
    /// The invoice.
    pub invoice: String,
    /// The quote's state as the wallet last saw it (`PAID`, `UNPAID`, `PENDING`, ...).
    pub state: String,
    /// ehash the melt took (inputs less change), once completed.
    pub melted: Option<u64>,
    /// The preimage, once paid.
    pub preimage: Option<String>,
}

/// Redeems beside the minting loop (`POST /wallet/redeem`).
#[derive(Clone)]
pub struct Redeemer {
    wallet: Wallet,
    mint_url: String,
    melt_lock: Arc<tokio::sync::Mutex<()>>,
    max_loss_ppm: u64,
}

impl OperatorWallet {
    /// What redeems beside the minting loop, refusing melts that lose more than
    /// `max_loss_ppm` to rounding unless told otherwise.
    pub fn redeemer(&self, max_loss_ppm: u64) -> Redeemer {
        Redeemer {
            wallet: self.wallet.clone(),
            mint_url: self.mint_url.clone(),
            melt_lock: self.melt_lock.clone(),
            max_loss_ppm,
        }
    }
}

/// The mint's view of a melt quote (`GET /v1/ehash/melt/{id}`).
async fn mint_view(mint_url: &str, quote: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("{mint_url}/v1/ehash/melt/{quote}");
    let resp = cdk_common::HttpClient::new()
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow!("{url}: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| anyhow!("{url}: {e}"))?;
    anyhow::ensure!(
        (200..300).contains(&status),
        "{url} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}

impl Redeemer {
    /// Every melt quote of the wallet with what its completed melt took.
    pub async fn melts(&self) -> anyhow::Result<Vec<MeltRecord>> {
        let done: std::collections::HashMap<String, u64> = self
            .wallet
            .list_transactions(Some(cdk::wallet::types::TransactionDirection::Outgoing))
            .await?
            .into_iter()
            .filter(|t| t.status == cdk_common::wallet::TransactionStatus::Completed)
            .filter_map(|t| {
                t.quote_id
                    .map(|q| (q, u64::from(t.amount) + u64::from(t.fee)))
            })
            .collect();
        Ok(self
            .wallet
            .localstore
            .get_melt_quotes()
            .await?
            .into_iter()
            .map(|q| MeltRecord {
                melted: done.get(&q.id).copied(),
                quote: q.id,
                invoice: q.request,
                state: q.state.to_string(),
                preimage: q.payment_proof,
            })
            .collect())
    }

    /// A melt quote for `invoice`, with what it costs and what rounding loses; nothing is
    /// spent.
    pub async fn quote(&self, invoice: &str) -> anyhow::Result<MeltQuoteView> {
        let bolt11: cdk::Bolt11Invoice = invoice
            .trim()
            .parse()
            .map_err(|e| anyhow!("not a BOLT11 invoice: {e}"))?;
        let invoice_sat = bolt11
            .amount_milli_satoshis()
            .context("the invoice has no amount: ask for one with an amount")?
            / 1000;
        let q = self
            .wallet
            .melt_quote(
                PaymentMethod::Known(cdk::nuts::nut00::KnownMethod::Bolt11),
                invoice.trim(),
                None,
                None,
            )
            .await
            .map_err(|e| anyhow!("the mint refused the melt quote: {e}"))?;
        self.view(&q.id, invoice_sat, q.expiry).await
    }

    async fn view(
        &self,
        quote: &str,
        invoice_sat: u64,
        expiry: u64,
    ) -> anyhow::Result<MeltQuoteView> {
        let v = mint_view(&self.mint_url, quote).await?;
        let n = |k: &str| v[k].as_u64().with_context(|| format!("no {k} in {v}"));
        Ok(MeltQuoteView {
            quote: quote.to_string(),
            invoice_sat,
            amount_ehash: n("amount_ehash")?,
            fee_reserve_ehash: n("fee_ehash")?,
            rate_msat_per_ehash: n("rate_msat")? / n("rate_ehash")?.max(1),
            rounding_loss_msat: n("rounding_loss_msat")?,
            rounding_loss_ppm: n("rounding_loss_ppm")?,
            expiry,
        })
    }

    /// Melt (one redemption at a time): a new quote for `opts.invoice`, or `opts.quote`.
    pub async fn redeem(&self, opts: &RedeemOptions) -> anyhow::Result<Redemption> {
        let _g = self.melt_lock.lock().await;
        let wallet = &self.wallet;
        let view = match (&opts.invoice, &opts.quote) {
            (Some(invoice), None) => self.quote(invoice).await?,
            (None, Some(id)) => {
                let q = wallet
                    .localstore
                    .get_melt_quote(id)
                    .await?
                    .with_context(|| {
                        format!(
                            "this wallet has no melt quote {id}: ask for one with `wallet quote`"
                        )
                    })?;
                let bolt11: cdk::Bolt11Invoice = q
                    .request
                    .parse()
                    .map_err(|e| anyhow!("quote {id}: not a BOLT11 invoice: {e}"))?;
                let sat = bolt11.amount_milli_satoshis().unwrap_or(0) / 1000;
                self.view(id, sat, q.expiry).await?
            }
            _ => anyhow::bail!("give either an invoice or a quote to pay"),
        };
        if view.rounding_loss_ppm > self.max_loss_ppm && !opts.accept_loss {
            anyhow::bail!(
                "the invoice costs {} ehash, worth {:.3} sat at the mint's rate of {} msat per ehash: {:.3} sat ({:.2} %) of it would be lost to rounding (ehash are whole), more than this wallet's limit of {:.2} %; redeem a larger invoice, or accept the loss (--accept-loss); nothing was spent (quote {})",
                view.amount_ehash,
                (view.invoice_sat * 1000 + view.rounding_loss_msat) as f64 / 1000.0,
                view.rate_msat_per_ehash,
                view.rounding_loss_msat as f64 / 1000.0,
                view.rounding_loss_ppm as f64 / 10_000.0,
                self.max_loss_ppm as f64 / 10_000.0,
                view.quote
            );
        }
        let held_before = u64::from(wallet.total_balance().await?);
        let needed = view.amount_ehash + view.fee_reserve_ehash;
        anyhow::ensure!(
            needed <= held_before,
            "the invoice costs {} ehash plus {} ehash of fee reserve at the mint's rate, the wallet holds {held_before}: nothing was spent",
            view.amount_ehash,
            view.fee_reserve_ehash
        );
        let prepared = wallet
            .prepare_melt(&view.quote, std::collections::HashMap::new())
            .await
            .map_err(|e| anyhow!("preparing the melt of quote {}: {e}", view.quote))?;
        let outcome = match prepared.confirm_prefer_async().await {
            Ok(o) => o,
            // The mint refused it (before it started: 30012) and the wallet took the proofs
            // back; cdk reports only "Payment failed", the mint keeps the reason.
            Err(e) => {
                let v = mint_view(&self.mint_url, &view.quote).await.ok();
                let state = v
                    .as_ref()
                    .and_then(|v| v["state"].as_str().map(str::to_string));
                let reason = v.and_then(|v| v["reason"].as_str().map(str::to_string));
                match (state.as_deref(), reason) {
                    (Some("not_paid"), Some(why)) => anyhow::bail!(
                        "melt of quote {} refused by the mint: {why}; nothing was spent",
                        view.quote
                    ),
                    (state, _) => anyhow::bail!(
                        "melt of quote {}: {e} (the mint has it {}); `hashpool-proxy wallet balance` shows what the wallet holds",
                        view.quote,
                        state.unwrap_or("unknown")
                    ),
                }
            }
        };
        let (state, preimage) = match outcome {
            cdk::wallet::MeltOutcome::Paid(done) => {
                (done.state(), done.payment_proof().map(str::to_string))
            }
            cdk::wallet::MeltOutcome::Pending(pending) => {
                drop(pending);
                wait_final(wallet, &view.quote).await?
            }
        };
        let held_after = u64::from(wallet.total_balance().await?);
        let paid = state == cdk::nuts::MeltQuoteState::Paid;
        // Spent = amount + fee; the change came back.
        let fee_paid = if paid {
            held_before
                .saturating_sub(held_after)
                .saturating_sub(view.amount_ehash)
        } else {
            0
        };
        let reason = if paid {
            None
        } else {
            mint_view(&self.mint_url, &view.quote)
                .await
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_string))
        };
        tracing::info!(
            quote = %view.quote,
            state = %state,
            invoice_sat = view.invoice_sat,
            amount = view.amount_ehash,
            fee_paid,
            reason = reason.as_deref().unwrap_or(""),
            "redemption"
        );
        Ok(Redemption {
            quote: view.quote.clone(),
            state: state.to_string(),
            invoice_sat: view.invoice_sat,
            amount_ehash: view.amount_ehash,
            fee_reserve_ehash: view.fee_reserve_ehash,
            fee_paid_ehash: fee_paid,
            rounding_loss_msat: view.rounding_loss_msat,
            preimage,
            held_before,
            held_after,
            reason,
        })
    }
}

/// Ask the mint about a melt it reported pending until it is final or the wait is over (the
/// wallet's loop keeps asking after that).
async fn wait_final(
    wallet: &Wallet,
    quote: &str,
) -> anyhow::Result<(cdk::nuts::MeltQuoteState, Option<String>)> {
    let deadline = tokio::time::Instant::now() + PENDING_MELT_WAIT;
    loop {
        let q = wallet
            .check_melt_quote_status(quote)
            .await
            .map_err(|e| anyhow!("melt quote {quote} status: {e}"))?;
        // Final only once the melt's saga is over (until then the local state is the one from
        // before the melt).
        let done = q.used_by_operation.is_none()
            && !matches!(
                q.state,
                cdk::nuts::MeltQuoteState::Pending | cdk::nuts::MeltQuoteState::Unknown
            );
        if done {
            return Ok((q.state, q.payment_proof.clone()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok((cdk::nuts::MeltQuoteState::Pending, None));
        }
        // The poll interval of a bounded wait on the mint.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// POST `body` to the running proxy's `path` on `http_listen` (loopback); `None` when no
/// proxy listens there (the caller may open the wallet itself).
async fn via_proxy(
    http_listen: &str,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<Option<bytes_or_error::Answer>> {
    if http_listen.is_empty() {
        return Ok(None);
    }
    // The proxy takes redemptions only from loopback: dial it there, on its port.
    let port = http_listen
        .rsplit_once(':')
        .map(|(_, p)| p)
        .unwrap_or(http_listen);
    let url = format!("http://127.0.0.1:{port}{path}");
    match cdk_common::HttpClient::new().post(&url).json(&body).send().await {
        Ok(resp) => {
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| anyhow!("{url}: {e}"))?;
            Ok(Some(bytes_or_error::Answer::of(status, &body)))
        }
        // Only when nothing listens may this process open the wallet itself: a proxy that
        // took the request may be melting already.
        Err(e) if e.to_string().to_lowercase().contains("connection refused") => {
            tracing::debug!("no running proxy at {url} ({e}); opening the wallet");
            Ok(None)
        }
        Err(e) => anyhow::bail!(
            "the running proxy at {url} did not answer ({e}); check `hashpool-proxy wallet balance` before trying again"
        ),
    }
}

mod bytes_or_error {
    /// A proxy's answer: its JSON on success, its error text otherwise.
    pub enum Answer {
        Ok(Vec<u8>),
        Err(String),
    }

    impl Answer {
        pub fn of(status: u16, body: &[u8]) -> Self {
            if status == 200 {
                return Answer::Ok(body.to_vec());
            }
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            Answer::Err(
                v["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
            )
        }

        pub fn into_result<T: serde::de::DeserializeOwned>(self) -> anyhow::Result<T> {
            match self {
                Answer::Ok(b) => Ok(serde_json::from_slice(&b)?),
                Answer::Err(e) => anyhow::bail!("{e}"),
            }
        }
    }
}

/// `hashpool-proxy wallet redeem`: through the running proxy's `POST /wallet/redeem` when it
/// answers on `http_listen` (one melt at a time with its minting loop), else by opening the
/// wallet here.
pub async fn redeem_with(
    mint_url: &str,
    secret_hex: &str,
    data_dir: &Path,
    http_listen: &str,
    max_loss_ppm: u64,
    opts: &RedeemOptions,
) -> anyhow::Result<Redemption> {
    if let Some(answer) =
        via_proxy(http_listen, "/wallet/redeem", serde_json::to_value(opts)?).await?
    {
        return answer.into_result();
    }
    let w = OperatorWallet::open(mint_url, secret_hex, data_dir).await?;
    w.redeemer(max_loss_ppm).redeem(opts).await
}

/// `hashpool-proxy wallet quote`: a melt quote and what it costs, through the running proxy
/// when it answers, else by opening the wallet here.
pub async fn quote_with(
    mint_url: &str,
    secret_hex: &str,
    data_dir: &Path,
    http_listen: &str,
    invoice: &str,
) -> anyhow::Result<MeltQuoteView> {
    let body = serde_json::json!({ "invoice": invoice });
    if let Some(answer) = via_proxy(http_listen, "/wallet/quote", body).await? {
        return answer.into_result();
    }
    let w = OperatorWallet::open(mint_url, secret_hex, data_dir).await?;
    w.redeemer(0).quote(invoice).await
}
