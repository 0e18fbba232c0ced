//! `just demo`: the whole story on a fresh private-signet stack, told in plain lines.
//!
//! Miners start, shares are accepted, quotes go PENDING -> PAID and the operator's wallet
//! mints them; a fraudulent operator declares templates that overclaim the coinbase and gets
//! FAILED quotes; a block is found; the pool's matured rewards (the cached rewards chain)
//! fund a channel to the operator's node; ehash is redeemed over Lightning; a summary table.
//! Every number comes from the roles' wire interfaces and from lightningd and bitcoind.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::memory::PeakSampler;
use crate::roles::MinerOptions;
use crate::wait::wait_until;
use crate::{Chain, HarnessConfig, Stack};

/// The pool's fee on matured rewards in full stacks (2 %).
pub const POOL_FEE_PPM: u64 = 20_000;
/// The channel the pool's node opens to the operator's.
pub const CHANNEL_SAT: u64 = 10_000_000;
/// The invoice the operator redeems against.
pub const REDEEM_SAT: u64 = 50_000;

/// The stack `just up` and `just demo` run: on signet, the rewards chain, a pool that pays
/// the pool's Lightning node, a mint that redeems through it, an auditor, proxy `operator`
/// with miner `cpu`, and the operator's own Lightning node; on regtest (or without
/// lightningd), the same without Lightning.
pub async fn full_stack(config: &HarnessConfig, chain: Chain, name: &str) -> anyhow::Result<Stack> {
    let lightning = chain == Chain::Signet
        && crate::binaries::find(crate::binaries::Program::Lightningd, &config.cache_dir).is_ok();
    let mut builder = Stack::builder(name, config).chain(chain).redis();
    if lightning {
        builder = builder.rewards();
    } else if chain == Chain::Signet {
        eprintln!("warning: no lightningd (LIGHTNINGD_EXE, PATH, or `just bootstrap`): no Lightning redemption in this stack");
    }
    let mut stack = builder.start().await?;
    if lightning {
        let pool = crate::roles::PoolOptions {
            min_bits: crate::lightning::REDEMPTION_MIN_BITS,
            ..Default::default()
        };
        stack
            .start_redemption_side(&pool, &Default::default(), POOL_FEE_PPM)
            .await?;
        stack.start_lightning("operator", None).await?;
    } else {
        stack
            .start_pool_side(&Default::default(), &Default::default())
            .await?;
    }
    stack.start_proxy("operator", true, 500_000.0).await?;
    stack
        .start_miner("cpu", "operator", &MinerOptions::default())
        .await?;
    Ok(stack)
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Fresh stack to a completed redemption.
    pub to_redemption: Duration,
    /// Peak memory of every process of the stack.
    pub peak: crate::memory::TreeMemory,
}

struct Narrator {
    start: Instant,
    quiet: bool,
}

impl Narrator {
    fn say(&self, line: impl std::fmt::Display) {
        if !self.quiet {
            println!("[{:>6.1} s] {line}", self.start.elapsed().as_secs_f64());
        }
    }
}

