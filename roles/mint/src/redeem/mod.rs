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

/// The processor.
pub struct RedeemBackend {
    cln: cdk_cln::Cln,
    ledger: Arc<Ledger>,
    fee_reserve_ppm: u64,
    min_fee_reserve_msat: u64,
}

impl RedeemBackend {
    /// Pay through `cln`, within `ledger`'s reserve.
    pub fn new(
        cln: cdk_cln::Cln,
        ledger: Arc<Ledger>,
        fee_reserve_ppm: u64,
        min_fee_reserve_sat: u64,
    ) -> Self {
        Self {
            cln,
            ledger,
            fee_reserve_ppm,
            min_fee_reserve_msat: min_fee_reserve_sat * 1000,
        }
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
                    .min(terms.amount_ehash + terms.fee_ehash);
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
        let invoice_msat = opts.bolt11.amount_milli_satoshis().ok_or_else(|| {
            Error::Custom("the invoice has no amount: ask for one with an amount".into())
        })?;
        let fee_reserve_msat = (u128::from(invoice_msat) * u128::from(self.fee_reserve_ppm)
            / 1_000_000)
            .max(u128::from(self.min_fee_reserve_msat)) as u64;
        let reserve = self.ledger.reserve().await.map_err(Self::custom)?;
        if reserve.outstanding_ehash == 0 {
            return Err(Error::Custom(
                "no ehash is outstanding: nothing to redeem".into(),
            ));
        }
        let needed = invoice_msat + fee_reserve_msat;
        if needed > reserve.available_msat {
            return Err(Error::Custom(format!(
                "{OVER_RESERVE}: the invoice asks {} sat plus a {} sat routing fee reserve, the pool can pay at most {} sat now (matured rewards {} sat - pool fee {} sat - redeemed {} sat - held {} sat)",
                invoice_msat / 1000,
                fee_reserve_msat.div_ceil(1000),
                reserve.available_msat / 1000,
                reserve.matured_sat,
                reserve.pool_fee_sat,
                reserve.redeemed_msat / 1000,
                reserve.held_msat / 1000,
            )));
        }
        let (rate_msat, rate_ehash) = (reserve.available_msat, reserve.outstanding_ehash);
        let payment_hash = *opts.bolt11.payment_hash().as_ref();
        let terms = QuoteTerms {
            invoice_msat,
            fee_reserve_msat,
            rate_msat,
            rate_ehash,
            amount_ehash: ledger::to_ehash(invoice_msat, rate_msat, rate_ehash),
            fee_ehash: ledger::to_ehash(fee_reserve_msat, rate_msat, rate_ehash),
            payment_hash: hex::encode(payment_hash),
        };
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
                "rate_msat": rate_msat,
                "rate_ehash": rate_ehash,
                "invoice_msat": invoice_msat,
                "fee_reserve_msat": fee_reserve_msat,
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
        let terms = self
            .ledger
            .terms(&quote_id)
            .await
            .map_err(Self::custom)?
            .ok_or_else(|| Error::Custom(format!("melt quote {quote_id} has no terms")))?;
        let lookup = PaymentIdentifier::PaymentHash(*opts.bolt11.payment_hash().as_ref());
        let needed = terms.invoice_msat + terms.fee_reserve_msat;
        {
            let _g = self.ledger.hold_lock.lock().await;
            let reserve = self.ledger.reserve().await.map_err(Self::custom)?;
            if needed > reserve.available_msat {
                // Refused before anything was sent: the melt fails and its proofs come back.
                tracing::warn!(
                    quote = quote_id,
                    needed,
                    available = reserve.available_msat,
                    "{OVER_RESERVE}; not paid"
                );
                return Ok(MakePaymentResponse {
                    payment_lookup_id: lookup,
                    payment_proof: None,
                    status: MeltQuoteState::Failed,
                    total_spent: Self::ehash(0),
                });
            }
            self.ledger
                .hold(&quote_id, needed)
                .await
                .map_err(Self::custom)?;
        }
        opts.max_fee_amount = Some(Amount::new(terms.fee_reserve_msat, CurrencyUnit::Msat));
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
        let resp = self.cln.check_outgoing_payment(payment_identifier).await?;
        let quote_id = self
            .ledger
            .quote_of_hash(&hex::encode(hash))
            .await
            .map_err(Self::custom)?
            .ok_or(Error::UnknownPaymentState)?;
        let terms = self
            .ledger
            .terms(&quote_id)
            .await
            .map_err(Self::custom)?
            .ok_or(Error::UnknownPaymentState)?;
        match resp.status {
            // A payment Lightning never saw and that this mint never held was not sent.
            MeltQuoteState::Paid | MeltQuoteState::Failed | MeltQuoteState::Unpaid => {
                self.account(&quote_id, &terms, resp).await
            }
            _ => {
                let mut resp = resp;
                resp.total_spent = Self::ehash(0);
                Ok(resp)
            }
        }
    }
}
