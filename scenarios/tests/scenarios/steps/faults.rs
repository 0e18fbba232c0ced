//! Fault steps for the mining roles: malformed input, garbage frames, floods, half-open
//! connections, Redis outages. Each asserts on logs, metrics and miner counts.

use std::time::{Duration, Instant};

use anyhow::Context;
use cucumber::{given, then, when};
use harness::logs::LogCursor;
use harness::sv2_client::Sv2Client;
use harness::wait::wait_until;
use tokio::net::TcpStream;

use crate::world::HarnessWorld;

async fn pool_metric(w: &HarnessWorld, key: &str) -> anyhow::Result<f64> {
    Ok(w.default_stack()?.pool()?.metrics().await?.get(key))
}

/// Wait until the pool's metric `key` is at least `at_least`.
pub async fn wait_metric_at_least(
    w: &HarnessWorld,
    key: &str,
    at_least: f64,
) -> anyhow::Result<()> {
    let pool = w.default_stack()?.pool()?;
    wait_until(
        &format!("pool metric {key} >= {at_least}"),
        Duration::from_secs(20),
        || async {
            match pool.metrics().await {
                Ok(m) if m.get(key) >= at_least => Ok(()),
                Ok(m) => Err(format!("{key} = {}", m.get(key))),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    Ok(())
}

fn disconnects(reason: &str) -> String {
    format!("hashpool_pool_disconnects_total{{reason=\"{reason}\"}}")
}

#[then(expr = "miner {string} is disconnected by the proxy")]
async fn miner_disconnected(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.expect_exit(&format!("miner-{name}"));
    let miner = w.default_stack()?.miner(&name)?;
    wait_until(
        &format!("miner {name} to exit"),
        Duration::from_secs(20),
        || {
            let log = miner.log();
            async move { log.finished.ok_or_else(|| "still running".to_string()) }
        },
    )
    .await
    .and_then(|line| {
        if line.contains("connection closed by the proxy") {
            Ok(())
        } else {
            Err(harness::wait::Timeout {
                what: "proxy to close".into(),
                waited: Duration::ZERO,
                last: line,
            })
        }
    })?;
    Ok(())
}

#[then(expr = "proxy {string} logged {string}")]
async fn proxy_logged(w: &mut HarnessWorld, proxy: String, needle: String) -> anyhow::Result<()> {
    let log = w.default_stack()?.proxy(&proxy)?.log();
    LogCursor::at_start(&log)
        .wait_for(&needle, Duration::from_secs(10))
        .await?;
    Ok(())
}

#[when("a client sends a garbage SV2 frame to the pool")]
async fn garbage_frame(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.counter_before = Some(pool_metric(w, &disconnects("protocol-error")).await?);
    let pool = w.default_stack()?.pool()?;
    let mut client = Sv2Client::connect(&pool.sv2_addr, &pool.authority.public).await?;
    client.send_garbage_frame().await?;
    let took = client
        .closed_within(Duration::from_secs(5))
        .await
        .context("the pool kept the garbage connection open")?;
    tracing::info!("pool closed the garbage connection after {took:?}");
    Ok(())
}

#[when(expr = "a client sends a {int}-byte SV2 message to the pool")]
async fn oversize(w: &mut HarnessWorld, len: usize) -> anyhow::Result<()> {
    w.counter_before = Some(pool_metric(w, &disconnects("oversize-message")).await?);
    let pool = w.default_stack()?.pool()?;
    let mut client = Sv2Client::connect(&pool.sv2_addr, &pool.authority.public).await?;
    // The pool may close after the header, while the body is still being written.
    if let Err(e) = client.send_oversize_frame(len).await {
        tracing::info!("the pool cut the oversize message off: {e:#}");
    }
    client
        .closed_within(Duration::from_secs(5))
        .await
        .context("the pool kept the connection with the oversize message")?;
    Ok(())
}

#[when(expr = "a set-up client sends only the header of a {int}-byte SV2 message to the pool")]
async fn oversize_header(w: &mut HarnessWorld, len: usize) -> anyhow::Result<()> {
    w.counter_before = Some(pool_metric(w, &disconnects("oversize-message")).await?);
    let pool = w.default_stack()?.pool()?;
    let mut client =
        harness::sv2_raw::RawSv2Client::connect(&pool.sv2_addr, &pool.authority.public).await?;
    client.setup().await?;
    client.send_header_of(len).await?;
    let took = client.closed_within(Duration::from_secs(5)).await.context(
        "the pool kept the connection open, waiting for the body of the oversize message",
    )?;
    tracing::info!("pool closed the connection {took:?} after the oversize header");
    Ok(())
}

#[then(
    expr = "a client that finishes the Noise handshake on the job declaration port and says nothing is closed within {int} ms"
)]
async fn silent_jd_client(w: &mut HarnessWorld, ms: u64) -> anyhow::Result<()> {
    let pool = w.default_stack()?.pool()?;
    let mut client =
        harness::sv2_raw::RawSv2Client::connect(&pool.jd_addr, &pool.authority.public).await?;
    let took = client
        .closed_within(Duration::from_millis(ms))
        .await
        .context("the job declaration port kept a connection that never sent SetupConnection")?;
    tracing::info!("job declaration port closed the silent connection after {took:?}");
    Ok(())
}

#[when("the pool is killed with SIGKILL")]
async fn kill_pool(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.expect_exit("pool");
    let process = w.default_stack()?.pool()?.process();
    let restarts = process.status().restarts;
    let generation = process.kill9().await?;
    w.restarts_before = Some(restarts);
    w.killed_generation = Some(generation);
    Ok(())
}

#[then("the supervisor restarts the pool")]
async fn pool_restarted(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let generation = w.killed_generation.context("the pool was not killed")?;
    let before = w.restarts_before.context("no restart count taken")?;
    let status = w
        .default_stack()?
        .pool()?
        .process()
        .wait_ready_after(generation, Duration::from_secs(30))
        .await?;
    anyhow::ensure!(
        status.restarts == before + 1 && status.generation == generation + 1,
        "expected exactly one restart after the kill: {status:?} (restarts before: {before})"
    );
    anyhow::ensure!(
        status.unexpected_exits.last().map(String::as_str) == Some("killed by SIGKILL"),
        "the killed pool ended with {:?}",
        status.unexpected_exits.last()
    );
    Ok(())
}

/// Kill the pool with SIGKILL and wait until the supervisor restarted it exactly once.
pub async fn kill_and_restart_pool(w: &mut HarnessWorld) -> anyhow::Result<()> {
    kill_pool(w).await?;
    pool_restarted(w).await
}

#[then(expr = "the pool counted a {string} disconnect")]
async fn counted_disconnect(w: &mut HarnessWorld, reason: String) -> anyhow::Result<()> {
    let before = w.counter_before.unwrap_or(0.0);
    wait_metric_at_least(w, &disconnects(&reason), before + 1.0).await
}

#[when(expr = "the accepted shares of miner {string} are counted")]
async fn count_accepted(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.counter_before = Some(w.default_stack()?.miner(&name)?.log().accepted.len() as f64);
    Ok(())
}

#[then(expr = "miner {string} gets {int} more shares accepted")]
async fn more_accepted(w: &mut HarnessWorld, name: String, n: usize) -> anyhow::Result<()> {
    let before = w.counter_before.context("no count taken")? as usize;
    let miner = w.default_stack()?.miner(&name)?;
    wait_until(
        &format!("miner {name} to get {n} more accepted shares"),
        Duration::from_secs(60),
        || {
            let log = miner.log();
            async move {
                if log.accepted.len() >= before + n {
                    Ok(())
                } else {
                    Err(format!(
                        "{} accepted (had {before}), rejections {:?}",
                        log.accepted.len(),
                        log.rejected_by_reason()
                    ))
                }
            }
        },
    )
    .await?;
    Ok(())
}

#[when("redis is stopped")]
async fn redis_stopped(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.default_stack()?.redis()?.process().stop().await?;
    Ok(())
}

#[when("redis is started again")]
async fn redis_started(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.default_stack()?.redis()?.process().start_again().await
}

/// Accepted shares per second of a miner over `window`.
async fn honest_rate(w: &HarnessWorld, name: &str, window: Duration) -> anyhow::Result<f64> {
    let miner = w.default_stack()?.miner(name)?;
    let before = miner.log().accepted.len();
    let start = Instant::now();
    // Measuring a rate needs a fixed window; nothing is synchronised on it.
    tokio::time::sleep(window).await; // a rate is counted over a fixed window
    Ok((miner.log().accepted.len() - before) as f64 / start.elapsed().as_secs_f64())
}

#[when(expr = "the accepted-share rate of miner {string} is measured for {int} seconds")]
async fn measure_rate(w: &mut HarnessWorld, name: String, secs: u64) -> anyhow::Result<()> {
    let rate = honest_rate(w, &name, Duration::from_secs(secs)).await?;
    w.rates
        .push((format!("{name} accepted rate, no flood"), rate));
    w.baseline_rate = Some(rate);
    Ok(())
}

/// Shares arrive as a Poisson process, so two windows of a few seconds differ by chance, and
/// here the flooding clients, the pool and the honest miner share two cores: the rate during a
/// flood must keep at least this share of the baseline. (Measured: 0.55 to 0.85 of a 10/s
/// baseline in seven runs, once 0.42; with 0.5 the check failed about one run in seven.)
const FLOOD_RATE_FLOOR: f64 = 0.3;

#[when(
    expr = "SV2 clients flood shares for {int} seconds while the rate of miner {string} is measured"
)]
async fn flood(w: &mut HarnessWorld, secs: u64, name: String) -> anyhow::Result<()> {
    let pool = w.default_stack()?.pool()?;
    let (addr, key) = (pool.sv2_addr.clone(), pool.authority.public.clone());
    w.counter_before = Some(pool_metric(w, &disconnects("share-rate-limit")).await?);
    let window = Duration::from_secs(secs);
    let flooder = tokio::spawn(async move {
        let start = Instant::now();
        let (mut cut_off, mut sent) = (0u32, 0u32);
        while start.elapsed() < window {
            // A flooder reconnecting at once soon meets the pool's new-connection rate limit:
            // a refused connection is part of the defence, and the flooder tries again.
            let opened = async {
                let mut c = Sv2Client::connect(&addr, &key).await?;
                let ch = c.open_channel().await?;
                anyhow::Ok((c, ch))
            };
            let Ok((mut c, ch)) = opened.await else {
                tokio::time::sleep(Duration::from_millis(20)).await; // retry interval after a refused connect
                continue;
            };
            sent += c.flood(&ch, 1_000_000).await;
            if c.closed_within(Duration::from_secs(5)).await.is_ok() {
                cut_off += 1;
            }
        }
        anyhow::Ok((cut_off, sent))
    });
    let rate = honest_rate(w, &name, window).await?;
    let (cut_off, sent) = flooder.await??;
    anyhow::ensure!(
        cut_off >= 1,
        "no flooding client was cut off ({sent} shares sent)"
    );
    w.rates.push((
        format!("{name} accepted rate, during flood ({sent} flood shares, {cut_off} cut-offs)"),
        rate,
    ));
    let baseline = w.baseline_rate.context("no baseline rate measured")?;
    anyhow::ensure!(
        rate >= FLOOD_RATE_FLOOR * baseline,
        "miner {name} got {rate:.1} shares/s accepted during the flood, below {FLOOD_RATE_FLOOR} x its baseline {baseline:.1}"
    );
    Ok(())
}

