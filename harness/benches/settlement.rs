//! Settlement benchmarks, printed as a table (release role binaries from $HASHPOOL_BIN_DIR;
//! `just bench` builds them):
//!
//! - quotes per second end to end: share records appended -> quotes PAID (a `valid` verdict
//!   is in first) -> minted by cdk wallets in NUT-29 batches (two batches in flight, and one
//!   at a time as the operator's wallet mints), beside the blind-signing limit (one blind
//!   signature with its DLEQ proof per ehash-1 quote) measured in this process;
//! - latency from a share's record (appended before its ack) to its quote PAID, with zero
//!   settlement delay, while a miner mines (the mint's histogram, bucket bounds);
//! - full stack start (bitcoind, Redis, pool, mint, auditor, proxy, miner), median of 5, and
//!   the peak RSS of the whole stack under mining load.

use std::str::FromStr;
use std::time::{Duration, Instant};

use cdk_common::dhke::{blind_message, sign_message};
use cdk_common::nuts::{BlindSignature, Id, SecretKey};
use harness::ehash_api;
use harness::roles::{MinerOptions, MintOptions, PoolOptions};
use harness::{Chain, HarnessConfig, Stack};

const QUOTES: usize = 3000;

/// Blind signatures with DLEQ proofs per second, one core, in process.
fn blind_sign_limit() -> anyhow::Result<f64> {
    let k = SecretKey::generate();
    let id = Id::from_str("009a1f293253e41e")?;
    let (b, _) = blind_message(b"bench secret", None)?;
    let n = 3000;
    let start = Instant::now();
    for _ in 0..n {
        let c = sign_message(&k, &b)?;
        std::hint::black_box(BlindSignature::new(1.into(), c, id, &b, &k)?);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// (records appended -> all PAID rate, -> all minted rate), the wallet side minting
/// `in_flight` batches at a time.
async fn quotes_end_to_end(config: &HarnessConfig, in_flight: usize) -> anyhow::Result<(f64, f64)> {
    let mut s = Stack::builder(&format!("bench-quotes-{in_flight}"), config)
        .redis()
        .start()
        .await?;
    s.start_mint(&MintOptions::default()).await?;
    let mint = s.mint()?;
    let (secret, key) = harness::keys::locking_keys();
    let mut conn = s.redis()?.connect().await?;
    let template_id = ehash::template_id(1, 1);
    harness::redis::append_valid_verdict(&mut conn, template_id).await?;
    let start = Instant::now();
    harness::redis::append_share_records(&mut conn, template_id, key, QUOTES).await?;
    harness::wait::wait_until("every quote paid", Duration::from_secs(300), || async {
        let m = mint.metrics().await.map_err(|e| e.to_string())?;
        let paid = m.get("hashpool_mint_quotes_total{event=\"paid\"}");
        if paid >= QUOTES as f64 {
            Ok(())
        } else {
            Err(format!("{paid} paid"))
        }
    })
    .await?;
    let paid = QUOTES as f64 / start.elapsed().as_secs_f64();
    let quotes = ehash_api::lookup(&mint.addr, &secret).await?;
    anyhow::ensure!(quotes.len() == QUOTES, "{} quotes", quotes.len());
    let minted = ehash_api::mint_all(&mint.url, &quotes, &secret, 500, in_flight).await?;
    anyhow::ensure!(minted == QUOTES as u64, "minted {minted}");
    let minted_rate = QUOTES as f64 / start.elapsed().as_secs_f64();
    s.shutdown(false).await?;
    Ok((paid, minted_rate))
}

/// Upper bound of the bucket holding quantile `q`.
fn quantile(m: &harness::http::Metrics, name: &str, q: f64) -> f64 {
    let total = m.get(&format!("{name}_count"));
    let prefix = format!("{name}_bucket{{le=\"");
    let mut b: Vec<(f64, f64)> =
        m.0.iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix(&prefix)?
                        .trim_end_matches("\"}")
                        .parse()
                        .ok()?,
                    *v,
                ))
            })
            .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    b.into_iter()
        .find(|(_, n)| *n >= total * q && total > 0.0)
        .map(|(le, _)| le)
        .unwrap_or(f64::NAN)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Full stack start times (ms) of `runs` stacks, and for the last one, under 10 s of mining:
/// settlement latency p50/p99 and the peak RSS of every process summed (MB).
async fn full_stack(
    config: &HarnessConfig,
    runs: usize,
) -> anyhow::Result<(Vec<u128>, f64, f64, f64)> {
    let mut starts = Vec::new();
    let mut last = None;
    for i in 0..runs {
        let started = Instant::now();
        let mut s = Stack::builder(&format!("bench-full-{i}"), config)
            .chain(Chain::Signet)
            .redis()
            .start()
            .await?;
        s.start_pool_side(&PoolOptions::default(), &MintOptions::default())
            .await?;
        s.start_proxy("op", true, 500_000.0).await?;
        s.start_miner(
            "cpu",
            "op",
            &MinerOptions {
                log_shares: false,
                ..Default::default()
            },
        )
        .await?;
        starts.push(started.elapsed().as_millis());
        if i + 1 < runs {
            s.shutdown(false).await?;
        } else {
            last = Some(s);
        }
    }
    let s = last.ok_or_else(|| anyhow::anyhow!("no runs"))?;
    // A measurement window under load; nothing waits on it for correctness.
    tokio::time::sleep(Duration::from_secs(10)).await; // measurement window
    let m = s.mint()?.metrics().await?;
    let p50 = quantile(&m, "hashpool_mint_settlement_seconds", 0.5) * 1000.0;
    let p99 = quantile(&m, "hashpool_mint_settlement_seconds", 0.99) * 1000.0;
    let rss: u64 = s
        .processes()
        .iter()
        .filter_map(|(_, p)| p.pid())
        .map(rss_kb)
        .sum();
    s.shutdown(false).await?;
    starts.sort();
    Ok((starts, p50, p99, rss as f64 / 1024.0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = HarnessConfig::load(None)?;
    let limit = blind_sign_limit()?;
    let (_, minted_one) = quotes_end_to_end(&config, 1).await?;
    let (paid, minted) = quotes_end_to_end(&config, 2).await?;
    println!("| measurement | value |");
    println!("|---|---|");
    println!("| blind signatures with DLEQ per second, one core (the limit) | {limit:.0} |");
    println!(
        "| {QUOTES} quotes: records appended -> all PAID, per second | {paid:.0} ({:.2} of the limit) |",
        paid / limit
    );
    println!(
        "| {QUOTES} quotes: records appended -> PAID -> minted (NUT-29 batches of 500, two in flight), per second | {minted:.0} ({:.2} of the limit; floor 1,000, aim 2,000) |",
        minted / limit
    );
    println!(
        "| the same, one batch at a time (as the operator's wallet mints), per second | {minted_one:.0} ({:.2} of the limit; floor 1,000) |",
        minted_one / limit
    );
    let (starts, p50, p99, rss) = full_stack(&config, 5).await?;
    let median = starts[starts.len() / 2];
    println!(
        "| full stack start (bitcoind, Redis, pool, mint, auditor, proxy, miner), median of 5 (min {} / max {} ms) | {median} ms (floor 3,000, aim 1,500) |",
        starts[0],
        starts[starts.len() - 1]
    );
    println!("| share record -> quote PAID, zero delay, under mining: p50 / p99 (bucket bounds) | {p50:.0} ms / {p99:.0} ms (floor p50 < 300 ms) |");
    println!("| peak RSS of the whole stack under mining (sum of VmHWM of every process) | {rss:.0} MB |");
    Ok(())
}
