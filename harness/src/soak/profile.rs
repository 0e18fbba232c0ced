//! The stacks a soak runs against. Both are on a private signet started from the rewards
//! chain (the pool's node holds matured rewards, so redemptions pay real sats).
//!
//! - `small`: bitcoind, Redis, pool, mint, auditors `a` and `b` (each with its audit node),
//!   the harness's SV2 sniffer between every proxy and the pool, honest operator `alice`
//!   (proxy on pool templates, a CPU miner, a Lightning node with a channel from the pool's,
//!   and two replaying miners, `replay-duplicate` and `replay-stale`, down until a replay
//!   fault starts one), fraudulent operator `mallory` (declares templates from its own
//!   node, each invalid by the next of the seven audited fraud kinds), Lightning node `carol` that no channel reaches, and
//!   node `fork` that mines the competing branches of reorganisations.
//! - `full`: the small stack plus honest operator `dave` declaring its own templates from its
//!   node (with a Lightning node and channel of its own) and a farm of 100 simulated miners
//!   behind `alice`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::schedule::Replay;
use crate::roles::MinerOptions;
use crate::wait::wait_until;
use crate::{Chain, HarnessConfig, Stack};

/// The pool's fee on matured rewards.
pub const POOL_FEE_PPM: u64 = 20_000;
/// Each channel the pool's node opens to an operator's node.
const CHANNEL_SAT: u64 = 5_000_000;
/// Blocks mined over the channels' funding before the nemesis starts (its reorganisations
/// replace at most 3 blocks below the tip they start from).
const FUNDING_BURIAL: u64 = 6;
/// The operator node that mines reorganisations' branches (never a fault target).
pub const FORK_NODE: &str = "fork";
/// The frauds `mallory`'s templates carry, one per template in turn: every kind the pool
/// accepts shares for and only the audit catches (the kinds it refuses inline earn no quote).
pub const FRAUD: &str = "coinbase-overclaim,missing-input,double-spend,over-weight,\
wrong-witness-commitment,immature-coinbase-spend,non-final";

/// Which stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Two operators, two auditors, three Lightning nodes.
    Small,
    /// The small stack plus an honest declaring operator and a farm of 100 miners.
    Full,
}

impl Profile {
    /// Operators that run a wallet and a Lightning node (redeemers).
    pub fn redeemers(self) -> Vec<&'static str> {
        match self {
            Profile::Small => vec!["alice"],
            Profile::Full => vec!["alice", "dave"],
        }
    }

    /// Honest operators (none of their templates may fail).
    pub fn honest(self) -> Vec<&'static str> {
        self.redeemers()
    }

    /// Fraudulent operators (every one of their templates must fail).
    pub fn fraudulent(self) -> Vec<&'static str> {
        vec!["mallory"]
    }

    /// Faults in effect at once unless `--max-faults` says otherwise.
    pub fn default_max_faults(self) -> usize {
        match self {
            Profile::Small => 2,
            Profile::Full => 3,
        }
    }

    /// The pool's vardiff aim per channel. The full stack's farm opens 100 channels: at the
    /// small stack's 600 per minute each, its quotes (one per share) outrun what one
    /// operator's wallet mints on two cores, and the run measures that instead of the faults.
    pub fn shares_per_minute(self) -> f32 {
        match self {
            Profile::Small => 600.0,
            Profile::Full => 60.0,
        }
    }

    /// Processes the nemesis may kill, stop or pause (names as in `stack.json`).
    pub fn fault_targets(self) -> Vec<&'static str> {
        let mut t = vec![
            "bitcoind",
            "redis",
            "pool",
            "mint",
            "auditor-a",
            "auditor-b",
            "bitcoind-audit-a",
            "bitcoind-audit-b",
            "proxy-alice",
            "proxy-mallory",
            "bitcoind-mallory",
            "lightning-pool",
            "lightning-alice",
        ];
        if self == Profile::Full {
            t.extend(["proxy-dave", "bitcoind-dave", "lightning-dave"]);
        }
        t
    }

    /// Start the stack, open the channels, and wait until every honest operator has minted
    /// ehash (the workload is running).
    pub async fn start(self, config: &HarnessConfig, name: &str) -> anyhow::Result<Stack> {
        let mut stack = Stack::builder(name, config)
            .chain(Chain::Signet)
            .redis()
            .rewards()
            .start()
            .await?;
        let pool = crate::roles::PoolOptions {
            min_bits: crate::lightning::REDEMPTION_MIN_BITS,
            shares_per_minute: self.shares_per_minute(),
            ..Default::default()
        };
        // Miners connect again by themselves when their proxy goes away, as real ones do.
        let miner = MinerOptions {
            reconnect: true,
            ..Default::default()
        };
        stack
            .start_redemption_side(&pool, &Default::default(), POOL_FEE_PPM)
            .await?;
        // Every proxy reaches the pool through the harness's SV2 sniffer, so the nemesis can
        // delay, blackhole and cut the pool's links. It records no frame (a run relays
        // millions).
        stack.start_sniffer().await?.set_recording(false);
        stack.start_auditor("b", 2).await?;
        stack.start_operator_node(FORK_NODE).await?;
        stack.start_operator_node("mallory").await?;
        stack
            .start_proxy_declaring("mallory", true, 500_000.0, Some(("mallory", Some(FRAUD))))
            .await?;
        stack.start_miner("mallory-cpu", "mallory", &miner).await?;
        stack.start_proxy("alice", true, 500_000.0).await?;
        stack.start_miner("alice-cpu", "alice", &miner).await?;
        // Replaying miners behind alice, down until a replay fault starts one.
        for replay in [Replay::Duplicate, Replay::Stale] {
            let opts = MinerOptions {
                behaviour: replay.behaviour().into(),
                ..miner.clone()
            };
            let m = stack.start_miner(&replay.miner(), "alice", &opts).await?;
            m.process().stop().await?;
            // Its log then holds only what it did during replay faults (the check reads it).
            std::fs::write(m.log_path(), "")?;
        }
        if self == Profile::Full {
            stack.start_operator_node("dave").await?;
            stack
                .start_proxy_declaring("dave", true, 500_000.0, Some(("dave", None)))
                .await?;
            stack.start_miner("dave-cpu", "dave", &miner).await?;
            let farm = MinerOptions {
                connections: 100,
                hashrate: Some(1_000_000.0),
                log_shares: false,
                ..miner.clone()
            };
            stack.start_miner("farm", "alice", &farm).await?;
        }
        stack.start_lightning("carol", None).await?;
        for who in self.redeemers() {
            stack.start_lightning(who, None).await?;
            stack.open_pool_channel(who, CHANNEL_SAT).await?;
        }
        // Bury the funding transactions below any reorganisation the nemesis makes: Core
        // Lightning fails a channel whose funding is reorganised out while it is in use (seen
        // in a CI soak, a 3-block reorganisation a few blocks after the channels opened).
        stack.mine_blocks(FUNDING_BURIAL).await?;
        for who in self.honest() {
            let proxy = stack.proxy(who)?;
            wait_until(
                &format!("operator {who}'s first minted ehash"),
                Duration::from_secs(180),
                || async {
                    let s = proxy.wallet_status().await.map_err(|e| e.to_string())?;
                    if s.minted > 0 {
                        Ok(())
                    } else {
                        Err(format!("{s:?}"))
                    }
                },
            )
            .await?;
        }
        Ok(stack)
    }
}