#[when(expr = "{int} clients connect to the pool and never finish the handshake")]
async fn half_open(w: &mut HarnessWorld, n: usize) -> anyhow::Result<()> {
    w.counter_before = Some(pool_metric(w, &disconnects("handshake-deadline")).await?);
    let pool = w.default_stack()?.pool()?;
    let deadline = Duration::from_millis(pool.config.limits.handshake_deadline_ms);
    let mut sockets = Vec::new();
    for _ in 0..n {
        sockets.push(TcpStream::connect(&pool.sv2_addr).await?);
    }
    // Each socket must be closed by the pool (EOF or reset) within the deadline plus slack.
    for mut s in sockets {
        let closed = harness::wait::tcp_closed_within(
            &mut s,
            deadline + harness::wait::scaled(Duration::from_secs(5)),
        )
        .await;
        anyhow::ensure!(
            closed,
            "a half-open connection was not closed within {deadline:?} + 5 s"
        );
    }
    Ok(())
}

#[then(expr = "the pool refused connections beyond its per-IP limit")]
async fn refused_per_ip(w: &mut HarnessWorld) -> anyhow::Result<()> {
    wait_metric_at_least(
        w,
        "hashpool_pool_connections_refused_total{reason=\"connections-per-ip\"}",
        1.0,
    )
    .await
}

#[given(expr = "a proxy {string} that expects a different pool authority key")]
async fn proxy_wrong_authority(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let other = harness::keys::authority_keys().public;
    w.default_stack_mut()?
        .start_proxy_expecting_authority(
            &name,
            crate::steps::mining::CAPPED_HASHRATE as f32,
            &other,
        )
        .await?;
    Ok(())
}

#[then(
    expr = "a miner {string} behind proxy {string} is refused with an SV1 error saying {string}"
)]
async fn miner_refused(
    w: &mut HarnessWorld,
    name: String,
    proxy: String,
    needle: String,
) -> anyhow::Result<()> {
    let started = crate::steps::mining::start_miner(
        w,
        &name,
        &proxy,
        "honest",
        Some(crate::steps::mining::CAPPED_HASHRATE),
    )
    .await;
    let error = match started {
        Ok(()) => anyhow::bail!("miner {name} subscribed behind proxy {proxy}: expected a refusal"),
        Err(e) => format!("{e:#}"),
    };
    anyhow::ensure!(
        error.contains(&needle),
        "miner {name} did not report {needle:?}:\n{error}"
    );
    Ok(())
}
