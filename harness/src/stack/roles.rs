//! Roles on a stack: the pool (needs bitcoind and Redis), proxies in front of it, miners behind
//! proxies. Started by scenarios step by step, stopped in reverse order on shutdown.

use anyhow::{anyhow, Context};

use super::{RoleSummary, Stack};
use crate::fault_proxy::FaultProxy;
use crate::roles::{
    DeclareOptions, MinerOptions, MinerRole, PoolOptions, PoolRole, ProxyLaunch, ProxyRole,
    WalletOptions,
};
use crate::supervisor::Supervised;

impl Stack {
    /// Start the pool on this stack's bitcoind and Redis.
    pub async fn start_pool(&mut self, opts: &PoolOptions) -> anyhow::Result<&PoolRole> {
        anyhow::ensure!(
            self.pool.is_none(),
            "stack {} already runs a pool",
            self.name
        );
        let (sv2, metrics, jd) = (
            self.allocator.allocate()?,
            self.allocator.allocate()?,
            self.allocator.allocate()?,
        );
        let mut redis_url = self.redis()?.url();
        if opts.redis_via_fault_proxy {
            let port = self.allocator.allocate()?;
            let target = format!("127.0.0.1:{}", self.redis()?.port());
            let proxy = FaultProxy::start(&format!("127.0.0.1:{}", port.port()), &target).await?;
            redis_url = format!("redis://{}", proxy.addr());
            self.ports.push(port);
            self.redis_fault = Some(proxy);
        }
        let bitcoind = self.bitcoind()?;
        let pool = PoolRole::start(
            &self.dir.join("pool"),
            (sv2.port(), metrics.port(), jd.port()),
            bitcoind,
            redis_url,
            opts,
            self.timeouts,
        )
        .await
        .context("starting the pool")?;
        self.ports.extend([sv2, metrics, jd]);
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
        self.start_proxy_declaring(name, with_key, nominal_hashrate, None)
            .await
    }

    /// Start proxy `name`; with `declare`, it builds templates from operator node `node`,
    /// declares them to the pool (with `fraud`, if given) and mines them as custom jobs.
    pub async fn start_proxy_declaring(
        &mut self,
        name: &str,
        with_key: bool,
        nominal_hashrate: f32,
        declare: Option<(&str, Option<&str>)>,
    ) -> anyhow::Result<&ProxyRole> {
        self.start_proxy_inner(name, with_key, nominal_hashrate, declare, None)
            .await
    }

    /// Start proxy `name` (with a locking key) that expects the pool to prove authority key
    /// `authority` (SRI base58) instead of the pool's own: its Noise handshake fails.
    pub async fn start_proxy_expecting_authority(
        &mut self,
        name: &str,
        nominal_hashrate: f32,
        authority: &str,
    ) -> anyhow::Result<&ProxyRole> {
        self.start_proxy_inner(name, true, nominal_hashrate, None, Some(authority))
            .await
    }

    async fn start_proxy_inner(
        &mut self,
        name: &str,
        with_key: bool,
        nominal_hashrate: f32,
        declare: Option<(&str, Option<&str>)>,
        authority: Option<&str>,
    ) -> anyhow::Result<&ProxyRole> {
        anyhow::ensure!(
            !self.proxies.contains_key(name),
            "proxy {name:?} already exists"
        );
        let port = self.allocator.allocate()?;
        // Every proxy gets its status endpoint (`/shares`, `/health`); a wallet where there
        // is a mint and a locking key.
        let http = self.allocator.allocate()?;
        let wallet = Some(WalletOptions {
            mint_url: match (&self.mint, with_key) {
                (Some(mint), true) => mint.url.clone(),
                _ => String::new(),
            },
            http_port: http.port(),
            poll_ms: 500,
        });
        self.ports.push(http);
        let declaring = match declare {
            Some((node, fraud)) => {
                let node = self.operator_node(node)?;
                Some(DeclareOptions {
                    node_rpc_url: node.rpc_url(),
                    node_rpc_password: node.rpc_password().to_string(),
                    chain: node.chain().name().to_string(),
                    fraud: fraud.map(str::to_string),
                })
            }
            None => None,
        };
        let pool = self.pool()?;
        let upstream = (
            match &self.sniffer {
                Some(s) => s.addr().to_string(),
                None => pool.sv2_addr.clone(),
            },
            authority.unwrap_or(&pool.authority.public).to_string(),
        );
        let dir = self.dir.join(format!("proxy-{name}"));
        let proxy = ProxyRole::start(ProxyLaunch {
            dir: &dir,
            port: port.port(),
            pool,
            upstream: (&upstream.0, &upstream.1),
            with_locking_key: with_key,
            nominal_hashrate,
            wallet,
            declare: declaring,
            max_shares_in_flight: self.proxy_share_window,
            timeouts: self.timeouts,
        })
        .await
        .with_context(|| format!("starting proxy {name}"))?;
        self.ports.push(port);
        self.proxies.insert(name.to_string(), proxy);
        self.write_summary()?;
        self.proxy(name)
    }

