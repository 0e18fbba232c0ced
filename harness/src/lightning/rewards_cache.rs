//! Matured block rewards for the pool's Lightning node, built once per machine from
//! `fixtures/chains/signet-rewards.blocks`.
//!
//! Rewards count only after 100 confirmations, and no scenario can wait for 100 signet
//! blocks (about 1.6 s each here). So the harness builds, once, a chain on top of the cached
//! signet chain in which one coinbase pays the pool node's wallet (a `lightningd` with the
//! fixed seed [`pool_hsm_secret`]) its channel liquidity at a second address (not the payout
//! address: it is no reward), then [`REWARD_BLOCKS`] coinbases of [`REWARD_SATS`] each pay
//! the payout address, and 100 more blocks mature them; and it keeps that node's lightning
//! directory with it: every stack that wants rewards starts from a copy of both, as a pool
//! node that has been mining for a while would be.
//!
//! The rewards are small on purpose (a coinbase may claim less than the subsidy): with the
//! ehash a few shares earn in a scenario, one ehash is worth some sats to some tens of sats,
//! as on a pool that has been paying shares for a while, so a redemption loses next to
//! nothing to rounding to whole ehash (at 50 BTC per coinbase one ehash was worth about
//! 10^8 sat and any invoice cost a whole ehash).
//! `<cache_dir>/chains/signet-rewards-v<FORMAT>-<hashes of the signet and rewards fixtures>-<bitcoind version>-<lightningd version>/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bitcoin::hashes::{sha256, Hash};
use serde::{Deserialize, Serialize};

use super::{LightningNode, LightningOptions};
use crate::binaries::{find, Program};
use crate::bitcoind::{copy_dir, ensure_chain_cache, Bitcoind, BitcoindOptions, Chain};
use crate::config::HarnessConfig;
use crate::ports::PortAllocator;
use crate::wait::wait_until;

/// Bump when the layout or content changes.
const FORMAT: u32 = 4;
/// Coinbases paid to the pool's payout address (the pool node's first address).
pub const REWARD_BLOCKS: u64 = 3;
/// What each of them claims, sats.
pub const REWARD_SATS: u64 = 20_000;
/// What the coinbase paying the pool node's liquidity claims, sats (channels are funded from
/// it; it is not a reward: it pays another address).
pub const LIQUIDITY_SATS: u64 = 100_000_000;
/// Blocks that mature them.
pub const MATURITY: u64 = 100;
/// Seed of the pool node's `hsm_secret`.
const POOL_LN_SEED: &str = "hashpool-harness pool lightning node v1";
/// Leading zero bits of a 1-ehash share on stacks that redeem (the pool's `min_bits`): a share
/// of the harness's CPU miners (about 16 zero bits) earns some hundred ehash, so these
/// rewards make one ehash worth some tens of sats.
pub const REDEMPTION_MIN_BITS: u32 = 8;

/// The first address the pool node's wallet gives (`newaddr`, from [`pool_hsm_secret`]): the
/// rewards fixture's coinbases pay it. The build checks lightningd still derives it.
pub const POOL_NODE_ADDRESS: &str = "tb1qqs2lgan9cxvqfcqwanw4j7258x5veaha2kejf7";
/// The second (`newaddr` again): the liquidity coinbase pays it.
pub const POOL_NODE_LIQUIDITY_ADDRESS: &str = "tb1qehrhwjrkn3xxzkkv7xzdenafndnzkrx7puaehh";

/// The pool node's fixed wallet seed.
pub fn pool_hsm_secret() -> [u8; 32] {
    sha256::Hash::hash(POOL_LN_SEED.as_bytes()).to_byte_array()
}

/// A chain with matured rewards and the pool node that holds them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardsChain {
    /// Tip height.
    pub blocks: u64,
    /// The pool node's address the reward coinbases pay (the pool's payout address).
    pub pool_address: String,
    /// Their total, satoshis.
    pub rewards_sats: u64,
    /// Versions it was built with.
    pub bitcoind_version: String,
    /// `lightningd --version`.
    pub lightningd_version: String,
    /// Format.
    pub format: u32,
    /// Chain directory to seed a node's datadir with (`signet/`).
    #[serde(skip)]
    pub chain_dir: PathBuf,
    /// The pool node's lightning directory.
    #[serde(skip)]
    pub pool_ln_dir: PathBuf,
}

