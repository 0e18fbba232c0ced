//! The hashpool pool role: Stratum V2 (Noise NX over TCP) for extended channels, templates
//! from bitcoind's `getblocktemplate`, share validation with `channels_sv2`, an ehash record
//! in Redis for every accepted share of a channel with a locking key (written before the share
//! is acknowledged), found blocks submitted to bitcoind, Prometheus metrics.
//!
//! `run(config, shutdown)` is the whole role; `main.rs` only loads the config and waits for
//! SIGTERM/SIGINT.

mod block;
/// Templates from `getblocktemplate` (the shared `sv2-templates` crate).
pub use sv2_templates as gbt;
mod admission;
mod channel;
mod connection;
mod custom_job;
pub mod jd;
mod limits;
mod metrics;
mod noise_io;
pub mod redis_store;
mod resolve;
mod server;
mod setup;
mod shares;
mod sink;
mod template;

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bitcoin::{Address, Network, ScriptBuf, Target};
use bitcoind_rpc::BitcoinRpc;
use hashpool_config::pool_side::PoolConfig;
use stratum_apps::key_utils::{Secp256k1PublicKey, Secp256k1SecretKey};
use stratum_apps::stratum_core::channels_sv2::extranonce_manager::ExtranonceAllocator;
use stratum_apps::tokio_util::sync::CancellationToken;
use tokio::sync::{watch, Notify};

pub use shares::{share_record, ERROR_RECORD_UNAVAILABLE};
pub use sink::{append_cmd, ShareAppend, SinkConfig};

/// Extranonce layout: 2 bytes of pool prefix + 2 bytes of channel index + 16 rollable.
const EXTRANONCE_LOCAL_PREFIX: [u8; 2] = [0x48, 0x50];
pub(crate) const EXTRANONCE_TOTAL_LEN: u8 = 20;
const MAX_CHANNELS: u32 = 65_536;

/// What every connection shares.
pub struct PoolContext {
    pub(crate) config: PoolConfig,
    pub(crate) metrics: Arc<metrics::PoolMetrics>,
    pub(crate) templates: watch::Receiver<Option<Arc<template::TemplateRecord>>>,
    pub(crate) store: Arc<template::TemplateStore>,
    pub(crate) sink: sink::RecordSink,
    pub(crate) rpc: Arc<BitcoinRpc>,
    pub(crate) kick: Arc<Notify>,
    pub(crate) allocator: Mutex<ExtranonceAllocator>,
    /// Open channels per source, all connections together (`limits.max_channels_per_ip`).
    pub(crate) channel_sources: Arc<limits::IpLimiter>,
    pub(crate) next_channel_id: AtomicU32,
    pub(crate) payout: ScriptBuf,
    pub(crate) max_target: Target,
    pub(crate) authority: ([u8; 32], [u8; 32]),
    pub(crate) template_ids: Arc<template::TemplateIds>,
    pub(crate) jobs: jd::JobBook,
}

impl PoolContext {
    /// A fresh template id (pool templates and declared jobs share the numbering).
    pub(crate) fn next_template_id(&self) -> anyhow::Result<u64> {
        self.template_ids.next()
    }
}

fn network(chain: &str) -> Network {
    if chain == "regtest" {
        Network::Regtest
    } else {
        Network::Signet
    }
}

/// Parse and check the authority key pair.
fn authority(config: &PoolConfig) -> anyhow::Result<([u8; 32], [u8; 32])> {
    let public = Secp256k1PublicKey::from_str(&config.authority_public_key)
        .map_err(|e| anyhow!("authority_public_key is not an SRI base58 public key: {e:?}"))?;
    let secret = Secp256k1SecretKey::from_str(config.authority_secret_key.expose())
        .map_err(|e| anyhow!("authority_secret_key is not an SRI base58 secret key: {e:?}"))?;
    if Secp256k1PublicKey::from(secret).into_bytes() != public.into_bytes() {
        bail!("authority_public_key does not belong to authority_secret_key");
    }
    Ok((public.into_bytes(), secret.into_bytes()))
}

