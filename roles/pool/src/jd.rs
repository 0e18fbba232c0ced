//! Job declaration: the pool's side of SV2's Job Declaration protocol, on its own port (Noise,
//! the pool's authority key). An operator that picks its own transactions asks for a token,
//! declares its job (full coinbase, then every transaction through
//! `ProvideMissingTransactions`: the pool keeps no mempool), and mines it with
//! `SetCustomMiningJob` on its mining connection.
//!
//! Checks here are the cheap ones: the token was allocated here and is used once; the
//! coinbase decodes, is at the height after the pool's tip (`stale-chain-tip`) and pays the
//! pool's payout script at least the block subsidy (`invalid-coinbase-tx`); the transactions
//! match the declared wtxids (`invalid-job`). Everything else is the auditor's: the declared
//! template goes to `audit:tasks` with `kind = declared` at its first share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitcoin::consensus::encode::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{Amount, Transaction, TxOut};
use stratum_apps::network_helpers::noise_stream::NoiseTcpStream;
use stratum_apps::stratum_core::binary_sv2::{B0255Owned, B064KOwned, Seq064KOwned, Str0255Owned};
use stratum_apps::stratum_core::common_messages_sv2::{
    Protocol, SetupConnectionErrorOwned, SetupConnectionSuccess,
};
use stratum_apps::stratum_core::job_declaration_sv2::{
    AllocateMiningJobTokenSuccessOwned, DeclareMiningJobErrorOwned, DeclareMiningJobOwned,
    DeclareMiningJobSuccessOwned, ProvideMissingTransactionsOwned,
};
use stratum_apps::stratum_core::noise_sv2::Responder;
use stratum_apps::stratum_core::parsers_sv2::{
    AnyMessage, AnyMessageOwned, CommonMessagesOwned, JobDeclarationOwned,
};
use stratum_apps::tokio_util::sync::CancellationToken;
use stratum_apps::utils::types::OutboundFrame;
use tokio::net::TcpListener;

use crate::PoolContext;

/// Full extranonce length a declared coinbase is split around (the pool's channels' length).
pub const DECLARED_EXTRANONCE_LEN: usize = crate::EXTRANONCE_TOTAL_LEN as usize;
/// Largest job declaration message (a block's worth of transactions, with room for witness).
pub const MAX_DECLARATION_BYTES: usize = 8 << 20;
/// Tokens and declarations expire after this long unused.
const TOKEN_LIFETIME: Duration = Duration::from_secs(600);
/// Unused tokens kept at most (the oldest is forgotten first).
const MAX_ALLOCATED: usize = 4096;
/// Declarations waiting for their `SetCustomMiningJob` kept at most (each holds a block's
/// transactions; the oldest is forgotten first).
const MAX_DECLARED: usize = 256;

/// A job an operator declared and the pool accepted.
#[derive(Debug)]
pub struct DeclaredTemplate {
    /// Block height (from the coinbase's BIP34 push).
    pub height: u64,
    /// Header version declared.
    pub version: u32,
    /// The coinbase's outputs, serialized as `SetCustomMiningJob` carries them.
    pub coinbase_outputs: Vec<u8>,
    /// Raw transactions in block order.
    pub transactions: Vec<Vec<u8>>,
    /// The coinbase's merkle path over their txids (internal order).
    pub merkle_path: Vec<[u8; 32]>,
    /// What the pool requires its payout script be paid (the block subsidy; the pool cannot
    /// know the fees of transactions it has no inputs for).
    pub payout_sats: u64,
}

#[derive(Default)]
struct Book {
    allocated: HashMap<Vec<u8>, Instant>,
    declared: HashMap<Vec<u8>, (Instant, Arc<DeclaredTemplate>)>,
}

/// Tokens: allocated, then declared (a new token), then used once by `SetCustomMiningJob`.
#[derive(Default)]
pub struct JobBook {
    inner: Mutex<Book>,
}

fn random_token() -> Vec<u8> {
    (0..16).map(|_| rand_byte()).collect()
}

/// A random byte from the OS (the `bitcoin` crate's secp256k1 RNG).
fn rand_byte() -> u8 {
    bitcoin::secp256k1::rand::random()
}

