//! The pool role.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bitcoin::Address;
use hashpool_config::pool_side::{PoolConfig, PoolLimits};
use hashpool_config::Secret;

use super::{role_exe, write_config};
use crate::bitcoind::{Bitcoind, RPC_USER};
use crate::http::{self, Metrics};
use crate::keys::{authority_keys, AuthorityKeys};
use crate::process::ProcessSpec;
use crate::supervisor::{Readiness, RestartPolicy, Supervised, SupervisorOptions};

/// Knobs scenarios turn.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Minimum share leading zero bits (the 1-ehash share).
    pub min_bits: u32,
    /// Vardiff aim.
    pub shares_per_minute: f32,
    /// Vardiff period.
    pub vardiff_interval_secs: u64,
    /// Limits.
    pub limits: PoolLimits,
    /// Time the pool waits for Redis to confirm a batch before resolving its outcome.
    pub append_timeout_ms: u64,
    /// Put a fault proxy between the pool and Redis (`Stack::redis_fault_proxy`).
    pub redis_via_fault_proxy: bool,
    /// The address the coinbase pays (default: a fresh one nobody holds the key of); the
    /// pool's Lightning node's address when the stack redeems over Lightning.
    pub payout_address: Option<String>,
    /// Start the pool with at most this many open descriptors (`ulimit -n`).
    pub nofile_limit: Option<u64>,
}

impl Default for PoolOptions {
    /// Test defaults: shares come fast (min_bits 16, 600 per minute per channel).
    fn default() -> Self {
        Self {
            min_bits: 16,
            shares_per_minute: 600.0,
            vardiff_interval_secs: 5,
            // Stacks open many connections from 127.0.0.1 at once (every miner, every test
            // client, reconnects after a pool restart): the per-source rate is the scenario's
            // to set (`@network`), not a default that throttles every stack.
            limits: PoolLimits {
                max_new_connections_per_sec: 1000.0,
                new_connection_burst: 1000.0,
                ..PoolLimits::default()
            },
            append_timeout_ms: hashpool_config::pool_side::RedisSection::default()
                .append_timeout_ms,
            redis_via_fault_proxy: false,
            payout_address: None,
            nofile_limit: None,
        }
    }
}

/// A running pool.
#[derive(Debug)]
pub struct PoolRole {
    process: Supervised,
    /// SV2 address.
    pub sv2_addr: String,
    /// Metrics/health address.
    pub metrics_addr: String,
    /// Job declaration address.
    pub jd_addr: String,
    /// Noise authority keys.
    pub authority: AuthorityKeys,
    /// Address the coinbase pays.
    pub payout_address: Address,
    /// The config it runs with.
    pub config: PoolConfig,
}

impl PoolRole {
    /// Write the config and start the pool; ready when `/health` answers 200 (it has a template).
    pub async fn start(
        dir: &Path,
        ports: (u16, u16, u16),
        bitcoind: &Bitcoind,
        redis_url: String,
        opts: &PoolOptions,
        timeouts: (Duration, Duration),
    ) -> anyhow::Result<Self> {
        let exe = role_exe("hashpool-pool", "HASHPOOL_POOL_EXE")?;
        let authority = authority_keys();
        let network = bitcoind.chain().network();
        let payout_address = match &opts.payout_address {
            Some(a) => a
                .parse::<Address<bitcoin::address::NetworkUnchecked>>()
                .context("pool payout address")?
                .require_network(network)
                .context("pool payout address")?,
            None => crate::keys::fresh_address(network),
        };
        let config = PoolConfig {
            listen: format!("127.0.0.1:{}", ports.0),
            metrics_listen: format!("127.0.0.1:{}", ports.1),
            jd_listen: format!("127.0.0.1:{}", ports.2),
            authority_public_key: authority.public.clone(),
            authority_secret_key: Secret::new(authority.secret.clone()),
            payout_address: payout_address.to_string(),
            min_bits: opts.min_bits,
            shares_per_minute: opts.shares_per_minute,
            vardiff_interval_secs: opts.vardiff_interval_secs,
            limits: opts.limits.clone(),
            bitcoind: hashpool_config::pool_side::BitcoindSection {
                rpc_url: bitcoind.rpc_url(),
                rpc_user: RPC_USER.into(),
                rpc_password: Secret::new(bitcoind.rpc_password().into()),
                chain: bitcoind.chain().name().into(),
                ..Default::default()
            },
            redis: hashpool_config::pool_side::RedisSection {
                url: redis_url,
                append_timeout_ms: opts.append_timeout_ms,
                ..Default::default()
            },
            ..PoolConfig::default()
        };
        let file = write_config(dir, "pool.toml", &config)?;
        let mut spec = ProcessSpec::new("pool", &exe, dir)
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "info,pool=debug");
        if let Some(n) = opts.nofile_limit {
            spec = spec.nofile_limit(n);
        }
        let metrics_addr = config.metrics_listen.clone();
        let probe_addr = metrics_addr.clone();
        let readiness = Readiness {
            what: format!("pool /health on {metrics_addr} answering 200"),
            probe: Arc::new(move || {
                let addr = probe_addr.clone();
                Box::pin(async move {
                    match http::get(&addr, "/health", Duration::from_secs(1)).await {
                        Ok((200, _)) => Ok(()),
                        Ok((code, body)) => Err(format!("{code} {body}")),
                        Err(e) => Err(e.to_string()),
                    }
                })
            }),
        };
        let options = SupervisorOptions::new(RestartPolicy::OnCrash { max_restarts: 3 }, timeouts);
        let process = Supervised::start(spec, readiness, options).await?;
        Ok(Self {
            process,
            sv2_addr: config.listen.clone(),
            metrics_addr,
            jd_addr: config.jd_listen.clone(),
            authority,
            payout_address,
            config,
        })
    }

    /// The process.
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// The pool's log (stdout).
    pub fn log(&self) -> PathBuf {
        self.process.spec().stdout_log()
    }

    /// Scrape `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (code, body) =
            http::get(&self.metrics_addr, "/metrics", Duration::from_secs(2)).await?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(Metrics::parse(&body))
    }
}
