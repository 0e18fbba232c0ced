//! Lightning redemption: the mint's payment processor for (`ehash`, `bolt11`).
//!
//! A NUT-05 melt quote for a BOLT11 invoice costs `ceil(invoice msat / rate)` ehash, plus a
//! routing fee reserve converted the same way, at the rate of [`tally`] fixed when the quote
//! is made. A quote the reserve cannot cover is refused. The payment goes through the pool's
//! Lightning node with `cdk-cln`; what it spent is converted back at the quote's rate so the
//! melt's change is exact.
//!
//! Every melt ends paid exactly once or unpaid with its proofs back, without an operator:
//! before the payment is sent its sats are held; a payment call that fails before reaching
//! Core Lightning releases the hold at once; otherwise the hold stays until Core Lightning
//! tells what became of the payment ([`resolve`]), asked when cdk asks
//! ([`MintPayment::check_outgoing_payment`]) and at start and every `hold_check_secs`.

pub mod ledger;
pub mod lightning;
mod matured;
mod outcome;
mod resolve;
pub mod tally;

pub use resolve::resolve_holds;

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cdk_common::nuts::MeltQuoteState;
use cdk_common::payment::{
    Bolt11Settings, CreateIncomingPaymentResponse, Error, Event, IncomingPaymentOptions,
    MakePaymentResponse, MintPayment, OutgoingPaymentOptions, PaymentIdentifier,
    PaymentQuoteResponse, SettingsResponse, WaitPaymentResponse,
};
use cdk_common::{Amount, CurrencyUnit};
use futures::Stream;
use hashpool_config::pool_side::RedemptionSection;

use crate::backend::UNIT;
use crate::metrics::MintMetrics;
use ledger::{Ledger, QuoteTerms};
use lightning::PaymentStatus;

/// Error code text prefix clients can match on.
pub const OVER_RESERVE: &str = "redemption exceeds the pool's redeemable reserve";
/// A melt quote's rate holds this long; a melt after it fails (ask for a new quote).
pub const QUOTE_TTL_SECS: u64 = 600;

/// How long the processor waits, and how long a hold may stay unexplained.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Longest wait on one payment call.
    pub payment_timeout: Duration,
    /// Pending with no HTLC anywhere, seen so this long: released.
    pub orphan_grace: Duration,
    /// Failed, or no payment at all, seen so this long: released.
    pub final_grace: Duration,
}

impl Timing {
    /// From the `[redemption]` settings.
    pub fn of(r: &RedemptionSection) -> Self {
        Self {
            payment_timeout: Duration::from_secs(r.payment_timeout_secs),
            orphan_grace: Duration::from_secs(r.orphan_payment_grace_secs),
            final_grace: Duration::from_secs(r.final_status_grace_secs),
        }
    }
}

/// The processor.
pub struct RedeemBackend {
    cln: cdk_cln::Cln,
    node: lightning::Node,
    ledger: Arc<Ledger>,
    metrics: Arc<MintMetrics>,
    timing: Timing,
    /// Quotes whose payment call is running in this process.
    dispatching: Mutex<HashSet<String>>,
    /// Since when each held payment has looked unable to complete.
    seen: resolve::Observations,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl RedeemBackend {
    /// Pay through `cln` (whose socket is `node`), within `ledger`'s reserve.
    pub fn new(
        cln: cdk_cln::Cln,
        node: lightning::Node,
        ledger: Arc<Ledger>,
        metrics: Arc<MintMetrics>,
        timing: Timing,
    ) -> Self {
        Self {
            cln,
            node,
            ledger,
            metrics,
            timing,
            dispatching: Mutex::new(HashSet::new()),
            seen: resolve::Observations::default(),
        }
    }

    fn ehash(v: u64) -> Amount<CurrencyUnit> {
        Amount::new(v, CurrencyUnit::custom(UNIT))
    }

    fn custom(e: impl std::fmt::Display) -> Error {
        Error::Custom(e.to_string())
    }

    fn response(lookup: &PaymentIdentifier, status: MeltQuoteState) -> MakePaymentResponse {
        MakePaymentResponse {
            payment_lookup_id: lookup.clone(),
            payment_proof: None,
            status,
            total_spent: Self::ehash(0),
        }
    }
}

#[async_trait]
impl MintPayment for RedeemBackend {
    type Err = Error;

    async fn get_settings(&self) -> Result<SettingsResponse, Self::Err> {
        Ok(SettingsResponse {
            unit: UNIT.into(),
            bolt11: Some(Bolt11Settings {
                mpp: false,
                amountless: false,
                invoice_description: false,
            }),
            bolt12: None,
            onchain: None,
            custom: HashMap::new(),
        })
    }

    async fn create_incoming_payment_request(
        &self,
        _options: IncomingPaymentOptions,
    ) -> Result<CreateIncomingPaymentResponse, Self::Err> {
        Err(Error::Custom(
            "ehash is minted only for audited shares, never bought over Lightning".into(),
        ))
    }

