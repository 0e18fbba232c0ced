//! The hashpool proxy (miner side): an SV1 server for miners; for each miner an SV2 extended
//! channel to the pool over Noise, opened with the operator's Cashu locking key in the ehash
//! TLV. It never learns the pool's Redis URL or secrets. Every share the pool refuses is logged
//! with the pool's reason and answered to the miner with it.

pub mod declare;
pub mod multiplex;
pub mod node;
mod session;
pub mod share_window;
pub mod sv1;
pub mod upstream;
pub mod wallet;

/// Whether an HTTP `Host` names this machine by a loopback literal or `localhost`.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `POST /wallet/quote` body.
#[derive(Debug, serde::Deserialize)]
pub struct QuoteRequest {
    /// A BOLT11 invoice with an amount, from the operator's own node.
    pub invoice: String,
}

/// Spending the operator's ehash: only from this machine, whatever address the status
/// endpoints listen on. The Host too: a web page the operator opens cannot rebind a name of
/// its own to 127.0.0.1 and post here.
fn from_this_machine(
    peer: &std::net::SocketAddr,
    headers: &axum::http::HeaderMap,
) -> Result<(), (axum::http::StatusCode, axum::Json<serde_json::Value>)> {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if peer.ip().to_canonical().is_loopback() && loopback_host(host) {
        return Ok(());
    }
    tracing::warn!(%peer, "wallet request refused: not from loopback");
    Err((
        axum::http::StatusCode::FORBIDDEN,
        axum::Json(
            serde_json::json!({"error": "the wallet's redemptions and melts are served only to this machine (loopback)"}),
        ),
    ))
}

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use ehash::LockingPubkey;
use hashpool_config::miner_side::ProxyConfig;
use stratum_apps::key_utils::Secp256k1PublicKey;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What every miner session shares.
pub struct ProxyShared {
    config: ProxyConfig,
    authority: Secp256k1PublicKey,
    locking_pubkey: Option<LockingPubkey>,
    /// Templates of the operator's node (`template_source = "miner"`).
    templates: Option<watch::Receiver<Option<Arc<node::NodeTemplate>>>>,
    fraud: declare::FraudPlan,
    declarations: declare::DeclarationStatus,
    /// The one job declaration connection all miners' declarers share.
    jd: declare::SharedJd,
    /// The one pool connection all miners' channels share.
    upstream: multiplex::Multiplexer,
    /// What became of the miners' shares.
    shares: Arc<share_window::ShareCounts>,
}

impl ProxyShared {
    fn open_params(&self, miner: u64) -> upstream::OpenParams {
        upstream::OpenParams {
            address: self.config.pool_address.clone(),
            authority: self.authority,
            locking_pubkey: self.locking_pubkey,
            nominal_hashrate: self.config.nominal_hashrate,
            max_target: [0xff; 32],
            min_extranonce_size: self.config.min_extranonce_size,
            user_identity: format!("proxy-miner-{miner}"),
            work_selection: self.templates.is_some(),
            open_timeout: std::time::Duration::from_millis(self.config.open_timeout_ms),
        }
    }

    fn declare_params(&self, miner: u64) -> declare::DeclareParams {
        declare::DeclareParams {
            address: self.config.jd_address.clone(),
            authority: self.authority,
            fraud: self.fraud.clone(),
            user_identity: format!("proxy-miner-{miner}"),
        }
    }
}

