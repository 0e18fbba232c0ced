//! A stack: one chain's bitcoind and a Redis, with their own ports and data directory, started
//! in parallel and stopped together, plus the roles scenarios add (pool, proxies, miners; see
//! `roles.rs`). Several stacks run side by side without sharing anything.

mod lightning;
mod log_scan;
mod strays;
pub use strays::{harness_alive, stray_processes};
mod nodes;
mod pool_side;
mod reorg;
pub use reorg::{Reorg, REWARDS_FORK_BLOCKS};
mod roles;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};

use crate::binaries::{find, Program};
use crate::bitcoind::{ensure_chain_cache, Bitcoind, BitcoindOptions, Chain, RPC_USER};
use crate::config::HarnessConfig;
use crate::faucet::Faucet;
use crate::ports::{PortAllocator, PortLease};
use crate::redis::{Redis, RedisOptions};
use crate::roles::{MinerRole, PoolRole, ProxyRole};

/// Name of the summary file written into every stack directory.
pub const SUMMARY_FILE: &str = "stack.json";

/// What a stack should run.
#[derive(Debug)]
pub struct StackBuilder<'a> {
    name: String,
    config: &'a HarnessConfig,
    chain: Option<Chain>,
    redis: bool,
    bitcoind_args: Vec<String>,
    keep_on_failure: bool,
    rewards: bool,
}

/// Endpoints, processes and directories of a running stack (also written as `stack.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackSummary {
    /// Stack name.
    pub name: String,
    /// Data directory.
    pub dir: PathBuf,
    /// The harness process that owns the stack.
    pub harness_pid: u32,
    /// The chain, if bitcoind runs.
    pub chain: Option<Chain>,
    /// Each role's endpoint, pid and log.
    pub roles: Vec<RoleSummary>,
    /// Which program backs each part.
    pub backends: Vec<(String, String)>,
    /// Address of the faucet (pays the pre-mined coinbases).
    pub faucet_address: Option<String>,
    /// Time from spawning the first process to all ready.
    pub start_ms: u64,
}

/// One role of a stack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleSummary {
    /// Role name.
    pub name: String,
    /// Where it answers.
    pub endpoint: String,
    /// Credentials, if any (test-only, random per stack).
    pub credentials: Option<String>,
    /// Process id when the summary was written.
    pub pid: Option<u32>,
    /// Log files.
    pub logs: Vec<PathBuf>,
}

/// A running stack. Call [`Stack::shutdown`]; dropping it instead kills every process and
/// keeps the directory.
#[derive(Debug)]
pub struct Stack {
    name: String,
    dir: PathBuf,
    chain: Option<Chain>,
    bitcoind: Option<Bitcoind>,
    redis: Option<Redis>,
    faucet: Option<Faucet>,
    backends: Vec<(String, String)>,
    start_time: Duration,
    ports: Vec<PortLease>,
    allocator: PortAllocator,
    timeouts: (Duration, Duration),
    pool: Option<PoolRole>,
    redis_fault: Option<crate::fault_proxy::FaultProxy>,
    /// The SV2 sniffer proxies reach the pool through, when a step placed one.
    sniffer: Option<crate::sniffer::Sv2Sniffer>,
    /// `max_shares_in_flight` of proxies started from now on (None: the proxy's default).
    proxy_share_window: Option<usize>,
    mint: Option<crate::roles::MintRole>,
    auditors: BTreeMap<String, crate::roles::AuditorRole>,
    /// How the pool's bitcoind was started (operators' nodes copy it).
    node_options: Option<BitcoindOptions>,
    operator_nodes: BTreeMap<String, Bitcoind>,
    /// Each auditor's own node, by auditor name.
    audit_nodes: BTreeMap<String, Bitcoind>,
    /// Fault proxies between auditors and their nodes, by auditor name.
    audit_node_proxies: BTreeMap<String, crate::fault_proxy::FaultProxy>,
    lightning_nodes: BTreeMap<String, crate::lightning::LightningNode>,
    /// Lightning nodes stopped or killed by a step, to start again.
    lightning_stopped: BTreeMap<String, crate::lightning::LightningOptions>,
    /// The rewards chain this stack started from, if any.
    rewards: Option<crate::lightning::RewardsChain>,
    /// The `ci/bootstrap` cache (where lightningd is found).
    cache_dir: PathBuf,
    proxies: BTreeMap<String, ProxyRole>,
    /// SRI translators in front of the pool, by name.
    translators: BTreeMap<String, crate::roles::TranslatorRole>,
    miners: BTreeMap<String, MinerRole>,
    done: bool,
}

impl<'a> StackBuilder<'a> {
    /// Run bitcoind on `chain`, from its pre-mined cache.
    pub fn chain(mut self, chain: Chain) -> Self {
        self.chain = Some(chain);
        self
    }

    /// Run a Redis.
    pub fn redis(mut self) -> Self {
        self.redis = true;
        self
    }

