//! The cucumber World: owns the stacks of one scenario and what the steps remember.

use std::collections::{BTreeMap, HashMap};

use anyhow::anyhow;
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
    /// Templates that already had a verdict when an auditor was stopped (audited on the tip
    /// of that time, before the chain moved on).
    pub audited_before_stop: std::collections::HashSet<u64>,
    /// Blocks the scenario mined last.
    pub mined: Vec<BlockHash>,
    /// The faucet payment made last.
    pub payment: Option<FaucetPayment>,
    /// Process generation killed by the last fault step.
    pub killed_generation: Option<u64>,
    /// How many job tips each miner had logged when bitcoind was killed.
    pub tips_at_crash: std::collections::HashMap<String, usize>,
    /// A process a step paused, to be resumed by a later one.
    pub paused_peer: Option<String>,
    /// Job tips a miner logged since bitcoind was killed.
    pub jobs_since_crash: usize,
    /// Where bitcoind's log stood when the mint was started again.
    pub node_log_from: Option<u64>,
    /// Stream entries remembered before a fault: (id, fields).
    pub stream_before: Vec<(String, Vec<(String, String)>)>,
    /// What Redis counted of each remembered stream.
    pub stream_counters_before: HashMap<String, harness::stream_archive::StreamCounters>,
    /// The last entry a late reader acknowledged, per stream.
    pub late_reader_last: Vec<(&'static str, String)>,
    /// The error of a step that was expected to fail.
    pub last_error: Option<String>,
    /// Pool settings used by the next pool start.
    pub pool_options: PoolOptions,
    /// Mint settings used by the next mint start.
    pub mint_options: harness::roles::MintOptions,
    /// How the auditors of the pool side trim (None: the harness's default).
    pub auditor_streams: Option<hashpool_config::pool_side::StreamsSection>,
    /// A counter remembered before an action (accepted shares of a miner, disconnects...).
    pub counter_before: Option<f64>,
    /// Rates measured by the scenario, printed in the report (name, shares/s).
    pub rates: Vec<(String, f64)>,
    /// Unexpected exits the scenario caused on purpose, by (stack, process name): the sweep
    /// fails on any other.
    pub expected_exits: HashMap<(String, String), usize>,
    /// An honest miner's accepted-share rate measured without faults.
    pub baseline_rate: Option<f64>,
    /// Restarts a process had before the last fault step (to count the new ones).
    pub restarts_before: Option<u32>,
    /// Channels the pool opened for the harness's own SV2 clients: (id, extranonce prefix).
    pub sv2_channels: Vec<(u32, String)>,
    /// The share hash and template id of a forged template's share.
    pub forged: Option<(String, u64)>,
    /// The harness's SV2 clients, by name.
    pub clients: BTreeMap<String, crate::steps::accounting::Client>,
    /// Blocks bitcoind refused, by reason, as the pool counted them.
    pub refused_blocks: BTreeMap<String, f64>,
    /// Redemptions tried: (operator, what was seen before, the redemption or None if refused).
    pub redemptions: Vec<(
        String,
        crate::steps::redemption::BeforeRedemption,
        Option<serde_json::Value>,
    )>,
    /// Invoices an operator's node made, kept for a later step: (bolt11, sats).
    pub invoices: HashMap<String, (String, u64)>,
    /// Error log lines a step caused on purpose (a substring each): the sweep skips them.
    pub expected_log_errors: Vec<String>,
    /// An operator's channel balance (sat) when its node made the kept invoice.
    pub channel_before: HashMap<String, u64>,
    /// The mint's redemption reserve remembered before a redemption.
    pub reserve_before: Option<serde_json::Value>,
    /// A redemption running in the background: the proxy's HTTP answer.
    pub redeem_in_flight: Option<tokio::task::JoinHandle<Result<(u16, String), String>>>,
    /// The share the SV2 sniffer cut before its answer.
    pub cut_share: Option<harness::sniffer::CutShare>,
    /// A process's peak resident memory remembered before an action, bytes.
    pub memory_before: Option<u64>,
    /// SV1 sockets a scenario holds open without a word.
    pub silent_sockets: Vec<tokio::net::TcpStream>,
    /// Plain SV2 clients (no ehash) a scenario holds open, by name.
    pub sv2_clients: BTreeMap<String, harness::sv2_client::Sv2Client>,
    /// The last reorganisation of the pool's node.
    pub reorg: Option<harness::stack::Reorg>,
    /// The redemption rate remembered before an action: (msat, ehash).
    pub rate_remembered: Option<(u128, u128)>,
    /// An invoice kept to quote again, and what its first quote cost (ehash).
    pub probe: Option<(String, u64)>,
    /// A melt quote an operator got and has not paid yet: (operator, the proxy's answer).
    pub melt_quote: Option<(String, serde_json::Value)>,
    /// Matured rewards (sats) as Bitcoin Core counted them before an action.
    pub matured_remembered: Option<u64>,
    /// Invoices the scenario named.
    pub named_invoices: HashMap<String, crate::steps::redemption_htlcs::NamedInvoice>,
    /// Redemptions of named invoices running in the background.
    pub named_redemptions: HashMap<String, crate::steps::redemption_htlcs::NamedRedemption>,
}

