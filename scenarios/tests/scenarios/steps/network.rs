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

#[then(expr = "plain SV2 client {string} still opens a channel")]
async fn still_opens(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let c = client(w, &name)?;
    c.open_extended(2)
        .await
        .with_context(|| format!("plain SV2 client {name}"))?;
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

#[when(expr = "{int} clients each stream {int} MB without a newline to proxy {string}")]
async fn streams_without_newline(
    w: &mut HarnessWorld,
    clients: usize,
    mb: usize,
    proxy: String,
) -> anyhow::Result<()> {
    let addr = w.default_stack()?.proxy(&proxy)?.sv1_addr.clone();
    let streams: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(stream_one(addr.clone(), mb, proxy.clone())))
        .collect();
    for s in streams {
        s.await??;
    }
    Ok(())
}

async fn stream_one(addr: String, mb: usize, proxy: String) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
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
        let closed = harness::wait::tcp_closed_within(
            &mut s,
            harness::wait::scaled(Duration::from_secs(10)),
        )
        .await;
        anyhow::ensure!(
            closed,
            "proxy {proxy} kept a connection that sent {mb} MB without a newline"
        );
    }
    Ok(())
}

fn proxy_peak_rss(w: &HarnessWorld, proxy: &str) -> anyhow::Result<u64> {
    let pid = w
        .default_stack()?
        .proxy(proxy)?
        .process()
        .pid()
        .context("the proxy is not running")?;
    Ok(harness::memory::peak_rss(pid))
}

#[when(expr = "the memory peak of proxy {string} is remembered")]
async fn remember_peak(w: &mut HarnessWorld, proxy: String) -> anyhow::Result<()> {
    w.memory_before = Some(proxy_peak_rss(w, &proxy)?);
    Ok(())
}

#[then(expr = "the memory peak of proxy {string} grew by less than {int} MB")]
async fn peak_grew(w: &mut HarnessWorld, proxy: String, mb: u64) -> anyhow::Result<()> {
    let before = w.memory_before.context("no memory peak remembered")?;
    let after = proxy_peak_rss(w, &proxy)?;
    let grew = after.saturating_sub(before);
    anyhow::ensure!(
        grew < mb * 1024 * 1024,
        "proxy {proxy}'s peak resident memory grew by {} KiB (bound {mb} MB)",
        grew / 1024
    );
    Ok(())
}

