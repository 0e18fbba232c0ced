//! The mint's ledger of ehash quotes, kept in cdk's own database so that a quote, its indexes
//! and its payment are written in one transaction:
//!
//! - a share record becomes one quote (amount from the record, locked to its key, lookup id =
//!   share hash), idempotent by share hash;
//! - an audit verdict is stored once per template; a `valid` template's quotes are paid (the
//!   backend's `PaymentReceived`, applied with cdk's own `pay_mint_quote`, payment id = share
//!   hash, so each counts once) when its settlement time has come, and quotes of later shares
//!   of that template are paid as they are created; an `invalid` template's quotes are never
//!   paid and report FAILED with the reason.
//!
//! Key-value layout (primary namespace `ehash`): `share/<hash>` -> quote id,
//! `quote/<quote id>` -> template id, `t<template id>/<quote id>` -> amount,
//! `p<pubkey>/<quote id>`, `u<pubkey>/<quote id>` (the key's quotes not known to be minted:
//! a lookup of unissued quotes walks only these, and drops those it finds minted),
//! `template/<id>` -> [`TemplateState`], `due/<template id>` ->
//! settlement time, `tally/quoted` and `tally/failed` -> the ehash of every quote made and of
//! those whose template was found invalid (kept in the transactions that change them, so the
//! redemption reserve never scans the quotes).
//!
//! Signed lookups leave nothing in the database: the last timestamp of each key is kept in
//! memory only while it is within the lookup window (an older one cannot be replayed: it is
//! stale), and after a restart only timestamps after the mint's start are taken.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use cdk::mint::Mint;
use cdk_common::database::mint::DynMintTransaction;
use cdk_common::mint::MintQuote;
use cdk_common::payment::{PaymentIdentifier, WaitPaymentResponse};
use cdk_common::{Amount, CurrencyUnit, PaymentMethod, PublicKey, QuoteId};
use ehash::{AuditResult, ShareRecord, Verdict};
use serde::{Deserialize, Serialize};

use crate::backend::{METHOD, UNIT};

mod tallies;
mod views;

const NS: &str = "ehash";
/// Secondary namespace of the running sums.
const TALLY: &str = "tally";
use crate::lookups::LookupGuard;
pub use crate::lookups::{LookupRefused, MAX_LOOKUP_KEYS};
/// Quotes never expire (a share stays owed until audited and minted).
const QUOTE_EXPIRY: u64 = u64::MAX / 2;
/// A quote's "last payment check" time that no clock reaches (the largest a signed 64-bit
/// column holds), so cdk's rate limit on backend checks (`last_checked < now - 10`) never
/// lets one through.
const BACKEND_CHECK_DONE_FOR_GOOD: u64 = i64::MAX as u64;

/// What the mint knows of a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateState {
    /// `valid` or `invalid`.
    pub verdict: String,
    /// The auditor's reason.
    pub reason: String,
    /// When the verdict was written (ms).
    pub audited_at: u64,
    /// When its quotes are (or were) paid (ms).
    pub settle_at: u64,
    /// Whether they were.
    pub settled: bool,
}

pub use views::{AuditStatus, Page, QuoteView};
/// Quotes whose state changed, to push over NUT-17 once committed.
pub type Changed = Vec<MintQuote>;

/// The ledger.
pub struct Store {
    mint: Arc<Mint>,
    unit: CurrencyUnit,
    method: PaymentMethod,
    /// One writer at a time: settlement reads a template's quotes and marks it settled
    /// while new shares of it may arrive.
    writer: tokio::sync::Mutex<()>,
    /// The replay check of signed lookups.
    lookups: std::sync::Mutex<LookupGuard>,
    /// Woken when a valid template is given a settlement time (the settlement loop sleeps
    /// until the next one is due).
    settle_wake: tokio::sync::Notify,
}

fn json<T: Serialize>(v: &T) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn number(raw: Option<Vec<u8>>) -> u64 {
    raw.and_then(|b| String::from_utf8_lossy(&b).parse().ok())
        .unwrap_or(0)
}

