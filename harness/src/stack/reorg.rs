//! Chain reorganisations of the pool's node, made the way they happen: an operator's node
//! (a real peer of the pool's node) builds a competing branch from a fork point while cut off
//! from the network (mined there, or the pre-mined fork of the rewards chain), then
//! reconnects, and the pool's node switches to the branch with more work. Nothing is
//! invalidated on the pool's node.

use std::time::{Duration, Instant};

use anyhow::Context;
use bitcoin::BlockHash;
use serde_json::{json, Value};

use super::Stack;
use crate::wait::wait_until;

/// Blocks mined past the pool's height at most (the pool's own miners may find blocks while
/// the branch grows).
const MAX_EXTRA_BLOCKS: u64 = 10;
/// Blocks of the rewards chain's pre-mined fork (`fixtures/chains/signet-rewards-fork.blocks`):
/// it replaces the last reward and the 100 blocks that matured it, and matures its own blocks
/// past the rewards chain's tip plus what a scenario mines (up to about 100 blocks).
pub const REWARDS_FORK_BLOCKS: usize = 220;

/// Where a competing branch comes from.
enum Branch {
    /// Mined on the operator's node until it outworks the pool's chain.
    Mine,
    /// Pre-mined blocks, submitted to the operator's node.
    Blocks(Vec<bitcoin::Block>),
}

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
    /// nobody keeps) until it is longer than the pool's chain, and reconnects; returns once the
    /// pool's node has the branch's tip.
    pub async fn reorganise(&self, name: &str, depth: u64) -> anyhow::Result<Reorg> {
        anyhow::ensure!(depth >= 1, "a reorganisation replaces at least one block");
        // Synced first, so that the fork point is `depth` below the tip both nodes share.
        self.wait_node_synced(name).await?;
        let tip = self.bitcoind()?.height().await?;
        anyhow::ensure!(tip > depth, "the pool's chain is only {tip} blocks high");
        self.replace_from(name, tip - depth, Branch::Mine).await
    }

    /// Replace the rewards chain from its last reward on with its pre-mined fork
    /// ([`REWARDS_FORK_BLOCKS`] blocks), through operator `name`'s node: the last reward and
    /// every block after it (the scenario's included) leave the active chain.
    pub async fn reorganise_onto_rewards_fork(&self, name: &str) -> anyhow::Result<Reorg> {
        let blocks = crate::bitcoind::chain_fixture::parse(
            crate::bitcoind::chain_fixture::REWARDS_FORK_FIXTURE,
            "signet-rewards-fork.blocks",
        )?;
        let parent = blocks
            .first()
            .context("the rewards fork fixture holds no block: run `just chain-fixtures`")?
            .header
            .prev_blockhash;
        let header: Value = self
            .bitcoind()?
            .rpc()
            .call("getblockheader", &[json!(parent)])
            .await
            .context("the rewards fork leaves a chain this stack does not run")?;
        let fork_height = header["height"].as_u64().context("fork height")?;
        self.replace_from(name, fork_height, Branch::Blocks(blocks))
            .await
    }

    async fn replace_from(
        &self,
        name: &str,
        fork_height: u64,
        source: Branch,
    ) -> anyhow::Result<Reorg> {
        let started = Instant::now();
        let pool = self.bitcoind()?;
        let node = self.operator_node(name)?;
        self.wait_node_synced(name).await?;
        let tip = pool.chain_info().await?;
        anyhow::ensure!(
            tip.blocks > fork_height,
            "the pool's chain ({}) does not go past the fork point {fork_height}",
            tip.blocks
        );
        let depth = tip.blocks - fork_height;
        let mut replaced = Vec::new();
        for h in fork_height + 1..=tip.blocks {
            replaced.push(
                pool.rpc()
                    .call::<BlockHash>("getblockhash", &[json!(h)])
                    .await?,
            );
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
            let mut branch = Vec::new();
            match source {
                Branch::Mine => {
                    let to = crate::keys::fresh_address(pool.chain().network());
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
                }
                Branch::Blocks(blocks) => {
                    for b in &blocks {
                        let hex = bitcoin::consensus::encode::serialize_hex(b);
                        let answer: Value =
                            node.rpc().call("submitblock", &[json!(hex)]).await?;
                        anyhow::ensure!(
                            answer.is_null(),
                            "node {name} refused branch block {}: {answer}",
                            b.block_hash()
                        );
                        branch.push(b.block_hash());
                    }
                    let pool_height = pool.height().await?;
                    anyhow::ensure!(
                        fork_height + branch.len() as u64 > pool_height,
                        "the pre-mined branch ends at {} and the pool's chain is at {pool_height}: the scenario mined too many blocks for it",
                        fork_height + branch.len() as u64
                    );
                }
            }
            anyhow::Ok(branch)
        }
        .await;
        // Back online whatever happened: the node must not stay cut off.
        node.rpc()
            .call::<Value>("setnetworkactive", &[json!(true)])
            .await?;
        let switched = async {
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
            anyhow::Ok((branch, switched))
        }
        .await;
        // Tidy the operator's node whatever happened: it knows both branches and keeps the
        // longer one (left invalidated, it could never follow the pool's chain again).
        node.rpc()
            .call::<Value>("reconsiderblock", &[json!(first)])
            .await?;
        let (branch, switched) = switched?;
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

    /// Wait until operator `name`'s node has the pool node's tip (read again at each look: the
    /// pool's miners may find blocks meanwhile, and a restarted node catches up over P2P).
    async fn wait_node_synced(&self, name: &str) -> anyhow::Result<()> {
        let (pool, node) = (self.bitcoind()?, self.operator_node(name)?);
        wait_until(
            &format!("node {name} to have the pool node's tip"),
            Duration::from_secs(60),
            || async {
                let want: BlockHash = pool
                    .rpc()
                    .call("getbestblockhash", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                let best: BlockHash = node
                    .rpc()
                    .call("getbestblockhash", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                if best == want {
                    Ok(())
                } else {
                    Err(format!("its tip is {best}, the pool node's {want}"))
                }
            },
        )
        .await?;
        Ok(())
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
