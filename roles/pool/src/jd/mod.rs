//! Job declaration: the pool's side of SV2's Job Declaration protocol, on its own port (Noise,
//! the pool's authority key). An operator that picks its own transactions asks for a token,
//! declares its job (full coinbase, then every transaction through
//! `ProvideMissingTransactions`: the pool keeps no mempool), and mines it with
//! `SetCustomMiningJob` on its mining connection.
//!
//! Checks here are the cheap ones (see [`check`]): the allocation token was given to this
//! connection and is used once (`invalid-mining-job-token`), then the coinbase and the
//! transactions. Everything else is the auditor's: the declared template goes to
//! `audit:tasks` with `kind = declared` at its first share. Limits: connections in total and
//! per IP, message sizes (small before `SetupConnection`), tokens and declarations per
//! connection and bytes in total ([`book`]), checks run off the async runtime two at a time.

mod book;
mod check;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bitcoin::{Amount, TxOut};
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
use tokio::sync::Semaphore;

pub use book::{BookFull, DeclaredTemplate, JobBook};
pub use check::{bip34_height, block_subsidy, check_declaration};

use crate::limits::IpLimiter;
use crate::PoolContext;

/// Full extranonce length a declared coinbase is split around (the pool's channels' length).
pub const DECLARED_EXTRANONCE_LEN: usize = crate::EXTRANONCE_TOTAL_LEN as usize;
/// Largest job declaration message: a block's worth of transactions (a block is at most
/// 4,000,000 bytes) with room for framing.
pub const MAX_DECLARATION_BYTES: usize = 5_000_000;
/// Largest message before `SetupConnection`.
const MAX_SETUP_BYTES: usize = 2048;
/// Job declaration connections open at once, in total and per IP address.
const MAX_CONNECTIONS: usize = 64;
const MAX_CONNECTIONS_PER_IP: usize = 8;
/// Declarations checked at once (each decodes and hashes up to a block's transactions, off
/// the async runtime).
const PARALLEL_CHECKS: usize = 2;

fn str0255(s: &str) -> Str0255Owned {
    Str0255Owned::try_from(s.to_string())
        .unwrap_or_else(|_| Str0255Owned::try_from(String::new()).expect("empty string fits"))
}

/// Accept job declaration connections until `stop`.
pub async fn serve(ctx: Arc<PoolContext>, listener: TcpListener, stop: CancellationToken) {
    let limiter = Arc::new(IpLimiter::default());
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let checks = Arc::new(Semaphore::new(PARALLEL_CHECKS));
    let next_id = AtomicU64::new(1);
    let (accept_log, refuse_log) = (
        crate::admission::LogGate::new(Duration::from_secs(1)),
        crate::admission::LogGate::new(Duration::from_secs(1)),
    );
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    if let Some(skipped) = accept_log.pass() {
                        tracing::warn!("job declaration accept failed: {e} ({skipped} more since the last line)");
                    }
                    // Backoff after an accept error (descriptors exhausted, for instance).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (Some(slot), Ok(permit)) = (
            limiter.acquire(
                crate::admission::source_of(peer.ip()),
                MAX_CONNECTIONS_PER_IP,
            ),
            open.clone().try_acquire_owned(),
        ) else {
            if let Some(skipped) = refuse_log.pass() {
                tracing::warn!(%peer, "job declaration connection refused: {MAX_CONNECTIONS} open, or {MAX_CONNECTIONS_PER_IP} from this address ({skipped} more refused since the last line)");
            }
            ctx.metrics
                .refused
                .with_label_values(&["job-declaration-connections"])
                .inc();
            continue;
        };
        let (ctx, stop, checks) = (ctx.clone(), stop.clone(), checks.clone());
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = connection(ctx, tcp, id, checks, stop).await {
                tracing::info!(%peer, "job declaration connection closed: {e:#}");
            }
            drop((slot, permit));
        });
    }
}