fn version_of(exe: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(exe)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", exe.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn read(dir: &Path, bitcoind: &str, lightningd: &str) -> Option<RewardsChain> {
    let mut r: RewardsChain =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).ok()?).ok()?;
    let ok = r.format == FORMAT
        && r.bitcoind_version == bitcoind
        && r.lightningd_version == lightningd
        && dir.join("chain").join("blocks").is_dir()
        && dir.join("pool-ln").is_dir();
    r.chain_dir = dir.join("chain");
    r.pool_ln_dir = dir.join("pool-ln");
    ok.then_some(r)
}

/// The rewards chain, built first if this machine has none.
pub async fn ensure_rewards_chain(config: &HarnessConfig) -> anyhow::Result<RewardsChain> {
    let bitcoind_exe = find(Program::Bitcoind, &config.cache_dir)?;
    let lightningd = find(Program::Lightningd, &config.cache_dir)?;
    let base = ensure_chain_cache(&bitcoind_exe, Chain::Signet, config).await?;
    let ln_version = version_of(&lightningd)?;
    let key = format!(
        "signet-rewards-v{FORMAT}-{}{}-{}-{}",
        crate::bitcoind::chain_fixture::fixture_id(Chain::Signet)?,
        crate::bitcoind::chain_fixture::text_id(crate::bitcoind::chain_fixture::REWARDS_FIXTURE),
        sanitize(&base.bitcoind_version),
        sanitize(&ln_version)
    );
    let chains = config.cache_dir.join("chains");
    let final_dir = chains.join(&key);
    if let Some(r) = read(&final_dir, &base.bitcoind_version, &ln_version) {
        return Ok(r);
    }
    let _lock = crate::bitcoind::lock_exclusive(&chains.join(format!("{key}.lock"))).await?;
    if let Some(r) = read(&final_dir, &base.bitcoind_version, &ln_version) {
        return Ok(r);
    }
    let tmp = chains.join(format!("{key}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let manifest = build(config, &base, &tmp, &bitcoind_exe, &lightningd, &ln_version)
        .await
        .with_context(|| {
            format!(
                "building the rewards chain (work dir kept: {})",
                tmp.display()
            )
        })?;
    std::fs::write(
        tmp.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)?;
    read(&final_dir, &base.bitcoind_version, &ln_version).ok_or_else(|| {
        anyhow!(
            "rewards chain {} unreadable after writing it",
            final_dir.display()
        )
    })
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .chars()
        .take(40)
        .collect()
}

async fn build(
    config: &HarnessConfig,
    base: &crate::bitcoind::CachedChain,
    tmp: &Path,
    bitcoind_exe: &Path,
    lightningd: &Path,
    ln_version: &str,
) -> anyhow::Result<RewardsChain> {
    let ports = PortAllocator::new(&config.port_lock_dir, config.port_min, config.port_max);
    let (rpc, p2p, proxy) = (ports.allocate()?, ports.allocate()?, ports.allocate()?);
    let start = Instant::now();
    let node = Bitcoind::start(BitcoindOptions {
        exe: bitcoind_exe.to_path_buf(),
        chain: Chain::Signet,
        dir: tmp.join("node"),
        rpc_port: rpc.port(),
        seed: Some(base.dir.clone()),
        extra_args: Vec::new(),
        name: "bitcoind".into(),
        p2p_port: None,
        connect: None,
        start_timeout: config.start_timeout(),
        stop_timeout: config.stop_timeout(),
    })
    .await?;
    let ln = LightningNode::start(
        LightningOptions {
            name: "lightning-pool".into(),
            dir: tmp.join("ln-node"),
            exe: lightningd.to_path_buf(),
            bitcoin_cli: find(Program::BitcoinCli, &config.cache_dir)?,
            p2p_port: p2p.port(),
            proxy_port: proxy.port(),
            hsm_secret: Some(pool_hsm_secret()),
            seed_dir: None,
            timeouts: (config.start_timeout(), config.stop_timeout()),
        },
        &node,
    )
    .await?;
    let pool_address = ln.new_address().await?;
    anyhow::ensure!(
        pool_address == POOL_NODE_ADDRESS,
        "lightningd derived {pool_address} from the pool node's fixed hsm_secret, the rewards \
         fixture pays {POOL_NODE_ADDRESS}: set POOL_NODE_ADDRESS to it and run `just chain-fixtures`"
    );
    let liquidity_address = ln.new_address().await?;
    anyhow::ensure!(
        liquidity_address == POOL_NODE_LIQUIDITY_ADDRESS,
        "lightningd derived {liquidity_address} as the pool node's second address, the rewards \
         fixture pays its liquidity to {POOL_NODE_LIQUIDITY_ADDRESS}: set POOL_NODE_LIQUIDITY_ADDRESS \
         to it and run `just chain-fixtures`"
    );
    let fixture = crate::bitcoind::chain_fixture::parse(
        crate::bitcoind::chain_fixture::REWARDS_FIXTURE,
        "signet-rewards.blocks",
    )?;
    anyhow::ensure!(
        fixture.len() as u64 == 1 + REWARD_BLOCKS + MATURITY,
        "fixtures/chains/signet-rewards.blocks holds {} blocks, not {}: run `just chain-fixtures`",
        fixture.len(),
        1 + REWARD_BLOCKS + MATURITY
    );
    eprintln!(
        "[harness] building the rewards chain once for this machine: the pool node's liquidity, {REWARD_BLOCKS} rewards to its payout address, {MATURITY} blocks to mature them, from fixtures/chains/signet-rewards.blocks"
    );
    for (i, block) in fixture.iter().enumerate() {
        let hex = bitcoin::consensus::encode::serialize_hex(block);
        let answer: serde_json::Value = node.rpc().call("submitblock", &[hex.into()]).await?;
        anyhow::ensure!(
            answer.is_null(),
            "bitcoind refused rewards fixture block {} ({}): {answer}",
            i + 1,
            block.block_hash()
        );
    }
    let height = node.height().await?;
    let rewards_sats = REWARD_BLOCKS * REWARD_SATS;
    wait_until(
        "the pool's Lightning node to count its matured rewards",
        Duration::from_secs(120),
        || async {
            let info = ln
                .call("getinfo", serde_json::json!({}))
                .await
                .map_err(|e| e.to_string())?;
            let (onchain, _) = ln.balances().await.map_err(|e| e.to_string())?;
            if info["blockheight"].as_u64() == Some(height)
                && onchain >= rewards_sats + LIQUIDITY_SATS
            {
                Ok(())
            } else {
                Err(format!("at {:?}, {onchain} sat", info["blockheight"]))
            }
        },
    )
    .await?;
    ln.stop().await?;
    node.process().stop().await?;
    let data = node.datadir().join(Chain::Signet.datadir_subdir());
    for transient in [
        ".lock",
        "debug.log",
        "peers.dat",
        "anchors.dat",
        "settings.json",
    ] {
        let _ = std::fs::remove_file(data.join(transient));
    }
    std::fs::rename(&data, tmp.join("chain"))?;
    let ln_dir = tmp.join("ln-node").join("ln");
    copy_dir(&ln_dir, &tmp.join("pool-ln"))?;
    std::fs::remove_dir_all(tmp.join("node"))?;
    std::fs::remove_dir_all(tmp.join("ln-node"))?;
    eprintln!(
        "[harness] rewards chain built in {:.0} s: height {height}, {rewards_sats} sat matured for {pool_address}",
        start.elapsed().as_secs_f64()
    );
    Ok(RewardsChain {
        blocks: height,
        pool_address,
        rewards_sats,
        bitcoind_version: base.bitcoind_version.clone(),
        lightningd_version: ln_version.to_string(),
        format: FORMAT,
        chain_dir: PathBuf::new(),
        pool_ln_dir: PathBuf::new(),
    })
}
