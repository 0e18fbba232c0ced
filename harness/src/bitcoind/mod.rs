//! Real bitcoind on a private signet or regtest, started from a pre-mined chain.

mod chain_cache;
pub mod chain_fixture;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use bitcoin::{Address, BlockHash, Network};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use bitcoind_rpc::{BitcoinRpc, RpcError};
pub(crate) use chain_cache::lock_exclusive;
pub use chain_cache::{
    bitcoind_version, ensure_chain_cache, faucet_secret_key, CachedChain, FAUCET_SECRET,
};

use crate::process::ProcessSpec;
use crate::supervisor::{Readiness, RestartPolicy, Supervised, SupervisorOptions};

/// RPC user for every harness bitcoind (the password is random per node).
pub const RPC_USER: &str = "harness";
/// `generatetoaddress` tries this many nonces at most (the default, one million, is below the
/// about 4.8 million hashes a private-signet block needs; bitcoind reads it as a 32-bit int).
const GENERATE_MAX_TRIES: i32 = i32::MAX;

/// Which chain a stack runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chain {
    /// `-signet -signetchallenge=51`: anyone can mine, real difficulty (about 4.8 million
    /// hashes per block). The chain for everything where miners mine.
    Signet,
    /// `-regtest`: nearly every hash is a block. For instant-block chain mechanics.
    Regtest,
}

impl Chain {
    /// Name as bitcoind reports it in `getblockchaininfo.chain`.
    pub fn name(self) -> &'static str {
        match self {
            Chain::Signet => "signet",
            Chain::Regtest => "regtest",
        }
    }

    /// rust-bitcoin network (addresses: `tb1` on signet, `bcrt1` on regtest).
    pub fn network(self) -> Network {
        match self {
            Chain::Signet => Network::Signet,
            Chain::Regtest => Network::Regtest,
        }
    }

    /// bitcoind arguments that select the chain.
    pub fn bitcoind_args(self) -> &'static [&'static str] {
        match self {
            Chain::Signet => &["-signet", "-signetchallenge=51"],
            Chain::Regtest => &["-regtest"],
        }
    }

    /// Sub-directory of the datadir bitcoind uses for this chain.
    pub fn datadir_subdir(self) -> &'static str {
        self.name()
    }

    /// `getblocktemplate` rules.
    pub fn gbt_rules(self) -> &'static [&'static str] {
        match self {
            Chain::Signet => &["segwit", "signet"],
            Chain::Regtest => &["segwit"],
        }
    }

    /// Blocks in the pre-mined chain: past coinbase maturity (100) with mature coinbases left
    /// for the faucet.
    pub fn premine_blocks(self) -> u64 {
        110
    }
}

impl FromStr for Chain {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "signet" => Ok(Chain::Signet),
            "regtest" => Ok(Chain::Regtest),
            other => anyhow::bail!("unknown chain {other:?}: use `signet` or `regtest`"),
        }
    }
}

impl std::fmt::Display for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to start one bitcoind.
#[derive(Debug, Clone)]
pub struct BitcoindOptions {
    /// The executable.
    pub exe: PathBuf,
    /// The chain.
    pub chain: Chain,
    /// Process directory: logs here, chain data in `data/`.
    pub dir: PathBuf,
    /// RPC port.
    pub rpc_port: u16,
    /// Chain to copy in before the first start.
    pub seed: Option<PathBuf>,
    /// Extra command-line arguments.
    pub extra_args: Vec<String>,
    /// Process name in the stack (`bitcoind`, `bitcoind-<operator>`).
    pub name: String,
    /// Listen for peers on 127.0.0.1 at this port (none: no P2P listening).
    pub p2p_port: Option<u16>,
    /// Connect to this peer only (`127.0.0.1:port`).
    pub connect: Option<String>,
    /// Readiness deadline.
    pub start_timeout: Duration,
    /// SIGTERM grace.
    pub stop_timeout: Duration,
}

/// A running, supervised bitcoind with an RPC client.
#[derive(Debug)]
pub struct Bitcoind {
    process: Supervised,
    rpc: BitcoinRpc,
    chain: Chain,
    rpc_port: u16,
    rpc_password: String,
    datadir: PathBuf,
}

/// A summary of `getblockchaininfo`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChainInfo {
    /// `signet` or `regtest`.
    pub chain: String,
    /// Height of the tip.
    pub blocks: u64,
    /// Tip hash.
    pub bestblockhash: BlockHash,
    /// Whether bitcoind thinks it is still syncing.
    pub initialblockdownload: bool,
}

