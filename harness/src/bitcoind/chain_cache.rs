//! Pre-mined chains, built once per machine from the committed fixtures
//! ([`super::chain_fixture`]) and copied into every stack.
//!
//! `<cache_dir>/chains/<chain>-v<FORMAT>-<fixture hash>-<blocks>-<bitcoind version>/` holds
//! `chain/` (the
//! chain's datadir sub-directory: blocks, chainstate, txindex) and `manifest.json`. It is built
//! in a `.tmp` directory and renamed into place, under an exclusive lock, so concurrent test
//! binaries never see half a chain and never mine it twice.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context};
use bitcoin::hashes::{sha256, Hash};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Bitcoind, BitcoindOptions, Chain};
use crate::config::HarnessConfig;
use crate::ports::PortAllocator;

/// Bump when the layout of cached chains changes (their content is named by the fixture hash).
const FORMAT: u32 = 2;
/// Seed of the harness-owned faucet key (the pre-mined coinbases pay it).
pub const FAUCET_SECRET: &str = "hashpool-harness faucet key v1";

/// A pre-mined chain ready to copy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CachedChain {
    /// Which chain.
    pub chain: Chain,
    /// Tip height.
    pub blocks: u64,
    /// Address the pre-mined coinbases pay (the faucet's).
    pub faucet_address: String,
    /// `bitcoind -version`, first line.
    pub bitcoind_version: String,
    /// Cache format.
    pub format: u32,
    /// Directory to copy into a node's datadir as `<chain name>/`.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// The faucet's secret key: sha256 of [`FAUCET_SECRET`].
pub fn faucet_secret_key() -> bitcoin::secp256k1::SecretKey {
    let digest = sha256::Hash::hash(FAUCET_SECRET.as_bytes());
    bitcoin::secp256k1::SecretKey::from_slice(digest.as_byte_array())
        .expect("sha256 of the faucet seed is a valid secret key")
}

/// The cached chain for `chain`, loading its fixture first if this machine has none.
pub async fn ensure_chain_cache(
    exe: &Path,
    chain: Chain,
    config: &HarnessConfig,
) -> anyhow::Result<CachedChain> {
    let version = bitcoind_version(exe)?;
    let blocks = chain.premine_blocks();
    let chains = config.cache_dir.join("chains");
    std::fs::create_dir_all(&chains)
        .with_context(|| format!("cannot create {}", chains.display()))?;
    let fixture = super::chain_fixture::fixture_id(chain)?;
    let key = format!(
        "{}-v{FORMAT}-{fixture}-{blocks}-{}",
        chain.name(),
        sanitize(&version)
    );
    let final_dir = chains.join(&key);
    if let Some(cached) = read_manifest(&final_dir, chain, blocks, &version) {
        return Ok(cached);
    }

    let _lock = lock_exclusive(&chains.join(format!("{key}.lock"))).await?;
    if let Some(cached) = read_manifest(&final_dir, chain, blocks, &version) {
        return Ok(cached); // another process built it while we waited
    }
    let tmp = chains.join(format!("{key}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    let faucet = crate::faucet::p2wpkh_address(&faucet_secret_key(), chain.network());
    load_fixture(exe, chain, blocks, &tmp, config)
        .await
        .with_context(|| {
            format!(
                "loading the {chain} chain fixture into bitcoind failed (work dir kept: {})",
                tmp.display()
            )
        })?;

    let manifest = CachedChain {
        chain,
        blocks,
        faucet_address: faucet.to_string(),
        bitcoind_version: version.clone(),
        format: FORMAT,
        dir: PathBuf::new(),
    };
    std::fs::write(
        tmp.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    std::fs::remove_dir_all(tmp.join("node"))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?; // stale manifest (older format or version)
    }
    std::fs::rename(&tmp, &final_dir)?;
    eprintln!("[harness] {chain} chain cached in {}", final_dir.display());
    read_manifest(&final_dir, chain, blocks, &version).ok_or_else(|| {
        anyhow!(
            "cached chain {} unreadable right after writing it",
            final_dir.display()
        )
    })
}

/// Start a bitcoind on an empty datadir and `submitblock` every fixture block: Bitcoin Core
/// validates each one; the tip must end at the fixture's.
async fn load_fixture(
    exe: &Path,
    chain: Chain,
    blocks: u64,
    tmp: &Path,
    config: &HarnessConfig,
) -> anyhow::Result<()> {
    let fixture = super::chain_fixture::fixture_blocks(chain)?;
    anyhow::ensure!(
        fixture.len() as u64 == blocks,
        "fixtures/chains/{chain}.blocks holds {} blocks, the harness needs {blocks}: run `just chain-fixtures`",
        fixture.len()
    );
    let ports = PortAllocator::new(&config.port_lock_dir, config.port_min, config.port_max);
    let port = ports.allocate()?;
    let node = Bitcoind::start(BitcoindOptions {
        exe: exe.to_path_buf(),
        chain,
        dir: tmp.join("node"),
        rpc_port: port.port(),
        seed: None,
        extra_args: Vec::new(),
        name: "bitcoind".into(),
        p2p_port: None,
        connect: None,
        start_timeout: config.start_timeout(),
        stop_timeout: config.stop_timeout(),
    })
    .await?;
    let start = Instant::now();
    for (i, block) in fixture.iter().enumerate() {
        let hex = bitcoin::consensus::encode::serialize_hex(block);
        let answer: serde_json::Value = node.rpc().call("submitblock", &[hex.into()]).await?;
        anyhow::ensure!(
            answer.is_null(),
            "bitcoind refused fixture block {} ({}): {answer}",
            i + 1,
            block.block_hash()
        );
    }
    let info = node.chain_info().await?;
    let tip = fixture.last().map(bitcoin::Block::block_hash);
    anyhow::ensure!(
        info.blocks == blocks && Some(info.bestblockhash) == tip,
        "after loading the fixture bitcoind's tip is {} at height {}, the fixture's is {tip:?} at {blocks}",
        info.bestblockhash,
        info.blocks
    );
    node.process().stop().await?;
    let data = node.datadir().join(chain.datadir_subdir());
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
    eprintln!(
        "[harness] loaded the {chain} chain fixture ({blocks} blocks) in {:.1} s; cached in {}",
        start.elapsed().as_secs_f64(),
        tmp.display()
    );
    Ok(())
}

fn read_manifest(dir: &Path, chain: Chain, blocks: u64, version: &str) -> Option<CachedChain> {
    let text = std::fs::read(dir.join("manifest.json")).ok()?;
    let mut cached: CachedChain = serde_json::from_slice(&text).ok()?;
    let valid = cached.chain == chain
        && cached.blocks == blocks
        && cached.format == FORMAT
        && cached.bitcoind_version == version
        && dir.join("chain").join("blocks").is_dir();
    cached.dir = dir.join("chain");
    valid.then_some(cached)
}

pub(crate) async fn lock_exclusive(path: &Path) -> anyhow::Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open lock {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, _)) => {
            eprintln!(
                "[harness] waiting for another harness process to finish {}",
                path.display()
            );
            tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
                .await?
                .map_err(|(_, e)| anyhow!("cannot lock {}: {e}", path.display()))
        }
    }
}

