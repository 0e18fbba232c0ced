//! Templates from bitcoind: poll the tip every `poll_interval_ms` and rebuild the template when
//! it changes (or every `refresh_secs` when the transactions changed), publish the newest to
//! every connection through a watch channel, and keep each template's transactions so that a
//! share that finds a block can be turned into a full block for `submitblock`.
//!
//! Template ids are `epoch << 32 | sequence` ([`ehash::template_id`]): the epoch is new at
//! every pool start (from Redis), so ids never repeat across restarts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bitcoind_rpc::BitcoinRpc;
use serde_json::json;
use stratum_apps::stratum_core::template_distribution_sv2::{
    NewTemplateOwned, SetNewPrevHashOwned,
};
use tokio::sync::{watch, Notify};

use crate::gbt::{self, BlockTemplate};
use crate::metrics::PoolMetrics;

/// Templates kept for block submission and audits (several tips' worth).
const KEPT_TEMPLATES: usize = 64;

/// Longest time the pool keeps its miners on the tip it has while bitcoind does not know that
/// tip (it forgot its newest blocks in a crash and gets them again from its peers). A node
/// with no peer never gets them: then the pool mines on what the node has.
pub const FORGOTTEN_TIP_WAIT: Duration = Duration::from_secs(30);

/// Core's JSON-RPC code for a block it does not know.
const RPC_INVALID_ADDRESS_OR_KEY: i32 = -5;

/// The pool's tip while bitcoind is behind it.
#[derive(Debug, Default)]
enum TipWait {
    /// bitcoind has the pool's tip.
    #[default]
    Level,
    /// Miners stay on `tip`; the wait has run since `since` (time bitcoind answered).
    Waiting { tip: String, since: Instant },
    /// The wait for `tip` ran out: the pool follows the node (until its tip changes).
    GaveUp { tip: String },
}

impl TipWait {
    fn gave_up_on(&self, tip: &str) -> bool {
        matches!(self, TipWait::GaveUp { tip: t } if t == tip)
    }

    /// How long the pool has waited on `tip`; `first` runs when the wait begins.
    fn waiting_on(&mut self, tip: &str, first: impl FnOnce()) -> Duration {
        match self {
            TipWait::Waiting { tip: t, since } if t == tip => since.elapsed(),
            _ => {
                first();
                *self = TipWait::Waiting {
                    tip: tip.to_string(),
                    since: Instant::now(),
                };
                Duration::ZERO
            }
        }
    }

    fn give_up(&mut self, tip: &str) {
        *self = TipWait::GaveUp {
            tip: tip.to_string(),
        };
    }

    /// The node has the pool's tip (or the pool follows a new one).
    fn caught_up(&mut self) {
        if let TipWait::Waiting { tip, since } = self {
            tracing::info!(
                tip = %tip,
                "bitcoind has the tip the pool mines on again after {:.1} s",
                since.elapsed().as_secs_f64()
            );
        }
        *self = TipWait::Level;
    }

    /// bitcoind did not answer: a wait under way counts again from its next answer.
    fn restart_clock(&mut self) {
        if let TipWait::Waiting { since, .. } = self {
            *since = Instant::now();
        }
    }
}

/// One template and everything needed to rebuild its block.
#[derive(Debug)]
pub struct TemplateRecord {
    /// Id (also in the SV2 messages).
    pub template_id: u64,
    /// `NewTemplate` (future form; connections clear the flag for same-tip refreshes).
    pub template: NewTemplateOwned,
    /// The tip it builds on.
    pub prev_hash: SetNewPrevHashOwned,
    /// Previous block hash, display order.
    pub prev_hash_display: String,
    /// Block height.
    pub height: u64,
    /// Smallest valid header time (median time past + 1).
    pub mintime: u32,
    /// Compact target.
    pub nbits: u32,
    /// Coinbase merkle path (internal order).
    pub merkle_path: Vec<[u8; 32]>,
    /// Raw transactions in block order.
    pub transactions: Vec<Vec<u8>>,
    /// GBT txids, to notice a changed mempool.
    txids: Vec<String>,
    /// The coinbase's value (subsidy plus fees), all of it paid to the pool's payout script.
    pub coinbase_value: u64,
}

/// Templates by id, plus which ones have (or are getting) an audit task.
#[derive(Debug, Default)]
pub struct TemplateStore {
    inner: Mutex<StoreInner>,
}

#[derive(Debug, Default)]
struct StoreInner {
    by_id: HashMap<u64, Arc<TemplateRecord>>,
    order: VecDeque<u64>,
    audited: HashSet<u64>,
}

impl TemplateStore {
    fn insert(&self, record: Arc<TemplateRecord>) {
        if let Ok(mut s) = self.inner.lock() {
            s.order.push_back(record.template_id);
            s.by_id.insert(record.template_id, record);
            while s.order.len() > KEPT_TEMPLATES {
                if let Some(old) = s.order.pop_front() {
                    s.by_id.remove(&old);
                    s.audited.remove(&old);
                }
            }
        }
    }

