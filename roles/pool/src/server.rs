//! The accept loop: per-IP connection limit, one task per connection, every close counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use stratum_apps::tokio_util::sync::CancellationToken;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::connection::{self, Close};
use crate::limits::IpLimiter;
use crate::PoolContext;

/// Accept connections until `stop` is cancelled, then wait for them to finish.
pub async fn accept_loop(ctx: Arc<PoolContext>, listener: TcpListener, stop: CancellationToken) {
    let limiter = Arc::new(IpLimiter::default());
    let next_id = AtomicU64::new(1);
    let mut tasks = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        let max = ctx.config.limits.max_connections_per_ip;
        let Some(slot) = limiter.acquire(peer.ip(), max) else {
            tracing::warn!(%peer, "refused: {max} connections from {} already open", peer.ip());
            ctx.metrics
                .refused
                .with_label_values(&["connections-per-ip"])
                .inc();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        keepalive(&tcp);
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let ctx = ctx.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            ctx.metrics.connections.inc();
            let close = connection::serve(ctx.clone(), tcp, peer, id, stop).await;
            ctx.metrics.connections.dec();
            drop(slot);
            match &close {
                Close::PeerGone(why) => tracing::info!(conn = id, %peer, "connection closed by peer: {why}"),
                Close::Shutdown => {}
                other => {
                    ctx.metrics.disconnects.with_label_values(&[other.label()]).inc();
                    tracing::warn!(conn = id, %peer, reason = other.label(), "disconnected: {other:?}");
                }
            }
        });
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("connections did not finish within 5 s of shutdown");
    }
}

/// TCP keepalive on an accepted socket: probes after 60 s without traffic, every 10 s, and 3
/// unanswered probes close it, so a peer that vanished is found without an idle timeout that
/// would also cut quiet, healthy SV2 clients.
fn keepalive(tcp: &tokio::net::TcpStream) {
    use std::time::Duration;
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!("TCP keepalive not set: {e}");
    }
}
