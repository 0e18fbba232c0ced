//! The auditor role: audits every template that got a share with Bitcoin Core.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hashpool_config::pool_side::{AuditorConfig, BitcoindSection, RedisSection, StreamsSection};
use hashpool_config::Secret;

use super::{group_exists, role_exe, write_config};
use crate::bitcoind::{Bitcoind, RPC_USER};
use crate::http;
use crate::process::ProcessSpec;
use crate::supervisor::{Readiness, RestartPolicy, Supervised, SupervisorOptions};

/// How to start an auditor.
#[derive(Debug, Clone)]
pub struct AuditorOptions {
    /// Concurrent audits.
    pub workers: usize,
    /// Reach the audit node through a fault proxy the stack keeps (to slow it down).
    pub through_fault_proxy: bool,
    /// `unknown_parent_wait_ms`.
    pub unknown_parent_wait_ms: u64,
    /// How the auditor trims `audit:tasks` (None: [`super::archived_streams`]).
    pub streams: Option<hashpool_config::pool_side::StreamsSection>,
}

impl AuditorOptions {
    /// `workers` concurrent audits, the node reached directly, the role's default wait for an
    /// unknown parent.
    pub fn new(workers: usize) -> Self {
        Self {
            workers,
            through_fault_proxy: false,
            unknown_parent_wait_ms: AuditorConfig::default().unknown_parent_wait_ms,
            streams: None,
        }
    }
}

/// A running auditor.
#[derive(Debug)]
pub struct AuditorRole {
    process: Supervised,
    /// Its name in the stack (`auditor-<name>`).
    pub name: String,
    /// `/metrics` address.
    pub addr: String,
}

impl AuditorRole {
    /// Write the config and start auditor `name` on its audit node `bitcoind`, reached at
    /// `rpc_url` (the node's own, or a fault proxy's in front of it); ready when `/health`
    /// answers and the `auditors` group exists.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        name: &str,
        dir: &Path,
        port: u16,
        bitcoind: &Bitcoind,
        rpc_url: &str,
        redis_url: &str,
        opts: &AuditorOptions,
        timeouts: (Duration, Duration),
    ) -> anyhow::Result<Self> {
        let exe = role_exe("hashpool-auditor", "HASHPOOL_AUDITOR_EXE")?;
        let streams = opts.streams.clone().unwrap_or_else(|| {
            let defaults = AuditorConfig::default().streams;
            StreamsSection {
                dead_letters_max: defaults.dead_letters_max,
                ..super::archived_streams()
            }
        });
        super::join_archive(&streams, redis_url).await?;
        let config = AuditorConfig {
            listen: format!("127.0.0.1:{port}"),
            consumer: format!("auditor-{name}"),
            workers: opts.workers,
            reclaim_idle_ms: 2_000,
            unknown_parent_wait_ms: opts.unknown_parent_wait_ms,
            bitcoind: BitcoindSection {
                rpc_url: rpc_url.to_string(),
                rpc_user: RPC_USER.into(),
                rpc_password: Secret::new(bitcoind.rpc_password().into()),
                chain: bitcoind.chain().name().into(),
                ..Default::default()
            },
            redis: RedisSection {
                url: redis_url.into(),
                ..Default::default()
            },
            streams,
        };
        let file = write_config(dir, "auditor.toml", &config)?;
        let spec = ProcessSpec::new(&format!("auditor-{name}"), &exe, dir)
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "info");
        let addr = config.listen.clone();
        let (probe_addr, probe_redis) = (addr.clone(), redis_url.to_string());
        let readiness = Readiness {
            what: format!("auditor /health on {addr} and the auditors group in Redis"),
            probe: Arc::new(move || {
                let (addr, redis) = (probe_addr.clone(), probe_redis.clone());
                Box::pin(async move {
                    match http::get(&addr, "/health", Duration::from_secs(1)).await {
                        Ok((200, _)) => {}
                        Ok((code, body)) => return Err(format!("/health: {code} {body}")),
                        Err(e) => return Err(e.to_string()),
                    }
                    group_exists(&redis, ehash::AUDIT_TASKS_STREAM, "auditors").await
                })
            }),
        };
        let options = SupervisorOptions::new(RestartPolicy::OnCrash { max_restarts: 3 }, timeouts);
        let process = Supervised::start(spec, readiness, options).await?;
        Ok(Self {
            process,
            name: name.into(),
            addr,
        })
    }

    /// The process.
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// Scrape `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<http::Metrics> {
        let (code, body) = http::get(&self.addr, "/metrics", Duration::from_secs(2)).await?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(http::Metrics::parse(&body))
    }

    /// The auditor's log (stdout).
    pub fn log(&self) -> PathBuf {
        self.process.spec().stdout_log()
    }
}
