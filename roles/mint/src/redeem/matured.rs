//! Matured rewards: coinbase outputs to the pool's payout script with 100 confirmations on
//! bitcoind's active chain, counted incrementally and kept in the mint's database, so a
//! restarted mint goes on from where it stopped instead of reading every block from height 0:
//!
//! - `redeem/scan/head` -> [`Head`] (JSON): the next height to count, the hash of the block
//!   before it, and the sum so far;
//! - `redeem/matured/<height, 10 digits>` -> `<block hash>:<sats>` for each counted block
//!   whose coinbase paid the script (what a reorganisation takes back).
//!
//! Both are written in one transaction after each count that moved, so the sum on disk always
//! matches its blocks. The count follows the active chain: when a block it went past is no
//! longer in it (a reorganisation, or a node that forgot its newest blocks in a crash), the
//! count goes back to the last counted block still in it and counts again from there (a
//! reorganisation that removes a matured coinbase lowers the reserve).

use std::collections::BTreeMap;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ledger::{kv_err, Ledger, COINBASE_MATURITY, NS};

/// Blocks walked back at most to find where a reorganisation left the counted chain.
const MAX_REORG_DEPTH: u64 = 10_000;
/// Core's JSON-RPC code for a block it does not know.
const RPC_INVALID_ADDRESS_OR_KEY: i32 = -5;
/// Secondary namespaces.
const SCAN: &str = "scan";
const MATURED: &str = "matured";

/// How far the matured rewards are counted (persisted).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Heights below this are counted.
    pub next: u64,
    /// Hash of block `next - 1` as counted.
    pub last: Option<String>,
    /// The sum of `matured/*`.
    pub matured_sat: u64,
}

/// The count in memory: its head and its blocks.
#[derive(Debug, Default)]
pub struct Scan {
    /// Read from the database yet.
    loaded: bool,
    head: Head,
    /// Blocks whose coinbase paid the payout script: height -> (hash, sats).
    counted: BTreeMap<u64, (String, u64)>,
}

fn key(height: u64) -> String {
    format!("{height:010}")
}

impl Ledger {
    /// Matured rewards on the active chain and the tip height (see the module docs).
    pub(super) async fn matured(&self) -> anyhow::Result<(u64, u64)> {
        let tip: u64 = self.call("getblockcount", &[]).await?;
        let mut scan = self.scan.lock().await;
        if !scan.loaded {
            *scan = self.load_scan().await?;
        }
        let before = scan.head.clone();
        let mut removed = Vec::new();
        let mut added = Vec::new();
        if let Some(last) = scan.head.last.clone() {
            if let Some(fork) = self.left_at(&last, &scan).await? {
                let gone: Vec<u64> = scan.counted.range(fork + 1..).map(|(h, _)| *h).collect();
                let mut lost = 0;
                for h in gone {
                    if let Some((_, sats)) = scan.counted.remove(&h) {
                        lost += sats;
                        removed.push(h);
                    }
                }
                scan.head.matured_sat -= lost;
                scan.head.next = fork + 1;
                scan.head.last = Some(self.call("getblockhash", &[json!(fork)]).await?);
                tracing::warn!(
                    fork,
                    lost_sat = lost,
                    "counted blocks left the active chain: their matured rewards no longer count"
                );
            }
        }
        // A coinbase at height h has tip - h + 1 confirmations.
        let counted = async {
            if let Some(last_mature) = (tip + 1).checked_sub(COINBASE_MATURITY) {
                while scan.head.next <= last_mature {
                    let height = scan.head.next;
                    let hash: String = self.call("getblockhash", &[json!(height)]).await?;
                    let block: Value = self.call("getblock", &[json!(hash), json!(2)]).await?;
                    // A reorganisation in the middle of the count: this block is not a child
                    // of the last one counted. Count again from where the chains meet (next
                    // call).
                    if let Some(last) = &scan.head.last {
                        if block["previousblockhash"].as_str() != Some(last.as_str()) {
                            anyhow::bail!(
                                "the chain reorganised while matured rewards were counted (block {height} does not follow {last}): counted again at the next look"
                            );
                        }
                    }
                    let sats = self.paid_to_pool(&block)?;
                    if sats > 0 {
                        scan.counted.insert(height, (hash.clone(), sats));
                        scan.head.matured_sat += sats;
                        added.push(height);
                    }
                    scan.head.last = Some(hash);
                    scan.head.next += 1;
                }
            }
            anyhow::Ok(())
        }
        .await;
        // What was counted is kept even when the count stopped early.
        if scan.head != before {
            if let Err(e) = self.save_scan(&scan, &added, &removed).await {
                // Not lost: the next start counts again from what was saved.
                tracing::warn!("the matured-rewards count was not saved: {e:#}");
            }
        }
        counted?;
        Ok((tip, scan.head.matured_sat))
    }

