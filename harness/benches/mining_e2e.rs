//! End to end over loopback on the private signet: miners -> proxy -> pool -> Redis record ->
//! ack. Prints accepted shares/s at saturation, ack latency percentiles at about 1,000
//! shares/s, and peak RSS of pool and proxy. Uses the role binaries in $HASHPOOL_BIN_DIR
//! (`just bench` builds them with --release and points it there).

use std::time::{Duration, Instant};

use harness::roles::{MinerOptions, PoolOptions};
use harness::{Chain, HarnessConfig, Stack};

/// Measurement window after warm-up.
const WINDOW: Duration = Duration::from_secs(10);
const WARMUP: Duration = Duration::from_secs(3);

fn peak_rss_mb(pid: Option<u32>) -> f64 {
    pid.map_or(0.0, |p| {
        harness::memory::peak_rss(p) as f64 / (1024.0 * 1024.0)
    })
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace().find_map(|w| {
        w.strip_prefix(key)?
            .strip_prefix('=')?
            .trim_end_matches("H/s")
            .parse()
            .ok()
    })
}

async fn stack(config: &HarnessConfig, name: &str, min_bits: u32) -> anyhow::Result<Stack> {
    let mut stack = Stack::builder(name, config)
        .chain(Chain::Signet)
        .redis()
        .start()
        .await?;
    let mut opts = PoolOptions {
        min_bits,
        shares_per_minute: 1.0e9,
        vardiff_interval_secs: 3600,
        ..Default::default()
    };
    opts.limits.max_shares_per_sec = 1.0e7;
    opts.limits.share_burst = 1.0e7;
    stack.start_pool(&opts).await?;
    // A tiny announced hashrate keeps the channel at the easiest target min_bits allows.
    stack.start_proxy("bench", true, 1.0).await?;
    Ok(stack)
}