    /// The template with this id, if still kept.
    pub fn get(&self, template_id: u64) -> Option<Arc<TemplateRecord>> {
        self.inner.lock().ok()?.by_id.get(&template_id).cloned()
    }

    /// Claim the audit task of `template_id`: true for the first caller only, so the block is
    /// assembled once per template and not for every share while the append is in flight.
    pub fn claim_audit(&self, template_id: u64) -> bool {
        self.inner
            .lock()
            .map(|mut s| s.audited.insert(template_id))
            .unwrap_or(false)
    }

    /// Give a claim back after the append failed, so a later share tries again.
    pub fn release_audit(&self, template_id: u64) {
        if let Ok(mut s) = self.inner.lock() {
            s.audited.remove(&template_id);
        }
    }
}

/// Template ids of this pool process: `epoch << 32 | sequence`, shared by the pool's own
/// templates and the jobs operators declare.
#[derive(Debug)]
pub struct TemplateIds {
    epoch: u32,
    next: std::sync::atomic::AtomicU32,
}

impl TemplateIds {
    /// Ids of pool epoch `epoch`, from sequence 1.
    pub fn new(epoch: u32) -> Self {
        Self {
            epoch,
            next: std::sync::atomic::AtomicU32::new(1),
        }
    }

    /// The next id; an error once the 32-bit sequence is spent.
    pub fn next(&self) -> anyhow::Result<u64> {
        let seq = self
            .next
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |n| n.checked_add(1),
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "4 billion templates in one pool process: restart the pool for a new epoch"
                )
            })?;
        Ok(ehash::template_id(self.epoch, seq))
    }
}

/// Polls bitcoind and publishes templates.
pub struct TemplateSource {
    rpc: Arc<BitcoinRpc>,
    rules: Vec<&'static str>,
    poll: Duration,
    refresh: Duration,
    store: Arc<TemplateStore>,
    tx: watch::Sender<Option<Arc<TemplateRecord>>>,
    kick: Arc<Notify>,
    metrics: Arc<PoolMetrics>,
    ids: Arc<TemplateIds>,
}

