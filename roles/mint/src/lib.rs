//! The hashpool mint role: a Cashu mint (cdk 0.18) for the custom unit `ehash` whose only
//! payment method, `mining_share`, is fed by the pool's share records:
//!
//! - every `ehash:shares` record becomes one quote, locked (NUT-20) to the record's key, for
//!   the record's amount, PENDING until its template's audit;
//! - an `audit:results` verdict `valid` pays the template's quotes (after the settlement
//!   delay), `invalid` leaves them unpaid forever (FAILED with the reason);
//! - the operator's wallet finds its quotes with a signed lookup and mints PAID ones with the
//!   standard NUT-04/NUT-20 (and NUT-29 batch) endpoints; quote state changes are pushed over
//!   NUT-17 websockets.
//!
//! `run(config, shutdown)` is the whole role; `main.rs` only loads the config.

pub mod backend;
pub mod http;
mod ingest;
mod lookups;
mod metrics;
pub mod redeem;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use cdk::mint::{MintBuilder, MintMeltLimits, UnitConfig};
use cdk::nuts::nut17::SupportedMethods;
use cdk_common::{CurrencyUnit, PaymentMethod};
use cdk_sqlite::MintSqliteDatabase;
use hashpool_config::pool_side::MintConfig;
use tokio_util::sync::CancellationToken;

use crate::backend::{ShareBackend, METHOD, UNIT};

/// Largest quote a batch mint may cover at once (NUT-29).
const MAX_BATCH: u64 = 1000;
/// How long the mint's tasks get to finish at shutdown.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// cdk advertises minting (NUT-04), melting (NUT-05) and their websocket commands for every
/// payment processor; `mining_share` quotes can only be minted and `bolt11` only melted, so
/// the mint's info says so.
async fn advertise_minting_only(mint: &cdk::mint::Mint) -> anyhow::Result<()> {
    let mut info = mint
        .mint_info()
        .await
        .map_err(|e| anyhow!("mint info: {e}"))?;
    let method = PaymentMethod::Custom(METHOD.into());
    info.nuts.nut05.methods.retain(|m| m.method != method);
    // bolt11 is for melting (redemption) only: ehash is never bought over Lightning.
    let bolt11 = PaymentMethod::Known(cdk_common::nuts::nut00::KnownMethod::Bolt11);
    info.nuts.nut04.methods.retain(|m| m.method != bolt11);
    if info.nuts.nut05.methods.is_empty() {
        info.nuts.nut05.disabled = true;
    }
    let melt = cdk::nuts::nut17::WsCommand::Custom(format!("{METHOD}_melt_quote"));
    for s in &mut info.nuts.nut17.supported {
        s.commands.retain(|c| *c != melt);
    }
    mint.set_mint_info(info)
        .await
        .map_err(|e| anyhow!("mint info: {e}"))
}

/// The mint's public key (NUT-06 `pubkey` in `/v1/info`), derived from its seed: signed
/// lookups name it, so a lookup made for another mint is refused here.
fn identity(seed: &[u8]) -> anyhow::Result<(cdk::nuts::PublicKey, ehash::LockingPubkey)> {
    use bitcoin::hashes::{sha256, Hash, HashEngine};
    let mut engine = sha256::Hash::engine();
    engine.input(b"hashpool/mint-identity/v1");
    engine.input(seed);
    let secret = bitcoin::secp256k1::SecretKey::from_slice(
        sha256::Hash::from_engine(engine).as_byte_array(),
    )
    .context("the seed gives no identity key")?;
    let public = secret
        .public_key(&bitcoin::secp256k1::Secp256k1::new())
        .serialize();
    Ok((
        cdk::nuts::PublicKey::from_slice(&public).map_err(|e| anyhow!("identity key: {e}"))?,
        ehash::LockingPubkey::from_slice(&public).map_err(|e| anyhow!("identity key: {e}"))?,
    ))
}

/// The (`ehash`, `bolt11`) processor and its ledger, paying through the pool's node.
async fn redemption_backend(
    config: &MintConfig,
    db: Arc<MintSqliteDatabase>,
    metrics: Arc<metrics::MintMetrics>,
) -> anyhow::Result<(Arc<redeem::RedeemBackend>, Arc<redeem::ledger::Ledger>)> {
    let r = &config.redemption;
    let network = match r.bitcoind.chain.as_str() {
        "regtest" => bitcoin::Network::Regtest,
        "signet" => bitcoin::Network::Signet,
        "testnet" => bitcoin::Network::Testnet,
        "main" | "mainnet" | "bitcoin" => bitcoin::Network::Bitcoin,
        other => anyhow::bail!(
            "`redemption.bitcoind.chain` {other:?}: use signet, regtest, testnet or main"
        ),
    };
    let script = r
        .payout_address
        .parse::<bitcoin::Address<bitcoin::address::NetworkUnchecked>>()
        .context("`redemption.payout_address` is not an address")?
        .require_network(network)
        .context(
            "`redemption.payout_address` is for another network than `redemption.bitcoind.chain`",
        )?
        .script_pubkey();
    let rpc = bitcoind_rpc::BitcoinRpc::new(
        &r.bitcoind.rpc_url,
        &r.bitcoind.rpc_user,
        r.bitcoind.rpc_password.expose(),
    )
    .map_err(|e| anyhow!("`redemption.bitcoind`: {e}"))?;
    let kv: cdk_common::database::DynKVStore = db;
    let ledger = Arc::new(redeem::ledger::Ledger::new(
        kv.clone(),
        rpc,
        hex::encode(script.as_bytes()),
        r.pool_fee_ppm,
        (
            r.routing_fee_reserve_ppm,
            r.min_routing_fee_reserve_sat.saturating_mul(1000),
        ),
    ));
    let cln = cdk_cln::Cln::new(
        r.lightning_rpc.clone().into(),
        cdk_common::common::FeeReserve {
            min_fee_reserve: r.min_routing_fee_reserve_sat.into(),
            percent_fee_reserve: r.routing_fee_reserve_ppm as f32 / 1_000_000.0,
        },
        false,
        kv,
    )
    .await
    .map_err(|e| anyhow!("`redemption.lightning_rpc`: {e}"))?
    .with_bolt12(false);
    let backend = Arc::new(redeem::RedeemBackend::new(
        cln,
        redeem::lightning::Node::new(std::path::Path::new(&r.lightning_rpc)),
        ledger.clone(),
        metrics,
        redeem::Timing::of(r),
    ));
    Ok((backend, ledger))
}

