//! The accept loop: connection caps and rates, one task per connection, every close counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use stratum_apps::tokio_util::sync::CancellationToken;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use std::time::{Duration, Instant};

use crate::admission::{
    connection_cap, source_of, ConnectionRate, LogGate, Tracked, RESERVED_DESCRIPTORS,
};
use crate::connection::{self, Close};
use crate::limits::IpLimiter;
use crate::PoolContext;

/// First wait after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait after failed accepts in a row.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Live connections by id (accept order, so the first is the oldest), with when they came.
type Registry = Arc<std::sync::Mutex<std::collections::BTreeMap<u64, (Instant, Tracked)>>>;

/// Close the oldest connection older than `deadline` that holds no channel; whether one was.
fn evict_oldest_idle(registry: &Registry, deadline: Duration) -> bool {
    let Ok(mut r) = registry.lock() else {
        return false;
    };
    let victim = r
        .iter()
        .find(|(_, (at, t))| at.elapsed() > deadline && !t.has_channel.load(Ordering::Relaxed))
        .map(|(id, _)| *id);
    match victim.and_then(|id| r.remove(&id)) {
        Some((_, t)) => {
            t.evict.cancel();
            true
        }
        None => false,
    }
}

/// One open connection in the total count; dropping it releases it.
struct OpenConnection(Arc<AtomicU64>);

impl OpenConnection {
    fn new(open: Arc<AtomicU64>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accept connections until `stop` is cancelled, then wait for them to finish.
///
/// Refusals, in order: the total cap (never above the descriptor limit minus what the pool
/// keeps for itself), new connections per second per source, open connections per source.
/// Each is counted in `hashpool_pool_connections_refused_total{reason}` and logged at most once
/// a second with how many were not. An accept error (out of descriptors, say) backs off, from
/// 10 ms doubling to 1 s, instead of retrying at once.
pub async fn accept_loop(ctx: Arc<PoolContext>, listener: TcpListener, stop: CancellationToken) {
    let limits = ctx.config.limits.clone();
    let limiter = Arc::new(IpLimiter::default());
    let rate = ConnectionRate::new(
        limits.max_new_connections_per_sec,
        limits.new_connection_burst,
    );
    let soft = hashpool_config::role_main::raise_descriptor_limit();
    let cap = connection_cap(limits.max_connections, soft);
    if cap < limits.max_connections {
        tracing::warn!(
            "limits.max_connections lowered from {} to {cap}: the descriptor limit is {} and the pool keeps {RESERVED_DESCRIPTORS} for itself (raise it with ulimit -n)",
            limits.max_connections,
            soft.unwrap_or_default()
        );
    }
    let open = Arc::new(AtomicU64::new(0));
    let registry: Registry = Arc::default();
    let setup_deadline = Duration::from_millis(limits.handshake_deadline_ms);
    let disconnect_log = Arc::new(LogGate::new(Duration::from_secs(1)));
    let gates: [LogGate; 4] = std::array::from_fn(|_| LogGate::new(Duration::from_secs(1)));
    let next_id = AtomicU64::new(1);
    let mut tasks = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    a
                }
                Err(e) => {
                    ctx.metrics.refused.with_label_values(&["accept-error"]).inc();
                    if let Some(skipped) = gates[0].pass() {
                        tracing::warn!("accept failed: {e} ({skipped} more since the last line); retrying in {backoff:?}");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let source = source_of(peer.ip());
        let full = open.load(Ordering::Relaxed) >= cap as u64;
        // At the cap, the oldest connection past the set-up deadline that holds no channel
        // makes room: a set-up client may wait for miners, but not at a newcomer's expense.
        let evicted = full && evict_oldest_idle(&registry, setup_deadline);
        if evicted {
            ctx.metrics.refused.with_label_values(&["evicted"]).inc();
        }
        let refusal = if full && !evicted {
            Some(("connections-total", 1, format!("{cap} connections open")))
        } else if !rate.allow(source) {
            Some((
                "connection-rate",
                2,
                format!(
                    "{source} opens more than {}/s",
                    limits.max_new_connections_per_sec
                ),
            ))
        } else {
            None
        };
        let slot = match refusal {
            Some(r) => Err(r),
            None => limiter
                .acquire(source, limits.max_connections_per_ip)
                .ok_or((
                    "connections-per-ip",
                    3,
                    format!(
                        "{} connections from {source} already open",
                        limits.max_connections_per_ip
                    ),
                )),
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err((reason, gate, why)) => {
                ctx.metrics.refused.with_label_values(&[reason]).inc();
                if let Some(skipped) = gates[gate].pass() {
                    tracing::warn!(%peer, reason, "refused: {why} ({skipped} more refused for this reason since the last line)");
                }
                drop(tcp);
                continue;
            }
        };
        let counted = OpenConnection::new(open.clone());
        let _ = tcp.set_nodelay(true);
        keepalive(&tcp);
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let tracked = Tracked::default();
        if let Ok(mut r) = registry.lock() {
            r.insert(id, (Instant::now(), tracked.clone()));
        }
        let (registry_entry, disconnect_log) = (registry.clone(), disconnect_log.clone());
        let ctx = ctx.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            ctx.metrics.connections.inc();
            let close = connection::serve(ctx.clone(), tcp, peer, id, stop, tracked).await;
            if let Ok(mut r) = registry_entry.lock() {
                r.remove(&id);
            }
            ctx.metrics.connections.dec();
            drop(slot);
            drop(counted);
            match &close {
                Close::PeerGone(why) => tracing::info!(conn = id, %peer, "connection closed by peer: {why}"),
                Close::Shutdown => {}
                other => {
                    ctx.metrics.disconnects.with_label_values(&[other.label()]).inc();
                    if let Some(skipped) = disconnect_log.pass() {
                        tracing::warn!(conn = id, %peer, reason = other.label(), "disconnected: {other:?} ({skipped} more disconnects since the last line)");
                    }
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
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!("TCP keepalive not set: {e}");
    }
}