impl HarnessWorld {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            config: HarnessConfig::load(None)?,
            stacks: BTreeMap::new(),
            address: None,
            tip_before: None,
            audited_before_stop: Default::default(),
            mined: Vec::new(),
            payment: None,
            killed_generation: None,
            tips_at_crash: Default::default(),
            paused_peer: None,
            jobs_since_crash: 0,
            node_log_from: None,
            stream_before: Vec::new(),
            stream_counters_before: HashMap::new(),
            late_reader_last: Vec::new(),
            last_error: None,
            pool_options: PoolOptions::default(),
            mint_options: Default::default(),
            auditor_streams: None,
            counter_before: None,
            rates: Vec::new(),
            expected_exits: HashMap::new(),
            restarts_before: None,
            baseline_rate: None,
            sv2_channels: Vec::new(),
            clients: BTreeMap::new(),
            forged: None,
            refused_blocks: BTreeMap::new(),
            redemptions: Vec::new(),
            invoices: HashMap::new(),
            expected_log_errors: Vec::new(),
            reserve_before: None,
            channel_before: HashMap::new(),
            redeem_in_flight: None,
            cut_share: None,
            sv2_clients: BTreeMap::new(),
            silent_sockets: Vec::new(),
            memory_before: None,
            reorg: None,
            rate_remembered: None,
            probe: None,
            melt_quote: None,
            matured_remembered: None,
            named_invoices: HashMap::new(),
            named_redemptions: HashMap::new(),
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
        // The whole cause chain in one message: cucumber prints only the outermost one.
        let stack = builder
            .start()
            .await
            .map_err(|e| anyhow!("starting stack {name:?}: {e:#}"))?;
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

    /// The scenario is about to make process `process` of the default stack exit (kill -9,
    /// a misbehaving miner cut off): the sweep expects one more unexpected exit of it.
    pub fn expect_exit(&mut self, process: &str) {
        *self
            .expected_exits
            .entry((DEFAULT_STACK.to_string(), process.to_string()))
            .or_default() += 1;
    }

