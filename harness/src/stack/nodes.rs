//! Bitcoind nodes beside the pool's, on the stack's chain (a copy of the same cached chain),
//! connected over P2P to the pool's node on loopback, so blocks and transactions propagate
//! for real: operators' own nodes (an operator that declares its own templates builds them
//! from its node) and each auditor's audit node.

use std::time::Duration;

use anyhow::{anyhow, Context};

use super::Stack;
use crate::bitcoind::{Bitcoind, BitcoindOptions};
use crate::wait::wait_until;

impl Stack {
    /// Start operator `name`'s node, connected to the pool's node, and wait until both have
    /// the same tip.
    pub async fn start_operator_node(&mut self, name: &str) -> anyhow::Result<&Bitcoind> {
        anyhow::ensure!(
            !self.operator_nodes.contains_key(name),
            "operator node {name:?} already exists"
        );
        let node = self
            .start_peer_node(&format!("bitcoind-{name}"))
            .await
            .with_context(|| format!("starting the node of operator {name}"))?;
        self.operator_nodes.insert(name.to_string(), node);
        self.write_summary()?;
        self.operator_node(name)
    }

    /// Start the audit node of auditor `name` (`bitcoind-audit-<name>`: the auditor's own,
    /// following the pool's node over P2P; the auditor rewinds it to audit templates whose tip
    /// is gone) and wait until it has the pool node's tip.
    pub async fn start_audit_node(&mut self, name: &str) -> anyhow::Result<&Bitcoind> {
        anyhow::ensure!(
            !self.audit_nodes.contains_key(name),
            "auditor {name:?} already has an audit node"
        );
        let node = self
            .start_peer_node(&format!("bitcoind-audit-{name}"))
            .await
            .with_context(|| format!("starting the audit node of auditor {name}"))?;
        self.audit_nodes.insert(name.to_string(), node);
        self.write_summary()?;
        self.audit_node(name)
    }

    /// Auditor `name`'s audit node.
    pub fn audit_node(&self, name: &str) -> anyhow::Result<&Bitcoind> {
        self.audit_nodes
            .get(name)
            .ok_or_else(|| anyhow!("auditor {name:?} has no audit node on stack {}", self.name))
    }

    /// A bitcoind on the stack's chain (a copy of the same cached chain) connected to the
    /// pool's node only, once both have the same tip and their P2P connection is past the
    /// version handshake.
    async fn start_peer_node(&mut self, process: &str) -> anyhow::Result<Bitcoind> {
        let base = self
            .node_options
            .clone()
            .ok_or_else(|| anyhow!("stack {} runs no bitcoind", self.name))?;
        let pool_p2p = base
            .p2p_port
            .ok_or_else(|| anyhow!("the pool's bitcoind does not listen for peers"))?;
        let rpc = self.allocator.allocate()?;
        let node = Bitcoind::start(BitcoindOptions {
            dir: self.dir.join(process),
            rpc_port: rpc.port(),
            name: process.to_string(),
            p2p_port: None,
            connect: Some(format!("127.0.0.1:{pool_p2p}")),
            ..base
        })
        .await?;
        self.ports.push(rpc);
        let pool = self.bitcoind()?.rpc();
        let expected_peers = self.operator_nodes.len() + self.audit_nodes.len() + 1;
        let what = format!(
            "{process} to share the pool node's tip, both ends of their P2P connection past the version handshake"
        );
        wait_until(&what, Duration::from_secs(60), || async {
            let a: String = pool
                .call("getbestblockhash", &[])
                .await
                .map_err(|e| e.to_string())?;
            let b: String = node
                .rpc()
                .call("getbestblockhash", &[])
                .await
                .map_err(|e| e.to_string())?;
            let here = handshaken_peers(node.rpc()).await?;
            let there = handshaken_peers(pool).await?;
            if a == b && here > 0 && there >= expected_peers {
                Ok(())
            } else {
                Err(format!(
                    "pool tip {a}, {process} tip {b}; {here} peer(s) of {process} and {there} of the pool's node past the handshake"
                ))
            }
        })
        .await?;
        Ok(node)
    }

    /// Names of the operators' nodes.
    pub fn operator_node_names(&self) -> Vec<String> {
        self.operator_nodes.keys().cloned().collect()
    }

    /// Operator `name`'s node.
    pub fn operator_node(&self, name: &str) -> anyhow::Result<&Bitcoind> {
        self.operator_nodes
            .get(name)
            .ok_or_else(|| anyhow!("no node of operator {name:?} on stack {}", self.name))
    }
}

/// Peers of a node whose version handshake is done (a transaction is relayed only to those).
async fn handshaken_peers(rpc: &bitcoind_rpc::BitcoinRpc) -> Result<usize, String> {
    let peers: Vec<serde_json::Value> = rpc
        .call("getpeerinfo", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(peers
        .iter()
        .filter(|p| p["version"].as_u64().unwrap_or(0) > 0 && p["relaytxes"] == true)
        .count())
}
