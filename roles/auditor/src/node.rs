//! The auditor's own bitcoind (the audit node) and how a template whose parent is no longer its
//! tip is still checked on its content.
//!
//! Bitcoin Core's proposal mode (`getblocktemplate {"mode":"proposal"}`) checks a block only on
//! the active tip (`TestBlockValidity`: `inconclusive-not-best-prevblk` otherwise). To audit a
//! template on an older parent, or on a parent a reorganisation left on a stale branch, the
//! audit node is rewound to that parent the way Core's own `dumptxoutset ... rollback` does it
//! (`rpc/blockchain.cpp`: `NetworkDisable` + `TemporaryRollback`): network activity suspended,
//! `invalidateblock` on the first block past the parent on every branch that outworks it, the
//! proposal, then `reconsiderblock` on each and the network back on. The pool's node is never
//! touched: the audit node follows the pool's chain over P2P and must be the auditor's alone
//! (a rewound node would hand a pool or a proxy templates on an old tip).
//!
//! Rewinds are serialised with every other proposal on the node (a read/write lock), and a
//! rewind interrupted by a crash is undone at the next start or rewind ([`AuditNode::recover`]:
//! every chain tip marked invalid is reconsidered: on an audit node no block is invalid but by
//! a rewind, since its only peer relays valid blocks, and reconsidering one that really is
//! invalid only finds it invalid again).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bitcoind_rpc::{BitcoinRpc, RpcError};
use serde_json::{json, Value};

/// Longest wait for one ordinary bitcoind answer (a 4 MB proposal takes well under a second).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one `invalidateblock`/`reconsiderblock` (disconnecting or reconnecting
/// many blocks after a long outage takes a while).
const REWIND_TIMEOUT: Duration = Duration::from_secs(600);
/// At most this many blocks are invalidated for one rewind (each removes one branch that
/// outworks the parent; more means the node keeps changing under us).
const MAX_INVALIDATIONS: usize = 64;
/// Missing parents remembered before old ones are pruned.
const MAX_MISSING: usize = 1024;
/// Ancestors of a stale parent walked to find where it leaves the active chain.
const MAX_FORK_DEPTH: usize = 10_000;

/// Why there is no verdict yet: retry the task later.
#[derive(Debug, thiserror::Error)]
pub enum NotYet {
    /// bitcoind did not answer usefully.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The audit node cannot decide yet (it is being rewound, or its chain moved under it).
    #[error("no verdict yet: {0}")]
    Lagging(String),
    /// The audit node does not have the template's parent (yet: its chain may lag the pool's).
    #[error("no verdict yet: {0}")]
    MissingParent(String),
}

/// What the node answered for a proposal, and how it got there.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// `null` (valid), a reject string, or what else Core said.
    pub answer: Value,
    /// Blocks of the active chain disconnected to make the parent the tip (0: it was the tip).
    pub rewound: u64,
}

/// Whether the node may be rewound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewind {
    /// The node is the auditor's own: rewind it to audit on older parents.
    Allowed,
    /// A node others use (the harness's `audit` command on a stack's node): a template not on
    /// its tip gets no verdict.
    Never,
}

/// The audit node and what the auditor remembers about it.
#[derive(Debug)]
pub struct AuditNode {
    rpc: BitcoinRpc,
    rewind: Rewind,
    /// Proposals on the tip share it; a rewind takes it alone.
    lock: tokio::sync::RwLock<()>,
    /// A rewind was not fully undone: recover before the next proposal.
    dirty: AtomicBool,
    /// When each parent the node did not have was first looked for.
    missing_since: Mutex<HashMap<String, Instant>>,
    /// How long a parent may stay unknown before its template is `unknown-parent`.
    unknown_parent_wait: Duration,
    /// When this auditor last turned the node's network back on (after a rewind).
    network_on_at: Mutex<Option<Instant>>,
}

