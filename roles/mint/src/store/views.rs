//! Quotes as the ehash endpoints show them: cdk's state joined with the audit verdict of
//! their template.

use anyhow::{anyhow, Context};
use cdk_common::{MintQuoteState, QuoteId};
use serde::Serialize;

use super::{Store, TemplateState, NS};

/// Minted quotes dropped from an index of unissued ones per write transaction.
const PRUNE_CHUNK: usize = 64;

/// A quote's audit status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "audit_status", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuditStatus {
    /// No verdict yet, or a valid one whose settlement time has not come.
    Pending {
        /// When a valid template's quotes will be paid (ms).
        #[serde(skip_serializing_if = "Option::is_none")]
        settle_at: Option<u64>,
    },
    /// Credited: the holder of the key can mint it.
    Paid,
    /// The template was found invalid: never paid.
    Failed {
        /// Bitcoin Core's reject string or the policy rule.
        reason: String,
    },
}

/// One quote as the ehash endpoints show it.
#[derive(Debug, Clone, Serialize)]
pub struct QuoteView {
    /// Quote id.
    pub quote: String,
    /// The share it pays for.
    pub share_hash: String,
    /// Its template.
    pub template_id: u64,
    /// ehash amount.
    pub amount: u64,
    /// cdk's state: UNPAID, PAID or ISSUED.
    pub state: String,
    /// Audit status (flattened: `audit_status`, `settle_at` / `reason`).
    #[serde(flatten)]
    pub audit: AuditStatus,
}

impl Store {
    /// The view of quote `id`, or `None` if the mint has no such ehash quote.
    pub async fn quote(&self, id: &str) -> anyhow::Result<Option<QuoteView>> {
        let db = self.mint.localstore();
        let Ok(qid) = id.parse::<QuoteId>() else {
            return Ok(None);
        };
        let Some(quote) = db.get_mint_quote(&qid).await.map_err(|e| anyhow!("{e}"))? else {
            return Ok(None);
        };
        let Some(tid) = db
            .kv_read(NS, "quote", id)
            .await
            .map_err(|e| anyhow!("{e}"))?
        else {
            return Ok(None);
        };
        let template_id: u64 = String::from_utf8_lossy(&tid)
            .parse()
            .context("template id")?;
        let template = db
            .kv_read(NS, "template", &template_id.to_string())
            .await
            .map_err(|e| anyhow!("{e}"))?
            .map(|b| serde_json::from_slice::<TemplateState>(&b))
            .transpose()?;
        let state = quote.state();
        let audit = match (&template, state) {
            (_, MintQuoteState::Paid | MintQuoteState::Issued) => AuditStatus::Paid,
            (Some(t), _) if t.verdict == "invalid" => AuditStatus::Failed {
                reason: t.reason.clone(),
            },
            (Some(t), _) => AuditStatus::Pending {
                settle_at: Some(t.settle_at),
            },
            (None, _) => AuditStatus::Pending { settle_at: None },
        };
        Ok(Some(QuoteView {
            quote: id.to_string(),
            share_hash: quote.request.clone(),
            template_id,
            amount: quote.amount.as_ref().map(|a| a.value()).unwrap_or(0),
            state: state.to_string(),
            audit,
        }))
    }

    /// One page of the quotes locked to `pubkey` (hex), in quote id order, and the id to ask
    /// the next page after (None: this was the last). With `unissued_only` the walk is over the
    /// key's quotes not minted yet (the `u<pubkey>` index: PENDING, PAID and FAILED ones, the
    /// last never minted), so its cost follows them, not the key's minted history: quotes found
    /// minted are dropped from that index on the way.
    pub async fn quotes_of(
        &self,
        pubkey: &str,
        page: Page<'_>,
    ) -> anyhow::Result<(Vec<QuoteView>, Option<String>)> {
        let index = if page.unissued_only {
            format!("u{pubkey}")
        } else {
            format!("p{pubkey}")
        };
        let ids = self
            .mint
            .localstore()
            .kv_list(NS, &index)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let mut out = Vec::new();
        let mut minted = Vec::new();
        let mut next = None;
        for id in ids
            .into_iter()
            .filter(|id| page.after.is_none_or(|a| id.as_str() > a))
        {
            if out.len() == page.limit {
                next = out.last().map(|q: &QuoteView| q.quote.clone());
                break;
            }
            let Some(q) = self.quote(&id).await? else {
                continue;
            };
            if page.unissued_only && q.state == MintQuoteState::Issued.to_string() {
                minted.push(id);
                continue;
            }
            out.push(q);
        }
        if !minted.is_empty() {
            // Best effort: a busy database must not fail the read; the next lookup drops them.
            if let Err(e) = self.drop_from_unissued(&index, &minted).await {
                tracing::warn!(
                    "dropping {} minted quote(s) from {index}: {e:#} (retried at the next lookup)",
                    minted.len()
                );
            }
        }
        Ok((out, next))
    }

    /// Remove minted quotes from a key's index of unissued ones, a few per transaction: the
    /// database has one writer, and cdk's own writes (a batch mint marking quotes checked) wait
    /// at most its busy timeout for it.
    async fn drop_from_unissued(&self, index: &str, ids: &[String]) -> anyhow::Result<()> {
        for chunk in ids.chunks(PRUNE_CHUNK) {
            let _w = self.writer.lock().await;
            let mut tx = self.begin().await?;
            for id in chunk {
                tx.kv_remove(NS, index, id)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
            }
            tx.commit().await.map_err(|e| anyhow!("commit: {e}"))?;
        }
        Ok(())
    }
}

/// Which page of a key's quotes a lookup asks for.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    /// Only quotes not minted yet.
    pub unissued_only: bool,
    /// Only quotes whose id sorts after this one.
    pub after: Option<&'a str>,
    /// At most this many.
    pub limit: usize,
}