impl Store {
    /// A ledger on `mint`'s database; signed lookups are taken within `lookup_window_ms` of
    /// the mint's clock.
    pub fn new(mint: Arc<Mint>, lookup_window_ms: u64) -> Self {
        Self {
            mint,
            unit: CurrencyUnit::custom(UNIT),
            method: PaymentMethod::Custom(METHOD.into()),
            writer: tokio::sync::Mutex::new(()),
            lookups: std::sync::Mutex::new(LookupGuard::new(now_ms(), lookup_window_ms)),
            settle_wake: tokio::sync::Notify::new(),
        }
    }

    async fn begin(&self) -> anyhow::Result<DynMintTransaction> {
        self.mint
            .localstore()
            .begin_transaction()
            .await
            .map_err(|e| anyhow!("begin transaction: {e}"))
    }

    async fn template(
        tx: &mut DynMintTransaction,
        template_id: u64,
    ) -> anyhow::Result<Option<TemplateState>> {
        let raw = tx
            .kv_read(NS, "template", &template_id.to_string())
            .await
            .map_err(|e| anyhow!("{e}"))?;
        raw.map(|b| serde_json::from_slice(&b).context("template state"))
            .transpose()
    }

    /// Pay quote `id` of the share it names if it is not paid yet; returns it if it changed.
    async fn pay(
        &self,
        tx: &mut DynMintTransaction,
        id: &QuoteId,
    ) -> anyhow::Result<Option<MintQuote>> {
        let Some(mut quote) = tx.get_mint_quote(id).await.map_err(|e| anyhow!("{e}"))? else {
            return Ok(None);
        };
        if quote.amount_paid().value() > 0 {
            return Ok(None);
        }
        let amount = quote.amount.clone().context("quote without amount")?;
        let payment = WaitPaymentResponse {
            payment_identifier: quote.request_lookup_id.clone(),
            payment_amount: amount,
            payment_id: quote.request.clone(),
        };
        let changed = self
            .mint
            .pay_mint_quote(tx, &mut quote, payment)
            .await
            .map_err(|e| anyhow!("pay quote {id}: {e}"))?;
        Ok(changed.then(|| quote.inner()))
    }

    /// One quote per record not seen before (idempotent by share hash); quotes of templates
    /// already settled valid are paid at once. Each record comes with the time (ms) it was
    /// appended. Returns (quotes created, quotes paid).
    pub async fn add_shares(
        &self,
        records: &[(u64, ShareRecord)],
    ) -> anyhow::Result<(usize, Changed)> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin().await?;
        let now = cdk_common::util::unix_time();
        let mut created = 0;
        let (mut quoted, mut failed) = (0u64, 0u64);
        let mut paid = Vec::new();
        let mut templates: HashMap<u64, Option<TemplateState>> = HashMap::new();
        for (recorded_at, r) in records {
            let id = QuoteId::new();
            let fresh = tx
                .kv_write_if_absent(NS, "share", &r.share_hash, id.to_string().as_bytes())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if !fresh {
                continue; // a replayed record: its quote exists
            }
            let quote = share_quote(id.clone(), r, *recorded_at, &self.unit, &self.method, now)?;
            tx.add_mint_quote(quote).await.map_err(|e| anyhow!("{e}"))?;
            let qid = id.to_string();
            tx.kv_write(NS, "quote", &qid, r.template_id.to_string().as_bytes())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            tx.kv_write(
                NS,
                &format!("t{}", r.template_id),
                &qid,
                r.amount.to_string().as_bytes(),
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
            tx.kv_write(NS, &format!("p{}", r.locking_pubkey), &qid, b"")
                .await
                .map_err(|e| anyhow!("{e}"))?;
            tx.kv_write(NS, &format!("u{}", r.locking_pubkey), &qid, b"")
                .await
                .map_err(|e| anyhow!("{e}"))?;
            created += 1;
            quoted += r.amount;
            if let std::collections::hash_map::Entry::Vacant(slot) = templates.entry(r.template_id)
            {
                slot.insert(Self::template(&mut tx, r.template_id).await?);
            }
            if let Some(Some(t)) = templates.get(&r.template_id) {
                if t.verdict == "valid" && t.settled {
                    paid.extend(self.pay(&mut tx, &id).await?);
                }
                if t.verdict == "invalid" {
                    failed += r.amount;
                }
            }
        }
        Self::add_to_tallies(&mut tx, quoted, failed).await?;
        tx.commit().await.map_err(|e| anyhow!("commit: {e}"))?;
        Ok((created, paid))
    }