/// Run the proxy until `shutdown` resolves.
pub async fn run(config: ProxyConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(|e| hashpool_config::role_main::invalid("proxy", e))?;
    let authority = Secp256k1PublicKey::from_str(&config.pool_authority_public_key)
        .map_err(|e| anyhow!("pool_authority_public_key is not an SRI base58 public key: {e:?}"))?;
    let locking_pubkey = locking_pubkey(&config)?;
    if locking_pubkey.is_none() {
        tracing::warn!("no locking key configured: shares through this proxy earn no ehash");
    }
    // One socket per miner: a farm needs more than the common soft limit of 1024.
    if let Some(soft) = hashpool_config::role_main::raise_descriptor_limit() {
        tracing::info!("descriptor limit {soft}: at most about {soft} miners");
    }
    let fraud = declare::FraudPlan::parse(&config.fraud)?;
    if !fraud.kinds().is_empty() {
        let kinds: Vec<String> = fraud.kinds().iter().map(ToString::to_string).collect();
        tracing::warn!(
            "fraud {}: every declared template is made invalid on purpose (one kind each, in turn)",
            kinds.join(", ")
        );
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut background = Vec::new();
    let templates = if config.template_source == "miner" {
        let (mut poller, rx) = node::NodePoller::new(&config.node)?;
        poller.first().await?;
        background.push(tokio::spawn(poller.run(stop.clone())));
        Some(rx)
    } else {
        None
    };
    let declarations = declare::DeclarationStatus::default();
    let window = Arc::new(share_window::ShareWindow::new(config.max_shares_in_flight));
    let shares = Arc::new(share_window::ShareCounts::new(window.clone()));
    let counts = shares.clone();
    let mut app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/shares",
            axum::routing::get(move || {
                let view = counts.view();
                async move { axum::Json(view) }
            }),
        );
    if templates.is_some() {
        let status = declarations.clone();
        app = app.route(
            "/declarations",
            axum::routing::get(move || {
                let s = status.lock().map(|s| s.clone()).unwrap_or_default();
                async move { axum::Json(s) }
            }),
        );
    }
    if !config.mint_url.is_empty() {
        let w = wallet::OperatorWallet::open(
            &config.mint_url,
            config.locking_secret_key.expose(),
            std::path::Path::new(&config.data_dir),
        )
        .await?;
        let status = w.status.clone();
        let redeemer = w.redeemer(config.max_rounding_loss_ppm);
        let quoter = redeemer.clone();
        let melts = redeemer.clone();
        let poll = std::time::Duration::from_millis(config.wallet_poll_ms);
        background.push(tokio::spawn(w.run(poll, stop.clone())));
        app = app
            .route(
                "/wallet",
                axum::routing::get(move || {
                    let s = status.read().map(|s| s.clone()).unwrap_or_default();
                    async move { axum::Json(s) }
                }),
            )
            .route(
                "/wallet/melts",
                axum::routing::get(
                    move |peer: axum::extract::ConnectInfo<std::net::SocketAddr>,
                          headers: axum::http::HeaderMap| {
                        let r = melts.clone();
                        async move {
                            // Invoices and preimages: only to this machine.
                            if let Err(refused) = from_this_machine(&peer.0, &headers) {
                                return refused;
                            }
                            match r.melts().await {
                                Ok(m) => {
                                    (axum::http::StatusCode::OK, axum::Json(serde_json::json!(m)))
                                }
                                Err(e) => (
                                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                                    axum::Json(serde_json::json!({"error": format!("{e:#}")})),
                                ),
                            }
                        }
                    },
                ),
            )
            .route(
                "/wallet/quote",
                axum::routing::post(
                    move |peer: axum::extract::ConnectInfo<std::net::SocketAddr>,
                          headers: axum::http::HeaderMap,
                          body: axum::Json<QuoteRequest>| {
                        let r = quoter.clone();
                        async move {
                            if let Err(refused) = from_this_machine(&peer.0, &headers) {
                                return refused;
                            }
                            match r.quote(&body.invoice).await {
                                Ok(q) => {
                                    (axum::http::StatusCode::OK, axum::Json(serde_json::json!(q)))
                                }
                                Err(e) => (
                                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                                    axum::Json(serde_json::json!({"error": format!("{e:#}")})),
                                ),
                            }
                        }
                    },
                ),
            )
            .route(
                "/wallet/redeem",
                axum::routing::post(
                    move |peer: axum::extract::ConnectInfo<std::net::SocketAddr>,
                          headers: axum::http::HeaderMap,
                          body: axum::Json<wallet::RedeemOptions>| {
                        let r = redeemer.clone();
                        async move {
                            if let Err(refused) = from_this_machine(&peer.0, &headers) {
                                return refused;
                            }
                            match r.redeem(&body).await {
                                Ok(r) => {
                                    (axum::http::StatusCode::OK, axum::Json(serde_json::json!(r)))
                                }
                                Err(e) => (
                                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                                    axum::Json(serde_json::json!({"error": format!("{e:#}")})),
                                ),
                            }
                        }
                    },
                ),
            );
    }
    if !config.http_listen.is_empty() {
        let listener = TcpListener::bind(&config.http_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.http_listen))?;
        tracing::info!(
            "status on http://{}/ (wallet, declarations, health)",
            listener.local_addr()?
        );
        let http_stop = stop.clone();
        background.push(tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await;
        }));
    }
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        "proxy listening for SV1 miners on {} (pool {}, locking key {})",
        listener.local_addr()?,
        config.pool_address,
        locking_pubkey
            .map(|k| k.to_string())
            .unwrap_or_else(|| "none".into())
    );
    let upstream = multiplex::Multiplexer::new(
        std::time::Duration::from_millis(config.reconnect_min_ms),
        std::time::Duration::from_millis(config.reconnect_max_ms),
        window,
    );
    let shared = Arc::new(ProxyShared {
        config,
        authority,
        locking_pubkey,
        templates,
        fraud,
        declarations,
        jd: declare::SharedJd::default(),
        upstream,
        shares,
    });
    let next = AtomicU64::new(1);
    let mut accept_backoff = std::time::Duration::from_millis(10);
    let mut sessions = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    accept_backoff = std::time::Duration::from_millis(10);
                    let _ = tcp.set_nodelay(true);
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(miner = id, %peer, "miner connected");
                    sessions.spawn(session::serve(shared.clone(), tcp, peer, id));
                }
                Err(e) => {
                    // Out of descriptors, say: back off instead of retrying at once.
                    tracing::warn!("accept failed: {e}; retrying in {accept_backoff:?}");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(std::time::Duration::from_secs(1));
                    continue;
                }
            },
        }
    }
    tracing::info!("shutting down ({} miner connection(s))", sessions.len());
    sessions.abort_all();
    while sessions.join_next().await.is_some() {}
    stop.cancel();
    // A redemption's request may wait minutes on its payment: the tasks get a grace, then are
    // aborted (an interrupted melt is finished or undone by the wallet's saga recovery at the
    // next start).
    let aborts: Vec<_> = background.iter().map(|t| t.abort_handle()).collect();
    let all = async {
        for t in background {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
        tracing::warn!(
            "background tasks (a redemption in flight?) did not finish within {SHUTDOWN_GRACE:?} of shutdown: aborted"
        );
        for a in aborts {
            a.abort();
        }
    }
    Ok(())
}

