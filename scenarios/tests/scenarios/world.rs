//! The cucumber World: owns the stacks of one scenario and what the steps remember.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context};
use bitcoin::{Address, BlockHash};
use cucumber::World;
use harness::faucet::FaucetPayment;
use harness::roles::PoolOptions;
use harness::{Chain, HarnessConfig, Stack};

/// Name of the stack a step means when it names none.
pub const DEFAULT_STACK: &str = "default";

/// State of one scenario.
#[derive(Debug, World)]
#[world(init = Self::new)]
pub struct HarnessWorld {
    pub config: HarnessConfig,
    pub stacks: BTreeMap<String, Stack>,
    /// An address the scenario created (it holds no key: coins sent there are only looked at).
    pub address: Option<Address>,
    /// Tip (height, hash) remembered before an action.
    pub tip_before: Option<(u64, BlockHash)>,
    /// Blocks the scenario mined last.
    pub mined: Vec<BlockHash>,
    /// The faucet payment made last.
    pub payment: Option<FaucetPayment>,
    /// Process generation killed by the last fault step.
    pub killed_generation: Option<u64>,
    /// Stream entries remembered before a fault: (id, fields).
    pub stream_before: Vec<(String, Vec<(String, String)>)>,
    /// The error of a step that was expected to fail.
    pub last_error: Option<String>,
    /// Pool settings used by the next pool start.
    pub pool_options: PoolOptions,
    /// A counter remembered before an action (accepted shares of a miner, disconnects...).
    pub counter_before: Option<f64>,
    /// Rates measured by the scenario, printed in the report (name, shares/s).
    pub rates: Vec<(String, f64)>,
}

impl HarnessWorld {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            config: HarnessConfig::load(None)?,
            stacks: BTreeMap::new(),
            address: None,
            tip_before: None,
            mined: Vec::new(),
            payment: None,
            killed_generation: None,
            stream_before: Vec::new(),
            last_error: None,
            pool_options: PoolOptions::default(),
            counter_before: None,
            rates: Vec::new(),
        })
    }

    /// Start a stack named `name`.
    pub async fn start_stack(
        &mut self,
        name: &str,
        chain: Option<Chain>,
        redis: bool,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.stacks.contains_key(name),
            "stack {name:?} already exists"
        );
        let mut builder = Stack::builder(name, &self.config);
        if let Some(chain) = chain {
            builder = builder.chain(chain);
        }
        if redis {
            builder = builder.redis();
        }
        let stack = builder
            .start()
            .await
            .with_context(|| format!("starting stack {name:?}"))?;
        self.stacks.insert(name.to_string(), stack);
        Ok(())
    }

    /// The stack called `name`.
    pub fn stack(&self, name: &str) -> anyhow::Result<&Stack> {
        self.stacks
            .get(name)
            .ok_or_else(|| anyhow!("no stack {name:?} in this scenario"))
    }

    /// The default stack.
    pub fn default_stack(&self) -> anyhow::Result<&Stack> {
        self.stack(DEFAULT_STACK)
    }

    /// The default stack, mutably (to start roles on it).
    pub fn default_stack_mut(&mut self) -> anyhow::Result<&mut Stack> {
        self.stacks
            .get_mut(DEFAULT_STACK)
            .ok_or_else(|| anyhow!("no stack {DEFAULT_STACK:?} in this scenario"))
    }

    /// Panics and ERROR lines in the roles' logs of every stack (the invariant sweep).
    pub fn log_problems(&self) -> Vec<String> {
        self.stacks.values().flat_map(Stack::log_problems).collect()
    }

    /// Called after the scenario: stop every stack; keep its data if the scenario failed.
    pub async fn finish(&mut self, scenario: &str, failed: bool) {
        for (name, rate) in &self.rates {
            println!("[scenario] {scenario}: {name} = {rate:.1} shares/s");
        }
        for (name, stack) in std::mem::take(&mut self.stacks) {
            match stack.shutdown(failed).await {
                Ok(Some(dir)) => eprintln!(
                    "[scenario] {scenario}: stack {name} data kept in {}",
                    dir.display()
                ),
                Ok(None) => {}
                Err(e) => eprintln!("[scenario] {scenario}: stopping stack {name} failed: {e:#}"),
            }
        }
    }
}
