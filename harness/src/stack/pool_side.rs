//! The pool side past the pool: the mint and the auditors, and a call that starts the whole
//! pool side at once.

use anyhow::{anyhow, Context};

use super::Stack;
use crate::roles::{AuditorRole, MintOptions, MintRole, PoolOptions};

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

    /// Start auditor `name` with `workers` concurrent audits.
    pub async fn start_auditor(
        &mut self,
        name: &str,
        workers: usize,
    ) -> anyhow::Result<&AuditorRole> {
        anyhow::ensure!(
            !self.auditors.contains_key(name),
            "auditor {name:?} already exists"
        );
        let port = self.allocator.allocate()?;
        let redis = self.redis()?.url();
        let auditor = AuditorRole::start(
            name,
            &self.dir.join(format!("auditor-{name}")),
            port.port(),
            self.bitcoind()?,
            &redis,
            workers,
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

    /// Auditor `name`.
    pub fn auditor(&self, name: &str) -> anyhow::Result<&AuditorRole> {
        self.auditors
            .get(name)
            .ok_or_else(|| anyhow!("no auditor {name:?} on stack {}", self.name))
    }
}