/// Accepted shares per second when two miners offer `offered` shares/s in total. With
/// min_bits 2 a share takes 4 hashes, so the miners' hashing costs little CPU and the
/// measurement is of the proxy -> pool -> Redis -> ack path.
/// With `connections` above 1, each of the two miner processes runs that many simulated miners.
async fn throughput(
    config: &HarnessConfig,
    offered: f64,
    connections: usize,
) -> anyhow::Result<Throughput> {
    const MIN_BITS: u32 = 2;
    const MINERS: usize = 2;
    let name = format!("bench-throughput-{offered}-{connections}");
    let mut s = stack(config, &name, MIN_BITS).await?;
    for i in 0..MINERS {
        let hashrate = offered / MINERS as f64 * 2f64.powi(MIN_BITS as i32);
        let opts = MinerOptions {
            hashrate: Some(hashrate),
            log_shares: false,
            connections,
            ..Default::default()
        };
        s.start_miner(&format!("m{i}"), "bench", &opts).await?;
    }
    // Fixed windows are what a rate measurement is; nothing waits on them for correctness.
    tokio::time::sleep(WARMUP).await; // measurement window
    let pool = s.pool()?;
    let pids = cpu_pids(&s)?;
    let cpu_before: Vec<f64> = pids.iter().map(|(_, p)| cpu(*p)).collect();
    let m = pool.metrics().await?;
    let before = (
        m.get("hashpool_pool_shares_accepted_total"),
        m.sum("hashpool_pool_shares_rejected_total"),
    );
    let reasons_before = rejected_by_reason(&m);
    let busy_before = s.proxy("bench")?.shares().await?.refused_upstream_busy;
    let t = Instant::now();
    tokio::time::sleep(WINDOW).await; // measurement window
    let m = pool.metrics().await?;
    let secs = t.elapsed().as_secs_f64();
    let rate = (m.get("hashpool_pool_shares_accepted_total") - before.0) / secs;
    let rejected = (m.sum("hashpool_pool_shares_rejected_total") - before.1) / secs;
    let busy =
        (s.proxy("bench")?.shares().await?.refused_upstream_busy - busy_before) as f64 / secs;
    let mut reasons: Vec<(String, f64)> = rejected_by_reason(&m)
        .into_iter()
        .map(|(r, n)| {
            let b = reasons_before.get(&r).copied().unwrap_or(0.0);
            (r, (n - b) / secs)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    reasons.sort_by(|a, b| b.1.total_cmp(&a.1));
    let reasons: Vec<String> = reasons
        .iter()
        .take(3)
        .map(|(r, n)| format!("{r} {n:.0}/s"))
        .collect();
    let split: Vec<String> = pids
        .iter()
        .zip(cpu_before)
        .map(|((name, p), b)| format!("{name} {:.2}", (cpu(*p) - b) / secs))
        .collect();
    let rss = (
        peak_rss_mb(pool.process().pid()),
        peak_rss_mb(s.proxy("bench")?.process().pid()),
    );
    s.shutdown(false).await?;
    Ok(Throughput {
        rate,
        rejected,
        busy,
        cpu: split.join(", "),
        reasons: reasons.join(", "),
        pool_rss: rss.0,
        proxy_rss: rss.1,
    })
}

/// What one throughput run measured.
struct Throughput {
    /// Accepted shares/s.
    rate: f64,
    /// Shares/s the pool refused (stale, duplicate, ...).
    rejected: f64,
    /// Shares/s the proxy refused with `upstream-busy` (its window to the pool full).
    busy: f64,
    /// Cores each process used during the window.
    cpu: String,
    /// The pool's most frequent refusal reasons in the window, per second.
    reasons: String,
    pool_rss: f64,
    proxy_rss: f64,
}

/// The pool's refusals so far, by reason.
fn rejected_by_reason(m: &harness::http::Metrics) -> std::collections::HashMap<String, f64> {
    m.0.iter()
        .filter_map(|(k, v)| {
            let r = k.strip_prefix("hashpool_pool_shares_rejected_total{reason=\"")?;
            Some((r.trim_end_matches("\"}").to_string(), *v))
        })
        .collect()
}

fn cpu(pid: Option<u32>) -> f64 {
    pid.map_or(0.0, harness::memory::cpu_seconds)
}

/// The processes whose CPU the throughput table splits: pool, proxy, miners, Redis.
fn cpu_pids(s: &Stack) -> anyhow::Result<Vec<(String, Option<u32>)>> {
    let mut pids = vec![
        ("pool".to_string(), s.pool()?.process().pid()),
        ("proxy".to_string(), s.proxy("bench")?.process().pid()),
    ];
    for m in s.miners() {
        pids.push((m.name.clone(), m.process().pid()));
    }
    pids.push(("redis".to_string(), s.redis()?.process().pid()));
    Ok(pids)
}

/// Ack latency (p50, p99 in ms) and the achieved share rate with one miner sized for ~1,000 shares/s.
async fn latency(config: &HarnessConfig) -> anyhow::Result<(f64, f64, f64, f64)> {
    let min_bits = 8;
    let mut s = stack(config, "bench-latency", min_bits).await?;
    let hashrate = 1000.0 * 2f64.powi(min_bits as i32);
    let opts = MinerOptions {
        hashrate: Some(hashrate),
        log_shares: false,
        ..Default::default()
    };
    s.start_miner("m", "bench", &opts).await?;
    tokio::time::sleep(WARMUP + WINDOW).await; // measurement window
    let miner = s.miner("m")?;
    miner.process().stop().await?;
    let pool_p99 = histogram_quantile(
        &s.pool()?.metrics().await?,
        "hashpool_pool_share_ack_seconds",
        0.99,
    );
    let log = std::fs::read_to_string(miner.log_path())?;
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("miner finished"))
        .unwrap_or_default()
        .to_string();
    let accepted = field(&last, "accepted").unwrap_or(0.0);
    let secs = (WARMUP + WINDOW).as_secs_f64();
    let p50 = field(&last, "ack_p50_us").unwrap_or(0.0) / 1000.0;
    let p99 = field(&last, "ack_p99_us").unwrap_or(0.0) / 1000.0;
    s.shutdown(false).await?;
    Ok((accepted / secs, p50, p99, pool_p99 * 1000.0))
}

/// Upper bound of the first histogram bucket holding quantile `q` of the observations.
fn histogram_quantile(m: &harness::http::Metrics, name: &str, q: f64) -> f64 {
    let total = m.get(&format!("{name}_count"));
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> =
        m.0.iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix(&prefix)?
                        .trim_end_matches("\"}")
                        .parse::<f64>()
                        .ok()?,
                    *v,
                ))
            })
            .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
        .into_iter()
        .find(|(_, n)| *n >= total * q)
        .map(|(le, _)| le)
        .unwrap_or(f64::INFINITY)
}

