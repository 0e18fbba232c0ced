//! Lightning redemption: the mint's payment processor for (`ehash`, `bolt11`).
//!
//! A NUT-05 melt quote for a BOLT11 invoice costs `ceil(invoice msat / rate)` ehash, plus a
//! routing fee reserve converted the same way, where `rate = (matured rewards - pool fee -
//! sats redeemed or held) / ehash outstanding`, fixed when the quote is made. A quote the
//! reserve cannot cover is refused. The payment goes through the pool's Lightning node with
//! `cdk-cln`; what it spent is converted back at the quote's rate so the melt's change is
//! exact, and cdk's melt saga keeps the proofs pending (never lost) while the payment's
//! outcome is unknown.

pub mod ledger;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use cdk_common::nuts::MeltQuoteState;
use cdk_common::payment::{
    Bolt11Settings, CreateIncomingPaymentResponse, Error, Event, IncomingPaymentOptions,
    MakePaymentResponse, MintPayment, OutgoingPaymentOptions, PaymentIdentifier,
    PaymentQuoteResponse, SettingsResponse, WaitPaymentResponse,
};
use cdk_common::{Amount, CurrencyUnit};
use futures::Stream;

use crate::backend::UNIT;
use ledger::{Ledger, QuoteTerms};

/// Error code text prefix clients can match on.
pub const OVER_RESERVE: &str = "redemption exceeds the pool's redeemable reserve";
/// A melt quote's rate holds this long; a melt after it fails (ask for a new quote).
pub const QUOTE_TTL_SECS: u64 = 600;

/// The processor.
pub struct RedeemBackend {
    cln: cdk_cln::Cln,
    ledger: Arc<Ledger>,
}

impl RedeemBackend {
    /// Pay through `cln`, within `ledger`'s reserve.
    pub fn new(cln: cdk_cln::Cln, ledger: Arc<Ledger>) -> Self {
        Self { cln, ledger }
    }

    fn ehash(v: u64) -> Amount<CurrencyUnit> {
        Amount::new(v, CurrencyUnit::custom(UNIT))
    }

    fn custom(e: impl std::fmt::Display) -> Error {
        Error::Custom(e.to_string())
    }