/// First line of `bitcoind -version`.
///
/// Run with `-nosettings` and an empty datadir of its own: a plain `bitcoind -version` reads
/// and rewrites `~/.bitcoin/settings.json`, and several at once (two test binaries starting
/// together) corrupt it and print nothing.
pub fn bitcoind_version(exe: &Path) -> anyhow::Result<String> {
    let datadir = std::env::temp_dir().join("hashpool-harness-bitcoind-version");
    std::fs::create_dir_all(&datadir)
        .with_context(|| format!("cannot create {}", datadir.display()))?;
    let out = std::process::Command::new(exe)
        .arg("-nosettings")
        .arg(format!("-datadir={}", datadir.display()))
        .arg("-version")
        .output()
        .with_context(|| format!("cannot run {} -version", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("{} -version printed nothing", exe.display()))
}

fn sanitize(version: &str) -> String {
    let v = version
        .split(' ')
        .find(|t| t.starts_with('v') && t[1..].starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or(version);
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_uses_the_version_token() {
        assert_eq!(
            sanitize("Bitcoin Core daemon version v30.99.0-abc"),
            "v30.99.0_abc"
        );
        assert_eq!(
            sanitize("Bitcoin Core daemon version v30.99.0-unk bitcoind"),
            "v30.99.0_unk"
        );
    }

    #[test]
    fn faucet_key_is_stable() {
        let a = faucet_secret_key();
        let b = faucet_secret_key();
        assert_eq!(a, b);
    }

    /// Several `-version` calls at once all print the version (a plain `bitcoind -version`
    /// races on `~/.bitcoin/settings.json`: 14 of 20 concurrent calls printed nothing here).
    #[test]
    fn concurrent_version_queries_all_answer() {
        let Ok(exe) = crate::binaries::find(
            crate::binaries::Program::Bitcoind,
            &crate::config::HarnessConfig::load(None).unwrap().cache_dir,
        ) else {
            return; // no bitcoind on this machine: nothing to ask
        };
        let answers: Vec<_> = (0..12)
            .map(|_| {
                let exe = exe.clone();
                std::thread::spawn(move || bitcoind_version(&exe))
            })
            .collect();
        for a in answers {
            let v = a.join().unwrap().unwrap();
            assert!(v.contains("version"), "{v}");
        }
    }
}