    async fn get_payment_quote(
        &self,
        unit: &CurrencyUnit,
        options: OutgoingPaymentOptions,
    ) -> Result<PaymentQuoteResponse, Self::Err> {
        let OutgoingPaymentOptions::Bolt11(opts) = options else {
            return Err(Error::UnsupportedPaymentOption);
        };
        if unit != &CurrencyUnit::custom(UNIT) || opts.melt_options.is_some() {
            return Err(Error::Custom(
                "only whole BOLT11 invoices with an amount are redeemed (no MPP, no amountless)"
                    .into(),
            ));
        }
        let invoice_msat = opts.bolt11.amount_milli_satoshis().unwrap_or(0);
        let payment_hash = *opts.bolt11.payment_hash().as_ref();
        let (terms, reserve) = self
            .ledger
            .quote(invoice_msat, hex::encode(payment_hash))
            .await
            .map_err(Self::custom)?;
        let terms = terms.map_err(Error::Custom)?;
        self.ledger
            .put_terms(&opts.quote_id.to_string(), &terms)
            .await
            .map_err(Self::custom)?;
        tracing::info!(
            quote = %opts.quote_id,
            invoice_msat,
            amount_ehash = terms.amount_ehash,
            fee_ehash = terms.fee_ehash,
            rounding_loss_msat = terms.rounding_loss_msat(),
            rate_msat_per_ehash = reserve.rate_msat_per_ehash(),
            "melt quote"
        );
        Ok(PaymentQuoteResponse {
            request_lookup_id: Some(PaymentIdentifier::PaymentHash(payment_hash)),
            amount: Self::ehash(terms.amount_ehash),
            fee: Self::ehash(terms.fee_ehash),
            state: MeltQuoteState::Unpaid,
            extra_json: Some(serde_json::json!({
                "rate_msat": terms.rate_msat,
                "rate_ehash": terms.rate_ehash,
                "invoice_msat": invoice_msat,
                "fee_reserve_msat": terms.fee_reserve_msat,
                "rounding_loss_msat": terms.rounding_loss_msat(),
            })),
            estimated_blocks: None,
            fee_options: None,
        })
    }