    /// Store each verdict once per template. A valid template settles `delay_ms` after
    /// `now_ms` (at once if 0). Returns the quotes paid.
    pub async fn add_verdicts(
        &self,
        results: &[AuditResult],
        now_ms: u64,
        delay_ms: u64,
    ) -> anyhow::Result<Changed> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin().await?;
        let mut paid = Vec::new();
        let mut delayed = false;
        for r in results {
            let state = TemplateState {
                verdict: r.verdict.as_str().into(),
                reason: r.reason.clone(),
                audited_at: r.audited_at,
                settle_at: now_ms + delay_ms,
                settled: false,
            };
            let tid = r.template_id.to_string();
            if !tx
                .kv_write_if_absent(NS, "template", &tid, &json(&state)?)
                .await
                .map_err(|e| anyhow!("{e}"))?
            {
                let first = Self::template(&mut tx, r.template_id).await?;
                tracing::warn!(
                    template = r.template_id,
                    "second verdict ({} {}) ignored; the first stands: {first:?}",
                    r.verdict.as_str(),
                    r.reason
                );
                continue;
            }
            match r.verdict {
                Verdict::Invalid => {
                    let mut failed = 0u64;
                    for q in tx
                        .kv_list(NS, &format!("t{}", r.template_id))
                        .await
                        .map_err(|e| anyhow!("{e}"))?
                    {
                        failed += number(
                            tx.kv_read(NS, &format!("t{}", r.template_id), &q)
                                .await
                                .map_err(|e| anyhow!("{e}"))?,
                        );
                    }
                    Self::add_to_tallies(&mut tx, 0, failed).await?;
                    tracing::info!(
                        template = r.template_id,
                        failed_ehash = failed,
                        "template invalid ({}): its quotes are FAILED",
                        r.reason
                    )
                }
                Verdict::Valid if delay_ms == 0 => {
                    paid.extend(self.settle(&mut tx, r.template_id, state).await?);
                }
                Verdict::Valid => {
                    tx.kv_write(NS, "due", &tid, (now_ms + delay_ms).to_string().as_bytes())
                        .await
                        .map_err(|e| anyhow!("{e}"))?;
                    delayed = true;
                }
            }
        }
        tx.commit().await.map_err(|e| anyhow!("commit: {e}"))?;
        if delayed {
            // A permit is kept if the loop is not waiting yet: it looks again at once.
            self.settle_wake.notify_one();
        }
        Ok(paid)
    }

    /// Until a valid template is given a settlement time ([`Self::settle_due`]'s caller
    /// sleeps on this and the next due time).
    pub async fn settlement_scheduled(&self) {
        self.settle_wake.notified().await
    }

    /// Pay every quote of a valid template and mark it settled.
    async fn settle(
        &self,
        tx: &mut DynMintTransaction,
        template_id: u64,
        mut state: TemplateState,
    ) -> anyhow::Result<Changed> {
        let mut paid = Vec::new();
        let quotes = tx
            .kv_list(NS, &format!("t{template_id}"))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        for q in quotes {
            let id: QuoteId = q.parse().map_err(|e| anyhow!("quote id {q}: {e:?}"))?;
            paid.extend(self.pay(tx, &id).await?);
        }
        state.settled = true;
        tx.kv_write(NS, "template", &template_id.to_string(), &json(&state)?)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        tx.kv_remove(NS, "due", &template_id.to_string())
            .await
            .map_err(|e| anyhow!("{e}"))?;
        tracing::info!(
            template = template_id,
            quotes = paid.len(),
            "template settled: quotes PAID"
        );
        Ok(paid)
    }

    /// Settle the valid templates whose time has come, one transaction each; a template not
    /// due yet is only read (its `due` entry holds its time), never written. Returns the
    /// quotes paid and when the next template is due (ms), if any.
    pub async fn settle_due(&self, now_ms: u64) -> anyhow::Result<(Changed, Option<u64>)> {
        let store = self.mint.localstore();
        let due = store.kv_list(NS, "due").await.map_err(|e| anyhow!("{e}"))?;
        let mut paid = Vec::new();
        let mut next: Option<u64> = None;
        for tid in due {
            let template_id: u64 = tid.parse().context("due template id")?;
            let at = store
                .kv_read(NS, "due", &tid)
                .await
                .map_err(|e| anyhow!("{e}"))?
                .and_then(|b| String::from_utf8_lossy(&b).parse::<u64>().ok());
            if let Some(at) = at.filter(|at| *at > now_ms) {
                next = Some(next.map_or(at, |n| n.min(at)));
                continue;
            }
            let _w = self.writer.lock().await;
            let mut tx = self.begin().await?;
            let Some(state) = Self::template(&mut tx, template_id).await? else {
                tx.rollback().await.map_err(|e| anyhow!("{e}"))?;
                continue;
            };
            if state.settled {
                tx.kv_remove(NS, "due", &tid)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
            } else if state.settle_at <= now_ms {
                paid.extend(self.settle(&mut tx, template_id, state).await?);
            } else {
                next = Some(next.map_or(state.settle_at, |n| n.min(state.settle_at)));
            }
            tx.commit().await.map_err(|e| anyhow!("commit: {e}"))?;
        }
        Ok((paid, next))
    }

    /// Accept a signed lookup's `timestamp` for `pubkey` if it is after the last one this
    /// mint accepted for the key and after the mint's start; nothing is written.
    pub fn bump_lookup(&self, pubkey: &str, timestamp: u64) -> Result<(), LookupRefused> {
        match self.lookups.lock() {
            Ok(mut g) => g.bump(pubkey, timestamp, now_ms()),
            // A panic while holding the guard: refuse rather than skip the replay check.
            Err(_) => Err(LookupRefused::Unavailable),
        }
    }
}

