//! Prometheus metrics and the health endpoint (`/metrics`, `/health`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric of the pool (names: `hashpool_pool_*`).
pub struct PoolMetrics {
    registry: Registry,
    /// Shares accepted (and recorded, for channels with a locking key).
    pub shares_accepted: IntCounter,
    /// Shares refused, by SV2 error code.
    pub shares_rejected: IntCounterVec,
    /// Estimated hashrate per channel (vardiff), H/s.
    pub channel_hashrate: GaugeVec,
    /// Accepted / submitted per channel.
    pub channel_acceptance: GaugeVec,
    /// Blocks submitted and accepted by bitcoind.
    pub blocks_found: IntCounter,
    /// Blocks bitcoind refused, by reason.
    pub blocks_rejected: IntCounterVec,
    /// Seconds since the current template was built.
    pub template_age: Gauge,
    /// Time from handing a record to the writer to Redis confirming it.
    pub redis_append_seconds: Histogram,
    /// Time from reading a share to queueing its answer (validation + records).
    pub share_ack_seconds: Histogram,
    /// Appends sent to Redis whose answer did not come (timeout, broken connection).
    pub redis_unknown_outcomes: IntCounter,
    /// Unknown outcomes settled by `hashpool_resolve`, by result (`recorded`, `refused`).
    pub redis_resolved: IntCounterVec,
    /// Connections closed by the pool, by reason (limits and protocol errors).
    pub disconnects: IntCounterVec,
    /// Refusals by a limit, by reason: at accept `connections-total`, `connection-rate`,
    /// `connections-per-ip`, `accept-error`; `evicted` (a channel-less connection closed to
    /// admit a new one at the total cap); `channels-per-connection` and `channels-per-ip` for
    /// a channel past `limits.max_channels_per_connection` or `limits.max_channels_per_ip`.
    pub refused: IntCounterVec,
    /// Job declarations, by result (`accepted` or the SV2 error code).
    pub declarations: IntCounterVec,
    /// `SetCustomMiningJob`s, by result (`accepted` or the SV2 error code).
    pub custom_jobs: IntCounterVec,
    /// Times bitcoind came back without the tip the pool mined on (it lost blocks).
    pub forgotten_tips: IntCounter,
    /// Open connections.
    pub connections: IntGauge,
    /// Open channels.
    pub channels: IntGauge,
    template_built: Mutex<Option<Instant>>,
    redis_ok: AtomicBool,
}