    async fn make_payment(
        &self,
        _unit: &CurrencyUnit,
        options: OutgoingPaymentOptions,
    ) -> Result<MakePaymentResponse, Self::Err> {
        let OutgoingPaymentOptions::Bolt11(mut opts) = options else {
            return Err(Error::UnsupportedPaymentOption);
        };
        let quote_id = opts.quote_id.to_string();
        let lookup = PaymentIdentifier::PaymentHash(*opts.bolt11.payment_hash().as_ref());
        let terms = match self.ledger.terms(&quote_id).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                return self
                    .refuse(
                        &quote_id,
                        &lookup,
                        format!("melt quote {quote_id} has no terms"),
                    )
                    .await
            }
            Err(e) => {
                return self
                    .refuse(
                        &quote_id,
                        &lookup,
                        format!("reading the quote's terms: {e:#}"),
                    )
                    .await
            }
        };
        let terms = {
            let _g = self.ledger.hold_lock.lock().await;
            // Checked under the lock: two melts cannot both take the last sats.
            let terms = match payable(&self.ledger, &terms).await {
                Ok(t) => t,
                Err(why) => {
                    drop(_g);
                    return self.refuse(&quote_id, &lookup, why).await;
                }
            };
            match self.ledger.hold(&quote_id, &terms).await {
                Ok(Ok(())) => terms,
                Ok(Err(why)) => {
                    drop(_g);
                    return self.refuse(&quote_id, &lookup, why).await;
                }
                Err(e) => {
                    drop(_g);
                    return self
                        .refuse(&quote_id, &lookup, format!("holding the sats: {e:#}"))
                        .await;
                }
            }
        };
        opts.max_fee_amount = Some(Amount::new(terms.fee_reserve_msat, CurrencyUnit::Msat));
        if let Ok(mut d) = self.dispatching.lock() {
            d.insert(quote_id.clone());
        }
        let sent = tokio::time::timeout(
            self.timing.payment_timeout,
            self.cln
                .make_payment(&CurrencyUnit::Msat, OutgoingPaymentOptions::Bolt11(opts)),
        )
        .await;
        if let Ok(mut d) = self.dispatching.lock() {
            d.remove(&quote_id);
        }
        match sent {
            Ok(Ok(resp)) => self.account(&quote_id, &terms, resp).await,
            // Core Lightning already has a payment for this hash: what became of it decides.
            Ok(Err(Error::InvoiceAlreadyPaid | Error::InvoicePaymentPending)) => {
                Ok(Self::response(&lookup, MeltQuoteState::Unknown))
            }
            // cdk-cln turns every error of the payment itself into a state: an error here
            // came before the payment was sent (the node down, its socket gone).
            Ok(Err(e)) => {
                self.released(
                    &quote_id,
                    &lookup,
                    "not_sent",
                    format!("the pool's Lightning node could not be asked to pay ({e}): try again once it is back"),
                )
                .await
            }
            Err(_) => {
                tracing::warn!(
                    quote = quote_id,
                    "no answer from the payment call within {:?}; its outcome will be read from Core Lightning",
                    self.timing.payment_timeout
                );
                Ok(Self::response(&lookup, MeltQuoteState::Unknown))
            }
        }
    }

    async fn wait_payment_event(
        &self,
    ) -> Result<Pin<Box<dyn Stream<Item = Event> + Send>>, Self::Err> {
        Ok(Box::pin(futures::stream::pending()))
    }

    fn is_payment_event_stream_active(&self) -> bool {
        true
    }

    fn cancel_payment_event_stream(&self) {}

    async fn check_incoming_payment_status(
        &self,
        _payment_identifier: &PaymentIdentifier,
    ) -> Result<Vec<WaitPaymentResponse>, Self::Err> {
        Ok(Vec::new())
    }

    async fn check_outgoing_payment(
        &self,
        payment_identifier: &PaymentIdentifier,
    ) -> Result<MakePaymentResponse, Self::Err> {
        let PaymentIdentifier::PaymentHash(hash) = payment_identifier else {
            return Err(Error::UnknownPaymentState);
        };
        // The ledger first: a hash no hold names was never dispatched, so it is not paid.
        let Some(quote_id) = self
            .ledger
            .quote_of_hash(&hex::encode(hash))
            .await
            .map_err(Self::custom)?
        else {
            return Ok(Self::response(payment_identifier, MeltQuoteState::Unpaid));
        };
        let terms = self
            .ledger
            .terms(&quote_id)
            .await
            .map_err(Self::custom)?
            .ok_or(Error::UnknownPaymentState)?;
        if let Some(spent_msat) = self.ledger.paid(&quote_id).await.map_err(Self::custom)? {
            let preimage = match self.node.status(&terms.payment_hash).await {
                Ok(PaymentStatus::Complete { preimage, .. }) => preimage,
                _ => None,
            };
            return Ok(MakePaymentResponse {
                payment_lookup_id: payment_identifier.clone(),
                payment_proof: preimage,
                status: MeltQuoteState::Paid,
                total_spent: Self::ehash(terms.melted_ehash(spent_msat)),
            });
        }
        if self.ledger.is_held(&quote_id).await.map_err(Self::custom)? {
            return self.resolve(&quote_id, &terms, payment_identifier).await;
        }
        // Released earlier: Core Lightning must not have paid it since (a released payment
        // that completes anyway is counted as paid out, loudly: its ehash went back).
        if let Ok(PaymentStatus::Complete { sent_msat, .. }) =
            self.node.status(&terms.payment_hash).await
        {
            if self
                .ledger
                .paid_after_release(&quote_id, &terms.payment_hash, sent_msat)
                .await
                .map_err(Self::custom)?
            {
                self.metrics
                    .holds_resolved
                    .with_label_values(&["paid_after_release"])
                    .inc();
            }
        }
        Ok(Self::response(payment_identifier, MeltQuoteState::Unpaid))
    }
}

/// The terms a melt quoted as `terms` is paid on now (its own, or a lower rate its inputs
/// still cover), or why it cannot be paid (quote too old, rate fallen too far, reserve short),
/// with what to do.
pub(crate) async fn payable(ledger: &Ledger, terms: &QuoteTerms) -> Result<QuoteTerms, String> {
    if now_secs().saturating_sub(terms.created_at) > QUOTE_TTL_SECS {
        return Err(format!(
            "the melt quote is older than {QUOTE_TTL_SECS} s: ask for a new quote"
        ));
    }
    let reserve = ledger
        .reserve()
        .await
        .map_err(|e| format!("the reserve cannot be counted now ({e:#}): try again"))?;
    let needed = terms.held_msat();
    if needed > reserve.available_msat {
        return Err(format!(
            "{OVER_RESERVE}: the melt needs {needed} msat, {} msat are available now (matured rewards {} sat - pool fee {} sat - redeemed {} msat - held {} msat): ask for a smaller invoice",
            reserve.available_msat,
            reserve.matured_sat,
            reserve.pool_fee_sat,
            reserve.redeemed_msat,
            reserve.held_msat
        ));
    }
    terms.payable_on(&reserve).ok_or_else(|| {
        format!(
            "the rate fell since the quote ({:.0} msat per ehash quoted, {:.0} now: more ehash is owed or the matured rewards fell) beyond what the quote's {} ehash cover: ask for a new quote",
            terms.rate_msat as f64 / terms.rate_ehash.max(1) as f64,
            reserve.rate_msat_per_ehash(),
            terms.amount_ehash + terms.fee_ehash
        )
    })
}