/// A transport failure reaching bitcoind (down, restarting, paused): waiting may mend it.
fn is_outage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<bitcoind_rpc::RpcError>()
            .is_some_and(bitcoind_rpc::RpcError::is_unreachable)
    })
}

/// How long a stopping pool waits for share records still being written or resolved.
const SINK_GRACE: Duration = Duration::from_secs(5);
/// Longest pause between two attempts to reach Redis at start-up.
const MAX_STARTUP_BACKOFF: Duration = Duration::from_secs(2);

/// Connect to Redis, load the pool's functions and take a new pool epoch, retrying until
/// Redis answers (the pool cannot number templates without it). `None` if `shutdown` came
/// first.
async fn take_epoch(
    config: &PoolConfig,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> anyhow::Result<Option<u32>> {
    let timeout = Duration::from_millis(config.redis.append_timeout_ms);
    let mut backoff = Duration::from_millis(100);
    for attempt in 1u32.. {
        let result = async {
            let mut conn = redis_store::prepare(&config.redis.url, timeout).await?;
            redis_store::new_epoch(&mut conn).await
        };
        tokio::select! {
            _ = &mut *shutdown => return Ok(None),
            r = result => match r {
                Ok(epoch) => return Ok(Some(epoch)),
                Err(e) if e.what == "maxmemory-policy" || e.what == "epoch" => bail!("Redis at {}: {e}", config.redis.url),
                Err(e) if attempt == 1 || attempt.is_multiple_of(30) => tracing::warn!(
                    "waiting for Redis at {} to take a pool epoch (attempt {attempt}): {e}",
                    config.redis.url
                ),
                Err(_) => {}
            },
        }
        tokio::select! {
            _ = &mut *shutdown => return Ok(None),
            // Backoff between attempts to reach Redis at start-up.
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_STARTUP_BACKOFF);
    }
    bail!("unreachable: the attempt counter overflowed")
}

/// Run the pool until `shutdown` resolves.
pub async fn run(config: PoolConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    config
        .validate()
        .map_err(|e| hashpool_config::role_main::invalid("pool", e))?;
    let authority = authority(&config)?;
    let net = network(&config.bitcoind.chain);
    let payout = Address::from_str(&config.payout_address)
        .map_err(|e| anyhow!("payout_address {:?}: {e}", config.payout_address))?
        .require_network(net)
        .map_err(|e| anyhow!("payout_address is not a {net} address: {e}"))?
        .script_pubkey();
    let metrics = Arc::new(metrics::PoolMetrics::new()?);
    let rpc = Arc::new(BitcoinRpc::new(
        &config.bitcoind.rpc_url,
        &config.bitcoind.rpc_user,
        config.bitcoind.rpc_password.expose(),
    )?);
    // bitcoind first: a pool that cannot get templates must not spend a Redis epoch. A node
    // that is down or restarting is waited for (a supervisor may start them in any order);
    // wrong credentials fail at once.
    let answering = rpc
        .wait_answering(&mut shutdown)
        .await
        .with_context(|| format!("bitcoind at {}", config.bitcoind.rpc_url))?;
    if answering.is_none() {
        return Ok(());
    }
    let Some(epoch) = take_epoch(&config, &mut shutdown).await? else {
        return Ok(());
    };
    let rules: Vec<&'static str> = if config.bitcoind.chain == "signet" {
        vec!["segwit", "signet"]
    } else {
        vec!["segwit"]
    };
    let store = Arc::new(template::TemplateStore::default());
    let kick = Arc::new(Notify::new());
    let template_ids = Arc::new(template::TemplateIds::new(epoch));
    let (mut source, templates) = template::TemplateSource::new(
        rpc.clone(),
        rules,
        Duration::from_millis(config.bitcoind.poll_interval_ms.max(10)),
        Duration::from_secs(config.bitcoind.refresh_secs.max(1)),
        store.clone(),
        kick.clone(),
        metrics.clone(),
        template_ids.clone(),
    );
    let mut pause = Duration::from_millis(100);
    let tip = loop {
        let first = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = source.first() => r,
        };
        match first {
            Ok(tip) => break tip,
            // bitcoind went away again between its answer and the template: wait for it.
            Err(e) if is_outage(&e) => {
                tracing::warn!("first block template: {e:#}; waiting for bitcoind");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    // Backoff between attempts at the first template.
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(MAX_STARTUP_BACKOFF);
                if rpc.wait_answering(&mut shutdown).await?.is_none() {
                    return Ok(());
                }
            }
            Err(e) => {
                return Err(e.context(format!(
                    "cannot get a block template from bitcoind at {}",
                    config.bitcoind.rpc_url
                )))
            }
        }
    };
    supersede_stale_tips(&config, &tip).await;
    let (sink, sink_tasks) = sink::RecordSink::spawn(
        sink::SinkConfig {
            url: config.redis.url.clone(),
            batch_max: config.redis.batch_max,
            timeout: Duration::from_millis(config.redis.append_timeout_ms),
            seen_idle_secs: config.redis.seen_idle_secs,
            seen_after_new_tip_secs: config.redis.seen_after_new_tip_secs,
        },
        epoch,
        templates.clone(),
        metrics.clone(),
    );
    let allocator = ExtranonceAllocator::new(
        EXTRANONCE_LOCAL_PREFIX.to_vec(),
        EXTRANONCE_TOTAL_LEN,
        MAX_CHANNELS,
    )
    .map_err(|e| anyhow!("extranonce allocator: {e:?}"))?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let (metrics_listener, metrics_addr) = metrics::bind(&config.metrics_listen).await?;
    let jd_listener = if config.jd_listen.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&config.jd_listen)
                .await
                .with_context(|| format!("cannot listen on {} (jd_listen)", config.jd_listen))?,
        )
    };
    let ctx = Arc::new(PoolContext {
        max_target: Target::from_le_bytes(ehash::amount::max_target_le(config.min_bits)),
        config,
        metrics: metrics.clone(),
        templates,
        store,
        sink,
        rpc,
        kick,
        allocator: Mutex::new(allocator),
        channel_sources: Arc::default(),
        next_channel_id: AtomicU32::new(1),
        payout,
        authority,
        template_ids,
        jobs: jd::JobBook::default(),
    });
    tracing::info!(
        "pool listening on {} (metrics on http://{metrics_addr}/metrics), min_bits {}, epoch {epoch}",
        listener.local_addr()?,
        ctx.config.min_bits
    );

    let stop = CancellationToken::new();
    let stop_metrics = stop.clone();
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, metrics, async move {
        stop_metrics.cancelled().await
    }));
    let stop_source = stop.clone();
    let source_task = tokio::spawn(source.run(async move { stop_source.cancelled().await }));
    let jd_task = match jd_listener {
        Some(l) => {
            tracing::info!("job declaration on {}", l.local_addr()?);
            Some(tokio::spawn(jd::serve(ctx.clone(), l, stop.clone())))
        }
        None => None,
    };
    let accept_task = tokio::spawn(server::accept_loop(ctx, listener, stop.clone()));
    (&mut shutdown).await;
    tracing::info!("shutting down");
    stop.cancel();
    let _ = accept_task.await;
    if let Some(t) = jd_task {
        let _ = t.await;
    }
    let _ = source_task.await;
    // Every connection is gone: let the record writer settle what it holds.
    sink_tasks.finish(SINK_GRACE).await;
    let _ = metrics_task.await;
    Ok(())
}

/// Seen share hashes of tips an earlier pool process mined on get the short expiry.
async fn supersede_stale_tips(config: &PoolConfig, tip: &str) {
    let timeout = Duration::from_millis(config.redis.append_timeout_ms);
    let result = async {
        let mut conn = redis_store::connect(&config.redis.url, timeout).await?;
        redis_store::supersede_stale_tips(&mut conn, tip, config.redis.seen_after_new_tip_secs)
            .await
    };
    match tokio::time::timeout(timeout * 4, result).await {
        Ok(Ok(n)) if n > 0 => tracing::info!("{n} earlier tip(s)' seen share hashes set to expire"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("cannot expire earlier tips' seen share hashes: {e}"),
        Err(_) => tracing::warn!("expiring earlier tips' seen share hashes took too long"),
    }
}