    /// Pass an extra argument to bitcoind.
    pub fn bitcoind_arg(mut self, arg: &str) -> Self {
        self.bitcoind_args.push(arg.to_string());
        self
    }

    /// Start the private signet from the rewards chain: matured coinbases held by the pool's
    /// Lightning node (see [`crate::lightning::ensure_rewards_chain`]); implies signet.
    pub fn rewards(mut self) -> Self {
        self.rewards = true;
        self.chain = Some(Chain::Signet);
        self
    }

    /// Whether a stack that fails to start keeps its directory (default: yes, for debugging).
    pub fn keep_on_failure(mut self, keep: bool) -> Self {
        self.keep_on_failure = keep;
        self
    }

    /// Start everything (in parallel) and wait until each part answers its protocol.
    pub async fn start(self) -> anyhow::Result<Stack> {
        let config = self.config;
        let dir = new_stack_dir(&config.run_dir, &self.name)?;
        let allocator = PortAllocator::new(&config.port_lock_dir, config.port_min, config.port_max);
        let mut backends = Vec::new();
        let mut ports = Vec::new();

        let mut rewards = None;
        let bitcoind_opts = match self.chain {
            Some(chain) => {
                let exe = find(Program::Bitcoind, &config.cache_dir)?;
                let mut cached = ensure_chain_cache(&exe, chain, config).await?;
                if self.rewards {
                    let r = crate::lightning::ensure_rewards_chain(config).await?;
                    cached.dir = r.chain_dir.clone();
                    rewards = Some(r);
                }
                backends.push((
                    "bitcoin".into(),
                    format!("{} ({})", exe.display(), cached.bitcoind_version),
                ));
                let port = allocator.allocate()?;
                let p2p = allocator.allocate()?;
                let opts = BitcoindOptions {
                    exe,
                    chain,
                    dir: dir.join("bitcoind"),
                    rpc_port: port.port(),
                    seed: Some(cached.dir),
                    extra_args: self.bitcoind_args.clone(),
                    name: "bitcoind".into(),
                    // Operators' nodes connect here.
                    p2p_port: Some(p2p.port()),
                    connect: None,
                    start_timeout: config.start_timeout(),
                    stop_timeout: config.stop_timeout(),
                };
                ports.push(port);
                ports.push(p2p);
                Some(opts)
            }
            None => None,
        };
        let redis_opts = if self.redis {
            let exe = find(Program::RedisServer, &config.cache_dir)?;
            backends.push(("redis".into(), exe.display().to_string()));
            let port = allocator.allocate()?;
            let opts = RedisOptions {
                exe,
                dir: dir.join("redis"),
                port: port.port(),
                start_timeout: config.start_timeout(),
                stop_timeout: config.stop_timeout(),
            };
            ports.push(port);
            Some(opts)
        } else {
            None
        };

        let started = Instant::now();
        let node_options = bitcoind_opts.clone();
        let (bitcoind, redis) = tokio::join!(
            async {
                match bitcoind_opts {
                    Some(o) => Bitcoind::start(o).await.map(Some),
                    None => Ok(None),
                }
            },
            async {
                match redis_opts {
                    Some(o) => Redis::start(o).await.map(Some),
                    None => Ok(None),
                }
            }
        );
        let start_time = started.elapsed();
        let (bitcoind, redis) = match (bitcoind, redis) {
            (Ok(b), Ok(r)) => (b, r),
            (b, r) => {
                let errors: Vec<String> = [b.err(), r.err()]
                    .into_iter()
                    .flatten()
                    .map(|e| format!("{e:#}"))
                    .collect();
                let kept = if self.keep_on_failure {
                    format!("data kept in {}", dir.display())
                } else {
                    let _ = std::fs::remove_dir_all(&dir);
                    "data removed".to_string()
                };
                return Err(anyhow!(
                    "stack {} failed to start ({kept}):\n{}",
                    self.name,
                    errors.join("\n")
                ));
            }
        };
        let stack = Stack {
            name: self.name,
            dir,
            chain: self.chain,
            faucet: self.chain.map(Faucet::new),
            bitcoind,
            redis,
            backends,
            start_time,
            ports,
            allocator,
            timeouts: (config.start_timeout(), config.stop_timeout()),
            pool: None,
            redis_fault: None,
            sniffer: None,
            proxy_share_window: None,
            mint: None,
            auditors: BTreeMap::new(),
            node_options,
            operator_nodes: BTreeMap::new(),
            audit_nodes: BTreeMap::new(),
            audit_node_proxies: BTreeMap::new(),
            lightning_nodes: BTreeMap::new(),
            lightning_stopped: BTreeMap::new(),
            cache_dir: config.cache_dir.clone(),
            rewards,
            proxies: BTreeMap::new(),
            translators: BTreeMap::new(),
            miners: BTreeMap::new(),
            done: false,
        };
        stack.write_summary()?;
        Ok(stack)
    }
}