/// After the auditor turns the node's network back on, its peer takes a moment to reconnect:
/// a look at the node this soon waits for it rather than count it as offline.
const RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// A parent the node has, or why not.
enum Parent {
    /// Header and block known: (height, in the active chain).
    Known { height: u64, active: bool },
    /// The node has no header for it.
    Unknown,
    /// Header known, block data missing (asked from peers).
    NoData,
}

impl AuditNode {
    /// The node behind `rpc`.
    pub fn new(rpc: BitcoinRpc, rewind: Rewind, unknown_parent_wait: Duration) -> Self {
        Self {
            rpc,
            rewind,
            lock: tokio::sync::RwLock::new(()),
            dirty: AtomicBool::new(rewind == Rewind::Allowed),
            missing_since: Mutex::new(HashMap::new()),
            unknown_parent_wait,
            network_on_at: Mutex::new(None),
        }
    }

    /// The RPC client.
    pub fn rpc(&self) -> &BitcoinRpc {
        &self.rpc
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        params: &[Value],
    ) -> Result<T, RpcError> {
        self.rpc.call_timeout(method, params, RPC_TIMEOUT).await
    }

    /// Undo any rewind left half done (a crash between `invalidateblock` and
    /// `reconsiderblock`): reconsider every chain tip marked invalid and turn the network on.
    pub async fn recover(&self) -> Result<usize, RpcError> {
        let tips: Vec<Value> = self.call("getchaintips", &[]).await?;
        let mut n = 0;
        for t in tips.iter().filter(|t| t["status"] == "invalid") {
            if let Some(hash) = t["hash"].as_str() {
                self.rpc
                    .call_timeout::<Value>("reconsiderblock", &[json!(hash)], REWIND_TIMEOUT)
                    .await?;
                n += 1;
            }
        }
        self.call::<Value>("setnetworkactive", &[json!(true)])
            .await?;
        if n > 0 {
            tracing::warn!(
                tips = n,
                "audit node: undid a rewind left half done (blocks reconsidered, network on)"
            );
        }
        Ok(n)
    }

    /// `getblocktemplate` proposal mode on `hex_block` on the current tip. A block the node
    /// already has (the template's first share was itself a block, or the block was
    /// invalidated by a rewind) answers `duplicate*` without checking anything: such a block is
    /// proposed again with another nonce (proof of work is not checked, so only its hash
    /// changes) to get the node's verdict on its content.
    async fn propose_here(&self, hex_block: &str) -> Result<Value, RpcError> {
        let mut data = hex_block.to_string();
        for nonce_bump in 1u32..=3 {
            let answer: Value = self
                .call(
                    "getblocktemplate",
                    &[json!({"mode": "proposal", "data": data})],
                )
                .await?;
            match &answer {
                Value::String(s) if s.starts_with("duplicate") => {
                    data = with_other_nonce(hex_block, nonce_bump);
                }
                _ => return Ok(answer),
            }
        }
        Ok(Value::String("duplicate".into()))
    }

    /// The proposal's answer on the node's tip, or, when `prev_hash` is not the tip, on the node
    /// rewound to `prev_hash`. `Err(NotYet)` while the node does not have the parent (and the
    /// wait for it is not over) or cannot answer.
    pub async fn propose(&self, prev_hash: &str, hex_block: &str) -> Result<Proposal, NotYet> {
        if self.dirty.load(Ordering::SeqCst) {
            let _w = self.lock.write().await;
            if self.dirty.load(Ordering::SeqCst) {
                self.recover().await?;
                self.dirty.store(false, Ordering::SeqCst);
            }
        }
        {
            let _r = self.lock.read().await;
            let answer = self.propose_here(hex_block).await?;
            if answer != json!(crate::INCONCLUSIVE) {
                self.forget_missing(prev_hash);
                return Ok(Proposal { answer, rewound: 0 });
            }
        }
        if self.rewind == Rewind::Never {
            return Err(NotYet::Lagging(format!(
                "the parent {prev_hash} is not this node's tip and the node may not be rewound"
            )));
        }
        let _w = self.lock.write().await;
        match self.parent(prev_hash).await? {
            Parent::Known { height, active } => {
                self.forget_missing(prev_hash);
                self.rewound_proposal(prev_hash, height, active, hex_block)
                    .await
            }
            Parent::Unknown => Err(self.missing(
                prev_hash,
                format!("the audit node does not know block {prev_hash}"),
            )),
            Parent::NoData => Err(self.missing(
                prev_hash,
                format!("the audit node has the header of {prev_hash} but not the block: asked its peers"),
            )),
        }
    }

