//! Lightning nodes on a stack: `lightningd` on the stack's bitcoind (each behind its own fee
//! proxy), funded from the faucet, with blocks mined by the harness when a step needs them.

use std::time::Duration;

use anyhow::{anyhow, Context};
use bitcoin::{Address, Amount};

use super::Stack;
use crate::binaries::{find, Program};
use crate::lightning::{LightningNode, LightningOptions};
use crate::wait::wait_until;

impl Stack {
    /// Start Lightning node `name` (with a fixed wallet seed if given) and wait until it has
    /// synced to bitcoind's tip.
    pub async fn start_lightning(
        &mut self,
        name: &str,
        hsm_secret: Option<[u8; 32]>,
    ) -> anyhow::Result<&LightningNode> {
        self.start_lightning_seeded(name, hsm_secret, None).await
    }

    async fn start_lightning_seeded(
        &mut self,
        name: &str,
        hsm_secret: Option<[u8; 32]>,
        seed_dir: Option<std::path::PathBuf>,
    ) -> anyhow::Result<&LightningNode> {
        anyhow::ensure!(
            !self.lightning_nodes.contains_key(name),
            "lightning node {name:?} already exists"
        );
        let (p2p, proxy) = (self.allocator.allocate()?, self.allocator.allocate()?);
        let node = LightningNode::start(
            LightningOptions {
                name: format!("lightning-{name}"),
                dir: self.dir.join(format!("lightning-{name}")),
                exe: find(Program::Lightningd, &self.cache_dir)?,
                bitcoin_cli: find(Program::BitcoinCli, &self.cache_dir)?,
                p2p_port: p2p.port(),
                proxy_port: proxy.port(),
                hsm_secret,
                seed_dir,
                timeouts: self.timeouts,
            },
            self.bitcoind()?,
        )
        .await
        .map_err(|e| anyhow!("starting lightning node {name}: {e:#}"))?;
        // The proxy listens on its own socket; the lease only reserved the number.
        self.ports.extend([p2p, proxy]);
        self.backends.push((
            format!("lightning-{name}"),
            node.process().spec().program.display().to_string(),
        ));
        self.lightning_nodes.insert(name.to_string(), node);
        self.write_summary()?;
        self.lightning(name)
    }

    /// Start the pool's Lightning node `pool` from the rewards chain's (its matured rewards
    /// in its wallet); the stack must have been built with `rewards()`.
    pub async fn start_pool_lightning(&mut self) -> anyhow::Result<&LightningNode> {
        let r = self
            .rewards
            .clone()
            .ok_or_else(|| anyhow!("stack {} was not started from the rewards chain", self.name))?;
        self.start_lightning_seeded(
            "pool",
            Some(crate::lightning::pool_hsm_secret()),
            Some(r.pool_ln_dir),
        )
        .await
    }

    /// The pool side of a stack that redeems over Lightning: the pool's node from the rewards
    /// chain, the pool paying that node's address, the mint redeeming through that node (its
    /// matured rewards counted from this stack's bitcoind), and auditor `a`.
    pub async fn start_redemption_side(
        &mut self,
        pool: &crate::roles::PoolOptions,
        mint: &crate::roles::MintOptions,
        pool_fee_ppm: u64,
    ) -> anyhow::Result<()> {
        self.start_pool_lightning().await?;
        let rewards = self.rewards.clone().context("no rewards chain")?;
        let mut pool = pool.clone();
        pool.payout_address = Some(rewards.pool_address.clone());
        self.start_pool(&pool).await?;
        let bitcoind = self.bitcoind()?;
        let mut mint = mint.clone();
        mint.redemption = Some(hashpool_config::pool_side::RedemptionSection {
            lightning_rpc: self.lightning("pool")?.rpc_path().display().to_string(),
            payout_address: rewards.pool_address.clone(),
            pool_fee_ppm,
            bitcoind: hashpool_config::pool_side::BitcoindSection {
                rpc_url: bitcoind.rpc_url(),
                rpc_user: crate::bitcoind::RPC_USER.into(),
                rpc_password: hashpool_config::Secret::new(bitcoind.rpc_password().into()),
                chain: bitcoind.chain().name().into(),
                ..Default::default()
            },
            ..Default::default()
        });
        if let (Some(r), Some((pay, check, orphan, undispatched))) =
            (mint.redemption.as_mut(), mint.hold_timing)
        {
            r.payment_timeout_secs = pay;
            r.hold_check_secs = check;
            r.orphan_payment_grace_secs = orphan;
            r.final_status_grace_secs = undispatched;
        }
        self.start_mint(&mint).await?;
        self.start_auditor("a", 2).await?;
        Ok(())
    }