impl JobBook {
    /// A fresh token.
    pub fn allocate(&self) -> Vec<u8> {
        let token = random_token();
        if let Ok(mut b) = self.inner.lock() {
            b.allocated.retain(|_, t| t.elapsed() < TOKEN_LIFETIME);
            b.declared.retain(|_, (t, _)| t.elapsed() < TOKEN_LIFETIME);
            if b.allocated.len() >= MAX_ALLOCATED {
                evict_oldest(&mut b.allocated, |t| *t);
            }
            b.allocated.insert(token.clone(), Instant::now());
        }
        token
    }

    /// Use an allocated token for a declaration (once).
    fn take_allocated(&self, token: &[u8]) -> bool {
        self.inner
            .lock()
            .map(|mut b| b.allocated.remove(token).is_some())
            .unwrap_or(false)
    }

    /// Record a declaration; returns the token `SetCustomMiningJob` must carry.
    fn declare(&self, t: DeclaredTemplate) -> Vec<u8> {
        let token = random_token();
        if let Ok(mut b) = self.inner.lock() {
            if b.declared.len() >= MAX_DECLARED {
                evict_oldest(&mut b.declared, |(t, _)| *t);
            }
            b.declared
                .insert(token.clone(), (Instant::now(), Arc::new(t)));
        }
        token
    }

    /// The declaration a `SetCustomMiningJob` token names (once).
    pub fn take_declared(&self, token: &[u8]) -> Option<Arc<DeclaredTemplate>> {
        self.inner
            .lock()
            .ok()?
            .declared
            .remove(token)
            .map(|(_, t)| t)
    }
}

fn evict_oldest<V>(map: &mut HashMap<Vec<u8>, V>, at: impl Fn(&V) -> Instant) {
    if let Some(oldest) = map
        .iter()
        .min_by_key(|(_, v)| at(v))
        .map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
}

fn str0255(s: &str) -> Str0255Owned {
    Str0255Owned::try_from(s.to_string())
        .unwrap_or_else(|_| Str0255Owned::try_from(String::new()).expect("empty string fits"))
}

/// A declared job's checks, in order; `Err` is the SV2 error code and a detail.
pub fn check_declaration(
    m: &DeclareMiningJobOwned,
    txs: &[Vec<u8>],
    tip_height: u64,
    payout: &bitcoin::ScriptBuf,
) -> Result<DeclaredTemplate, (&'static str, String)> {
    let mut coinbase = m.coinbase_tx_prefix.as_bytes().to_vec();
    coinbase.extend(std::iter::repeat_n(0u8, DECLARED_EXTRANONCE_LEN));
    coinbase.extend_from_slice(m.coinbase_tx_suffix.as_bytes());
    let cb: Transaction = deserialize(&coinbase).map_err(|e| {
        (
            "invalid-coinbase-tx",
            format!("the coinbase around a {DECLARED_EXTRANONCE_LEN}-byte extranonce does not decode: {e}"),
        )
    })?;
    let height = cb
        .input
        .first()
        .and_then(|i| bip34_height(i.script_sig.as_bytes()))
        .ok_or((
            "invalid-coinbase-tx",
            "the coinbase's script_sig does not start with a BIP34 height".to_string(),
        ))?;
    if height != tip_height + 1 {
        return Err((
            "stale-chain-tip",
            format!(
                "coinbase height {height}, the pool's next block is {}",
                tip_height + 1
            ),
        ));
    }
    let required = block_subsidy(height);
    let paid: u64 = cb
        .output
        .iter()
        .filter(|o| o.script_pubkey == *payout)
        .map(|o| o.value.to_sat())
        .sum();
    if paid < required {
        return Err((
            "invalid-coinbase-tx",
            format!(
                "the coinbase pays the pool {paid} sat, it requires the block subsidy {required}"
            ),
        ));
    }
    let wtxids = m.wtxid_list.clone().into_inner();
    if wtxids.len() != txs.len() {
        return Err((
            "invalid-job",
            format!(
                "{} transactions for {} declared wtxids",
                txs.len(),
                wtxids.len()
            ),
        ));
    }
    let mut txids = Vec::with_capacity(txs.len());
    for (i, (raw, wtxid)) in txs.iter().zip(&wtxids).enumerate() {
        let tx: Transaction = deserialize(raw).map_err(|e| {
            (
                "invalid-job",
                format!("transaction {i} does not decode: {e}"),
            )
        })?;
        if tx.compute_wtxid().to_byte_array() != wtxid.to_array() {
            return Err((
                "invalid-job",
                format!("transaction {i} is not the declared wtxid"),
            ));
        }
        txids.push(tx.compute_txid().to_byte_array());
    }
    Ok(DeclaredTemplate {
        height,
        version: m.version,
        coinbase_outputs: bitcoin::consensus::encode::serialize(&cb.output),
        transactions: txs.to_vec(),
        merkle_path: sv2_templates::coinbase_merkle_path(&txids),
        payout_sats: required,
    })
}