impl PoolMetrics {
    /// Register everything.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let m = Self {
            shares_accepted: IntCounter::with_opts(Opts::new(
                "hashpool_pool_shares_accepted_total",
                "Shares accepted",
            ))?,
            shares_rejected: IntCounterVec::new(
                Opts::new(
                    "hashpool_pool_shares_rejected_total",
                    "Shares refused, by SV2 error code",
                ),
                &["reason"],
            )?,
            channel_hashrate: GaugeVec::new(
                Opts::new(
                    "hashpool_pool_channel_hashrate",
                    "Estimated hashrate per channel, H/s",
                ),
                &["channel_id"],
            )?,
            channel_acceptance: GaugeVec::new(
                Opts::new(
                    "hashpool_pool_channel_acceptance_ratio",
                    "Accepted over submitted shares per channel",
                ),
                &["channel_id"],
            )?,
            blocks_found: IntCounter::with_opts(Opts::new(
                "hashpool_pool_blocks_found_total",
                "Blocks accepted by bitcoind",
            ))?,
            blocks_rejected: IntCounterVec::new(
                Opts::new(
                    "hashpool_pool_blocks_rejected_total",
                    "Blocks refused by bitcoind, by reason",
                ),
                &["reason"],
            )?,
            template_age: Gauge::with_opts(Opts::new(
                "hashpool_pool_template_age_seconds",
                "Age of the current template",
            ))?,
            redis_append_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "hashpool_pool_redis_append_seconds",
                    "Record append latency",
                )
                .buckets(vec![
                    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0,
                ]),
            )?,
            share_ack_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "hashpool_pool_share_ack_seconds",
                    "Share read to answer queued",
                )
                .buckets(vec![
                    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0,
                ]),
            )?,
            redis_unknown_outcomes: IntCounter::with_opts(Opts::new(
                "hashpool_pool_redis_unknown_outcomes_total",
                "Appends sent to Redis whose answer was lost or late",
            ))?,
            redis_resolved: IntCounterVec::new(
                Opts::new(
                    "hashpool_pool_redis_resolved_total",
                    "Unknown append outcomes settled, by result",
                ),
                &["result"],
            )?,
            disconnects: IntCounterVec::new(
                Opts::new(
                    "hashpool_pool_disconnects_total",
                    "Connections closed by the pool, by reason",
                ),
                &["reason"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "hashpool_pool_connections_refused_total",
                    "Connections refused at accept, by reason",
                ),
                &["reason"],
            )?,
            declarations: IntCounterVec::new(
                Opts::new(
                    "hashpool_pool_declarations_total",
                    "Job declarations, by result (accepted or the SV2 error code)",
                ),
                &["result"],
            )?,
            custom_jobs: IntCounterVec::new(
                Opts::new(
                    "hashpool_pool_custom_jobs_total",
                    "SetCustomMiningJob messages, by result (accepted or the SV2 error code)",
                ),
                &["result"],
            )?,
            forgotten_tips: IntCounter::with_opts(Opts::new(
                "hashpool_pool_forgotten_tips_total",
                "Times bitcoind did not know the tip the pool mined on (it lost its newest blocks)",
            ))?,
            connections: IntGauge::with_opts(Opts::new(
                "hashpool_pool_connections",
                "Open connections",
            ))?,
            channels: IntGauge::with_opts(Opts::new("hashpool_pool_channels", "Open channels"))?,
            template_built: Mutex::new(None),
            redis_ok: AtomicBool::new(true),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.shares_accepted.clone()),
            Box::new(m.shares_rejected.clone()),
            Box::new(m.channel_hashrate.clone()),
            Box::new(m.channel_acceptance.clone()),
            Box::new(m.blocks_found.clone()),
            Box::new(m.blocks_rejected.clone()),
            Box::new(m.template_age.clone()),
            Box::new(m.redis_append_seconds.clone()),
            Box::new(m.share_ack_seconds.clone()),
            Box::new(m.redis_unknown_outcomes.clone()),
            Box::new(m.redis_resolved.clone()),
            Box::new(m.disconnects.clone()),
            Box::new(m.refused.clone()),
            Box::new(m.declarations.clone()),
            Box::new(m.custom_jobs.clone()),
            Box::new(m.forgotten_tips.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.channels.clone()),
        ];
        for c in collectors {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    /// A new template was built now.
    pub fn template_built(&self) {
        if let Ok(mut t) = self.template_built.lock() {
            *t = Some(Instant::now());
        }
    }

    /// Record whether the last Redis append worked.
    pub fn set_redis_ok(&self, ok: bool) {
        self.redis_ok.store(ok, Ordering::Relaxed);
    }

    /// Forget a closed channel's series.
    pub fn remove_channel(&self, channel_id: u32) {
        let id = channel_id.to_string();
        let _ = self.channel_hashrate.remove_label_values(&[&id]);
        let _ = self.channel_acceptance.remove_label_values(&[&id]);
    }

    fn template_age_secs(&self) -> Option<f64> {
        self.template_built
            .lock()
            .ok()
            .and_then(|t| t.map(|t| t.elapsed().as_secs_f64()))
    }

    fn render(&self) -> String {
        if let Some(age) = self.template_age_secs() {
            self.template_age.set(age);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

async fn metrics(State(m): State<Arc<PoolMetrics>>) -> impl IntoResponse {
    m.render()
}

async fn health(State(m): State<Arc<PoolMetrics>>) -> impl IntoResponse {
    let age = m.template_age_secs();
    let redis = m.redis_ok.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "status": if age.is_some() && redis { "ok" } else { "degraded" },
        "template_age_secs": age,
        "redis": if redis { "ok" } else { "failing" },
        "connections": m.connections.get(),
        "channels": m.channels.get(),
    });
    let code = if age.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
}

/// Serve `/metrics` and `/health` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<PoolMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/health", get(health))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Bind the metrics listener.
pub async fn bind(addr: &str) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