/// Run the mint until `shutdown` resolves.
pub async fn run(config: MintConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(|e| hashpool_config::role_main::invalid("mint", e))?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir))?;
    let path = std::path::Path::new(&config.data_dir).join("mint.sqlite");
    let db = Arc::new(
        MintSqliteDatabase::new(&path)
            .await
            .map_err(|e| anyhow!("database {}: {e}", path.display()))?,
    );
    let unit = CurrencyUnit::custom(UNIT);
    let method = PaymentMethod::Custom(METHOD.into());
    let mut builder = MintBuilder::new(db.clone());
    // ehash amounts are powers of two up to 2^63 (hashpool's rule).
    builder.configure_unit(
        unit.clone(),
        UnitConfig {
            amounts: (0..64).map(|i| 1u64 << i).collect(),
            input_fee_ppk: 0,
        },
    )?;
    builder
        .add_payment_processor(
            unit.clone(),
            method.clone(),
            MintMeltLimits::new(1, u64::MAX),
            Arc::new(ShareBackend),
        )
        .await?;
    let metrics = Arc::new(metrics::MintMetrics::new()?);
    let redemption = match config.redemption.enabled() {
        true => {
            let (backend, ledger) =
                redemption_backend(&config, db.clone(), metrics.clone()).await?;
            builder
                .add_payment_processor(
                    unit.clone(),
                    PaymentMethod::Known(cdk_common::nuts::nut00::KnownMethod::Bolt11),
                    MintMeltLimits::new(1, u64::MAX),
                    backend.clone(),
                )
                .await?;
            Some((backend, ledger))
        }
        false => None,
    };
    let ledger = redemption.as_ref().map(|(_, l)| l.clone());
    let builder = builder
        .with_name("hashpool ehash mint".into())
        .with_description(
            "ehash for every accepted share, paid once its template is audited".into(),
        )
        .with_urls(vec![config.public_url()])
        .with_supported_websockets(SupportedMethods::default_custom(method, unit))
        .with_batch_minting(Some(MAX_BATCH), Some(vec![METHOD.into()]));
    let seed = hex::decode(config.seed.expose()).context("seed is not hex")?;
    let (identity, mint_pubkey) = identity(&seed)?;
    let builder = builder.with_pubkey(identity);
    let mint = Arc::new(
        builder
            .build_with_seed(db.clone(), &seed)
            .await
            .map_err(|e| anyhow!("building the mint: {e}"))?,
    );
    // The ledgers first: starting the mint checks melts left pending, which settles them.
    let store = Arc::new(store::Store::new(
        mint.clone(),
        config.lookup_max_skew_ms + ehash::lookup::MAX_AHEAD_MS,
    ));
    store
        .upgrade()
        .await
        .context("bringing the mint's database up to date")?;
    if let Some(l) = &ledger {
        l.set_store(store.clone());
    }
    mint.start()
        .await
        .map_err(|e| anyhow!("starting the mint: {e}"))?;
    advertise_minting_only(&mint).await?;
    let mut methods = vec![METHOD.to_string()];
    if ledger.is_some() {
        methods.push("bolt11".into());
    }
    let cashu = cdk_axum::create_mint_router(mint.clone(), methods)
        .await
        .map_err(|e| anyhow!("cashu routes: {e}"))?;
    let api = Arc::new(http::Api {
        store: store.clone(),
        metrics: metrics.clone(),
        max_skew_ms: config.lookup_max_skew_ms,
        redemption: ledger.clone(),
        mint_pubkey,
    });
    let app = http::routes(api.clone())
        .merge(cashu)
        .layer(axum::middleware::from_fn_with_state(
            api,
            http::melt_quote_guard,
        ));
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let stop = CancellationToken::new();
    let mut tasks = ingest::spawn(&config, store, mint.clone(), metrics.clone(), stop.clone());
    if let Some((backend, ledger)) = redemption {
        tasks.push(tokio::spawn(redeem::resolve_holds(
            mint.clone(),
            ledger,
            backend,
            metrics,
            std::time::Duration::from_secs(config.redemption.hold_check_secs),
            stop.clone(),
        )));
    }
    tracing::info!(
        "mint listening on http://{} (unit {UNIT}, method {METHOD}, settlement delay {} s, Lightning redemption {})",
        listener.local_addr()?,
        config.settlement_delay_secs,
        match &ledger {
            Some(_) => format!("through {}", config.redemption.lightning_rpc),
            None => "off".into(),
        }
    );
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await
    });
    shutdown.await;
    tracing::info!("shutting down");
    stop.cancel();
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
        let _ = server.await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
        tracing::warn!("mint tasks did not finish within {SHUTDOWN_GRACE:?} of shutdown");
    }
    mint.stop()
        .await
        .map_err(|e| anyhow!("stopping the mint: {e}"))?;
    Ok(())
}
