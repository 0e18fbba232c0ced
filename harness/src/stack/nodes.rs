//! Operators' own bitcoind nodes: on the stack's chain (a copy of the same cached chain),
//! connected over P2P to the pool's node on loopback, so blocks and transactions propagate
//! for real. An operator that declares its own templates builds them from its node.

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
        let base = self
            .node_options
            .clone()
            .ok_or_else(|| anyhow!("stack {} runs no bitcoind", self.name))?;
        let pool_p2p = base
            .p2p_port
            .ok_or_else(|| anyhow!("the pool's bitcoind does not listen for peers"))?;
        let rpc = self.allocator.allocate()?;
        let node = Bitcoind::start(BitcoindOptions {
            dir: self.dir.join(format!("bitcoind-{name}")),
            rpc_port: rpc.port(),
            name: format!("bitcoind-{name}"),
            p2p_port: None,
            connect: Some(format!("127.0.0.1:{pool_p2p}")),
            ..base
        })
        .await
        .with_context(|| format!("starting the node of operator {name}"))?;
        self.ports.push(rpc);
        let pool = self.bitcoind()?.rpc();
        let expected_peers = self.operator_nodes.len() + 1;
        let what = format!(
            "the node of operator {name} to share the pool node's tip, both ends of their P2P connection past the version handshake"
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
                    "pool tip {a}, operator tip {b}; {here} peer(s) of the operator and {there} of the pool's node past the handshake"
                ))
            }
        })
        .await?;
        self.operator_nodes.insert(name.to_string(), node);
        self.write_summary()?;
        self.operator_node(name)
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
