//! The operator's own bitcoind (`template_source = "miner"`): its `getblocktemplate`, polled
//! every `node.poll_interval_ms` and published to every miner session when the tip or the
//! transactions change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bitcoin::Txid;
use bitcoind_rpc::BitcoinRpc;
use hashpool_config::miner_side::NodeSection;
use serde_json::{json, Value};
use sv2_templates::BlockTemplate;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A rebuild on the same tip at most this often (a new tip is taken at once).
const REFRESH: Duration = Duration::from_secs(5);

/// A template of the operator's node.
#[derive(Debug, Clone)]
pub struct NodeTemplate {
    /// Its `getblocktemplate` answer.
    pub gbt: BlockTemplate,
    /// Coinbase txid of the tip block (fraud `immature-coinbase-spend` spends it).
    pub tip_coinbase: Option<Txid>,
}

/// Polls the node.
pub struct NodePoller {
    rpc: BitcoinRpc,
    rules: Vec<&'static str>,
    poll: Duration,
    tx: watch::Sender<Option<Arc<NodeTemplate>>>,
}

impl NodePoller {
    /// A poller for `node`, and the receiver sessions watch.
    pub fn new(
        node: &NodeSection,
    ) -> anyhow::Result<(Self, watch::Receiver<Option<Arc<NodeTemplate>>>)> {
        let rpc = BitcoinRpc::new(&node.rpc_url, &node.rpc_user, node.rpc_password.expose())?;
        let rules = if node.chain == "signet" {
            vec!["segwit", "signet"]
        } else {
            vec!["segwit"]
        };
        let (tx, rx) = watch::channel(None);
        Ok((
            Self {
                rpc,
                rules,
                poll: Duration::from_millis(node.poll_interval_ms),
                tx,
            },
            rx,
        ))
    }

    /// The first template (fails if the node cannot give one).
    pub async fn first(&mut self) -> anyhow::Result<()> {
        let t = self.fetch().await.with_context(|| {
            format!(
                "cannot get a block template from the operator's bitcoind at {}",
                self.rpc.url()
            )
        })?;
        self.tx.send_replace(Some(Arc::new(t)));
        Ok(())
    }

    async fn fetch(&self) -> anyhow::Result<NodeTemplate> {
        let gbt: BlockTemplate = self
            .rpc
            .call("getblocktemplate", &[json!({"rules": self.rules})])
            .await
            .context("getblocktemplate")?;
        let block: Value = self
            .rpc
            .call("getblock", &[json!(gbt.previousblockhash), json!(1)])
            .await
            .context("getblock of the tip")?;
        let tip_coinbase = block["tx"][0].as_str().and_then(|s| s.parse().ok());
        Ok(NodeTemplate { gbt, tip_coinbase })
    }

    /// Poll until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut refreshed = Instant::now();
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                // Poll interval of the operator's node (a new tip is noticed within it).
                _ = tokio::time::sleep(self.poll) => {}
            }
            let current = self.tx.borrow().clone();
            let result = async {
                let best: String = self.rpc.call("getbestblockhash", &[]).await?;
                let new_tip = current
                    .as_ref()
                    .is_none_or(|c| c.gbt.previousblockhash != best);
                if !new_tip && refreshed.elapsed() < REFRESH {
                    return anyhow::Ok(());
                }
                refreshed = Instant::now();
                let t = self.fetch().await?;
                let changed = current.as_ref().is_none_or(|c| {
                    c.gbt.previousblockhash != t.gbt.previousblockhash
                        || c.gbt.coinbasevalue != t.gbt.coinbasevalue
                        || c.gbt.transactions.len() != t.gbt.transactions.len()
                        || c.gbt
                            .transactions
                            .iter()
                            .zip(&t.gbt.transactions)
                            .any(|(a, b)| a.txid != b.txid)
                });
                if changed {
                    tracing::info!(
                        height = t.gbt.height,
                        prev = %t.gbt.previousblockhash,
                        txs = t.gbt.transactions.len(),
                        "new template from the operator's node"
                    );
                    self.tx.send_replace(Some(Arc::new(t)));
                }
                Ok(())
            }
            .await;
            match (result, failing) {
                (Err(e), false) => {
                    tracing::error!(
                        "the operator's node gives no template (keeping the last): {e:#}"
                    );
                    failing = true;
                }
                (Ok(()), true) => {
                    tracing::info!("the operator's node answers again");
                    failing = false;
                }
                _ => {}
            }
        }
    }
}