impl Stack {
    /// Describe a new stack called `name` (letters, digits and `-` in directory names).
    pub fn builder<'a>(name: &str, config: &'a HarnessConfig) -> StackBuilder<'a> {
        StackBuilder {
            name: name.to_string(),
            config,
            chain: None,
            redis: false,
            bitcoind_args: Vec::new(),
            keep_on_failure: true,
            rewards: false,
        }
    }

    /// Stack name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Data directory (one sub-directory per role).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The chain, if the stack runs bitcoind.
    pub fn chain(&self) -> Option<Chain> {
        self.chain
    }

    /// Time from first spawn to every part ready.
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// bitcoind, if the stack has one.
    pub fn bitcoind(&self) -> anyhow::Result<&Bitcoind> {
        self.bitcoind
            .as_ref()
            .ok_or_else(|| anyhow!("stack {} runs no bitcoind", self.name))
    }

    /// Redis, if the stack has one.
    pub fn redis(&self) -> anyhow::Result<&Redis> {
        self.redis
            .as_ref()
            .ok_or_else(|| anyhow!("stack {} runs no redis", self.name))
    }

    /// The faucet of the stack's chain.
    pub fn faucet(&self) -> anyhow::Result<&Faucet> {
        self.faucet
            .as_ref()
            .ok_or_else(|| anyhow!("stack {} runs no chain", self.name))
    }

    /// Endpoints, pids, logs and backends.
    pub fn summary(&self) -> StackSummary {
        let mut roles = Vec::new();
        if let Some(b) = &self.bitcoind {
            let spec = b.process().spec();
            roles.push(RoleSummary {
                name: "bitcoind".into(),
                endpoint: b.rpc_url(),
                credentials: Some(format!("{RPC_USER}:{}", b.rpc_password())),
                pid: b.process().pid(),
                logs: vec![spec.stdout_log(), spec.stderr_log()],
            });
        }
        if let Some(r) = &self.redis {
            let spec = r.process().spec();
            roles.push(RoleSummary {
                name: "redis".into(),
                endpoint: r.url(),
                credentials: None,
                pid: r.process().pid(),
                logs: vec![spec.stdout_log(), spec.stderr_log()],
            });
        }
        for (prefix, nodes) in [
            ("bitcoind-", &self.operator_nodes),
            ("bitcoind-audit-", &self.audit_nodes),
        ] {
            for (name, b) in nodes {
                let spec = b.process().spec();
                roles.push(RoleSummary {
                    name: format!("{prefix}{name}"),
                    endpoint: b.rpc_url(),
                    credentials: Some(format!("{RPC_USER}:{}", b.rpc_password())),
                    pid: b.process().pid(),
                    logs: vec![spec.stdout_log(), spec.stderr_log()],
                });
            }
        }
        roles.extend(self.role_summaries());
        StackSummary {
            name: self.name.clone(),
            dir: self.dir.clone(),
            harness_pid: std::process::id(),
            chain: self.chain,
            roles,
            backends: self.backends.clone(),
            faucet_address: self.faucet.as_ref().map(|f| f.address().to_string()),
            start_ms: self.start_time.as_millis() as u64,
        }
    }

    /// Rewrite `stack.json` (after a restart changed a pid, for instance).
    pub fn write_summary(&self) -> anyhow::Result<()> {
        let path = self.dir.join(SUMMARY_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&self.summary())?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Stop every process (SIGTERM, then SIGKILL after the grace), then remove the data
    /// directory unless `keep` (or `keep_data` in the config). Returns the kept directory.
    pub async fn shutdown(mut self, keep: bool) -> anyhow::Result<Option<PathBuf>> {
        self.done = true;
        self.stop_roles().await?;
        let (b, r) = tokio::join!(
            async {
                match &self.bitcoind {
                    Some(b) => b.process().stop().await.map(|_| ()),
                    None => Ok(()),
                }
            },
            async {
                match &self.redis {
                    Some(r) => {
                        // Best effort: the harness's copy of its streams goes with the stack.
                        if let Ok(mut conn) = r.connect().await {
                            let _ = crate::stream_archive::forget(&mut conn).await;
                        }
                        r.process().stop().await.map(|_| ())
                    }
                    None => Ok(()),
                }
            }
        );
        b.and(r)
            .with_context(|| format!("stopping stack {}", self.name))?;
        let keep = keep || std::env::var_os("HASHPOOL_KEEP_DATA").is_some();
        if keep {
            Ok(Some(self.dir.clone()))
        } else {
            std::fs::remove_dir_all(&self.dir)
                .with_context(|| format!("cannot remove {}", self.dir.display()))?;
            Ok(None)
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.done {
            eprintln!(
                "[harness] stack {} dropped without shutdown: processes killed, data kept in {}",
                self.name,
                self.dir.display()
            );
        }
    }
}

fn new_stack_dir(run_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let clean: String = clean.chars().take(48).collect();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = run_dir.join(format!("{clean}-{stamp}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
