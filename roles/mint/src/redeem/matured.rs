//! Matured rewards: coinbase outputs to the pool's payout script with 100 confirmations on
//! bitcoind's active chain, counted incrementally and kept in the mint's database, so a
//! restarted mint goes on from where it stopped instead of reading every block from height 0:
//!
//! - `redeem/scan/head` -> [`Head`] (JSON): the next height to count, the hash of the block
//!   before it, and the sum so far;
//! - `redeem/matured/<height, 10 digits>` -> `<block hash>:<sats>` for each counted block
//!   whose coinbase paid the script (what a reorganisation takes back).
//!
//! Every change in memory marks its height; the head and the marked entries are written in
//! one transaction after each look that changed anything (and every 1,000 blocks of a long
//! count), and the marks are cleared only once that commits, so the sum on disk always
//! matches its blocks. A database whose sum does not match (written by an older mint) is
//! counted again from height 0. The count follows the active chain: when a block it went
//! past is no longer in it (a reorganisation, or a node that forgot its newest blocks in a
//! crash), the count goes back to the last counted block still in it and counts again from
//! there (a reorganisation that removes a matured coinbase lowers the reserve). A counted
//! coinbase that has fewer than 100 confirmations again (the node's tip fell) does not count
//! until it has them.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ledger::{kv_err, Ledger, COINBASE_MATURITY, NS};