    /// Sats the coinbase of `block` (`getblock` verbosity 2) pays the payout script.
    fn paid_to_pool(&self, block: &Value) -> anyhow::Result<u64> {
        let mut sats = 0;
        for out in block["tx"][0]["vout"].as_array().into_iter().flatten() {
            if out["scriptPubKey"]["hex"].as_str() == Some(&self.payout_script) {
                sats += bitcoin::Amount::from_btc(out["value"].as_f64().unwrap_or(0.0))
                    .context("coinbase output value")?
                    .to_sat();
            }
        }
        Ok(sats)
    }

    /// Where the count must go back to, if block `last` is no longer in the active chain: the
    /// height of the last block it shares with it.
    async fn left_at(&self, last: &str, scan: &Scan) -> anyhow::Result<Option<u64>> {
        match self
            .call_node::<Value>("getblockheader", &[json!(last)])
            .await?
        {
            Some(h) if h["confirmations"].as_i64().unwrap_or(-1) >= 0 => Ok(None),
            Some(_) => Ok(Some(self.fork_height(last).await?)),
            // The node does not know the block at all (it forgot its newest blocks in a crash):
            // go back to the highest counted block it still has in its chain.
            None => {
                for (height, (hash, _)) in scan.counted.iter().rev() {
                    let here: Option<String> =
                        self.call_node("getblockhash", &[json!(height)]).await?;
                    if here.as_deref() == Some(hash.as_str()) {
                        return Ok(Some(*height));
                    }
                }
                Ok(Some(0))
            }
        }
    }

    /// A bitcoind answer, or `None` when it says it knows no such block (or height).
    async fn call_node<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        params: &[Value],
    ) -> anyhow::Result<Option<T>> {
        match self.call::<T>(method, params).await {
            Ok(v) => Ok(Some(v)),
            Err(e) => match e.downcast_ref::<bitcoind_rpc::RpcError>() {
                Some(r) if r.code() == Some(RPC_INVALID_ADDRESS_OR_KEY) || r.code() == Some(-8) => {
                    Ok(None)
                }
                _ => Err(e),
            },
        }
    }

    /// Height of the last block `hash` (no longer in the active chain) shares with it.
    async fn fork_height(&self, hash: &str) -> anyhow::Result<u64> {
        let mut at = hash.to_string();
        for _ in 0..MAX_REORG_DEPTH {
            let h: Value = self.call("getblockheader", &[json!(at)]).await?;
            if h["confirmations"].as_i64().unwrap_or(-1) >= 0 {
                return h["height"].as_u64().context("header height");
            }
            at = h["previousblockhash"]
                .as_str()
                .context("a stale block without a parent")?
                .to_string();
        }
        anyhow::bail!("a reorganisation deeper than {MAX_REORG_DEPTH} blocks")
    }

    /// The count as the database has it (empty: count from height 0).
    async fn load_scan(&self) -> anyhow::Result<Scan> {
        let head: Head = match self.kv.kv_read(NS, SCAN, "head").await.map_err(kv_err)? {
            Some(raw) => serde_json::from_slice(&raw).context("the matured-rewards count")?,
            None => Head::default(),
        };
        let mut counted = BTreeMap::new();
        for k in self.kv.kv_list(NS, MATURED).await.map_err(kv_err)? {
            let Some(raw) = self.kv.kv_read(NS, MATURED, &k).await.map_err(kv_err)? else {
                continue;
            };
            let text = String::from_utf8_lossy(&raw).to_string();
            let (hash, sats) = text
                .split_once(':')
                .with_context(|| format!("matured block {k}: {text:?}"))?;
            counted.insert(
                k.parse::<u64>()
                    .with_context(|| format!("matured block key {k}"))?,
                (
                    hash.to_string(),
                    sats.parse::<u64>().context("matured sats")?,
                ),
            );
        }
        let sum: u64 = counted.values().map(|(_, s)| s).sum();
        anyhow::ensure!(
            sum == head.matured_sat,
            "the matured-rewards count says {} sat, its blocks sum to {sum}",
            head.matured_sat
        );
        if head.next > 0 {
            tracing::info!(
                next = head.next,
                matured_sat = head.matured_sat,
                blocks = counted.len(),
                "matured rewards counted before: going on from there"
            );
        }
        Ok(Scan {
            loaded: true,
            head,
            counted,
        })
    }

    /// Write the head and the blocks added and removed, in one transaction.
    async fn save_scan(&self, scan: &Scan, added: &[u64], removed: &[u64]) -> anyhow::Result<()> {
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        for h in removed {
            tx.kv_remove(NS, MATURED, &key(*h)).await.map_err(kv_err)?;
        }
        for h in added {
            if let Some((hash, sats)) = scan.counted.get(h) {
                tx.kv_write(NS, MATURED, &key(*h), format!("{hash}:{sats}").as_bytes())
                    .await
                    .map_err(kv_err)?;
            }
        }
        tx.kv_write(NS, SCAN, "head", &serde_json::to_vec(&scan.head)?)
            .await
            .map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)
    }
}