/// Pipelined `XADD`s per second (100 per pipeline, share-record-sized entries) on a fresh
/// Redis of the same kind the stacks run: the limit the pool's record path is compared with.
async fn xadd_limit(config: &HarnessConfig) -> anyhow::Result<f64> {
    let s = Stack::builder("bench-xadd", config).redis().start().await?;
    let mut conn = s.redis()?.connect().await?;
    let fields: Vec<(String, String)> = [
        ("v", "2"),
        (
            "share_hash",
            "0000acbb810baac845669eb3984cca1ea9cf1ebcb6528cfa47566499d78da965",
        ),
        ("template_id", "7709466296320000007"),
        ("channel_id", "3"),
        (
            "locking_pubkey",
            "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
        ),
        ("amount", "16"),
        ("ntime", "1795000000"),
        ("version", "536887296"),
        ("nonce", "3735928559"),
        ("extranonce", "4850000100000000000000000000000000000007"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < WARMUP {
        let mut pipe = redis::pipe();
        for _ in 0..100 {
            pipe.cmd("XADD").arg("bench").arg("*").arg(&fields).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        n += 100;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    s.shutdown(false).await?;
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = HarnessConfig::load(None)?;
    let limit = xadd_limit(&config).await?;
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| pipelined Redis XADD/s, 100 per pipeline (the limit of the record path) | {limit:.0} |"
    );
    // The same measurement before #10, when the proxy opened one SV2 connection per miner
    // (closing note of #7, this machine, `just bench`).
    let per_miner_connection = [4_885.0, 10_052.0, 19_906.0, 18_044.0];
    let mut accepted = Vec::new();
    for (offered, before) in [5_000.0, 10_000.0, 20_000.0, 40_000.0]
        .into_iter()
        .zip(per_miner_connection)
    {
        let t = throughput(&config, offered, 1).await?;
        accepted.push(t.rate);
        println!(
            "| accepted shares/s with {offered:.0}/s offered by 2 miners (min_bits 2) on the proxy's one upstream connection, each recorded once (dedup + XADD) | {:.0} ({:.2} of the XADD limit; floor 20,000; {before:.0} with one connection per miner, #7); refused by the pool {:.0}/s ({}), by the proxy (upstream-busy) {:.0}/s |",
            t.rate,
            t.rate / limit,
            t.rejected,
            t.reasons,
            t.busy
        );
        println!(
            "| cores used at that load (2 on this machine) | {} |",
            t.cpu
        );
        println!(
            "| peak RSS pool / proxy at that load | {:.1} MB / {:.1} MB (sum {:.1} MB) |",
            t.pool_rss,
            t.proxy_rss,
            t.pool_rss + t.proxy_rss
        );
    }
    let peak = accepted.iter().copied().fold(0.0, f64::max);
    let overloaded = accepted.last().copied().unwrap_or(0.0);
    println!(
        "| goodput under overload: accepted at 40000/s offered over the peak of these runs | {:.2} ({overloaded:.0} / {peak:.0}; aim at least 0.90: the proxy keeps at most 4,096 shares waiting for the pool and refuses the rest at once with `upstream-busy`, so the pool spends itself on shares it can record) |",
        overloaded / peak.max(1.0)
    );
    let t = throughput(&config, 20_000.0, 100).await?;
    println!(
        "| accepted shares/s with 20000/s offered by 200 miners (2 processes x 100 connections) on one upstream connection | {:.0} ({:.2} of the XADD limit); refused by the pool {:.0}/s, by the proxy {:.0}/s; peak RSS pool / proxy {:.1} / {:.1} MB |",
        t.rate,
        t.rate / limit,
        t.rejected,
        t.busy,
        t.pool_rss,
        t.proxy_rss
    );
    println!("| cores used at that load | {} |", t.cpu);
    let (rate, p50, p99, pool_p99) = latency(&config).await?;
    println!("| ack latency at {rate:.0} shares/s, miner to miner (one miner, min_bits 8): p50 / p99 | {p50:.2} ms / {p99:.2} ms |");
    println!("| of which inside the pool (share read to answer queued, incl. Redis): p99 at most | {pool_p99:.3} ms |");
    Ok(())
}
