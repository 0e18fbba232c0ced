//! Steps for hostile networks and standard SV2 clients: plain SV2 clients (no ehash) that set
//! up a connection and wait, open and close channels, or open too many.

use std::time::Duration;

use anyhow::{anyhow, Context};
use cucumber::{given, then, when};
use harness::sv2_client::Sv2Client;

use crate::world::HarnessWorld;

async fn connect(w: &HarnessWorld) -> anyhow::Result<Sv2Client> {
    let pool = w.default_stack()?.pool()?;
    Sv2Client::connect(&pool.sv2_addr, &pool.authority.public).await
}

fn client<'a>(w: &'a mut HarnessWorld, name: &str) -> anyhow::Result<&'a mut Sv2Client> {
    w.sv2_clients
        .get_mut(name)
        .ok_or_else(|| anyhow!("no plain SV2 client {name:?} in this scenario"))
}

#[when(expr = "a plain SV2 client {string} sets up its connection and opens no channel")]
async fn setup_only(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let mut c = connect(w).await?;
    c.setup().await?;
    w.sv2_clients.insert(name, c);
    Ok(())
}

#[when(expr = "a plain SV2 client {string} opens a channel and closes it")]
async fn open_and_close(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let mut c = connect(w).await?;
    c.setup().await?;
    let ch = c.open_extended(1).await?;
    c.close_channel(ch.channel_id).await?;
    w.sv2_clients.insert(name, c);
    Ok(())
}

#[then(
    expr = "after twice the pool's channel deadline plain SV2 client {string} still opens a channel"
)]
async fn still_opens(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let deadline = Duration::from_millis(
        w.default_stack()?
            .pool()?
            .config
            .limits
            .handshake_deadline_ms,
    );
    // Waiting is the point here: the pool's deadline has to pass with the client quiet.
    tokio::time::sleep(deadline * 2).await;
    let c = client(w, &name)?;
    c.open_extended(2)
        .await
        .with_context(|| format!("plain SV2 client {name} after {:?}", deadline * 2))?;
    Ok(())
}

#[then(
    expr = "plain SV2 client {string} opens {int} channels and the next one is refused with {string}"
)]
async fn channel_cap(
    w: &mut HarnessWorld,
    name: String,
    n: u32,
    code: String,
) -> anyhow::Result<()> {
    if !w.sv2_clients.contains_key(&name) {
        let mut c = connect(w).await?;
        c.setup().await?;
        w.sv2_clients.insert(name.clone(), c);
    }
    let c = client(w, &name)?;
    for i in 0..n {
        c.open_extended(100 + i)
            .await
            .with_context(|| format!("channel {} of {n}", i + 1))?;
    }
    let refused = c.open_extended(100 + n).await;
    let error = match refused {
        Ok(ch) => anyhow::bail!("channel {} opened past the cap: {ch:?}", n + 1),
        Err(e) => format!("{e:#}"),
    };
    anyhow::ensure!(
        error.contains(&format!("channel refused: {code}")),
        "channel {} was refused, but not with {code:?}: {error}",
        n + 1
    );
    Ok(())
}

#[given(expr = "the pool will allow {int} channels per connection")]
async fn channels_per_connection(w: &mut HarnessWorld, n: usize) {
    w.pool_options.limits.max_channels_per_connection = n;
}

#[then(expr = "the pool counted a {string} refusal")]
async fn counted_refusal(w: &mut HarnessWorld, reason: String) -> anyhow::Result<()> {
    crate::steps::faults::wait_metric_at_least(
        w,
        &format!("hashpool_pool_connections_refused_total{{reason=\"{reason}\"}}"),
        1.0,
    )
    .await
}

#[when(expr = "a client streams {int} MB without a newline to proxy {string}")]
async fn stream_without_newline(
    w: &mut HarnessWorld,
    mb: usize,
    proxy: String,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = w.default_stack()?.proxy(&proxy)?.sv1_addr.clone();
    let mut s = tokio::net::TcpStream::connect(&addr).await?;
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    let mut closed = false;
    while sent < mb * 1024 * 1024 {
        if s.write_all(&chunk).await.is_err() {
            closed = true;
            break;
        }
        sent += chunk.len();
    }
    if !closed {
        // Everything was written: the proxy must still close this connection.
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(harness::wait::scaled(Duration::from_secs(10)), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        anyhow::ensure!(
            read.is_ok(),
            "proxy {proxy} kept a connection that sent {mb} MB without a newline"
        );
    }
    Ok(())
}

#[then(expr = "proxy {string} peaked below {int} MB of memory")]
async fn proxy_peak(w: &mut HarnessWorld, proxy: String, mb: u64) -> anyhow::Result<()> {
    let pid = w
        .default_stack()?
        .proxy(&proxy)?
        .process()
        .pid()
        .context("the proxy is not running")?;
    let peak = harness::memory::peak_rss(pid);
    anyhow::ensure!(
        peak < mb * 1024 * 1024,
        "proxy {proxy} peaked at {} MB of resident memory (bound {mb} MB)",
        peak / 1024 / 1024
    );
    Ok(())
}

#[when(expr = "{int} SV1 sockets connect to proxy {string} and say nothing")]
async fn silent_sockets(w: &mut HarnessWorld, n: usize, proxy: String) -> anyhow::Result<()> {
    let addr = w.default_stack()?.proxy(&proxy)?.sv1_addr.clone();
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        sockets.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .with_context(|| format!("silent socket {i} of {n}"))?,
        );
    }
    w.silent_sockets = sockets;
    Ok(())
}

#[then("the proxy closes the silent sockets at its subscribe deadline")]
async fn silent_closed(w: &mut HarnessWorld) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let sockets = std::mem::take(&mut w.silent_sockets);
    let n = sockets.len();
    let wait = harness::wait::scaled(Duration::from_secs(20));
    let mut open = 0;
    for mut s in sockets {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(wait, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        if closed.is_err() {
            open += 1;
        }
    }
    anyhow::ensure!(
        open == 0,
        "{open} of {n} silent sockets still open after {wait:?}"
    );
    Ok(())
}

#[when(expr = "an honest miner {string} starts behind proxy {string}")]
async fn honest_starts(w: &mut HarnessWorld, name: String, proxy: String) -> anyhow::Result<()> {
    crate::steps::mining::start_miner(
        w,
        &name,
        &proxy,
        "honest",
        Some(crate::steps::mining::CAPPED_HASHRATE),
    )
    .await
}