/// How long shutdown waits for background tasks before aborting them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(8);

/// The operator's locking key: derived from `locking_secret_key` if set (and then
/// `locking_pubkey`, if also set, must match), else `locking_pubkey`, else none.
pub fn locking_pubkey(config: &ProxyConfig) -> anyhow::Result<Option<LockingPubkey>> {
    let secret = config.locking_secret_key.expose();
    let from_secret = if secret.is_empty() {
        None
    } else {
        let sk = bitcoin::secp256k1::SecretKey::from_slice(
            &hex::decode(secret).context("locking_secret_key is not hex")?,
        )
        .map_err(|e| anyhow!("locking_secret_key: {e}"))?;
        let pk = sk.public_key(&bitcoin::secp256k1::Secp256k1::new());
        Some(LockingPubkey::from_slice(&pk.serialize())?)
    };
    let given = if config.locking_pubkey.is_empty() {
        None
    } else {
        Some(
            LockingPubkey::from_str(&config.locking_pubkey)
                .map_err(|e| anyhow!("locking_pubkey: {e}"))?,
        )
    };
    match (from_secret, given) {
        (Some(a), Some(b)) if a != b => {
            anyhow::bail!("locking_pubkey {b} is not the key of locking_secret_key ({a})")
        }
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

#[cfg(test)]
mod redeem_host_tests {
    use super::loopback_host;

    #[test]
    fn only_loopback_names_pass() {
        for ok in [
            "127.0.0.1:3000",
            "localhost:1",
            "[::1]:8080",
            "127.0.0.1",
            "localhost",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:3000",
            "192.168.1.5:3000",
            "[::ffff:10.0.0.1]:1",
            "",
            "127.0.0.1.evil.example",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }
}