/// The block subsidy at `height` (mainnet, signet and regtest by default halve every 210,000
/// blocks).
pub fn block_subsidy(height: u64) -> u64 {
    let halvings = height / u64::from(bitcoin::blockdata::constants::SUBSIDY_HALVING_INTERVAL);
    if halvings >= 64 {
        0
    } else {
        (50 * 100_000_000u64) >> halvings
    }
}

/// The height a coinbase script_sig starts with (BIP34: a minimal push of the height, or
/// `OP_1`..`OP_16` for heights 1 to 16).
pub fn bip34_height(script_sig: &[u8]) -> Option<u64> {
    let (&first, rest) = script_sig.split_first()?;
    match first {
        0x51..=0x60 => Some(u64::from(first - 0x50)),
        1..=8 => {
            let bytes = rest.get(..usize::from(first))?;
            if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                return None; // negative
            }
            let mut v = [0u8; 8];
            v[..bytes.len()].copy_from_slice(bytes);
            Some(u64::from_le_bytes(v))
        }
        _ => None,
    }
}

/// Accept job declaration connections until `stop`.
pub async fn serve(ctx: Arc<PoolContext>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("job declaration accept failed: {e}");
                    // Backoff after an accept error (descriptors exhausted, for instance).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(ctx, tcp, stop).await {
                tracing::info!(%peer, "job declaration connection closed: {e:#}");
            }
        });
    }
}

