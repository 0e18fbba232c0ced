//! The running sums of the ledger (`tally/quoted`, `tally/failed`) and the upgrade that
//! computes them once for a database that predates them.

use std::collections::HashMap;

use anyhow::anyhow;
use cdk_common::database::mint::DynMintTransaction;

use super::{number, Store, NS, TALLY};

impl Store {
    /// Bring the database up to this version: the running sums (version 1) and the index of
    /// unissued quotes per key (version 2) are computed once from the quotes when a database
    /// predates them (a database is never taken back to an older mint: quotes that one made
    /// would be missing from the index), and the lookup timestamps older versions kept
    /// (one row per key ever seen) are removed.
    pub async fn upgrade(&self) -> anyhow::Result<()> {
        let _w = self.writer.lock().await;
        let mut tx = self.begin().await?;
        let version = number(
            tx.kv_read(NS, TALLY, "version")
                .await
                .map_err(|e| anyhow!("{e}"))?,
        );
        if version < 1 {
            let (mut quoted, mut failed) = (0u64, 0u64);
            let mut invalid: HashMap<u64, bool> = HashMap::new();
            // Before the readers start: nothing writes quotes meanwhile.
            let quotes = self
                .mint
                .localstore()
                .get_mint_quotes()
                .await
                .map_err(|e| anyhow!("{e}"))?;
            for q in quotes {
                if q.payment_method != self.method {
                    continue;
                }
                let amount = q.amount.as_ref().map(|a| a.value()).unwrap_or(0);
                quoted += amount;
                let template = number(
                    tx.kv_read(NS, "quote", &q.id.to_string())
                        .await
                        .map_err(|e| anyhow!("{e}"))?,
                );
                if let std::collections::hash_map::Entry::Vacant(slot) = invalid.entry(template) {
                    let state = Self::template(&mut tx, template).await?;
                    slot.insert(state.is_some_and(|t| t.verdict == "invalid"));
                }
                if invalid.get(&template) == Some(&true) {
                    failed += amount;
                }
            }
            tx.kv_write(NS, TALLY, "quoted", quoted.to_string().as_bytes())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            tx.kv_write(NS, TALLY, "failed", failed.to_string().as_bytes())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            tracing::info!(quoted, failed, "ehash tallies computed from the quotes");
        }
        if version < 2 {
            // The index of each key's quotes not minted yet (`u<pubkey>`).
            let quotes = self
                .mint
                .localstore()
                .get_mint_quotes()
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let mut indexed = 0;
            for q in quotes {
                if q.payment_method != self.method
                    || q.state() == cdk_common::MintQuoteState::Issued
                {
                    continue;
                }
                let Some(key) = q.pubkey else { continue };
                tx.kv_write(NS, &format!("u{key}"), &q.id.to_string(), b"")
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                indexed += 1;
            }
            tx.kv_write(NS, TALLY, "version", b"2")
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if indexed > 0 {
                tracing::info!(indexed, "index of unissued quotes built");
            }
        }
        let old = tx.kv_list(NS, "lookup").await.map_err(|e| anyhow!("{e}"))?;
        for k in &old {
            tx.kv_remove(NS, "lookup", k)
                .await
                .map_err(|e| anyhow!("{e}"))?;
        }
        if !old.is_empty() {
            tracing::info!(
                keys = old.len(),
                "removed the lookup timestamps an older mint kept"
            );
        }
        tx.commit().await.map_err(|e| anyhow!("commit: {e}"))
    }

    /// ehash of every quote made, and of those whose template was found invalid.
    pub async fn tallies(&self) -> anyhow::Result<(u64, u64)> {
        let db = self.mint.localstore();
        let quoted = number(
            db.kv_read(NS, TALLY, "quoted")
                .await
                .map_err(|e| anyhow!("{e}"))?,
        );
        let failed = number(
            db.kv_read(NS, TALLY, "failed")
                .await
                .map_err(|e| anyhow!("{e}"))?,
        );
        Ok((quoted, failed))
    }

    /// Add `quoted` and `failed` ehash to the running sums, in `tx`.
    pub(super) async fn add_to_tallies(
        tx: &mut DynMintTransaction,
        quoted: u64,
        failed: u64,
    ) -> anyhow::Result<()> {
        for (key, add) in [("quoted", quoted), ("failed", failed)] {
            if add == 0 {
                continue;
            }
            let now = number(
                tx.kv_read(NS, TALLY, key)
                    .await
                    .map_err(|e| anyhow!("{e}"))?,
            );
            tx.kv_write(
                NS,
                TALLY,
                key,
                now.saturating_add(add).to_string().as_bytes(),
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
        }
        Ok(())
    }
}