    /// Proxies started from now on keep at most `n` shares waiting for the pool's answer
    /// (`max_shares_in_flight`).
    pub fn set_proxy_share_window(&mut self, n: usize) {
        self.proxy_share_window = Some(n);
    }

    /// Place the SV2 sniffer in front of the pool: proxies started from now on reach the pool
    /// through it (see [`crate::sniffer`]).
    pub async fn start_sniffer(&mut self) -> anyhow::Result<&crate::sniffer::Sv2Sniffer> {
        anyhow::ensure!(
            self.sniffer.is_none(),
            "stack {} already has a sniffer",
            self.name
        );
        let port = self.allocator.allocate()?;
        let pool = self.pool()?;
        let sniffer = crate::sniffer::Sv2Sniffer::start(
            &format!("127.0.0.1:{}", port.port()),
            &pool.sv2_addr,
            &pool.authority,
        )
        .await?;
        self.ports.push(port);
        self.sniffer = Some(sniffer);
        self.sniffer()
    }

    /// The SV2 sniffer ([`start_sniffer`](Self::start_sniffer)).
    pub fn sniffer(&self) -> anyhow::Result<&crate::sniffer::Sv2Sniffer> {
        self.sniffer
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("stack {} has no SV2 sniffer", self.name))
    }

    /// Start SRI's translator `name` in front of the pool (`aggregate`: one shared channel).
    pub async fn start_translator(
        &mut self,
        name: &str,
        aggregate: bool,
    ) -> anyhow::Result<&crate::roles::TranslatorRole> {
        anyhow::ensure!(
            !self.translators.contains_key(name) && !self.proxies.contains_key(name),
            "a proxy or translator {name:?} already exists"
        );
        let port = self.allocator.allocate()?;
        let t = crate::roles::TranslatorRole::start(
            &self.dir.join(format!("translator-{name}")),
            port.port(),
            self.pool()?,
            aggregate,
            &self.cache_dir,
            self.timeouts,
        )
        .await
        .with_context(|| format!("starting translator {name}"))?;
        self.ports.push(port);
        self.translators.insert(name.to_string(), t);
        self.write_summary()?;
        self.translators
            .get(name)
            .ok_or_else(|| anyhow!("translator {name} vanished"))
    }

    /// Translator `name`.
    pub fn translator(&self, name: &str) -> anyhow::Result<&crate::roles::TranslatorRole> {
        self.translators
            .get(name)
            .ok_or_else(|| anyhow!("stack {} has no translator {name:?}", self.name))
    }

    /// Start miner `name` behind proxy (or translator) `proxy`.
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
        // Behind a proxy, or behind an SRI translator of that name.
        let addr = match self.translators.get(proxy) {
            Some(t) => t.sv1_addr.clone(),
            None => self.proxy(proxy)?.sv1_addr.clone(),
        };
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

    /// The fault proxy between the pool and Redis (started with
    /// `PoolOptions::redis_via_fault_proxy`).
    pub fn redis_fault_proxy(&self) -> anyhow::Result<&FaultProxy> {
        self.redis_fault
            .as_ref()
            .ok_or_else(|| anyhow!("the pool of stack {} talks to Redis directly", self.name))
    }

    /// Every proxy, by name.
    pub fn proxies(&self) -> impl Iterator<Item = (&String, &ProxyRole)> {
        self.proxies.iter()
    }

    /// Every miner.
    pub fn miners(&self) -> impl Iterator<Item = &MinerRole> {
        self.miners.values()
    }

    /// Every supervised process of the stack with its name (as in `stack.json`).
    pub fn processes(&self) -> Vec<(String, &Supervised)> {
        let mut out = Vec::new();
        if let Some(b) = &self.bitcoind {
            out.push(("bitcoind".to_string(), b.process()));
        }
        for (name, n) in &self.operator_nodes {
            out.push((format!("bitcoind-{name}"), n.process()));
        }
        for (name, n) in &self.audit_nodes {
            out.push((format!("bitcoind-audit-{name}"), n.process()));
        }
        for (name, n) in &self.lightning_nodes {
            out.push((format!("lightning-{name}"), n.process()));
        }
        if let Some(r) = &self.redis {
            out.push(("redis".to_string(), r.process()));
        }
        if let Some(pool) = &self.pool {
            out.push(("pool".to_string(), pool.process()));
        }
        if let Some(mint) = &self.mint {
            out.push(("mint".to_string(), mint.process()));
        }
        for (name, a) in &self.auditors {
            out.push((format!("auditor-{name}"), a.process()));
        }
        for (name, p) in &self.proxies {
            out.push((format!("proxy-{name}"), p.process()));
        }
        for (name, m) in &self.miners {
            out.push((format!("miner-{name}"), m.process()));
        }
        for (name, t) in &self.translators {
            out.push((format!("translator-{name}"), t.process()));
        }
        out
    }

    /// Resume every paused process (a scenario that failed while one was paused leaves it so;
    /// the sweep needs it answering).
    pub fn resume_paused(&self) {
        for (_, p) in self.processes() {
            if p.status().phase == crate::supervisor::Phase::Paused {
                let _ = p.resume();
            }
        }
    }

    /// Every unexpected exit of every process: (process name, how it ended), in order.
    pub fn unexpected_exits(&self) -> Vec<(String, String)> {
        self.processes()
            .into_iter()
            .flat_map(|(name, p)| {
                p.status()
                    .unexpected_exits
                    .into_iter()
                    .map(move |how| (name.clone(), how))
            })
            .collect()
    }

    /// Stop every process (roles first); returns the processes that did not exit cleanly
    /// (exit code 0) on SIGTERM, with how they ended, including earlier stops.
    pub async fn stop_all(&mut self) -> anyhow::Result<Vec<(String, String)>> {
        self.stop_roles().await?;
        if let Some(b) = &self.bitcoind {
            b.process().stop().await?;
        }
        if let Some(r) = &self.redis {
            r.process().stop().await?;
        }
        Ok(self
            .processes()
            .into_iter()
            .flat_map(|(name, p)| {
                // SRI's translator has no SIGTERM handler: dying by it is its clean stop.
                let clean: &[&str] = if p.spec().foreign {
                    &["exit code 0", "killed by SIGTERM"]
                } else {
                    &["exit code 0"]
                };
                p.status()
                    .stop_exits
                    .into_iter()
                    .filter(move |how| !clean.contains(&how.as_str()))
                    .map(move |how| (name.clone(), how))
            })
            .collect())
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
                format!(
                    "{} (SV2, authority {}); http://{}/metrics",
                    pool.sv2_addr, pool.authority.public, pool.metrics_addr
                ),
                pool.process(),
            ));
        }
        if let Some(mint) = &self.mint {
            out.push(summary(
                "mint".into(),
                format!("{} (Cashu; /v1/ehash/*, /metrics)", mint.url),
                mint.process(),
            ));
        }
        for (name, a) in &self.auditors {
            out.push(summary(
                format!("auditor-{name}"),
                format!("http://{}/metrics", a.addr),
                a.process(),
            ));
        }
        for (name, p) in &self.proxies {
            let wallet = p
                .wallet_addr
                .as_ref()
                .map(|w| format!("; wallet http://{w}/wallet"))
                .unwrap_or_default();
            out.push(summary(
                format!("proxy-{name}"),
                format!("{} (SV1){wallet}", p.sv1_addr),
                p.process(),
            ));
        }
        for (name, m) in &self.miners {
            out.push(summary(format!("miner-{name}"), String::new(), m.process()));
        }
        for (name, n) in &self.lightning_nodes {
            out.push(summary(
                format!("lightning-{name}"),
                format!(
                    "{} (peer {}, id {})",
                    n.rpc_path().display(),
                    n.p2p_addr,
                    n.id
                ),
                n.process(),
            ));
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
        for t in self.translators.values() {
            t.process().stop().await?;
        }
        if let Some(pool) = &self.pool {
            pool.process().stop().await?;
        }
        for r in futures::future::join_all(self.auditors.values().map(|a| a.process().stop())).await
        {
            r?;
        }
        if let Some(mint) = &self.mint {
            mint.process().stop().await?;
        }
        for n in self.lightning_nodes.values() {
            n.stop().await?;
        }
        for n in self
            .operator_nodes
            .values()
            .chain(self.audit_nodes.values())
        {
            n.process().stop().await?;
        }
        Ok(())
    }
}