#[when(expr = "{int} SV1 sockets connect to proxy {string} and say nothing")]
async fn silent_sockets(w: &mut HarnessWorld, n: usize, proxy: String) -> anyhow::Result<()> {
    let addr = w.default_stack()?.proxy(&proxy)?.sv1_addr.clone();
    w.counter_before = Some(pool_connections(w).await?);
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
    let sockets = std::mem::take(&mut w.silent_sockets);
    let n = sockets.len();
    let wait = harness::wait::scaled(Duration::from_secs(20));
    let mut open = 0;
    for mut s in sockets {
        if !harness::wait::tcp_closed_within(&mut s, wait).await {
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

#[given(expr = "the pool runs with a descriptor limit of {int}")]
async fn descriptor_limit(w: &mut HarnessWorld, n: u64) {
    w.pool_options.nofile_limit = Some(n);
}

/// Connect to the pool from `127.0.0.<first + i % sources>` and hold the sockets.
async fn hold_connections(
    w: &mut HarnessWorld,
    n: usize,
    first: u8,
    sources: usize,
) -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = w.default_stack()?.pool()?.sv2_addr.parse()?;
    for i in 0..n {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, first.wrapping_add((i % sources) as u8));
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((ip, 0).into())?;
        if let Ok(s) = socket.connect(addr).await {
            w.silent_sockets.push(s);
        }
    }
    Ok(())
}

#[when(expr = "{int} clients connect to the pool from {int} different addresses and wait")]
async fn many_sources(w: &mut HarnessWorld, n: usize, sources: usize) -> anyhow::Result<()> {
    hold_connections(w, n, 20, sources.max(1)).await
}

#[when(expr = "{int} clients connect to the pool at once from one address and wait")]
async fn one_source_burst(w: &mut HarnessWorld, n: usize) -> anyhow::Result<()> {
    hold_connections(w, n, 9, 1).await
}

#[then("the pool's /health answers")]
async fn health_answers(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let pool = w.default_stack()?.pool()?;
    let (code, body) =
        harness::http::get(&pool.metrics_addr, "/health", Duration::from_secs(5)).await?;
    anyhow::ensure!(code == 200, "/health answered {code}: {body}");
    Ok(())
}

#[then(expr = "the pool logged at most {int} refusal or accept-error lines")]
async fn bounded_refusal_logs(w: &mut HarnessWorld, n: usize) -> anyhow::Result<()> {
    let log = std::fs::read_to_string(w.default_stack()?.pool()?.log())?;
    let lines = log
        .lines()
        .filter(|l| l.contains("refused:") || l.contains("accept failed"))
        .count();
    anyhow::ensure!(
        lines <= n,
        "the pool logged {lines} refusal lines (bound {n})"
    );
    Ok(())
}

#[when("bitcoind mines a block on the tip")]
async fn bitcoind_mines_remembered(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let to = stack.faucet()?.address().clone();
    let node = stack.bitcoind()?;
    node.generate_to_address(1, &to).await?;
    let info = node.chain_info().await?;
    w.tip_before = Some((info.blocks, info.bestblockhash));
    Ok(())
}

#[given(expr = "the pool will allow {int} new connections per second per address, {int} at once")]
async fn connection_rate(w: &mut HarnessWorld, rate: u32, burst: u32) {
    w.pool_options.limits.max_new_connections_per_sec = f64::from(rate);
    w.pool_options.limits.new_connection_burst = f64::from(burst);
}

#[when(
    expr = "{int} plain SV2 clients from {int} addresses set up connections, open no channel and wait"
)]
async fn idle_setup_clients(w: &mut HarnessWorld, n: usize, sources: usize) -> anyhow::Result<()> {
    let pool = w.default_stack()?.pool()?;
    let (addr, key) = (pool.sv2_addr.clone(), pool.authority.public.clone());
    let mut refused = 0;
    for i in 0..n {
        let ip = std::net::Ipv4Addr::new(127, 0, 1, 1 + (i % sources.max(1)) as u8);
        let setup = async {
            let mut c = Sv2Client::connect_from(&addr, &key, ip).await?;
            c.setup().await?;
            anyhow::Ok(c)
        };
        match setup.await {
            Ok(c) => {
                let name = format!("idle-{}", w.sv2_clients.len());
                w.sv2_clients.insert(name, c);
            }
            Err(_) => refused += 1,
        }
    }
    println!("[network] {n} set-up clients tried, {refused} not admitted");
    Ok(())
}

/// The pool's open-connection gauge.
async fn pool_connections(w: &HarnessWorld) -> anyhow::Result<f64> {
    Ok(w.default_stack()?
        .pool()?
        .metrics()
        .await?
        .get("hashpool_pool_connections"))
}

#[when("the pool's set-up deadline passes for everything connected so far")]
async fn deadline_passes(w: &mut HarnessWorld) -> anyhow::Result<()> {
    // The witness: a probe connected now that never sets up is cut by the pool at its
    // deadline (counted), so every connection made before it is past the deadline too.
    let key = "hashpool_pool_disconnects_total{reason=\"handshake-deadline\"}";
    let pool = w.default_stack()?.pool()?;
    let before = pool.metrics().await?.get(key);
    let _probe = tokio::net::TcpStream::connect(&pool.sv2_addr).await?;
    crate::steps::faults::wait_metric_at_least(w, key, before + 1.0).await
}

#[then("a newcomer is admitted by closing the oldest idle connection past the deadline")]
async fn newcomer_evicts(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let pool = w.default_stack()?.pool()?;
    let (addr, key) = (pool.sv2_addr.clone(), pool.authority.public.clone());
    let what = "a newcomer admitted at the cap (the oldest idle connections reaching the deadline)";
    let admitted = harness::wait::wait_until(what, Duration::from_secs(20), || {
        let (addr, key) = (addr.clone(), key.clone());
        async move {
            let mut c =
                Sv2Client::connect_from(&addr, &key, std::net::Ipv4Addr::new(127, 0, 1, 250))
                    .await
                    .map_err(|e| e.to_string())?;
            c.setup().await.map_err(|e| e.to_string())?;
            Ok(c)
        }
    })
    .await?;
    w.sv2_clients.insert("newcomer".into(), admitted);
    Ok(())
}

