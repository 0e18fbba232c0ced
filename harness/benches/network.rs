//! Hostile networks and farms (#10), on the private signet with the role binaries in
//! $HASHPOOL_BIN_DIR (`just bench` builds them with --release and points it there):
//!
//! - pool and proxy resident memory and CPU with 1,000 miners on one proxy (one miner
//!   process, 1,000 SV1 connections, one upstream SV2 connection), beside the aim of 300 MB;
//! - Noise handshakes + `SetupConnection` per second the pool completes while an honest miner
//!   mines, with that miner's acceptance rate before and during, beside the responder side of
//!   a handshake per second on one core in memory, measured in the same run.

use std::time::{Duration, Instant};

use harness::memory::{cpu_seconds, peak_rss};
use harness::roles::{MinerOptions, PoolOptions};
use harness::sv2_client::Sv2Client;
use harness::{Chain, HarnessConfig, Stack};

/// Measurement window.
const WINDOW: Duration = Duration::from_secs(10);
/// Miners on the farm proxy.
const FARM: usize = 1000;
/// Concurrent handshaking clients.
const CLIENTS: usize = 8;

async fn stack(config: &HarnessConfig, name: &str, min_bits: u32) -> anyhow::Result<Stack> {
    let mut stack = Stack::builder(name, config)
        .chain(Chain::Signet)
        .redis()
        .start()
        .await?;
    let mut opts = PoolOptions {
        min_bits,
        ..Default::default()
    };
    opts.limits.max_new_connections_per_sec = 1.0e6;
    opts.limits.new_connection_burst = 1.0e6;
    opts.limits.max_connections_per_ip = 100_000;
    stack.start_pool(&opts).await?;
    Ok(stack)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// (seconds until every miner had an accepted share, pool peak RSS MB, proxy peak RSS MB,
/// pool CPU %, proxy CPU %, miner CPU %, accepted shares/s) with `FARM` miners at 1 kH/s each.
async fn farm(config: &HarnessConfig) -> anyhow::Result<[f64; 7]> {
    let mut s = stack(config, "bench-farm", 12).await?;
    s.start_proxy("farm", true, 1000.0).await?;
    let opts = MinerOptions {
        connections: FARM,
        hashrate: Some(FARM as f64 * 1000.0),
        ..Default::default()
    };
    let t = Instant::now();
    s.start_miner("thousand", "farm", &opts).await?;
    let miner = s.miner("thousand")?;
    harness::wait::wait_until(
        "every farm miner to have an accepted share",
        Duration::from_secs(300),
        || {
            let n = miner.log().with_accepted.len();
            async move {
                if n >= FARM {
                    Ok(())
                } else {
                    Err(format!("{n} of {FARM}"))
                }
            }
        },
    )
    .await?;
    let all_mining = t.elapsed().as_secs_f64();
    let pids = [
        s.pool()?.process().pid(),
        s.proxy("farm")?.process().pid(),
        miner.process().pid(),
    ]
    .map(Option::unwrap_or_default);
    let cpu_before = pids.map(cpu_seconds);
    let accepted_before = s
        .pool()?
        .metrics()
        .await?
        .get("hashpool_pool_shares_accepted_total");
    let t = Instant::now();
    tokio::time::sleep(WINDOW).await; // measurement window
    let secs = t.elapsed().as_secs_f64();
    let accepted = s
        .pool()?
        .metrics()
        .await?
        .get("hashpool_pool_shares_accepted_total");
    let cpu = [0, 1, 2].map(|i| (cpu_seconds(pids[i]) - cpu_before[i]) / secs * 100.0);
    let out = [
        all_mining,
        mb(peak_rss(pids[0])),
        mb(peak_rss(pids[1])),
        cpu[0],
        cpu[1],
        cpu[2],
        (accepted - accepted_before) / secs,
    ];
    s.shutdown(false).await?;
    Ok(out)
}

/// Accepted shares of `miner` per second over `WINDOW`.
async fn accepted_rate(s: &Stack, miner: &str) -> anyhow::Result<f64> {
    let before = s.miner(miner)?.log().accepted.len();
    let t = Instant::now();
    tokio::time::sleep(WINDOW).await; // measurement window
    Ok((s.miner(miner)?.log().accepted.len() - before) as f64 / t.elapsed().as_secs_f64())
}

/// (handshakes/s, honest shares/s before, honest shares/s during, pool CPU % during).
async fn handshakes(config: &HarnessConfig) -> anyhow::Result<[f64; 4]> {
    let mut s = stack(config, "bench-handshakes", 12).await?;
    s.start_proxy("alice", true, 1.0).await?;
    let opts = MinerOptions {
        hashrate: Some(300_000.0),
        ..Default::default()
    };
    s.start_miner("honest", "alice", &opts).await?;
    harness::wait::wait_until(
        "the honest miner's first share",
        Duration::from_secs(30),
        || {
            let n = s
                .miner("honest")
                .map(|m| m.log().accepted.len())
                .unwrap_or(0);
            async move {
                if n > 0 {
                    Ok(())
                } else {
                    Err("none yet".to_string())
                }
            }
        },
    )
    .await?;
    let before = accepted_rate(&s, "honest").await?;
    let pool = s.pool()?;
    let (addr, authority) = (pool.sv2_addr.clone(), pool.authority.public.clone());
    let pool_pid = pool.process().pid().unwrap_or_default();
    let stop = Instant::now() + WINDOW;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (addr, authority) = (addr.clone(), authority.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = 0u32;
            while Instant::now() < stop {
                i += 1;
                // Many loopback sources, as from many hosts.
                let source = std::net::Ipv4Addr::new(127, 3, c as u8, (i % 250 + 1) as u8);
                let attempt = async {
                    let mut client = Sv2Client::connect_from(&addr, &authority, source).await?;
                    client.setup().await
                };
                let ok = tokio::time::timeout(Duration::from_secs(5), attempt).await;
                // Only handshakes finished inside the window count.
                if matches!(ok, Ok(Ok(()))) && Instant::now() <= stop {
                    done += 1;
                }
            }
            done
        }));
    }
    let cpu_before = cpu_seconds(pool_pid);
    let during = accepted_rate(&s, "honest").await?;
    let pool_cpu = (cpu_seconds(pool_pid) - cpu_before) / WINDOW.as_secs_f64() * 100.0;
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    s.shutdown(false).await?;
    Ok([
        total as f64 / WINDOW.as_secs_f64(),
        before,
        during,
        pool_cpu,
    ])
}

