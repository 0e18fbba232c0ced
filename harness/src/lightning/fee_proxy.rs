//! A bitcoind JSON-RPC proxy for Core Lightning on the private signet: bitcoind has no fee
//! data there, so `estimatesmartfee` is answered with a fixed rate (as Core Lightning's own
//! test framework mocks it); every other request is forwarded to bitcoind unchanged. One
//! request per connection (`bitcoin-cli`, which lightningd's bitcoin backend runs, sends one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The fee rate answered, BTC per kvB (10 sat/vB).
pub const FIXED_FEERATE_BTC_PER_KVB: f64 = 0.000_1;
/// Largest request or response forwarded.
const MAX_MESSAGE: usize = 64 << 20;
/// Time for bitcoind to answer one forwarded request.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct FeeProxy {
    addr: String,
    task: JoinHandle<()>,
    answered: Arc<AtomicU64>,
}

impl FeeProxy {
    /// Listen on `listen` and forward to bitcoind's RPC at `upstream` (`host:port`).
    pub async fn start(listen: &str, upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("fee proxy cannot listen on {listen}"))?;
        let addr = listener.local_addr()?.to_string();
        let upstream = upstream.to_string();
        let answered = Arc::new(AtomicU64::new(0));
        let count = answered.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (upstream, count) = (upstream.clone(), count.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(client, &upstream, &count).await {
                        tracing::debug!("fee proxy: {e:#}");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            task,
            answered,
        })
    }

    /// Where it listens (`127.0.0.1:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Port it listens on.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// `estimatesmartfee` requests answered so far.
    pub fn fee_answers(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl FeeProxy {
    /// Stop listening, and return once the port is free (dropping only asks the task to end).
    pub async fn close(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for FeeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP message: the head (up to the blank line) and the body.
async fn read_message(s: &mut TcpStream) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(buf.len() < 64 * 1024, "HTTP head over 64 KiB");
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before the HTTP head ended");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    anyhow::ensure!(length <= MAX_MESSAGE, "a {length}-byte HTTP body");
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed inside the HTTP body");
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok((head, body))
}

async fn serve(mut client: TcpStream, upstream: &str, answered: &AtomicU64) -> anyhow::Result<()> {
    let (head, body) = read_message(&mut client).await?;
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if request["method"] == "estimatesmartfee" {
        answered.fetch_add(1, Ordering::Relaxed);
        // Bitcoin Core prints amounts with exactly 8 decimals, and lightningd's parser
        // insists on that.
        let reply = format!(
            r#"{{"result":{{"feerate":{FIXED_FEERATE_BTC_PER_KVB:.8},"blocks":2}},"error":null,"id":{}}}"#,
            request["id"]
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
        client.write_all(response.as_bytes()).await?;
        return Ok(());
    }
    let forward = async {
        let mut up = TcpStream::connect(upstream)
            .await
            .with_context(|| format!("cannot reach bitcoind at {upstream}"))?;
        up.write_all(head.as_bytes()).await?;
        up.write_all(&body).await?;
        read_message(&mut up).await
    };
    let (rhead, rbody) = tokio::time::timeout(UPSTREAM_TIMEOUT, forward)
        .await
        .map_err(|_| anyhow!("bitcoind did not answer in {UPSTREAM_TIMEOUT:?}"))??;
    client.write_all(rhead.as_bytes()).await?;
    client.write_all(&rbody).await?;
    Ok(())
}
