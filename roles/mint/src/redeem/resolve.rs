//! What became of a held payment, from Core Lightning, and the loop that asks at start and
//! every `hold_check_secs`, so no melt waits for an operator.
//!
//! A hold is settled when Core Lightning has the payment complete, and released only when the
//! payment can no longer complete, as seen by this process continuously for a grace time
//! (a restart starts the clocks again, so it only waits longer):
//!
//! - **failed** (every attempt failed) or **no payment at all**, for `final_status_grace_secs`:
//!   xpay routes and retries for up to 60 s, between attempts every recorded one may be failed,
//!   and a payment call cut off by a crash (or stuck in a frozen node's socket) may still
//!   record its first attempt;
//! - **pending with no HTLC on any channel**, for `orphan_payment_grace_secs`: a node killed
//!   before it committed the HTLC forgets it and never sends it (Core Lightning fails an HTLC
//!   it could not add within 30 s while it runs).
//!
//! A payment call running in this process is pending whatever Core Lightning says.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdk_common::nuts::MeltQuoteState;
use cdk_common::payment::{Error, MakePaymentResponse, MintPayment, PaymentIdentifier};

use super::ledger::{Ledger, QuoteTerms};
use super::lightning::PaymentStatus;
use super::{now_secs, RedeemBackend};
use crate::metrics::MintMetrics;

/// What a held payment looked like when it was last asked about, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Looked {
    /// Every attempt failed.
    Failed,
    /// Core Lightning has no payment for the invoice.
    Absent,
    /// Pending with no HTLC on any channel.
    Orphaned,
}

/// Since when each held payment has looked the same way, continuously.
#[derive(Debug, Default)]
pub(super) struct Observations(Mutex<HashMap<String, (Looked, Instant)>>);

impl Observations {
    /// Record that `quote` looks `how` now; returns for how long it has looked so.
    pub(super) fn looks(&self, quote: &str, how: Looked) -> Duration {
        let Ok(mut m) = self.0.lock() else {
            return Duration::ZERO;
        };
        let entry = m.entry(quote.to_string()).or_insert((how, Instant::now()));
        if entry.0 != how {
            *entry = (how, Instant::now());
        }
        entry.1.elapsed()
    }

    /// `quote` looks alive (pending with an HTLC) or is done: forget it.
    pub(super) fn forget(&self, quote: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(quote);
        }
    }
}

impl RedeemBackend {
    /// What became of the held payment of `quote_id`, from Core Lightning; settles the hold
    /// when it completed and releases it when it can no longer complete.
    pub(super) async fn resolve(
        &self,
        quote_id: &str,
        terms: &QuoteTerms,
        lookup: &PaymentIdentifier,
    ) -> Result<MakePaymentResponse, Error> {
        let running = self
            .dispatching
            .lock()
            .map(|d| d.contains(quote_id))
            .unwrap_or(true);
        if running {
            return Ok(Self::response(lookup, MeltQuoteState::Pending));
        }
        let status = self
            .node
            .status(&terms.payment_hash)
            .await
            .map_err(Self::custom)?;
        let (how, grace, why) = match status {
            PaymentStatus::Complete {
                sent_msat,
                preimage,
            } => {
                self.seen.forget(quote_id);
                return self
                    .paid(quote_id, terms, lookup, sent_msat, preimage)
                    .await;
            }
            PaymentStatus::Pending { htlc: true } => {
                self.seen.forget(quote_id);
                return Ok(Self::response(lookup, MeltQuoteState::Pending));
            }
            PaymentStatus::Pending { htlc: false } => (
                Looked::Orphaned,
                self.timing.orphan_grace,
                "Core Lightning lists the payment as pending but no channel has had an HTLC for it (the node was stopped before it committed one and will never send it): it can never complete; pay a new invoice",
            ),
            PaymentStatus::Failed => (
                Looked::Failed,
                self.timing.final_grace,
                "Core Lightning reports every attempt of the payment failed",
            ),
            PaymentStatus::None => (
                Looked::Absent,
                self.timing.final_grace,
                "Core Lightning never got the payment (the mint stopped between holding the sats and sending it)",
            ),
        };
        let seen = self.seen.looks(quote_id, how);
        if seen < grace {
            return Ok(Self::response(lookup, MeltQuoteState::Pending));
        }
        let outcome = match how {
            Looked::Failed => "failed",
            Looked::Absent => "never_sent",
            Looked::Orphaned => "orphaned",
        };
        self.released(
            quote_id,
            lookup,
            outcome,
            format!("{why}; seen so for {} s", seen.as_secs()),
        )
        .await
    }
}