impl TemplateSource {
    /// A source numbering its templates with `ids`; `kick` makes it poll at once
    /// (after a block was submitted).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rpc: Arc<BitcoinRpc>,
        rules: Vec<&'static str>,
        poll: Duration,
        refresh: Duration,
        store: Arc<TemplateStore>,
        kick: Arc<Notify>,
        metrics: Arc<PoolMetrics>,
        ids: Arc<TemplateIds>,
    ) -> (Self, watch::Receiver<Option<Arc<TemplateRecord>>>) {
        let (tx, rx) = watch::channel(None);
        (
            Self {
                rpc,
                rules,
                poll,
                refresh,
                store,
                tx,
                kick,
                metrics,
                ids,
            },
            rx,
        )
    }

    /// Build the first template (fails if bitcoind cannot give one); returns its tip.
    pub async fn first(&mut self) -> anyhow::Result<String> {
        self.rebuild(None).await?;
        self.tx
            .borrow()
            .as_ref()
            .map(|r| r.prev_hash_display.clone())
            .context("no template after the first build")
    }

    /// Poll until `shutdown`.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut last_refresh = Instant::now();
        let mut failing = false;
        // The pool's tip while bitcoind is behind it (see `FORGOTTEN_TIP_WAIT`).
        let mut behind = TipWait::default();
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(self.poll) => {},
                _ = self.kick.notified() => {},
            }
            let current = self.tx.borrow().clone();
            let result = async {
                let best: String = self.rpc.call("getbestblockhash", &[]).await?;
                let tip_changed = current
                    .as_ref()
                    .map(|c| c.prev_hash_display != best)
                    .unwrap_or(true);
                if let (true, Some(c)) = (tip_changed, current.as_deref()) {
                    if self.keep_tip_ahead(c, &best, &mut behind).await? {
                        return Ok(());
                    }
                } else {
                    behind.caught_up();
                }
                if tip_changed || last_refresh.elapsed() >= self.refresh {
                    last_refresh = Instant::now();
                    self.rebuild(current.as_deref()).await?;
                }
                anyhow::Ok(())
            }
            .await;
            if result.is_err() {
                // The wait counts time the node answers: it starts again when it is back.
                behind.restart_clock();
            }
            match (result, failing) {
                (Err(e), false) => {
                    tracing::error!("template update failed (keeping the last template): {e:#}");
                    failing = true;
                }
                (Ok(()), true) => {
                    tracing::info!("template updates work again");
                    failing = false;
                }
                _ => {}
            }
        }
    }

    /// Whether to keep the miners on `current`'s tip although bitcoind's best block is now
    /// `best`: bitcoind does not know that tip, or knows less work on its best block than on
    /// it (it has the tip's header, not yet its chain). A node that was killed comes back with
    /// the chain it last wrote to disk (Core writes its block index about hourly), behind the
    /// blocks it had, and catches up only once a peer reconnects, headers first. A template on
    /// an older block would have miners work on a chain the network left: a block found there
    /// is stale and known to this node alone, so no audit node could ever check the shares
    /// made on it. A reorganisation (the best block has at least the tip's work) is followed
    /// at once; a node still behind after [`FORGOTTEN_TIP_WAIT`] of answering is followed too.
    async fn keep_tip_ahead(
        &self,
        current: &TemplateRecord,
        best: &str,
        behind: &mut TipWait,
    ) -> anyhow::Result<bool> {
        let tip = &current.prev_hash_display;
        if behind.gave_up_on(tip) {
            return Ok(false);
        }
        let work = |h: &serde_json::Value| h["chainwork"].as_str().unwrap_or_default().to_string();
        let ahead = match self
            .rpc
            .call::<serde_json::Value>("getblockheader", &[json!(tip)])
            .await
        {
            Err(e) if e.code() == Some(RPC_INVALID_ADDRESS_OR_KEY) => true,
            Err(e) => return Err(e.into()),
            Ok(ours) => {
                let theirs: serde_json::Value =
                    self.rpc.call("getblockheader", &[json!(best)]).await?;
                // Chainwork is 64 hex digits: compared as text, it compares as a number.
                work(&theirs) < work(&ours)
            }
        };
        if !ahead {
            behind.caught_up();
            return Ok(false);
        }
        let waited = behind.waiting_on(tip, || {
            tracing::warn!(
                tip = %tip,
                node_best = %best,
                "bitcoind is behind the tip the pool mines on (it lost its newest blocks, a \
                 crash?): miners stay on it while the node catches up from its peers, at most \
                 {} s",
                FORGOTTEN_TIP_WAIT.as_secs()
            );
            self.metrics.forgotten_tips.inc();
        });
        if waited < FORGOTTEN_TIP_WAIT {
            return Ok(true);
        }
        tracing::warn!(
            tip = %tip,
            node_best = %best,
            "bitcoind is still behind the tip the pool mined on after {} s (no peer has it?): \
             mining on the node's best block",
            FORGOTTEN_TIP_WAIT.as_secs()
        );
        behind.give_up(tip);
        Ok(false)
    }

    /// Fetch a template; publish it if it differs from `current`. Returns whether it did.
    async fn rebuild(&mut self, current: Option<&TemplateRecord>) -> anyhow::Result<bool> {
        let gbt: BlockTemplate = self
            .rpc
            .call("getblocktemplate", &[json!({"rules": self.rules})])
            .await
            .context("getblocktemplate")?;
        let txids: Vec<String> = gbt.transactions.iter().map(|t| t.txid.clone()).collect();
        if let Some(c) = current {
            if c.prev_hash_display == gbt.previousblockhash
                && c.txids == txids
                && c.coinbase_value == gbt.coinbasevalue
            {
                return Ok(false); // nothing new
            }
        }
        let id = self.ids.next()?;
        let converted = gbt::convert(&gbt, id)?;
        let transactions = gbt
            .transactions
            .iter()
            .map(|t| hex::decode(&t.data).context("template transaction is not hex"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let record = Arc::new(TemplateRecord {
            template_id: id,
            template: converted.template,
            prev_hash: converted.prev_hash,
            prev_hash_display: gbt.previousblockhash.clone(),
            height: gbt.height,
            mintime: gbt.mintime,
            nbits: converted.nbits,
            merkle_path: converted.merkle_path,
            transactions,
            txids,
            coinbase_value: gbt.coinbasevalue,
        });
        tracing::info!(
            template_id = id,
            height = gbt.height,
            prev = %gbt.previousblockhash,
            txs = record.transactions.len(),
            "new template"
        );
        self.store.insert(record.clone());
        self.metrics.template_built();
        let _ = self.tx.send(Some(record));
        Ok(true)
    }
}

#[cfg(test)]
impl TemplateRecord {
    /// A record for `gbt` (unit tests).
    pub fn from_gbt(gbt: &BlockTemplate, template_id: u64) -> anyhow::Result<Self> {
        let converted = gbt::convert(gbt, template_id)?;
        Ok(Self {
            template_id,
            template: converted.template,
            prev_hash: converted.prev_hash,
            prev_hash_display: gbt.previousblockhash.clone(),
            height: gbt.height,
            mintime: gbt.mintime,
            nbits: converted.nbits,
            merkle_path: converted.merkle_path,
            transactions: Vec::new(),
            txids: Vec::new(),
            coinbase_value: gbt.coinbasevalue,
        })
    }
}