    /// Stop Lightning node `name` cleanly (its `stop` command); `restart_lightning` starts it
    /// again on the same directory and ports.
    pub async fn stop_lightning(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self
            .lightning_nodes
            .remove(name)
            .ok_or_else(|| anyhow!("no lightning node {name:?} on stack {}", self.name))?;
        let mut node = node;
        node.stop().await?;
        node.close_fee_proxy().await;
        self.lightning_stopped
            .insert(name.into(), node.options().clone());
        Ok(())
    }

    /// Kill Lightning node `name` with SIGKILL (its subdaemons die with it).
    pub async fn kill_lightning(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self
            .lightning_nodes
            .remove(name)
            .ok_or_else(|| anyhow!("no lightning node {name:?} on stack {}", self.name))?;
        let mut node = node;
        node.process().kill9().await?;
        node.close_fee_proxy().await;
        self.lightning_stopped
            .insert(name.into(), node.options().clone());
        Ok(())
    }

    /// Start a stopped or killed Lightning node again and wait until it has synced.
    pub async fn restart_lightning(&mut self, name: &str) -> anyhow::Result<&LightningNode> {
        let opts = self
            .lightning_stopped
            .remove(name)
            .ok_or_else(|| anyhow!("lightning node {name:?} was not stopped"))?;
        let node = LightningNode::start(opts, self.bitcoind()?)
            .await
            .map_err(|e| anyhow!("restarting lightning node {name}: {e:#}"))?;
        self.lightning_nodes.insert(name.to_string(), node);
        self.write_summary()?;
        self.lightning(name)
    }

    /// A channel of `sats` from the pool's Lightning node to node `who`'s, confirmed and
    /// normal on both sides.
    pub async fn open_pool_channel(&self, who: &str, sats: u64) -> anyhow::Result<()> {
        let (pool_ln, op_ln) = (self.lightning("pool")?, self.lightning(who)?);
        pool_ln.connect(op_ln).await?;
        pool_ln.fund_channel(op_ln, sats).await?;
        self.mine_blocks(1).await?;
        pool_ln
            .wait_channel_normal(&op_ln.id, Duration::from_secs(60))
            .await?;
        op_ln
            .wait_channel_normal(&pool_ln.id, Duration::from_secs(60))
            .await
    }

    /// The rewards chain the stack started from.
    pub fn rewards(&self) -> Option<&crate::lightning::RewardsChain> {
        self.rewards.as_ref()
    }

    /// Lightning node `name`.
    pub fn lightning(&self, name: &str) -> anyhow::Result<&LightningNode> {
        self.lightning_nodes
            .get(name)
            .ok_or_else(|| anyhow!("no lightning node {name:?} on stack {}", self.name))
    }

    /// Mine `n` blocks to the faucet (the harness's blocks, not the pool's).
    pub async fn mine_blocks(&self, n: u64) -> anyhow::Result<()> {
        let to: Address = self.faucet()?.address().clone();
        self.bitcoind()?.generate_to_address(n, &to).await?;
        Ok(())
    }

    /// Pay `sats` from the faucet to node `name`'s wallet, confirm it, and wait until the
    /// node counts it.
    pub async fn fund_lightning(&self, name: &str, sats: u64) -> anyhow::Result<()> {
        let node = self.lightning(name)?;
        let before = node.balances().await?.0;
        let address: Address = node
            .new_address()
            .await?
            .parse::<Address<bitcoin::address::NetworkUnchecked>>()?
            .assume_checked();
        self.faucet()?
            .send(self.bitcoind()?.rpc(), &address, Amount::from_sat(sats))
            .await?;
        self.mine_blocks(1).await?;
        wait_until(
            &format!("lightning node {name} to count {sats} sat more on chain"),
            Duration::from_secs(30),
            || async {
                let now = node.balances().await.map_err(|e| e.to_string())?.0;
                if now >= before + sats {
                    Ok(())
                } else {
                    Err(format!("{now} sat confirmed"))
                }
            },
        )
        .await?;
        Ok(())
    }
}