async fn connection(
    ctx: Arc<PoolContext>,
    tcp: tokio::net::TcpStream,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (public, secret) = ctx.authority;
    let cert = Duration::from_secs(ctx.config.cert_validity_secs);
    let responder = Responder::from_authority_kp(&public, &secret, cert)
        .map_err(|e| anyhow::anyhow!("noise responder: {e:?}"))?;
    let deadline = Duration::from_millis(ctx.config.limits.handshake_deadline_ms);
    let stream = NoiseTcpStream::accept(tcp, responder, deadline)
        .await
        .map_err(|e| anyhow::anyhow!("noise handshake: {e:?}"))?;
    let (mut reader, mut writer) = stream.into_split();
    let idle = Duration::from_secs(ctx.config.limits.idle_timeout_secs);
    let send = |m: AnyMessageOwned| {
        OutboundFrame::from_message(m).map_err(|e| anyhow::anyhow!("encode: {e:?}"))
    };
    let mut setup = false;
    // A declaration waiting for its transactions.
    let mut waiting: Option<DeclareMiningJobOwned> = None;
    loop {
        let mut frame = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            f = tokio::time::timeout(idle, reader.read_frame()) => f
                .map_err(|_| anyhow::anyhow!("idle for {idle:?}"))?
                .map_err(|e| anyhow::anyhow!("read: {e:?}"))?,
        };
        let header = frame.header();
        anyhow::ensure!(
            header.payload_length() <= MAX_DECLARATION_BYTES,
            "a {}-byte message",
            header.payload_length()
        );
        let msg = AnyMessage::try_from((header, frame.payload()))
            .map_err(|e| anyhow::anyhow!("undecodable message: {e:?}"))?
            .into_owned();
        let answer = match msg {
            AnyMessageOwned::Common(CommonMessagesOwned::SetupConnection(m)) => {
                if m.protocol != Protocol::JobDeclarationProtocol {
                    let err = AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionError(
                        SetupConnectionErrorOwned {
                            flags: 0,
                            error_code: str0255("unsupported-protocol"),
                        },
                    ));
                    writer
                        .write_frame(send(err)?)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    anyhow::bail!("protocol {:?} on the job declaration port", m.protocol);
                }
                setup = true;
                AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionSuccess(
                    SetupConnectionSuccess {
                        used_version: 2,
                        flags: 0,
                    },
                ))
            }
            _ if !setup => anyhow::bail!("a message before SetupConnection"),
            AnyMessageOwned::JobDeclaration(JobDeclarationOwned::AllocateMiningJobToken(m)) => {
                let token = ctx.jobs.allocate();
                let outputs = bitcoin::consensus::encode::serialize(&vec![TxOut {
                    value: Amount::ZERO,
                    script_pubkey: ctx.payout.clone(),
                }]);
                AnyMessageOwned::JobDeclaration(JobDeclarationOwned::AllocateMiningJobTokenSuccess(
                    AllocateMiningJobTokenSuccessOwned {
                        request_id: m.request_id,
                        mining_job_token: B0255Owned::try_from(token)
                            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
                        coinbase_outputs: B064KOwned::try_from(outputs)
                            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
                    },
                ))
            }
            AnyMessageOwned::JobDeclaration(JobDeclarationOwned::DeclareMiningJob(m)) => {
                if !ctx.jobs.take_allocated(m.mining_job_token.as_bytes()) {
                    ctx.metrics
                        .declarations
                        .with_label_values(&["invalid-mining-job-token"])
                        .inc();
                    declare_error(
                        m.request_id,
                        "invalid-mining-job-token",
                        "unknown or used token",
                    )?
                } else {
                    let n = m.wtxid_list.clone().into_inner().len();
                    let request_id = m.request_id;
                    waiting = Some(m);
                    AnyMessageOwned::JobDeclaration(
                        JobDeclarationOwned::ProvideMissingTransactions(
                            ProvideMissingTransactionsOwned {
                                request_id,
                                unknown_tx_position_list: Seq064KOwned::new(
                                    (0..n as u16).collect(),
                                )
                                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
                            },
                        ),
                    )
                }
            }
            AnyMessageOwned::JobDeclaration(
                JobDeclarationOwned::ProvideMissingTransactionsSuccess(m),
            ) => {
                let Some(declared) = waiting.take() else {
                    anyhow::bail!("transactions without a declaration");
                };
                let txs: Vec<Vec<u8>> = m
                    .transaction_list
                    .into_inner()
                    .into_iter()
                    .map(|t| t.as_bytes().to_vec())
                    .collect();
                let tip_height = ctx
                    .templates
                    .borrow()
                    .as_ref()
                    .map(|t| t.height.saturating_sub(1))
                    .unwrap_or(0);
                match check_declaration(&declared, &txs, tip_height, &ctx.payout) {
                    Ok(t) => {
                        ctx.metrics
                            .declarations
                            .with_label_values(&["accepted"])
                            .inc();
                        tracing::info!(
                            height = t.height,
                            txs = t.transactions.len(),
                            "job declared"
                        );
                        let token = ctx.jobs.declare(t);
                        AnyMessageOwned::JobDeclaration(
                            JobDeclarationOwned::DeclareMiningJobSuccess(
                                DeclareMiningJobSuccessOwned {
                                    request_id: declared.request_id,
                                    new_mining_job_token: B0255Owned::try_from(token)
                                        .map_err(|e| anyhow::anyhow!("{e:?}"))?,
                                },
                            ),
                        )
                    }
                    Err((code, detail)) => {
                        ctx.metrics.declarations.with_label_values(&[code]).inc();
                        tracing::info!("declaration refused: {code}: {detail}");
                        declare_error(declared.request_id, code, &detail)?
                    }
                }
            }
            other => anyhow::bail!("unexpected message on the job declaration port: {other:?}"),
        };
        writer
            .write_frame(send(answer)?)
            .await
            .map_err(|e| anyhow::anyhow!("write: {e:?}"))?;
    }
}

fn declare_error(request_id: u32, code: &str, detail: &str) -> anyhow::Result<AnyMessageOwned> {
    Ok(AnyMessageOwned::JobDeclaration(
        JobDeclarationOwned::DeclareMiningJobError(DeclareMiningJobErrorOwned {
            request_id,
            error_code: str0255(code),
            error_details: B064KOwned::try_from(detail.as_bytes().to_vec())
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        }),
    ))
}

#[cfg(test)]
mod tests;
