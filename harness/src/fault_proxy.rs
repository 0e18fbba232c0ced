//! A TCP fault proxy the harness places in front of a server (Redis, a role): it relays bytes
//! both ways and, on a step, holds the client's bytes on the connections open at that moment
//! (they reach the server only on release, even if the client gave up and closed meanwhile).
//! New connections pass. That is how a scenario makes a request's answer arrive too late, or
//! makes a request land after its sender decided it had failed. It can also delay every
//! client chunk, on every connection old and new, by a set time (a slow link or a slow
//! server, seen from the client).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with client bytes on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Pass,
    Hold,
}

/// A running fault proxy.
#[derive(Debug)]
pub struct FaultProxy {
    addr: String,
    /// One flow switch per live connection.
    flows: Arc<Mutex<Vec<watch::Sender<Flow>>>>,
    /// Connections that held bytes and have not finished delivering them.
    holding: Arc<AtomicUsize>,
    /// Every client chunk waits this long (ms) before it is relayed.
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on `listen` (host:port) and relay every connection to `target`.
    pub async fn start(listen: &str, target: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("fault proxy cannot listen on {listen}"))?;
        let addr = listener.local_addr()?.to_string();
        let flows: Arc<Mutex<Vec<watch::Sender<Flow>>>> = Arc::default();
        let holding: Arc<AtomicUsize> = Arc::default();
        let target = target.to_string();
        let registry = flows.clone();
        let counter = holding.clone();
        let delay_ms: Arc<AtomicU64> = Arc::default();
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (tx, rx) = watch::channel(Flow::Pass);
                if let Ok(mut f) = registry.lock() {
                    f.retain(|s| !s.is_closed());
                    f.push(tx);
                }
                tokio::spawn(relay(
                    client,
                    target.clone(),
                    rx,
                    counter.clone(),
                    delay.clone(),
                ));
            }
        });
        Ok(Self {
            addr,
            flows,
            holding,
            delay_ms,
            task,
        })
    }

    /// `host:port` clients connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Hold the client bytes of every connection open now (new connections pass).
    pub fn hold(&self) {
        self.set(Flow::Hold);
    }

    /// Connections that held bytes and have not yet delivered them and closed (after
    /// [`release`](Self::release) this reaches 0 once the server read every held byte and
    /// closed those connections, so it has acted on them).
    pub fn holding_connections(&self) -> usize {
        self.holding.load(Ordering::SeqCst)
    }

    /// Delay every client chunk by `delay` from now on, on every connection (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Deliver what was held and relay normally again.
    pub fn release(&self) {
        self.set(Flow::Pass);
    }

    fn set(&self, flow: Flow) {
        if let Ok(f) = self.flows.lock() {
            for s in f.iter() {
                let _ = s.send(flow);
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    target: String,
    mut flow: watch::Receiver<Flow>,
    holding_count: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Server to client: always relayed.
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    // Client to server: held bytes are buffered, and delivered on release even after the
    // client closed.
    let mut held: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut client_open = true;
    let mut switch_open = true;
    let mut counted = false;
    loop {
        // A dropped proxy releases everything.
        let holding = switch_open && *flow.borrow() == Flow::Hold;
        if !holding && !held.is_empty() {
            if server_write.write_all(&held).await.is_err() {
                break;
            }
            held.clear();
        }
        if !client_open && !holding {
            break;
        }
        tokio::select! {
            changed = flow.changed(), if switch_open => switch_open = changed.is_ok(),
            n = client_read.read(&mut buf), if client_open => match n {
                Ok(0) | Err(_) => client_open = false,
                Ok(n) if holding => {
                    if !counted {
                        counted = true;
                        holding_count.fetch_add(1, Ordering::SeqCst);
                    }
                    held.extend_from_slice(&buf[..n]);
                }
                Ok(n) => {
                    let delay = delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        // The slow link this proxy plays.
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    if server_write.write_all(&buf[..n]).await.is_err() { break }
                }
            },
        }
    }
    let _ = server_write.shutdown().await;
    // Let the server's answers to the delivered bytes drain before closing.
    let _ = down.await;
    if counted {
        holding_count.fetch_sub(1, Ordering::SeqCst);
    }
}