async fn connection(
    ctx: Arc<PoolContext>,
    tcp: tokio::net::TcpStream,
    conn: u64,
    checks: Arc<Semaphore>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (public, secret) = ctx.authority;
    let cert = Duration::from_secs(ctx.config.cert_validity_secs);
    let responder = Responder::from_authority_kp(&public, &secret, cert)
        .map_err(|e| anyhow::anyhow!("noise responder: {e:?}"))?;
    let deadline = Duration::from_millis(ctx.config.limits.handshake_deadline_ms);
    // SetupConnection is due within the handshake deadline, counted from accept.
    let setup_by = tokio::time::Instant::now() + deadline;
    // Frames are bounded as they are read: MAX_SETUP_BYTES until SetupConnection, then
    // MAX_DECLARATION_BYTES.
    let (mut reader, mut writer) = tokio::time::timeout_at(
        setup_by,
        crate::noise_io::accept(tcp, responder, deadline, MAX_SETUP_BYTES),
    )
    .await
    .map_err(|_| anyhow::anyhow!("noise handshake not done within {deadline:?}"))?
    .map_err(|e| anyhow::anyhow!("noise handshake: {e:?}"))?;
    // 0: no idle limit (as on the mining port).
    let idle = match ctx.config.limits.idle_timeout_secs {
        0 => Duration::MAX,
        secs => Duration::from_secs(secs),
    };
    let send = |m: AnyMessageOwned| {
        OutboundFrame::from_message(m).map_err(|e| anyhow::anyhow!("encode: {e:?}"))
    };
    let mut setup = false;
    // A declaration waiting for its transactions.
    let mut waiting: Option<DeclareMiningJobOwned> = None;
    loop {
        let mut frame = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            f = tokio::time::timeout(
                if setup { idle } else { setup_by.saturating_duration_since(tokio::time::Instant::now()) },
                reader.read_frame(),
            ) => f
                .map_err(|_| if setup {
                    anyhow::anyhow!("idle for {idle:?}")
                } else {
                    anyhow::anyhow!("no SetupConnection within {deadline:?} of accept")
                })?
                .map_err(|e| anyhow::anyhow!("read: {e:?}"))?,
        };
        let header = frame.header();
        let max = if setup {
            MAX_DECLARATION_BYTES
        } else {
            MAX_SETUP_BYTES
        };
        anyhow::ensure!(
            header.payload_length() <= max,
            "a {}-byte message (limit {max})",
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
                reader.set_max_payload(MAX_DECLARATION_BYTES);
                AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionSuccess(
                    SetupConnectionSuccess {
                        used_version: 2,
                        flags: 0,
                    },
                ))
            }
            _ if !setup => anyhow::bail!("a message before SetupConnection"),
            AnyMessageOwned::JobDeclaration(JobDeclarationOwned::AllocateMiningJobToken(m)) => {
                let token = ctx.jobs.allocate(conn);
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
                if !ctx.jobs.take_allocated(m.mining_job_token.as_bytes(), conn) {
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
                let payout = ctx.payout.clone();
                let permit = checks.clone().acquire_owned().await?;
                let (declared, checked) = tokio::task::spawn_blocking(move || {
                    let checked = check_declaration(&declared, &txs, tip_height, &payout);
                    drop(permit);
                    (declared, checked)
                })
                .await?;
                let kept = checked.and_then(|t| {
                    let (height, n) = (t.height, t.transactions.len());
                    ctx.jobs.declare(t, conn).map(|token| (token, height, n)).map_err(|full| match full {
                        BookFull::Pool => ("invalid-job", "the pool holds as many declared transactions as it keeps: declare again later".to_string()),
                    })
                });
                match kept {
                    Ok((token, height, n)) => {
                        ctx.metrics
                            .declarations
                            .with_label_values(&["accepted"])
                            .inc();
                        tracing::info!(height, txs = n, "job declared");
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
