//! What becomes of a melt once its payment call or Core Lightning has answered: settled at
//! the quote's rate, released (its proofs go back), or refused before anything was held.

use cdk_common::nuts::MeltQuoteState;
use cdk_common::payment::{Error, MakePaymentResponse, PaymentIdentifier};
use cdk_common::CurrencyUnit;

use super::ledger::QuoteTerms;
use super::RedeemBackend;

impl RedeemBackend {
    /// The payment completed, `spent_msat` sent: settle it at the quote's rate.
    pub(super) async fn paid(
        &self,
        quote_id: &str,
        terms: &QuoteTerms,
        lookup: &PaymentIdentifier,
        spent_msat: u64,
        preimage: Option<String>,
    ) -> Result<MakePaymentResponse, Error> {
        let ehash = terms.melted_ehash(spent_msat);
        self.ledger
            .settle(quote_id, spent_msat, ehash)
            .await
            .map_err(Self::custom)?;
        self.seen.forget(quote_id);
        self.metrics
            .holds_resolved
            .with_label_values(&["paid"])
            .inc();
        tracing::info!(
            quote = quote_id,
            spent_msat,
            ehash,
            "redemption paid over Lightning"
        );
        Ok(MakePaymentResponse {
            payment_lookup_id: lookup.clone(),
            payment_proof: preimage,
            status: MeltQuoteState::Paid,
            total_spent: Self::ehash(ehash),
        })
    }

    /// The payment can no longer complete: release the hold (`why` kept for the operator).
    pub(super) async fn released(
        &self,
        quote_id: &str,
        lookup: &PaymentIdentifier,
        outcome: &str,
        why: String,
    ) -> Result<MakePaymentResponse, Error> {
        self.ledger
            .release(quote_id, &why)
            .await
            .map_err(Self::custom)?;
        self.seen.forget(quote_id);
        self.metrics
            .holds_resolved
            .with_label_values(&[outcome])
            .inc();
        tracing::warn!(
            quote = quote_id,
            outcome,
            "redemption not paid, hold released, proofs go back: {why}"
        );
        Ok(Self::response(lookup, MeltQuoteState::Failed))
    }

    /// Refused before anything was held: the melt fails and its proofs come back.
    pub(super) async fn refuse(
        &self,
        quote_id: &str,
        lookup: &PaymentIdentifier,
        why: String,
    ) -> Result<MakePaymentResponse, Error> {
        tracing::warn!(quote = quote_id, "redemption not paid: {why}");
        if let Err(e) = self.ledger.refuse(quote_id, &why).await {
            tracing::warn!(
                quote = quote_id,
                "keeping the refusal's reason failed: {e:#}"
            );
        }
        Ok(Self::response(lookup, MeltQuoteState::Failed))
    }

    /// Convert what the payment call reported into the quote's ehash, settling the ledger.
    pub(super) async fn account(
        &self,
        quote_id: &str,
        terms: &QuoteTerms,
        resp: MakePaymentResponse,
    ) -> Result<MakePaymentResponse, Error> {
        let lookup = resp.payment_lookup_id.clone();
        let sent = resp
            .total_spent
            .convert_to(&CurrencyUnit::Msat)
            .map(|a| a.value())
            .ok();
        match (resp.status, sent) {
            (MeltQuoteState::Paid, Some(spent)) if spent >= terms.invoice_msat => {
                self.paid(quote_id, terms, &lookup, spent, resp.payment_proof)
                    .await
            }
            // Lightning failed it for good (no route, expired, refused by the payee).
            (MeltQuoteState::Failed | MeltQuoteState::Unpaid, _) => {
                self.released(
                    quote_id,
                    &lookup,
                    "failed",
                    format!("Core Lightning could not pay the invoice ({})", resp.status),
                )
                .await
            }
            // Paid without the amount, pending or unknown: keep holding until Core
            // Lightning tells (the next check).
            (status, _) => {
                tracing::warn!(quote = quote_id, %status, "redemption outcome not known yet; sats stay held");
                Ok(Self::response(&lookup, MeltQuoteState::Pending))
            }
        }
    }
}
