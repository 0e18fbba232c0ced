//! `harness`: start a stack by hand, mine on it, read its logs, clean up.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use harness::binaries::{find, Program};
use harness::bitcoind::{ensure_chain_cache, BitcoinRpc, Chain, RPC_USER};
use harness::stack::{stray_processes, StackSummary, SUMMARY_FILE};
use harness::{HarnessConfig, Stack};
use serde_json::json;

/// Run and inspect hashpool-harness stacks (real bitcoind and Redis on a private chain).
#[derive(Parser, Debug)]
#[command(name = "harness", version)]
struct Cli {
    /// Harness config file (TOML); `HASHPOOL_HARNESS__*` variables override it.
    #[arg(long, global = true, env = "HASHPOOL_HARNESS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a seeded fault schedule over a whole stack (kills, pauses, reorgs, locks,
    /// hostile redemptions), then check money conservation and every invariant; replay or
    /// shrink a schedule file. Writes target/soak/<seed>/ (schedule, history, report.html).
    Soak(harness::soak::cli::SoakArgs),
    /// Tell the whole story on a fresh signet stack: shares, quotes PENDING -> PAID, a
    /// fraudulent operator's FAILED quotes, a block, matured rewards, a channel, ehash redeemed
    /// over Lightning, then a summary table.
    Demo {
        /// Leave the stack running afterwards (endpoints printed) until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Start a stack, print its endpoints and keep it running until Ctrl-C (on signet with
    /// lightningd: the Lightning nodes and redemption too).
    Up {
        /// Chain: `signet` (private, real difficulty; where miners mine) or `regtest`.
        #[arg(long, default_value = "signet")]
        chain: Chain,
        /// Keep the data directory after Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Only bitcoind and Redis (no pool, mint, auditor, proxy or miner).
        #[arg(long)]
        bare: bool,
    },
    /// Mine N blocks on the running `up` stack (to the faucet, or to --address).
    GenerateBlocks {
        /// How many blocks.
        n: u64,
        /// Address the coinbases pay (default: the harness faucet's).
        #[arg(long)]
        address: Option<String>,
    },
    /// Print the logs of the running `up` stack, or of a kept stack directory.
    Logs {
        /// Only this role (bitcoind, redis).
        role: Option<String>,
        /// A stack directory (default: the running `up` stack).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Lines per log file.
        #[arg(long, short = 'n', default_value_t = 40)]
        lines: usize,
        /// Keep printing what the logs gain (each line prefixed with its role) until Ctrl-C.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Remove kept stack directories and stop processes left over from finished runs (the
    /// stacks of a run whose harness is alive are left alone).
    Clean {
        /// Also remove the pre-mined chains (the bitcoind build is kept).
        #[arg(long)]
        cache: bool,
    },
    /// Load the chain fixtures into the machine's chain cache now, and the rewards chain when
    /// lightningd is found (otherwise the first stack that needs one does it).
    Premine {
        /// Only this chain (default: both).
        #[arg(long)]
        chain: Option<Chain>,
    },
    /// Build a template with one kind of fraud on the running `up` stack's tip and write it as
    /// an audit task (JSON), to replay with `harness audit`.
    Fraud {
        /// The fraud kind (missing-input, double-spend, coinbase-overclaim, over-weight,
        /// wrong-witness-commitment, immature-coinbase-spend, non-final, no-pool-payout,
        /// stale-tip, reused-token).
        kind: String,
        /// Where to write the task.
        #[arg(long, default_value = "fraud-task.json")]
        out: PathBuf,
        /// Address the coinbase pays (the pool's; default: the harness faucet's).
        #[arg(long)]
        payout: Option<String>,
    },
    /// Print the auditor's verdict on a saved audit task (JSON of the task's fields, as the
    /// fraud scenarios save them and `harness fraud` writes them), from the running `up`
    /// stack's bitcoind.
    Audit {
        /// The task file.
        file: PathBuf,
    },
    /// Print which program backs each part of a stack.
    Backends,
    /// Print a fresh pool authority key pair (SRI base58), a Cashu locking key pair, and a
    /// payout address (signet and regtest) with its secret key.
    Keys,
    /// Rebuild the pre-mined chains as fixtures (fixtures/chains/<chain>.blocks): deterministic
    /// blocks from the faucet's key and fixed times. Commit the files; caches rebuild from them.
    ChainFixtures {
        /// Directory to write into.
        #[arg(long, default_value = "fixtures/chains")]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = HarnessConfig::load(cli.config.as_deref())?;
    match cli.command {
        Command::Soak(args) => {
            if !harness::soak::cli::run(&config, &args).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Demo { keep } => {
            let report = harness::demo::run(&config, keep, false).await?;
            eprintln!(
                "demo: fresh stack to completed redemption {:.1} s, peak memory RSS {} MB (PSS {} MB) over {} processes",
                report.to_redemption.as_secs_f64(),
                report.peak.rss / 1_000_000,
                report.peak.pss / 1_000_000,
                report.peak.processes
            );
            Ok(())
        }
        Command::Up { chain, keep, bare } => up(&config, chain, keep, bare).await,
        Command::GenerateBlocks { n, address } => generate(&config, n, address).await,
        Command::Logs {
            role,
            dir,
            lines,
            follow,
        } => logs(&config, role, dir, lines, follow),
        Command::Clean { cache } => clean(&config, cache),
        Command::Premine { chain } => {
            let exe = find(Program::Bitcoind, &config.cache_dir)?;
            let chains = chain
                .map(|c| vec![c])
                .unwrap_or_else(|| vec![Chain::Regtest, Chain::Signet]);
            for chain in chains {
                let cached = ensure_chain_cache(&exe, chain, &config).await?;
                println!(
                    "{chain}: {} blocks cached in {}",
                    cached.blocks,
                    cached.dir.display()
                );
            }
            if chain.is_none_or(|c| c == Chain::Signet)
                && find(Program::Lightningd, &config.cache_dir).is_ok()
            {
                let r = harness::lightning::ensure_rewards_chain(&config).await?;
                println!(
                    "signet rewards: {} blocks, {} sat matured for the pool's Lightning node ({})",
                    r.blocks,
                    r.rewards_sats,
                    r.chain_dir.display()
                );
            }
            Ok(())
        }
        Command::Backends => backends(&config),
        Command::Fraud { kind, out, payout } => fraud(&config, &kind, &out, payout).await,
        Command::Audit { file } => audit(&config, &file).await,
        Command::ChainFixtures { out } => harness::chain_fixtures::write_all(&out),
        Command::Keys => {
            let a = harness::keys::authority_keys();
            let (locking_secret, locking_public) = harness::keys::locking_keys();
            println!(
                "authority_public_key = \"{}\"\nauthority_secret_key = \"{}\"",
                a.public, a.secret
            );
            println!(
                "locking_secret_key = \"{locking_secret}\"\nlocking_pubkey = \"{locking_public}\""
            );
            // A payout key for the pool's `payout_address` (P2WPKH), with its secret so the
            // rewards can be spent.
            let secp = bitcoin::secp256k1::Secp256k1::new();
            let (sk, pk) = secp.generate_keypair(&mut bitcoin::secp256k1::rand::thread_rng());
            let pk = bitcoin::CompressedPublicKey(pk);
            for (chain, network) in [
                ("signet", bitcoin::Network::Signet),
                ("regtest", bitcoin::Network::Regtest),
            ] {
                println!(
                    "# {chain}\npayout_address = \"{}\"",
                    bitcoin::Address::p2wpkh(&pk, network)
                );
            }
            println!(
                "# keep it: the payout address's secret key (WIF, test networks)\n# payout_secret_key = \"{}\"",
                bitcoin::PrivateKey::new(sk, bitcoin::Network::Signet).to_wif()
            );
            Ok(())
        }
    }
}

fn up_pointer(config: &HarnessConfig) -> PathBuf {
    config.run_dir.join("up.json")
}

async fn up(config: &HarnessConfig, chain: Chain, keep: bool, bare: bool) -> anyhow::Result<()> {
    if let Ok(summary) = running_up(config) {
        bail!(
            "an `up` stack is already running (harness pid {}, {}); stop it with Ctrl-C first",
            summary.harness_pid,
            summary.dir.display()
        );
    }
    for (pid, cmd, dir) in stray_processes(&config.run_dir) {
        eprintln!(
            "warning: stray process {pid} from an earlier run ({}): {cmd}; `just clean` stops it",
            dir.display()
        );
    }
    let started = std::time::Instant::now();
    let stack = if bare {
        let mut stack = Stack::builder("up", config)
            .chain(chain)
            .redis()
            .start()
            .await?;
        // An auditor rewinds its node: it gets one of its own, following the pool's.
        stack.start_audit_node("manual").await?;
        stack
    } else {
        let stack = harness::demo::full_stack(config, chain, "up").await?;
        println!(
            "pool, mint, auditor, proxy `operator`, miner `cpu` (500 kH/s){} ready in {} ms",
            if stack.rewards().is_some() {
                ", the pool's and the operator's Lightning nodes (the pool's holding matured rewards)"
            } else {
                ""
            },
            started.elapsed().as_millis()
        );
        stack
    };
    let summary = stack.summary();
    std::fs::write(up_pointer(config), serde_json::to_vec_pretty(&summary)?)?;
    println!(
        "stack `up` on {chain} ready in {} ms ({})",
        summary.start_ms,
        summary.dir.display()
    );
    harness::demo::print_endpoints(&summary);
    println!("Ctrl-C stops the stack; meanwhile: `just generate-blocks N`, `just logs [ROLE]`.");
    harness::demo::wait_for_stop_signal().await?;
    eprintln!("stopping stack `up`...");
    let _ = std::fs::remove_file(up_pointer(config));
    match stack.shutdown(keep).await? {
        Some(dir) => eprintln!("stopped; data kept in {}", dir.display()),
        None => eprintln!("stopped; data removed"),
    }
    Ok(())
}

fn running_up(config: &HarnessConfig) -> anyhow::Result<StackSummary> {
    let path = up_pointer(config);
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "no running `up` stack ({} missing): start one with `just up`",
            path.display()
        )
    })?;
    let summary: StackSummary = serde_json::from_slice(&text)?;
    if !Path::new(&format!("/proc/{}", summary.harness_pid)).exists() {
        bail!(
            "the `up` stack's harness (pid {}) is gone: start one with `just up`",
            summary.harness_pid
        );
    }
    Ok(summary)
}

/// The running `up` stack's summary and a client of its bitcoind.
fn up_rpc(config: &HarnessConfig) -> anyhow::Result<(StackSummary, BitcoinRpc)> {
    let summary = running_up(config)?;
    let role = summary
        .roles
        .iter()
        .find(|r| r.name == "bitcoind")
        .context("the `up` stack runs no bitcoind")?;
    let password = role
        .credentials
        .as_deref()
        .and_then(|c| c.strip_prefix(&format!("{RPC_USER}:")))
        .context("no bitcoind credentials in the stack summary")?;
    let rpc = BitcoinRpc::new(&role.endpoint, RPC_USER, password)?;
    Ok((summary, rpc))
}

async fn fraud(
    config: &HarnessConfig,
    kind: &str,
    out: &Path,
    payout: Option<String>,
) -> anyhow::Result<()> {
    let kind: template_fraud::FraudKind = kind.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let (summary, rpc) = up_rpc(config)?;
    let address = payout
        .or(summary.faucet_address)
        .context("no payout address: pass --payout")?;
    let script = address
        .parse::<bitcoin::Address<bitcoin::address::NetworkUnchecked>>()
        .with_context(|| format!("{address} is not an address"))?
        .assume_checked()
        .script_pubkey();
    let signet = summary.chain == Some(Chain::Signet);
    let task = harness::fraud_replay::fraud_task(&rpc, signet, kind, script, 1).await?;
    harness::fraud_replay::write_task(out, &task)?;
    println!(
        "{kind} template on {} (height {}) written to {}; replay: harness audit {}",
        task.prev_hash,
        task.height,
        out.display(),
        out.display()
    );
    Ok(())
}

async fn audit(config: &HarnessConfig, file: &Path) -> anyhow::Result<()> {
    let task = harness::fraud_replay::read_task(file)?;
    let (_, rpc) = up_rpc(config)?;
    let (verdict, reason) = harness::fraud_replay::audit(rpc, &task).await?;
    println!(
        "template {} ({}, height {} on {}): {} ({reason})",
        task.template_id,
        task.kind.as_str(),
        task.height,
        task.prev_hash,
        verdict.as_str()
    );
    Ok(())
}

async fn generate(config: &HarnessConfig, n: u64, address: Option<String>) -> anyhow::Result<()> {
    let (summary, rpc) = up_rpc(config)?;
    let address = address
        .or(summary.faucet_address)
        .context("no address to mine to")?;
    let hashes: Vec<String> = rpc
        .call(
            "generatetoaddress",
            &[json!(n), json!(address), json!(i32::MAX)],
        )
        .await?;
    let height: u64 = rpc.call("getblockcount", &[]).await?;
    for h in &hashes {
        println!("{h}");
    }
    println!(
        "mined {} block(s) to {address}; height {height}",
        hashes.len()
    );
    Ok(())
}

fn logs(
    config: &HarnessConfig,
    role: Option<String>,
    dir: Option<PathBuf>,
    lines: usize,
    follow: bool,
) -> anyhow::Result<()> {
    let summary: StackSummary = match dir {
        Some(dir) => serde_json::from_slice(
            &std::fs::read(dir.join(SUMMARY_FILE))
                .with_context(|| format!("{} has no {SUMMARY_FILE}", dir.display()))?,
        )?,
        None => running_up(config)?,
    };
    let mut shown = 0;
    for r in summary
        .roles
        .iter()
        .filter(|r| role.as_deref().is_none_or(|want| want == r.name))
    {
        for log in &r.logs {
            println!("==> {} <==", log.display());
            println!("{}", harness::logs::tail(log, lines));
            shown += 1;
        }
    }
    if shown == 0 {
        bail!(
            "no role {:?} in stack {}",
            role.unwrap_or_default(),
            summary.dir.display()
        );
    }
    if follow {
        // Print what each log gains, prefixed with its role, until Ctrl-C.
        let mut files: Vec<(String, PathBuf, u64)> = summary
            .roles
            .iter()
            .filter(|r| role.as_deref().is_none_or(|want| want == r.name))
            .flat_map(|r| r.logs.iter().map(move |l| (r.name.clone(), l.clone())))
            .map(|(n, l)| {
                let len = std::fs::metadata(&l).map(|m| m.len()).unwrap_or(0);
                (n, l, len)
            })
            .collect();
        loop {
            for (name, path, seen) in &mut files {
                let Ok(bytes) = std::fs::read(&*path) else {
                    continue;
                };
                let len = bytes.len() as u64;
                if len < *seen {
                    *seen = 0; // truncated or replaced
                }
                if len > *seen {
                    for line in String::from_utf8_lossy(&bytes[*seen as usize..]).lines() {
                        println!("[{name}] {line}");
                    }
                    *seen = len;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    Ok(())
}

fn clean(config: &HarnessConfig, cache: bool) -> anyhow::Result<()> {
    if let Ok(summary) = running_up(config) {
        bail!(
            "an `up` stack is running (harness pid {}): stop it with Ctrl-C before cleaning",
            summary.harness_pid
        );
    }
    for (pid, cmd, _) in stray_processes(&config.run_dir) {
        println!("stopping stray process {pid}: {cmd}");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Everything under the run dir but the stacks of runs still alive (a `just scenario`
    // beside a `just bench`).
    if let Ok(entries) = std::fs::read_dir(&config.run_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Some(summary) = std::fs::read(path.join(SUMMARY_FILE))
                .ok()
                .and_then(|t| serde_json::from_slice::<StackSummary>(&t).ok())
            {
                if harness::stack::harness_alive(&summary) {
                    println!(
                        "kept {} (its run, harness pid {}, is alive)",
                        path.display(),
                        summary.harness_pid
                    );
                    continue;
                }
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("cannot remove {}", path.display()))?;
            println!("removed {}", path.display());
        }
    }
    if cache {
        let chains = config.cache_dir.join("chains");
        if chains.exists() {
            std::fs::remove_dir_all(&chains)?;
            println!("removed {}", chains.display());
        }
    }
    Ok(())
}

fn backends(config: &HarnessConfig) -> anyhow::Result<()> {
    for program in Program::ALL {
        match find(program, &config.cache_dir) {
            Ok(path) => println!("{:<13} {}", program.file_name(), path.display()),
            Err(e) => println!("{:<13} MISSING: {e}", program.file_name()),
        }
    }
    Ok(())
}