/// The pool's side of Noise NX handshakes per second on one core, in memory (a fresh
/// responder, with its ephemeral key and signed certificate, answering an initiator's first
/// message): the limit.
fn handshake_limit() -> anyhow::Result<f64> {
    use stratum_apps::stratum_core::noise_sv2::{Initiator, Responder};
    let secp = secp256k1_28::Secp256k1::new();
    let (secret, _) = secp.generate_keypair(&mut secp256k1_28::rand::thread_rng());
    let public = secret.x_only_public_key(&secp).0.serialize();
    let secret = secret.secret_bytes();
    fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
        anyhow::anyhow!("{e:?}")
    }
    let first = Initiator::from_raw_k(public)
        .map_err(err)?
        .step_0()
        .map_err(err)?;
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs(3) {
        let mut responder =
            Responder::from_authority_kp(&public, &secret, Duration::from_secs(3600))
                .map_err(err)?;
        responder.step_1(first).map_err(err)?;
        n += 1;
    }
    Ok(f64::from(n) / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = HarnessConfig::load(None)?;
    let [all, pool_rss, proxy_rss, pool_cpu, proxy_cpu, miner_cpu, rate] = farm(&config).await?;
    println!("| measurement | value |");
    println!("|---|---|");
    println!("| {FARM} miners (one process, 1 kH/s each, min_bits 12) on one proxy: every one with an accepted share after | {all:.1} s |");
    println!(
        "| peak RSS pool / proxy with {FARM} miners | {pool_rss:.1} MB / {proxy_rss:.1} MB (sum {:.1} MB; aim under 300 MB) |",
        pool_rss + proxy_rss
    );
    println!("| CPU pool / proxy / miner process with {FARM} miners, {rate:.0} accepted shares/s, over {}s | {pool_cpu:.0} % / {proxy_cpu:.0} % / {miner_cpu:.0} % of one core |", WINDOW.as_secs());
    let limit = handshake_limit()?;
    let [hs, before, during, cpu] = handshakes(&config).await?;
    println!("| the pool's side of a Noise NX handshake per second on one core, in memory (the limit) | {limit:.0} |");
    println!(
        "| handshakes + SetupConnection/s the pool completed over TCP from {CLIENTS} clients (the clients share the 2 cores) | {hs:.0} ({:.2} of the limit; pool CPU {cpu:.0} % of one core) |",
        hs / limit
    );
    println!(
        "| an honest miner's accepted shares/s before / during the handshakes | {before:.1} / {during:.1} ({:.2}) |",
        during / before.max(1e-9)
    );
    Ok(())
}
