//! What Core Lightning knows of one outgoing payment, read with its own RPCs (`listpays`,
//! `listpeerchannels`) over the pool node's socket, each call bounded in time (a paused node
//! never answers). `cdk-cln` reports a failed payment, and one it never heard of, as
//! "unknown"; the mint needs to tell them apart to release what it held.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde_json::{json, Value};

/// Longest wait for one Core Lightning answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What Core Lightning says of a payment hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Paid: msat sent (fees included) and the preimage.
    Complete {
        /// msat sent, fees included.
        sent_msat: u64,
        /// The preimage (hex).
        preimage: Option<String>,
    },
    /// Recorded as pending; `htlc` tells whether an outgoing HTLC for it is on a channel.
    Pending {
        /// An HTLC for the hash is on some channel (offered or committed).
        htlc: bool,
    },
    /// Every attempt failed: it can no longer complete.
    Failed,
    /// Core Lightning has no payment for the hash.
    None,
}

/// The pool node's RPC socket.
#[derive(Debug, Clone)]
pub struct Node {
    rpc_path: PathBuf,
}

impl Node {
    /// The node behind `rpc_path`.
    pub fn new(rpc_path: &Path) -> Self {
        Self {
            rpc_path: rpc_path.to_path_buf(),
        }
    }

    async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let call = async {
            let mut rpc = cln_rpc::ClnRpc::new(&self.rpc_path)
                .await
                .with_context(|| format!("cannot open {}", self.rpc_path.display()))?;
            rpc.call_raw::<Value, Value>(method, &params)
                .await
                .map_err(|e| anyhow!("lightningd {method}: {e}"))
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| anyhow!("lightningd {method}: no answer within {CALL_TIMEOUT:?}"))?
    }

    /// What the node knows of the payment of `payment_hash` (hex).
    pub async fn status(&self, payment_hash: &str) -> anyhow::Result<PaymentStatus> {
        let pays = self
            .call("listpays", json!({ "payment_hash": payment_hash }))
            .await?;
        let pays = pays["pays"].as_array().cloned().unwrap_or_default();
        if let Some(done) = pays.iter().find(|p| p["status"] == "complete") {
            return Ok(PaymentStatus::Complete {
                sent_msat: done["amount_sent_msat"]
                    .as_u64()
                    .context("a complete payment without amount_sent_msat")?,
                preimage: done["preimage"].as_str().map(str::to_string),
            });
        }
        if pays.iter().any(|p| p["status"] == "pending") {
            let channels = self.call("listpeerchannels", json!({})).await?;
            let htlc = channels["channels"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["htlcs"].as_array().cloned().unwrap_or_default())
                .any(|h| h["direction"] == "out" && h["payment_hash"] == payment_hash);
            return Ok(PaymentStatus::Pending { htlc });
        }
        if pays.is_empty() {
            Ok(PaymentStatus::None)
        } else {
            Ok(PaymentStatus::Failed)
        }
    }
}