impl Bitcoind {
    /// Copy the seed chain (first start only), spawn bitcoind and wait until RPC answers.
    pub async fn start(opts: BitcoindOptions) -> anyhow::Result<Self> {
        let datadir = opts.dir.join("data");
        std::fs::create_dir_all(&datadir)
            .with_context(|| format!("cannot create {}", datadir.display()))?;
        if let Some(seed) = &opts.seed {
            let target = datadir.join(opts.chain.datadir_subdir());
            if !target.exists() {
                copy_dir(seed, &target).with_context(|| {
                    format!(
                        "cannot copy chain {} into {}",
                        seed.display(),
                        target.display()
                    )
                })?;
            }
        }
        let rpc_password = random_hex(16);
        let url = format!("http://127.0.0.1:{}", opts.rpc_port);
        let rpc = BitcoinRpc::new(&url, RPC_USER, &rpc_password)?;

        let mut spec = ProcessSpec::new(&opts.name, &opts.exe, &opts.dir);
        for arg in opts.chain.bitcoind_args() {
            spec = spec.arg(*arg);
        }
        spec = spec
            .arg(format!("-datadir={}", datadir.display()))
            .arg("-server=1")
            .arg(match opts.p2p_port {
                Some(port) => format!("-bind=127.0.0.1:{port}"),
                None => "-listen=0".into(),
            })
            .arg(match &opts.connect {
                Some(peer) => format!("-connect={peer}"),
                None => "-connect=0".into(),
            })
            // Loopback peers are the stack's own nodes: relay to them at once (no trickle).
            .arg("-whitelist=in,out,noban@127.0.0.1")
            .arg("-dnsseed=0")
            .arg("-fixedseeds=0")
            .arg(format!("-rpcport={}", opts.rpc_port))
            .arg("-rpcbind=127.0.0.1")
            .arg("-rpcallowip=127.0.0.1")
            .arg(format!("-rpcuser={RPC_USER}"))
            .arg(format!("-rpcpassword={rpc_password}"))
            .arg("-rpcthreads=16")
            .arg("-txindex=1")
            .arg("-fallbackfee=0.0002")
            // A copied chain's tip is as old as the cache; it must not look like an IBD node.
            .arg("-maxtipage=2000000000")
            .arg("-printtoconsole=1")
            // Each RPC method called is logged (`ThreadRPCServer method=...`): what a role
            // asked of the node, an oracle apart from the role's own account.
            .arg("-debug=rpc")
            .arg("-nodebuglogfile");
        for arg in &opts.extra_args {
            spec = spec.arg(arg);
        }

        let probe_rpc = BitcoinRpc::new(&url, RPC_USER, &rpc_password)?;
        let probe_rpc = std::sync::Arc::new(probe_rpc);
        let readiness = Readiness {
            what: format!("bitcoind RPC getblockchaininfo on {url} out of initial block download"),
            probe: std::sync::Arc::new(move || {
                let rpc = probe_rpc.clone();
                Box::pin(async move {
                    let info: ChainInfo = rpc
                        .call_timeout("getblockchaininfo", &[], Duration::from_secs(2))
                        .await
                        .map_err(|e| e.to_string())?;
                    // Still importing blocks (a -reindex after a crash) counts as not ready.
                    match info.initialblockdownload {
                        false => Ok(()),
                        true => Err(format!("initial block download at height {}", info.blocks)),
                    }
                })
            }),
        };
        let options = SupervisorOptions {
            // After SIGKILL, blocks accepted since the last flush are in the block files but
            // not in the block index; with no peers to fetch them from, rebuild the index.
            recovery_args: vec!["-reindex".into()],
            ..SupervisorOptions::new(
                RestartPolicy::OnCrash { max_restarts: 5 },
                (opts.start_timeout, opts.stop_timeout),
            )
        };
        let process = Supervised::start(spec, readiness, options).await?;
        Ok(Self {
            process,
            rpc,
            chain: opts.chain,
            rpc_port: opts.rpc_port,
            rpc_password,
            datadir,
        })
    }

    /// The supervised process (faults, status).
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// RPC client.
    pub fn rpc(&self) -> &BitcoinRpc {
        &self.rpc
    }

    /// The chain.
    pub fn chain(&self) -> Chain {
        self.chain
    }

    /// RPC port.
    pub fn rpc_port(&self) -> u16 {
        self.rpc_port
    }

    /// RPC URL.
    pub fn rpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rpc_port)
    }

    /// RPC password (user is [`RPC_USER`]).
    pub fn rpc_password(&self) -> &str {
        &self.rpc_password
    }

    /// The `-datadir`.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// `getblockchaininfo`.
    pub async fn chain_info(&self) -> anyhow::Result<ChainInfo> {
        Ok(self.rpc.call("getblockchaininfo", &[]).await?)
    }

    /// Tip height.
    pub async fn height(&self) -> anyhow::Result<u64> {
        Ok(self.rpc.call("getblockcount", &[]).await?)
    }

    /// Mine `n` blocks whose coinbases pay `address`; returns their hashes.
    pub async fn generate_to_address(
        &self,
        n: u64,
        address: &Address,
    ) -> anyhow::Result<Vec<BlockHash>> {
        let hashes: Vec<BlockHash> = self
            .rpc
            .call(
                "generatetoaddress",
                &[
                    json!(n),
                    json!(address.to_string()),
                    json!(GENERATE_MAX_TRIES),
                ],
            )
            .await?;
        anyhow::ensure!(
            hashes.len() as u64 == n,
            "generatetoaddress mined {} of {n} blocks",
            hashes.len()
        );
        Ok(hashes)
    }

    /// The block at `hash` (verbosity 2: transactions decoded).
    pub async fn block_json(&self, hash: &BlockHash) -> anyhow::Result<Value> {
        Ok(self
            .rpc
            .call("getblock", &[json!(hash.to_string()), json!(2)])
            .await?)
    }
}

/// Recursive copy of a directory tree (regular files and directories only).
pub(crate) fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