    /// Whether the auditor gives up waiting for `prev_hash` (then the template is
    /// `unknown-parent`): the node, which still does not have it, has been networking with a
    /// peer and every block whose header it knows for `unknown_parent_wait` (so it is not
    /// merely lagging). Each look at it while the node is offline, alone or behind its headers
    /// starts the wait again: a peer that just reconnected has not sent its headers yet.
    pub async fn gives_up_on(&self, prev_hash: &str) -> Option<Duration> {
        let since = *self.missing_since.lock().ok()?.get(prev_hash)?;
        // Not while a rewind has the network off.
        let _r = self.lock.read().await;
        let mut synced = self.synced().await;
        let reconnecting = self
            .network_on_at
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < RECONNECT_GRACE);
        if !synced && reconnecting {
            // This auditor's own rewind dropped the peer: give it the moment to come back.
            let until = Instant::now() + Duration::from_secs(5);
            while !synced && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(250)).await; // polling the peer's return
                synced = self.synced().await;
            }
            if !synced {
                return None;
            }
        }
        if !synced {
            if let Ok(mut m) = self.missing_since.lock() {
                m.insert(prev_hash.to_string(), Instant::now());
            }
            return None;
        }
        let waited = since.elapsed();
        (waited >= self.unknown_parent_wait).then_some(waited)
    }

    /// Networking, with a peer, and every block whose header it knows.
    async fn synced(&self) -> bool {
        match (
            self.call::<Value>("getnetworkinfo", &[]).await,
            self.call::<Value>("getblockchaininfo", &[]).await,
        ) {
            (Ok(net), Ok(chain)) => {
                net["networkactive"] == true
                    && net["connections"].as_u64().unwrap_or(0) > 0
                    && chain["headers"] == chain["blocks"]
            }
            _ => false,
        }
    }

    fn missing(&self, prev_hash: &str, why: String) -> NotYet {
        if let Ok(mut m) = self.missing_since.lock() {
            if m.len() >= MAX_MISSING {
                // Parents given up on long ago (their templates have their verdicts).
                let keep = self.unknown_parent_wait * 10;
                m.retain(|_, since| since.elapsed() < keep);
            }
            m.entry(prev_hash.to_string()).or_insert_with(Instant::now);
        }
        NotYet::MissingParent(why)
    }

    fn forget_missing(&self, prev_hash: &str) {
        if let Ok(mut m) = self.missing_since.lock() {
            if !m.is_empty() {
                m.remove(prev_hash);
            }
        }
    }

    /// What the node has of `hash`; a header without its block is asked from every peer.
    async fn parent(&self, hash: &str) -> Result<Parent, NotYet> {
        let header: Value = match self.call("getblockheader", &[json!(hash)]).await {
            Ok(h) => h,
            Err(RpcError::Node { .. }) => return Ok(Parent::Unknown),
            Err(e) => return Err(e.into()),
        };
        let height = header["height"].as_u64().unwrap_or(0);
        let active = header["confirmations"].as_i64().unwrap_or(-1) >= 0;
        // The parent and, on a stale branch, its ancestors down to the active chain: the node
        // can only switch to the parent with every one of their blocks.
        let mut at = hash.to_string();
        let mut missing = false;
        for _ in 0..MAX_FORK_DEPTH {
            match self.call::<Value>("getblock", &[json!(at), json!(0)]).await {
                Ok(_) => {}
                Err(RpcError::Node { .. }) => {
                    missing = true;
                    self.ask_peers_for(&at).await?;
                }
                Err(e) => return Err(e.into()),
            }
            if active {
                break;
            }
            let h: Value = self.call("getblockheader", &[json!(at)]).await?;
            if h["confirmations"].as_i64().unwrap_or(-1) >= 0 {
                break;
            }
            match h["previousblockhash"].as_str() {
                Some(p) => at = p.to_string(),
                None => break,
            }
        }
        Ok(match missing {
            true => Parent::NoData,
            false => Parent::Known { height, active },
        })
    }

    /// Ask every peer for block `hash` (its header is known); not awaited: it arrives over P2P.
    async fn ask_peers_for(&self, hash: &str) -> Result<(), NotYet> {
        let peers: Vec<Value> = self.call("getpeerinfo", &[]).await?;
        for p in peers {
            if let Some(id) = p["id"].as_u64() {
                let _ = self
                    .call::<Value>("getblockfrompeer", &[json!(hash), json!(id)])
                    .await;
            }
        }
        Ok(())
    }

    /// Network off, rewind to `parent`, propose, restore (always, even after an error).
    async fn rewound_proposal(
        &self,
        parent: &str,
        height: u64,
        active: bool,
        hex_block: &str,
    ) -> Result<Proposal, NotYet> {
        // A node with inbound peers serves others (a pool's node?): never rewind it.
        let net: Value = self.call("getnetworkinfo", &[]).await?;
        let inbound = net["connections_in"].as_u64().unwrap_or(0);
        if inbound > 0 {
            tracing::error!(
                inbound,
                "the audit node has inbound peers: it serves others and is not rewound; give the auditor a bitcoind of its own (no listening, one outbound peer: the pool's node)"
            );
            return Err(NotYet::Lagging(format!(
                "the audit node has {inbound} inbound peer(s): not rewound (it must be the auditor's own)"
            )));
        }
        self.call::<Value>("setnetworkactive", &[json!(false)])
            .await?;
        let mut invalidated = Vec::new();
        let result = async {
            let rewound = self
                .rewind_to(parent, height, active, &mut invalidated)
                .await?;
            let answer = self.propose_here(hex_block).await?;
            Ok::<_, NotYet>(Proposal { answer, rewound })
        }
        .await;
        let restored = self.restore(&invalidated).await;
        if result.is_err() {
            // Whatever the rewind left (a block Core invalidated though the call failed), the
            // next audit reconsiders every invalid tip first.
            self.dirty.store(true, Ordering::SeqCst);
        }
        if let Err(e) = &restored {
            self.dirty.store(true, Ordering::SeqCst);
            tracing::warn!(
                "audit node: restoring after a rewind failed, retried before the next audit: {e}"
            );
        }
        let proposal = result?;
        restored?;
        Ok(proposal)
    }

    /// Invalidate, one branch at a time, the first block past `parent` on whatever chain the
    /// node makes active, until `parent` is its tip. Returns how many blocks of the chain that
    /// was active were disconnected.
    async fn rewind_to(
        &self,
        parent: &str,
        parent_height: u64,
        mut active: bool,
        invalidated: &mut Vec<String>,
    ) -> Result<u64, NotYet> {
        let mut disconnected = None;
        for _ in 0..MAX_INVALIDATIONS {
            let best: String = self.call("getbestblockhash", &[]).await?;
            if best == parent {
                return Ok(disconnected.unwrap_or(0));
            }
            let cut_height = if active {
                parent_height + 1
            } else {
                self.fork_height(parent).await? + 1
            };
            if disconnected.is_none() {
                let tip_height: u64 = self.call("getblockcount", &[]).await?;
                disconnected = Some((tip_height + 1).saturating_sub(cut_height));
            }
            let cut: String = match self.call("getblockhash", &[json!(cut_height)]).await {
                Ok(h) => h,
                // The active chain ends at or below the cut and the node did not switch to the
                // parent's branch: it lacks blocks of that branch (asked from its peers).
                Err(RpcError::Node { message, .. }) => {
                    return Err(self.missing(
                        parent,
                        format!(
                            "the audit node cannot switch to {parent}'s branch: no block at height {cut_height} ({message}); its blocks are asked from the peers"
                        ),
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            // Recorded before the call: one that fails after Core applied it (a timeout, a
            // dropped connection) is reconsidered all the same (reconsidering a block that
            // was not invalidated changes nothing).
            invalidated.push(cut.clone());
            self.rpc
                .call_timeout::<Value>("invalidateblock", &[json!(cut)], REWIND_TIMEOUT)
                .await?;
            let header: Value = self.call("getblockheader", &[json!(parent)]).await?;
            active = header["confirmations"].as_i64().unwrap_or(-1) >= 0;
        }
        Err(NotYet::Lagging(format!(
            "{parent} did not become the tip after {MAX_INVALIDATIONS} invalidations (the audit node keeps changing: is another process using it?): audited again"
        )))
    }

    /// Height of the last block `hash` (not in the active chain) shares with the active chain.
    async fn fork_height(&self, hash: &str) -> Result<u64, NotYet> {
        let mut at = hash.to_string();
        for _ in 0..MAX_FORK_DEPTH {
            let h: Value = self.call("getblockheader", &[json!(at)]).await?;
            if h["confirmations"].as_i64().unwrap_or(-1) >= 0 {
                return h["height"]
                    .as_u64()
                    .ok_or_else(|| NotYet::Lagging(format!("no height for {at}")));
            }
            at = match h["previousblockhash"].as_str() {
                Some(p) => p.to_string(),
                None => break,
            };
        }
        Err(NotYet::Lagging(format!(
            "{hash} leaves the active chain more than {MAX_FORK_DEPTH} blocks back"
        )))
    }

    /// Reconsider what was invalidated (newest first) and turn the network back on.
    async fn restore(&self, invalidated: &[String]) -> Result<(), RpcError> {
        let mut first_error = None;
        for hash in invalidated.iter().rev() {
            if let Err(e) = self
                .rpc
                .call_timeout::<Value>("reconsiderblock", &[json!(hash)], REWIND_TIMEOUT)
                .await
            {
                first_error.get_or_insert(e);
            }
        }
        match self.call::<Value>("setnetworkactive", &[json!(true)]).await {
            Ok(_) => {
                if let Ok(mut t) = self.network_on_at.lock() {
                    *t = Some(Instant::now());
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// `hex_block` with its header nonce (bytes 76..80) raised by `bump`.
fn with_other_nonce(hex_block: &str, bump: u32) -> String {
    let Some(nonce_hex) = hex_block.get(152..160) else {
        return hex_block.to_string();
    };
    let Ok(bytes) = hex::decode(nonce_hex) else {
        return hex_block.to_string();
    };
    let mut le = [0u8; 4];
    le.copy_from_slice(&bytes);
    let nonce = u32::from_le_bytes(le).wrapping_add(bump);
    format!(
        "{}{}{}",
        &hex_block[..152],
        hex::encode(nonce.to_le_bytes()),
        &hex_block[160..]
    )
}

#[cfg(test)]
mod tests {
    use super::with_other_nonce;

    #[test]
    fn another_nonce_changes_only_the_nonce_bytes() {
        let header = format!("{}{}{}", "a".repeat(152), "ffffffff", "0102");
        let out = with_other_nonce(&header, 1);
        assert_eq!(&out[..152], &header[..152]);
        assert_eq!(&out[152..160], "00000000");
        assert_eq!(&out[160..], "0102");
        let out = with_other_nonce(&header, 3);
        assert_eq!(&out[152..160], "02000000");
        assert_eq!(with_other_nonce("abc", 1), "abc");
    }
}