/// Blocks walked back at most to find where a reorganisation left the counted chain.
const MAX_REORG_DEPTH: u64 = 10_000;
/// Core's JSON-RPC code for a block it does not know.
const RPC_INVALID_ADDRESS_OR_KEY: i32 = -5;
/// Core's JSON-RPC code for a height past its tip (`getblockhash`).
const RPC_INVALID_PARAMETER: i32 = -8;
/// A long count is saved every this many blocks.
const CHECKPOINT_BLOCKS: u64 = 1_000;
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
    /// Heights whose entry changed since the last save (added or removed).
    dirty: BTreeSet<u64>,
    /// The head as last saved.
    saved: Head,
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
        // A coinbase at height h has tip - h + 1 confirmations.
        let last_mature = (tip + 1).checked_sub(COINBASE_MATURITY);
        let counted = self.count(&mut scan, last_mature).await;
        // What changed is saved even when the look stopped early.
        if let Err(e) = self.save_scan(&mut scan).await {
            // Kept marked in memory: the next look saves it.
            tracing::warn!("the matured-rewards count was not saved: {e:#}");
        }
        counted?;
        // Counted coinbases the node's tip fell below maturity again wait until it rises.
        let young: u64 = match last_mature {
            Some(m) => scan.counted.range(m + 1..).map(|(_, (_, s))| s).sum(),
            None => scan.head.matured_sat,
        };
        Ok((tip, scan.head.matured_sat - young))
    }

    /// Follow the active chain back if it left the count, then count up to `last_mature`.
    async fn count(&self, scan: &mut Scan, last_mature: Option<u64>) -> anyhow::Result<()> {
        if let Some(last) = scan.head.last.clone() {
            if let Some((fork, fork_hash)) = self.left_at(&last, scan).await? {
                let gone: Vec<u64> = scan.counted.range(fork + 1..).map(|(h, _)| *h).collect();
                let mut lost = 0;
                for h in gone {
                    if let Some((_, sats)) = scan.counted.remove(&h) {
                        lost += sats;
                        scan.dirty.insert(h);
                    }
                }
                scan.head.matured_sat -= lost;
                scan.head.next = fork + 1;
                scan.head.last = Some(fork_hash);
                tracing::warn!(
                    fork,
                    lost_sat = lost,
                    "counted blocks left the active chain: their matured rewards no longer count"
                );
            }
        }
        let Some(last_mature) = last_mature else {
            return Ok(());
        };
        let mut since_save = 0;
        while scan.head.next <= last_mature {
            let height = scan.head.next;
            let hash: String = self.call("getblockhash", &[json!(height)]).await?;
            let block: Value = self.call("getblock", &[json!(hash), json!(2)]).await?;
            // A reorganisation in the middle of the count: this block is not a child of the
            // last one counted. Count again from where the chains meet (next call).
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
                scan.dirty.insert(height);
            }
            scan.head.last = Some(hash);
            scan.head.next += 1;
            since_save += 1;
            if since_save >= CHECKPOINT_BLOCKS {
                since_save = 0;
                self.save_scan(scan).await?;
            }
        }
        Ok(())
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
    /// height and hash of the last block it shares with it (from the same answers, so a
    /// reorganisation meanwhile cannot pair one chain's height with another's hash).
    async fn left_at(&self, last: &str, scan: &Scan) -> anyhow::Result<Option<(u64, String)>> {
        match self
            .call_node::<Value>("getblockheader", &[json!(last)])
            .await?
        {
            Some(h) if h["confirmations"].as_i64().unwrap_or(-1) >= 0 => Ok(None),
            Some(_) => Ok(Some(self.fork_of(last).await?)),
            // The node does not know the block at all (it forgot its newest blocks in a crash):
            // go back to the highest counted block it still has in its chain.
            None => {
                for (height, (hash, _)) in scan.counted.iter().rev() {
                    let here: Option<String> =
                        self.call_node("getblockhash", &[json!(height)]).await?;
                    if here.as_deref() == Some(hash.as_str()) {
                        return Ok(Some((*height, hash.clone())));
                    }
                }
                let genesis: String = self.call("getblockhash", &[json!(0)]).await?;
                Ok(Some((0, genesis)))
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
                Some(r)
                    if r.code() == Some(RPC_INVALID_ADDRESS_OR_KEY)
                        || r.code() == Some(RPC_INVALID_PARAMETER) =>
                {
                    Ok(None)
                }
                _ => Err(e),
            },
        }
    }

    /// Height and hash of the last block `hash` (no longer in the active chain) shares with it.
    async fn fork_of(&self, hash: &str) -> anyhow::Result<(u64, String)> {
        let mut at = hash.to_string();
        for _ in 0..MAX_REORG_DEPTH {
            let h: Value = self.call("getblockheader", &[json!(at)]).await?;
            if h["confirmations"].as_i64().unwrap_or(-1) >= 0 {
                return Ok((h["height"].as_u64().context("header height")?, at));
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
        if sum != head.matured_sat {
            // Never written by this code (its saves are whole): count again from 0, the safe
            // direction. Every entry goes at the next save.
            tracing::warn!(
                head_sat = head.matured_sat,
                blocks_sat = sum,
                "the saved matured-rewards count does not match its blocks: counted again from height 0"
            );
            return Ok(Scan {
                loaded: true,
                dirty: counted.keys().copied().collect(),
                saved: head,
                ..Scan::default()
            });
        }
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
            saved: head.clone(),
            head,
            counted,
            dirty: BTreeSet::new(),
        })
    }

    /// Write the head and every entry changed since the last save, in one transaction; the
    /// marks are cleared only once it commits.
    async fn save_scan(&self, scan: &mut Scan) -> anyhow::Result<()> {
        if scan.dirty.is_empty() && scan.head == scan.saved {
            return Ok(());
        }
        let mut tx = self.kv.begin_transaction().await.map_err(kv_err)?;
        for h in &scan.dirty {
            match scan.counted.get(h) {
                Some((hash, sats)) => {
                    tx.kv_write(NS, MATURED, &key(*h), format!("{hash}:{sats}").as_bytes())
                        .await
                        .map_err(kv_err)?;
                }
                None => tx.kv_remove(NS, MATURED, &key(*h)).await.map_err(kv_err)?,
            }
        }
        tx.kv_write(NS, SCAN, "head", &serde_json::to_vec(&scan.head)?)
            .await
            .map_err(kv_err)?;
        tx.commit().await.map_err(kv_err)?;
        scan.dirty.clear();
        scan.saved = scan.head.clone();
        Ok(())
    }
}