    /// Convert what Lightning reported (msat) into the quote's ehash, settling the ledger.
    async fn account(
        &self,
        quote_id: &str,
        terms: &QuoteTerms,
        mut resp: MakePaymentResponse,
    ) -> Result<MakePaymentResponse, Error> {
        match resp.status {
            MeltQuoteState::Paid
                if resp
                    .total_spent
                    .convert_to(&CurrencyUnit::Msat)
                    .map(|a| a.value() < terms.invoice_msat)
                    .unwrap_or(true) =>
            {
                // Paid, but Lightning did not say how much was sent: keep holding until it does.
                tracing::warn!(quote = quote_id, total_spent = %resp.total_spent, "redemption paid without the amount sent; sats stay held");
                resp.status = MeltQuoteState::Unknown;
                resp.total_spent = Self::ehash(0);
            }
            MeltQuoteState::Paid => {
                let spent_msat = resp
                    .total_spent
                    .convert_to(&CurrencyUnit::Msat)
                    .map_err(Self::custom)?
                    .value();
                self.ledger
                    .settle(quote_id, spent_msat)
                    .await
                    .map_err(Self::custom)?;
                let ehash = terms
                    .to_ehash(spent_msat)
                    .min(terms.amount_ehash.saturating_add(terms.fee_ehash));
                tracing::info!(
                    quote = quote_id,
                    spent_msat,
                    ehash,
                    "redemption paid over Lightning"
                );
                resp.total_spent = Self::ehash(ehash);
            }
            MeltQuoteState::Failed | MeltQuoteState::Unpaid => {
                self.ledger.release(quote_id).await.map_err(Self::custom)?;
                tracing::warn!(quote = quote_id, status = %resp.status, "redemption not paid; hold released");
                resp.total_spent = Self::ehash(0);
            }
            _ => {
                tracing::warn!(quote = quote_id, status = %resp.status, "redemption outcome not known yet; sats stay held");
                resp.total_spent = Self::ehash(0);
            }
        }
        Ok(resp)
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
        // Refused before anything is held or sent: the melt fails and its proofs come back.
        let refuse = |why: String| {
            tracing::warn!(quote = quote_id, "redemption not paid: {why}");
            Ok(MakePaymentResponse {
                payment_lookup_id: lookup.clone(),
                payment_proof: None,
                status: MeltQuoteState::Failed,
                total_spent: Self::ehash(0),
            })
        };
        let terms = match self.ledger.terms(&quote_id).await {
            Ok(Some(t)) => t,
            Ok(None) => return refuse(format!("melt quote {quote_id} has no terms")),
            Err(e) => return refuse(format!("reading the quote's terms: {e:#}")),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if now.saturating_sub(terms.created_at) > QUOTE_TTL_SECS {
            return refuse(format!(
                "the quote is older than {QUOTE_TTL_SECS} s: ask for a new one"
            ));
        }
        {
            let _g = self.ledger.hold_lock.lock().await;
            let reserve = match self.ledger.reserve().await {
                Ok(r) => r,
                Err(e) => return refuse(format!("the reserve cannot be counted: {e:#}")),
            };
            let needed = terms.invoice_msat.saturating_add(terms.fee_reserve_msat);
            if needed > reserve.available_msat {
                return refuse(format!(
                    "{OVER_RESERVE}: {needed} msat needed, {} msat available",
                    reserve.available_msat
                ));
            }
            if terms.rate_above(&reserve) {
                return refuse(format!(
                    "the rate fell since the quote ({} msat per ehash quoted, {:.0} now): ask for a new quote",
                    terms.rate_msat / terms.rate_ehash.max(1),
                    reserve.rate_msat_per_ehash()
                ));
            }
            if let Err(e) = self.ledger.hold(&quote_id, &terms).await {
                return refuse(format!("holding the sats: {e:#}"));
            }
        }
        opts.max_fee_amount = Some(Amount::new(terms.fee_reserve_msat, CurrencyUnit::Msat));
        // From here the payment may be on its way: an error leaves the hold and the proofs
        // pending until Lightning tells.
        let resp = self
            .cln
            .make_payment(&CurrencyUnit::Msat, OutgoingPaymentOptions::Bolt11(opts))
            .await?;
        self.account(&quote_id, &terms, resp).await
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
        let unpaid = || MakePaymentResponse {
            payment_lookup_id: payment_identifier.clone(),
            payment_proof: None,
            status: MeltQuoteState::Unpaid,
            total_spent: Self::ehash(0),
        };
        // The ledger first: a hash no hold names was never dispatched, so it is not paid.
        let Some(quote_id) = self
            .ledger
            .quote_of_hash(&hex::encode(hash))
            .await
            .map_err(Self::custom)?
        else {
            return Ok(unpaid());
        };
        let terms = self
            .ledger
            .terms(&quote_id)
            .await
            .map_err(Self::custom)?
            .ok_or(Error::UnknownPaymentState)?;
        // Paid and held read together: a settle between the two reads would look unpaid.
        let (paid, held) = {
            let _g = self.ledger.hold_lock.lock().await;
            (
                self.ledger.paid(&quote_id).await.map_err(Self::custom)?,
                self.ledger.is_held(&quote_id).await.map_err(Self::custom)?,
            )
        };
        if let Some(spent_msat) = paid {
            let cln = self.cln.check_outgoing_payment(payment_identifier).await?;
            return Ok(MakePaymentResponse {
                payment_lookup_id: payment_identifier.clone(),
                payment_proof: cln.payment_proof,
                status: MeltQuoteState::Paid,
                total_spent: Self::ehash(
                    terms
                        .to_ehash(spent_msat)
                        .min(terms.amount_ehash.saturating_add(terms.fee_ehash)),
                ),
            });
        }
        if !held {
            return Ok(unpaid());
        }
        let resp = self.cln.check_outgoing_payment(payment_identifier).await?;
        self.account(&quote_id, &terms, resp).await
    }
}