/// Run the demo; with `keep`, leave the stack running (endpoints printed) until Ctrl-C; with
/// `quiet`, print nothing (the benchmark).
pub async fn run(config: &HarnessConfig, keep: bool, quiet: bool) -> anyhow::Result<DemoReport> {
    let n = Narrator {
        start: Instant::now(),
        quiet,
    };
    let sampler = PeakSampler::start(Duration::from_millis(250));
    n.say("starting a private signet (real difficulty) from the cached chain whose 3 oldest pool coinbases are 100+ blocks deep, held by the pool's Lightning node");
    let mut stack = full_stack(config, Chain::Signet, "demo").await?;
    anyhow::ensure!(
        stack.rewards().is_some(),
        "the demo needs lightningd: run `just bootstrap` (or set LIGHTNINGD_EXE)"
    );
    n.say("pool, mint (redeeming through the pool's Lightning node), auditor, proxy `operator` with its ehash wallet, a 500 kH/s CPU miner on SV1, and the operator's Lightning node are up");

    n.say("a fraudulent operator `mallory` starts: its own bitcoind, templates it declares with a coinbase that claims more than subsidy plus fees");
    stack.start_operator_node("mallory").await?;
    stack
        .start_proxy_declaring(
            "mallory",
            true,
            500_000.0,
            Some(("mallory", Some("coinbase-overclaim"))),
        )
        .await?;
    stack
        .start_miner("m-cpu", "mallory", &MinerOptions::default())
        .await?;

    let operator = stack.proxy("operator")?;
    let st = wait_until(
        "the operator's first PAID ehash, minted",
        Duration::from_secs(120),
        || async {
            let s = operator.wallet_status().await.map_err(|e| e.to_string())?;
            if s.minted > 0 {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await?;
    n.say(format!(
        "operator: {} quote(s) from accepted shares; {} ehash PENDING until their templates are audited, {} ehash PAID and minted by its wallet",
        st.quotes, st.pending, st.minted
    ));
    let mallory = stack.proxy("mallory")?;
    let ms = wait_until(
        "mallory's first FAILED quote",
        Duration::from_secs(120),
        || async {
            let s = mallory.wallet_status().await.map_err(|e| e.to_string())?;
            if s.failed > 0 {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await?;
    n.say(format!(
        "mallory: shares accepted, but {} ehash of quotes FAILED (the auditor asked Bitcoin Core: the coinbase claims too much); its wallet minted {}",
        ms.failed, ms.minted
    ));

    let pool = stack.pool()?;
    let blocks = wait_until(
        "the pool to find a block",
        Duration::from_secs(300),
        || async {
            let m = pool.metrics().await.map_err(|e| e.to_string())?;
            let found = m.sum("hashpool_pool_blocks_found_total");
            if found >= 1.0 {
                Ok(found)
            } else {
                Err(format!("{found} blocks"))
            }
        },
    )
    .await?;
    n.say(format!(
        "the pool found {blocks} block(s) on the private signet; its coinbase pays the pool's Lightning node and matures in 100 blocks"
    ));
    let reserve = stack.mint()?.redemption_reserve().await?;
    n.say(format!(
        "matured rewards: {} sat (pool fee {} sat); redeemable now {} sat for {} ehash outstanding",
        reserve["matured_sat"],
        reserve["pool_fee_sat"],
        reserve["available_sat"],
        reserve["outstanding_ehash"]
    ));

    stack.open_pool_channel("operator", CHANNEL_SAT).await?;
    let (pool_ln, op_ln) = (stack.lightning("pool")?, stack.lightning("operator")?);
    n.say(format!(
        "the pool's node opened a {CHANNEL_SAT} sat channel to the operator's node with its rewards"
    ));

    for name in ["cpu", "m-cpu"] {
        stack.miner(name)?.process().stop().await?;
    }
    let operator = stack.proxy("operator")?;
    wait_until(
        "the operator's wallet to mint every PAID quote",
        Duration::from_secs(60),
        || async {
            let s = operator.wallet_status().await.map_err(|e| e.to_string())?;
            if s.pending == 0 && s.paid_unminted == 0 {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await?;
    let invoice = op_ln.invoice(REDEEM_SAT, "demo").await?;
    n.say(format!(
        "miners stopped, every PAID quote minted; the operator asks its node for a {REDEEM_SAT} sat invoice and melts ehash against it"
    ));
    let r = operator
        .redeem(&invoice, crate::wait::scaled(Duration::from_secs(120)))
        .await?
        .map_err(|e| anyhow::anyhow!("redemption failed: {e}"))?;
    anyhow::ensure!(r["state"] == "PAID", "redemption ended {}", r["state"]);
    let to_redemption = n.start.elapsed();
    n.say(format!(
        "redeemed: the wallet held {} ehash, melted {} (+{} routing fee) for {REDEEM_SAT} sat, paid over Lightning by the pool's node (preimage {})",
        r["held_before"], r["amount_ehash"], r["fee_paid_ehash"], r["preimage"].as_str().unwrap_or("?")
    ));
    let (_, channel) = wait_until(
        "the operator's channel to hold the sats",
        Duration::from_secs(30),
        || async {
            let b = op_ln.balances().await.map_err(|e| e.to_string())?;
            if b.1 >= REDEEM_SAT {
                Ok(b)
            } else {
                Err(format!("{b:?}"))
            }
        },
    )
    .await?;
    let after = stack.mint()?.redemption_reserve().await?;
    let ms = stack.proxy("mallory")?.wallet_status().await?;
    // The money checks the scenarios end with: nothing held, every payment one PAID melt,
    // each wallet balanced, the reserve Bitcoin Core's.
    let keys = crate::stack_sweep::proxy_keys(&stack).await;
    let mint = stack.mint()?;
    let money = crate::money_sweep::sweep_money(
        &stack,
        mint,
        pool_ln,
        &mint.config.redemption.payout_address,
        POOL_FEE_PPM,
        &keys,
    )
    .await
    .context("the money checks after the redemption")?;
    n.say(format!("money conserved: {money}"));
    let peak = sampler.peak();
    if quiet {
        stack
            .shutdown(false)
            .await
            .context("stopping the demo stack")?;
        return Ok(DemoReport {
            to_redemption,
            peak,
        });
    }
    println!();
    println!("| what | value |");
    println!("|---|---|");
    println!("| blocks found by the pool | {blocks} |");
    println!("| operator ehash minted | {} |", st_minted(&stack).await?);
    println!(
        "| operator ehash melted | {} |",
        u64_of(&r, "held_before") - u64_of(&r, "held_after")
    );
    println!("| operator ehash held | {} |", u64_of(&r, "held_after"));
    println!(
        "| mallory ehash FAILED / minted | {} / {} |",
        ms.failed, ms.minted
    );
    println!("| operator node channel balance | {channel} sat |");
    println!("| pool redeemed | {} msat |", after["redeemed_msat"]);
    println!(
        "| matured rewards - pool fee - redeemed | {} sat |",
        after["available_sat"]
    );
    println!(
        "| fresh stack to completed redemption | {:.1} s |",
        to_redemption.as_secs_f64()
    );
    println!(
        "| peak memory of the stack ({} processes) | RSS {} MB summed, PSS {} MB |",
        peak.processes,
        peak.rss / 1_000_000,
        peak.pss / 1_000_000
    );
    if keep {
        print_endpoints(&stack.summary());
        println!("the stack keeps running; Ctrl-C stops it");
        wait_for_stop_signal().await?;
    }
    stack
        .shutdown(false)
        .await
        .context("stopping the demo stack")?;
    Ok(DemoReport {
        to_redemption,
        peak,
    })
}

fn u64_of(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

async fn st_minted(stack: &Stack) -> anyhow::Result<u64> {
    Ok(stack.proxy("operator")?.wallet_status().await?.minted)
}

/// Print a stack's backends, roles with their endpoints and pids, and the faucet.
pub fn print_endpoints(summary: &crate::StackSummary) {
    for (part, backend) in &summary.backends {
        println!("  backend {part:<8} {backend}");
    }
    for role in &summary.roles {
        let creds = role
            .credentials
            .as_deref()
            .map(|c| format!("  auth {c}"))
            .unwrap_or_default();
        println!(
            "  {:<9} {}{creds}  pid {}",
            role.name,
            role.endpoint,
            role.pid.unwrap_or(0)
        );
    }
    if let Some(f) = &summary.faucet_address {
        println!("  faucet    {f}");
    }
}

/// Wait for Ctrl-C or SIGTERM.
pub async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    Ok(())
}