/// How long a released payment is watched for a completion that should never come.
const RELEASED_WATCH_SECS: u64 = 24 * 3600;
/// How often released payments are looked at (one `listpays` each).
const RELEASED_WATCH_EVERY: Duration = Duration::from_secs(60);

impl RedeemBackend {
    /// Released payments Core Lightning completed after all (it should never happen: each was
    /// seen failed, absent or orphaned for a grace first): counted as paid out, loudly, since
    /// their ehash went back. Each is watched for [`RELEASED_WATCH_SECS`]; one failed look
    /// (Core Lightning slow or away) ends the round, so the hold checks are not held up.
    async fn watch_released(&self, ledger: &Ledger) {
        let released = match ledger.released().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("listing released payments failed (retried): {e:#}");
                return;
            }
        };
        for (quote_id, at) in released {
            let outcome = async {
                if now_secs().saturating_sub(at) > RELEASED_WATCH_SECS {
                    return ledger.unwatch(&quote_id, at).await;
                }
                let Some(terms) = ledger.terms(&quote_id).await? else {
                    return ledger.unwatch(&quote_id, at).await;
                };
                if let PaymentStatus::Complete { sent_msat, .. } =
                    self.node.status(&terms.payment_hash).await?
                {
                    // Counted only if the invoice is still this quote's and it is not held
                    // again (checked under the hold lock).
                    if ledger
                        .paid_after_release(&quote_id, &terms.payment_hash, sent_msat)
                        .await?
                    {
                        self.metrics
                            .holds_resolved
                            .with_label_values(&["paid_after_release"])
                            .inc();
                    } else if ledger.quote_of_hash(&terms.payment_hash).await?.as_deref()
                        != Some(quote_id.as_str())
                    {
                        // The invoice was given to another melt: its payment is that melt's.
                        ledger.unwatch(&quote_id, at).await?;
                    }
                }
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = outcome {
                tracing::warn!(quote = %quote_id, "watching a released payment failed (next round): {e:#}");
                return;
            }
        }
    }
}

/// Check every held payment with Core Lightning through cdk (which finalizes a melt the
/// processor calls paid and returns the proofs of one it calls failed): at start and every
/// `every` until `stop`.
pub async fn resolve_holds(
    mint: Arc<cdk::mint::Mint>,
    ledger: Arc<Ledger>,
    backend: Arc<RedeemBackend>,
    metrics: Arc<MintMetrics>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut last_watch: Option<Instant> = None;
    loop {
        match ledger.holds().await {
            Ok(holds) => {
                metrics.observe_holds(&holds, now_secs());
                for h in holds {
                    let outcome = check_hold(&mint, &ledger, &backend, &h.quote_id).await;
                    match outcome {
                        Ok(s) => tracing::debug!(quote = %h.quote_id, "held payment checked: {s}"),
                        Err(e) => {
                            tracing::warn!(quote = %h.quote_id, "checking a held payment failed (retried): {e}")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("listing held payments failed (retried): {e:#}"),
        }
        if last_watch.is_none_or(|t: Instant| t.elapsed() >= RELEASED_WATCH_EVERY) {
            last_watch = Some(Instant::now());
            backend.watch_released(&ledger).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            // The hold check's period.
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One held payment: through cdk while its melt waits (cdk finalizes or compensates it), or
/// the ledger alone once cdk is done with the melt.
async fn check_hold(
    mint: &cdk::mint::Mint,
    ledger: &Ledger,
    backend: &RedeemBackend,
    quote_id: &str,
) -> Result<String, String> {
    let qid = quote_id
        .parse::<cdk_common::QuoteId>()
        .map_err(|e| format!("quote id: {e:?}"))?;
    let state = mint
        .localstore()
        .get_melt_quote(&qid)
        .await
        .ok()
        .flatten()
        .map(|q| q.state);
    if let Some(MeltQuoteState::Pending | MeltQuoteState::Unknown) = state {
        return mint
            .check_melt_quote(&qid)
            .await
            .map(|q| q.state().to_string())
            .map_err(|e| e.to_string());
    }
    let terms = ledger
        .terms(quote_id)
        .await
        .map_err(|e| format!("{e:#}"))?
        .ok_or("no terms")?;
    let hash: [u8; 32] = hex::decode(&terms.payment_hash)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("payment hash")?;
    backend
        .check_outgoing_payment(&PaymentIdentifier::PaymentHash(hash))
        .await
        .map(|r| r.status.to_string())
        .map_err(|e| e.to_string())
}
