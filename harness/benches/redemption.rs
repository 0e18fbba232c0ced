//! `just demo`'s story, three times, printed as a table (release roles from $HASHPOOL_BIN_DIR;
//! `just bench` builds them): the time from a fresh private-signet stack to a completed
//! Lightning redemption, and the peak memory of the whole stack (bitcoind x2, Redis, pool,
//! mint, auditor, two proxies, two miners, two lightningd with their subdaemons and plugins),
//! sampled from /proc every 250 ms. The time includes waiting for the pool's first block,
//! which is luck at real difficulty.

use harness::HarnessConfig;

/// The memory target for the whole stack.
const RSS_TARGET_MB: u64 = 512;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = HarnessConfig::load(None)?;
    println!("| run | fresh stack to completed redemption | peak RSS summed | peak PSS | processes | RSS target |");
    println!("|---|---|---|---|---|---|");
    let mut times = Vec::new();
    let mut worst_rss = 0;
    for run in 1..=3 {
        let r = harness::demo::run(&config, false, true).await?;
        let (rss, pss) = (r.peak.rss / 1_000_000, r.peak.pss / 1_000_000);
        println!(
            "| {run} | {:.1} s | {rss} MB | {pss} MB | {} | {RSS_TARGET_MB} MB |",
            r.to_redemption.as_secs_f64(),
            r.peak.processes
        );
        times.push(r.to_redemption.as_secs_f64());
        worst_rss = worst_rss.max(rss);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "| median of 3 | {:.1} s | {worst_rss} MB (worst) | | | {RSS_TARGET_MB} MB |",
        times[1]
    );
    Ok(())
}