#[then(expr = "the pool holds at most {int} connections")]
async fn holds_at_most(w: &mut HarnessWorld, n: u64) -> anyhow::Result<()> {
    let open = pool_connections(w).await?;
    anyhow::ensure!(
        open <= n as f64,
        "the pool holds {open} connections (cap {n})"
    );
    Ok(())
}

#[then("the pool holds no more connections than before them")]
async fn no_more_pool_connections(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let before = w.counter_before.context("no connection count remembered")?;
    let now = pool_connections(w).await?;
    anyhow::ensure!(
        now <= before,
        "the pool holds {now} connections, {before} before the silent sockets"
    );
    Ok(())
}

#[then(
    expr = "a plain SV2 client flooding shares on one of its two channels gets only that channel closed with {string}"
)]
async fn flood_one_channel(w: &mut HarnessWorld, reason: String) -> anyhow::Result<()> {
    use stratum_apps::stratum_core::parsers_sv2::{AnyMessageOwned, MiningOwned};
    let mut c = connect(w).await?;
    c.setup().await?;
    let flooded = c.open_extended(1).await?;
    let kept = c.open_extended(2).await?;
    c.flood(&flooded, 2_000).await;
    let deadline = std::time::Instant::now() + harness::wait::scaled(Duration::from_secs(10));
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        anyhow::ensure!(!left.is_zero(), "no CloseChannel for the flooded channel");
        match c.recv(left).await? {
            AnyMessageOwned::Mining(MiningOwned::CloseChannel(m)) => {
                anyhow::ensure!(
                    m.channel_id == flooded.channel_id,
                    "channel {} was closed, not the flooded {}",
                    m.channel_id,
                    flooded.channel_id
                );
                let code = String::from_utf8_lossy(m.reason_code.as_bytes()).into_owned();
                anyhow::ensure!(code == reason, "closed with {code:?}, not {reason:?}");
                break;
            }
            _ => continue,
        }
    }
    // The connection and its other channel live on: it still opens channels.
    c.open_extended(3).await.with_context(|| {
        format!(
            "after channel {} was closed (kept {})",
            flooded.channel_id, kept.channel_id
        )
    })?;
    Ok(())
}

#[given(expr = "the pool will allow {int} channels per address")]
async fn channels_per_address(w: &mut HarnessWorld, n: usize) {
    w.pool_options.limits.max_channels_per_ip = n;
}

async fn client_from(w: &HarnessWorld, source: &str) -> anyhow::Result<Sv2Client> {
    let pool = w.default_stack()?.pool()?;
    let mut c =
        Sv2Client::connect_from(&pool.sv2_addr, &pool.authority.public, source.parse()?).await?;
    c.setup().await?;
    Ok(c)
}

#[then(
    expr = "plain SV2 clients from {string} open {int} channels over two connections, and the next is refused with {string}"
)]
async fn per_address_cap(
    w: &mut HarnessWorld,
    source: String,
    n: u32,
    code: String,
) -> anyhow::Result<()> {
    let per_connection = w
        .default_stack()?
        .pool()?
        .config
        .limits
        .max_channels_per_connection as u32;
    let mut a = client_from(w, &source).await?;
    let mut b = client_from(w, &source).await?;
    for i in 0..n {
        let c = if i < per_connection { &mut a } else { &mut b };
        c.open_extended(10 + i)
            .await
            .with_context(|| format!("channel {} of {n} from {source}", i + 1))?;
    }
    let error = match b.open_extended(10 + n).await {
        Ok(ch) => anyhow::bail!(
            "channel {} from {source} opened past the cap: {ch:?}",
            n + 1
        ),
        Err(e) => format!("{e:#}"),
    };
    anyhow::ensure!(
        error.contains(&format!("channel refused: {code}")),
        "channel {} from {source} was refused, but not with {code:?}: {error}",
        n + 1
    );
    w.sv2_clients.insert(format!("{source}-a"), a);
    w.sv2_clients.insert(format!("{source}-b"), b);
    Ok(())
}

#[then(expr = "a plain SV2 client from {string} still opens a channel")]
async fn other_source_opens(w: &mut HarnessWorld, source: String) -> anyhow::Result<()> {
    let mut c = client_from(w, &source).await?;
    c.open_extended(1).await?;
    Ok(())
}