    /// The invariant sweep of every stack, while it still runs: error lines in any log
    /// (unless `allow_errors`), unexpected exits beyond those the scenario caused, and the
    /// share records checked against independent oracles.
    pub async fn sweep(&self, allow_errors: bool) -> Vec<String> {
        let mut problems = Vec::new();
        for (stack_name, stack) in &self.stacks {
            stack.resume_paused();
            // The sweep compares streams read at one moment with quotes looked up at the
            // next: no new share may land in between.
            for m in stack.miners() {
                if let Err(e) = m.process().stop().await {
                    problems.push(format!(
                        "stack {stack_name}: stopping a miner failed: {e:#}"
                    ));
                }
            }
            if !allow_errors {
                problems.extend(
                    stack
                        .log_problems()
                        .into_iter()
                        .filter(|l| !self.expected_log_errors.iter().any(|e| l.contains(e))),
                );
            }
            let mut exits: HashMap<String, Vec<String>> = HashMap::new();
            for (process, how) in stack.unexpected_exits() {
                exits.entry(process).or_default().push(how);
            }
            for (s, process) in self.expected_exits.keys() {
                if s == stack_name {
                    exits.entry(process.clone()).or_default();
                }
            }
            for (process, hows) in exits {
                let expected = self
                    .expected_exits
                    .get(&(stack_name.clone(), process.clone()))
                    .copied()
                    .unwrap_or(0);
                if hows.len() != expected {
                    problems.push(format!(
                        "stack {stack_name}: {process} exited unexpectedly {} time(s) ({}), the scenario caused {expected}",
                        hows.len(),
                        hows.join(", ")
                    ));
                }
            }
            let inputs = harness::stack_sweep::SweepInputs {
                channels: self.sv2_channels.clone(),
                keys: self.clients.values().map(|c| c.key).collect(),
                known: self.known_keys(stack).await,
            };
            for check in harness::stack_sweep::sweep_stack(stack, &inputs).await {
                if check.passed {
                    println!(
                        "[sweep] stack {stack_name}: {}: {}",
                        check.name, check.detail
                    );
                } else {
                    problems.extend(
                        check
                            .detail
                            .lines()
                            .map(|p| format!("stack {stack_name}: {}: {p}", check.name)),
                    );
                }
            }
        }
        problems
    }

    /// The settlement invariants of the default stack, now.
    pub async fn settlement_problems(&self) -> anyhow::Result<Vec<String>> {
        self.sweep_settlement(self.default_stack()?).await
    }

    /// The settlement invariants for every key the scenario knows (proxies' and clients').
    async fn sweep_settlement(&self, stack: &Stack) -> anyhow::Result<Vec<String>> {
        let keys = self.known_keys(stack).await;
        harness::settlement_sweep::sweep_settlement(stack, &keys).await
    }

    /// Every operator key of `stack` the scenario knows: the proxies' and the SV2 clients'.
    async fn known_keys(&self, stack: &Stack) -> Vec<harness::settlement_sweep::KnownKey> {
        use harness::settlement_sweep::KnownKey;
        let mut keys = harness::stack_sweep::proxy_keys(stack).await;
        for (name, c) in &self.clients {
            keys.push(KnownKey {
                name: format!("client {name}"),
                public: c.key.to_string(),
                secret: c.secret.clone(),
                wallet_held: None,
            });
        }
        keys
    }

    /// Called after the scenario: stop every stack (a process that does not exit cleanly on
    /// SIGTERM is a problem), keep its data if the scenario failed or a problem was found.
    /// Returns the problems.
    pub async fn finish(
        &mut self,
        scenario: &str,
        failed: bool,
        mut problems: Vec<String>,
    ) -> Vec<String> {
        for (name, rate) in &self.rates {
            println!("[scenario] {scenario}: {name} = {rate:.1} shares/s");
        }
        let mut stacks = std::mem::take(&mut self.stacks);
        for (name, stack) in stacks.iter_mut() {
            match stack.stop_all().await {
                Ok(bad) => problems.extend(bad.into_iter().map(|(process, how)| {
                    format!("stack {name}: {process} did not exit cleanly when stopped: {how}")
                })),
                Err(e) => problems.push(format!("stack {name}: stopping failed: {e:#}")),
            }
        }
        let keep = failed || !problems.is_empty();
        for (name, stack) in stacks {
            match stack.shutdown(keep).await {
                Ok(Some(dir)) => eprintln!(
                    "[scenario] {scenario}: stack {name} data kept in {}",
                    dir.display()
                ),
                Ok(None) => {}
                Err(e) => eprintln!("[scenario] {scenario}: stopping stack {name} failed: {e:#}"),
            }
        }
        problems
    }
}