/// The quote of share record `r` (recorded at `recorded_at`), created at `now`.
fn share_quote(
    id: QuoteId,
    r: &ShareRecord,
    recorded_at: u64,
    unit: &CurrencyUnit,
    method: &PaymentMethod,
    now: u64,
) -> anyhow::Result<MintQuote> {
    let pubkey = PublicKey::from_slice(r.locking_pubkey.as_bytes())
        .map_err(|e| anyhow!("locking key of {}: {e}", r.share_hash))?;
    let mut quote = MintQuote::new(
        Some(id),
        r.share_hash.clone(),
        unit.clone(),
        Some(Amount::new(r.amount, unit.clone())),
        QUOTE_EXPIRY,
        PaymentIdentifier::CustomId(r.share_hash.clone()),
        Some(pubkey),
        Amount::new(0, unit.clone()),
        Amount::new(0, unit.clone()),
        method.clone(),
        now,
        now,
        vec![],
        vec![],
        Some(serde_json::json!({
            "share_hash": r.share_hash,
            "template_id": r.template_id,
            "recorded_at": recorded_at,
        })),
    );
    // cdk asks a quote's payment backend whether it was paid each time the quote is read for
    // minting or for its status, and first records the time of that check with a write of
    // its own (a commit and an fsync per quote: the larger part of a batch mint's time at the
    // mint). Ours never reports a payment, since settlement marks quotes PAID itself, so the
    // check is marked done for good and cdk skips it.
    quote.set_last_checked(BACKEND_CHECK_DONE_FOR_GOOD);
    Ok(quote)
}

#[cfg(test)]
mod backend_check_tests;
