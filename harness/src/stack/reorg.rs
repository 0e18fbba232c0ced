//! Chain reorganisations of the pool's node, made the way they happen: an operator's node
//! (a real peer of the pool's node) builds a competing branch from a fork point while cut off
//! from the network, then reconnects, and the pool's node switches to the branch with more
//! work. Nothing is invalidated on the pool's node.

use std::time::{Duration, Instant};

use anyhow::Context;
use bitcoin::BlockHash;
use serde_json::{json, Value};

use super::Stack;
use crate::wait::wait_until;

/// Blocks mined past the pool's height at most (the pool's own miners may find blocks while
/// the branch grows).
const MAX_EXTRA_BLOCKS: u64 = 10;

/// What a reorganisation did.
#[derive(Debug, Clone)]
pub struct Reorg {
    /// Height of the last block both branches share.
    pub fork_height: u64,
    /// The pool node's blocks the branch replaced (oldest first).
    pub replaced: Vec<BlockHash>,
    /// The branch's blocks, now the active chain (oldest first).
    pub branch: Vec<BlockHash>,
    /// When the harness first saw the pool's node on the branch's tip.
    pub switched_at: Instant,
    /// From cutting the operator's node off to the switch.
    pub took: Duration,
}

impl Stack {
    /// Replace the pool node's last `depth` blocks: operator `name`'s node goes offline,
    /// invalidates its copy of the first of them, mines a branch on the fork point (to a key
    /// the harness holds) until it is longer than the pool's chain, and reconnects; returns
    /// once the pool's node has the branch's tip.
    pub async fn reorganise(&self, name: &str, depth: u64) -> anyhow::Result<Reorg> {
        anyhow::ensure!(depth >= 1, "a reorganisation replaces at least one block");
        let started = Instant::now();
        let pool = self.bitcoind()?;
        let node = self.operator_node(name)?;
        let tip = pool.chain_info().await?;
        anyhow::ensure!(
            tip.blocks > depth,
            "the pool's chain is only {} blocks high",
            tip.blocks
        );
        let fork_height = tip.blocks - depth;
        wait_until(
            &format!("node {name} to have the pool node's tip {}", tip.bestblockhash),
            Duration::from_secs(30),
            || async {
                let best: BlockHash = node
                    .rpc()
                    .call("getbestblockhash", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                if best == tip.bestblockhash {
                    Ok(())
                } else {
                    Err(format!("its tip is {best}"))
                }
            },
        )
        .await?;
        let mut replaced = Vec::new();
        for h in fork_height + 1..=tip.blocks {
            replaced.push(pool.rpc().call::<BlockHash>("getblockhash", &[json!(h)]).await?);
        }
        let first = *replaced.first().context("nothing to replace")?;
        node.rpc()
            .call::<Value>("setnetworkactive", &[json!(false)])
            .await?;
        let branch = async {
            node.rpc()
                .call::<Value>("invalidateblock", &[json!(first)])
                .await?;
            // A key of the branch's own: a block the node invalidated is never mined again.
            let to = crate::keys::fresh_address(pool.chain().network());
            let mut branch = Vec::new();
            loop {
                let pool_height = pool.height().await?;
                let ours = fork_height + branch.len() as u64;
                if ours > pool_height {
                    break;
                }
                anyhow::ensure!(
                    ours <= tip.blocks + MAX_EXTRA_BLOCKS,
                    "the pool's chain outgrew the branch ({pool_height} against {ours})"
                );
                branch.extend(node.generate_to_address(1, &to).await?);
            }
            anyhow::Ok(branch)
        }
        .await;
        // Back online whatever happened: the node must not stay cut off.
        node.rpc()
            .call::<Value>("setnetworkactive", &[json!(true)])
            .await?;
        let mut branch = branch?;
        let switched = loop {
            let new_tip = *branch.last().context("no branch")?;
            let seen = wait_until(
                &format!("the pool's node to switch to the branch tip {new_tip}"),
                Duration::from_secs(30),
                || async {
                    let best: BlockHash = pool
                        .rpc()
                        .call("getbestblockhash", &[])
                        .await
                        .map_err(|e| e.to_string())?;
                    if best == new_tip {
                        return Ok(Some(Instant::now()));
                    }
                    let height = pool.height().await.map_err(|e| e.to_string())?;
                    if height >= fork_height + branch.len() as u64 {
                        // The pool's miners found a block meanwhile: the branch must grow.
                        return Ok(None);
                    }
                    Err(format!("its tip is {best} at height {height}"))
                },
            )
            .await?;
            match seen {
                Some(at) => break at,
                None => {
                    anyhow::ensure!(
                        branch.len() as u64 <= depth + MAX_EXTRA_BLOCKS,
                        "the pool's chain keeps outgrowing the branch"
                    );
                    let to = crate::keys::fresh_address(pool.chain().network());
                    branch.extend(node.generate_to_address(1, &to).await?);
                }
            }
        };
        // Tidy the operator's node: it knows both branches and keeps the longer one.
        node.rpc()
            .call::<Value>("reconsiderblock", &[json!(first)])
            .await?;
        let took = started.elapsed();
        tracing::info!(
            depth,
            branch = branch.len(),
            "reorganisation of the pool's node done in {took:?}"
        );
        Ok(Reorg {
            fork_height,
            replaced,
            branch,
            switched_at: switched,
            took,
        })
    }

    /// Wait until every node of the stack (the pool's, operators', auditors') has `tip`.
    pub async fn wait_all_nodes_at(&self, tip: &BlockHash) -> anyhow::Result<()> {
        let mut nodes = vec![("bitcoind".to_string(), self.bitcoind()?)];
        nodes.extend(
            self.operator_nodes
                .iter()
                .map(|(n, b)| (format!("bitcoind-{n}"), b)),
        );
        nodes.extend(
            self.audit_nodes
                .iter()
                .map(|(n, b)| (format!("bitcoind-audit-{n}"), b)),
        );
        for (name, node) in nodes {
            wait_until(
                &format!("{name} to have tip {tip}"),
                Duration::from_secs(30),
                || async {
                    let best: BlockHash = node
                        .rpc()
                        .call("getbestblockhash", &[])
                        .await
                        .map_err(|e| e.to_string())?;
                    if &best == tip {
                        Ok(())
                    } else {
                        Err(format!("its tip is {best}"))
                    }
                },
            )
            .await?;
        }
        Ok(())
    }
}
