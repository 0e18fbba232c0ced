//! Roles on a stack: the pool (needs bitcoind and Redis), proxies in front of it, miners behind
//! proxies. Started by scenarios step by step, stopped in reverse order on shutdown.

use anyhow::{anyhow, Context};

use super::{RoleSummary, Stack};
use crate::roles::{MinerOptions, MinerRole, PoolOptions, PoolRole, ProxyRole};
use crate::supervisor::Supervised;

impl Stack {
    /// Start the pool on this stack's bitcoind and Redis.
    pub async fn start_pool(&mut self, opts: &PoolOptions) -> anyhow::Result<&PoolRole> {
        anyhow::ensure!(
            self.pool.is_none(),
            "stack {} already runs a pool",
            self.name
        );
        let (sv2, metrics) = (self.allocator.allocate()?, self.allocator.allocate()?);
        let bitcoind = self.bitcoind()?;
        let redis = self.redis()?;
        let pool = PoolRole::start(
            &self.dir.join("pool"),
            (sv2.port(), metrics.port()),
            bitcoind,
            redis,
            opts,
            self.timeouts,
        )
        .await
        .context("starting the pool")?;
        self.ports.extend([sv2, metrics]);
        self.backends.push((
            "pool".into(),
            pool.process().spec().program.display().to_string(),
        ));
        self.pool = Some(pool);
        self.write_summary()?;
        self.pool()
    }

    /// Start proxy `name` in front of the pool; with a fresh locking key unless `with_key` is false.
    pub async fn start_proxy(
        &mut self,
        name: &str,
        with_key: bool,
        nominal_hashrate: f32,
    ) -> anyhow::Result<&ProxyRole> {
        anyhow::ensure!(
            !self.proxies.contains_key(name),
            "proxy {name:?} already exists"
        );
        let port = self.allocator.allocate()?;
        let pool = self.pool()?;
        let proxy = ProxyRole::start(
            &self.dir.join(format!("proxy-{name}")),
            port.port(),
            &pool.sv2_addr,
            &pool.authority.public,
            with_key,
            nominal_hashrate,
            self.timeouts,
        )
        .await
        .with_context(|| format!("starting proxy {name}"))?;
        self.ports.push(port);
        self.proxies.insert(name.to_string(), proxy);
        self.write_summary()?;
        self.proxy(name)
    }

    /// Start miner `name` behind proxy `proxy`.
    pub async fn start_miner(
        &mut self,
        name: &str,
        proxy: &str,
        opts: &MinerOptions,
    ) -> anyhow::Result<&MinerRole> {
        anyhow::ensure!(
            !self.miners.contains_key(name),
            "miner {name:?} already exists"
        );
        let addr = self.proxy(proxy)?.sv1_addr.clone();
        let miner = MinerRole::start(
            name,
            &self.dir.join(format!("miner-{name}")),
            &addr,
            opts,
            self.timeouts,
        )
        .await
        .with_context(|| format!("starting miner {name}"))?;
        self.miners.insert(name.to_string(), miner);
        self.write_summary()?;
        self.miner(name)
    }

    /// The pool.
    pub fn pool(&self) -> anyhow::Result<&PoolRole> {
        self.pool
            .as_ref()
            .ok_or_else(|| anyhow!("stack {} runs no pool", self.name))
    }

    /// Proxy `name`.
    pub fn proxy(&self, name: &str) -> anyhow::Result<&ProxyRole> {
        self.proxies
            .get(name)
            .ok_or_else(|| anyhow!("no proxy {name:?} on stack {}", self.name))
    }

    /// Miner `name`.
    pub fn miner(&self, name: &str) -> anyhow::Result<&MinerRole> {
        self.miners
            .get(name)
            .ok_or_else(|| anyhow!("no miner {name:?} on stack {}", self.name))
    }

    /// Every miner.
    pub fn miners(&self) -> impl Iterator<Item = &MinerRole> {
        self.miners.values()
    }

    /// Lines in the roles' logs that say something broke: panics and ERROR records. Scenarios
    /// that provoke errors on purpose are tagged `@allow.errors`.
    pub fn log_problems(&self) -> Vec<String> {
        let mut processes: Vec<&Supervised> =
            self.miners.values().map(MinerRole::process).collect();
        processes.extend(self.proxies.values().map(ProxyRole::process));
        processes.extend(self.pool.iter().map(PoolRole::process));
        let mut problems = Vec::new();
        for p in processes {
            for log in [p.spec().stdout_log(), p.spec().stderr_log()] {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                for line in text
                    .lines()
                    .filter(|l| l.contains("panicked at") || l.contains(" ERROR "))
                {
                    problems.push(format!("{}: {line}", log.display()));
                }
            }
        }
        problems
    }

    pub(super) fn role_summaries(&self) -> Vec<RoleSummary> {
        let summary = |name: String, endpoint: String, p: &Supervised| RoleSummary {
            name,
            endpoint,
            credentials: None,
            pid: p.pid(),
            logs: vec![p.spec().stdout_log(), p.spec().stderr_log()],
        };
        let mut out = Vec::new();
        if let Some(pool) = &self.pool {
            out.push(summary(
                "pool".into(),
                pool.sv2_addr.clone(),
                pool.process(),
            ));
        }
        for (name, p) in &self.proxies {
            out.push(summary(
                format!("proxy-{name}"),
                p.sv1_addr.clone(),
                p.process(),
            ));
        }
        for (name, m) in &self.miners {
            out.push(summary(format!("miner-{name}"), String::new(), m.process()));
        }
        out
    }

    /// Stop miners, then proxies, then the pool (each group in parallel).
    pub(super) async fn stop_roles(&mut self) -> anyhow::Result<()> {
        for r in futures::future::join_all(self.miners.values().map(|m| m.process().stop())).await {
            r?;
        }
        for r in futures::future::join_all(self.proxies.values().map(|p| p.process().stop())).await
        {
            r?;
        }
        if let Some(pool) = &self.pool {
            pool.process().stop().await?;
        }
        Ok(())
    }
}
