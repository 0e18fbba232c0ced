//! The pool side past the pool: the mint and the auditors, and a call that starts the whole
//! pool side at once.

use anyhow::{anyhow, Context};

use super::Stack;
use crate::fault_proxy::FaultProxy;
use crate::roles::{AuditorOptions, AuditorRole, MintOptions, MintRole, PoolOptions};

impl Stack {
    /// Start the mint on this stack's Redis.
    pub async fn start_mint(&mut self, opts: &MintOptions) -> anyhow::Result<&MintRole> {
        anyhow::ensure!(
            self.mint.is_none(),
            "stack {} already runs a mint",
            self.name
        );
        let port = self.allocator.allocate()?;
        let redis = self.redis()?.url();
        let mint = MintRole::start(
            &self.dir.join("mint"),
            port.port(),
            &redis,
            opts,
            self.timeouts,
        )
        .await
        .context("starting the mint")?;
        self.ports.push(port);
        self.backends.push((
            "mint".into(),
            mint.process().spec().program.display().to_string(),
        ));
        self.mint = Some(mint);
        self.write_summary()?;
        self.mint()
    }

    /// Start auditor `name` with `workers` concurrent audits, on its own audit node (started
    /// first, the first time).
    pub async fn start_auditor(
        &mut self,
        name: &str,
        workers: usize,
    ) -> anyhow::Result<&AuditorRole> {
        self.start_auditor_with(name, &AuditorOptions::new(workers))
            .await
    }

    /// Start auditor `name` as `opts` say, on its own audit node (started first, the first
    /// time; with a fault proxy in front of it when `opts` ask for one).
    pub async fn start_auditor_with(
        &mut self,
        name: &str,
        opts: &AuditorOptions,
    ) -> anyhow::Result<&AuditorRole> {
        anyhow::ensure!(
            !self.auditors.contains_key(name),
            "auditor {name:?} already exists"
        );
        if !self.audit_nodes.contains_key(name) {
            self.start_audit_node(name).await?;
        }
        let node_url = self.audit_node(name)?.rpc_url();
        let rpc_url = match (opts.through_fault_proxy, self.audit_node_proxies.get(name)) {
            (false, _) => node_url,
            (true, Some(p)) => format!("http://{}", p.addr()),
            (true, None) => {
                let port = self.allocator.allocate()?;
                let target = node_url.trim_start_matches("http://").to_string();
                let proxy =
                    FaultProxy::start(&format!("127.0.0.1:{}", port.port()), &target).await?;
                self.ports.push(port);
                let url = format!("http://{}", proxy.addr());
                self.audit_node_proxies.insert(name.to_string(), proxy);
                url
            }
        };
        let port = self.allocator.allocate()?;
        let redis = self.redis()?.url();
        let auditor = AuditorRole::start(
            name,
            &self.dir.join(format!("auditor-{name}")),
            port.port(),
            self.audit_node(name)?,
            &rpc_url,
            &redis,
            opts,
            self.timeouts,
        )
        .await
        .with_context(|| format!("starting auditor {name}"))?;
        self.ports.push(port);
        self.auditors.insert(name.to_string(), auditor);
        self.write_summary()?;
        self.auditor(name)
    }

    /// Start the whole pool side: pool, mint and one auditor (`a`, two workers).
    pub async fn start_pool_side(
        &mut self,
        pool: &PoolOptions,
        mint: &MintOptions,
    ) -> anyhow::Result<()> {
        self.start_pool(pool).await?;
        self.start_mint(mint).await?;
        self.start_auditor("a", 2).await?;
        Ok(())
    }

    /// The mint.
    pub fn mint(&self) -> anyhow::Result<&MintRole> {
        self.mint
            .as_ref()
            .ok_or_else(|| anyhow!("stack {} runs no mint", self.name))
    }

    /// The fault proxy between auditor `name` and its audit node, if it was started through
    /// one.
    pub fn audit_node_proxy(&self, name: &str) -> anyhow::Result<&FaultProxy> {
        self.audit_node_proxies.get(name).ok_or_else(|| {
            anyhow!(
                "auditor {name:?} of stack {} reaches its node directly",
                self.name
            )
        })
    }

    /// Names of the auditors.
    pub fn auditor_names(&self) -> Vec<String> {
        self.auditors.keys().cloned().collect()
    }

    /// Names of the auditors started through a fault proxy.
    pub fn audit_node_proxy_names(&self) -> Vec<String> {
        self.audit_node_proxies.keys().cloned().collect()
    }

    /// Auditor `name`.
    pub fn auditor(&self, name: &str) -> anyhow::Result<&AuditorRole> {
        self.auditors
            .get(name)
            .ok_or_else(|| anyhow!("no auditor {name:?} on stack {}", self.name))
    }
}
