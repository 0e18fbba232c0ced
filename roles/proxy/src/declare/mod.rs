//! Job declaration, the operator's side (`template_source = "miner"`): for every template of
//! the operator's node, ask the pool's job declarator for a token, declare the job (the full
//! coinbase, then every transaction when asked), and hand the session a `SetCustomMiningJob`
//! to set on its channel. With a `fraud` kind, the template is made invalid that way first.
//!
//! Every channel of the proxy declares over the proxy's one job declaration connection
//! ([`SharedJd`]), one declaration at a time: a farm behind one proxy holds one connection to
//! the pool's declarator, not one per miner (the pool allows 8 per address there).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bitcoin::consensus::encode::deserialize;
use bitcoin::TxOut;
use serde::Serialize;
use stratum_apps::key_utils::Secp256k1PublicKey;
use stratum_apps::network_helpers::connect_with_noise;
use stratum_apps::network_helpers::noise_stream::{NoiseTcpReadHalf, NoiseTcpWriteHalf};
use stratum_apps::stratum_core::binary_sv2::{B016MOwned, Seq064KOwned, Str0255Owned};
use stratum_apps::stratum_core::common_messages_sv2::{Protocol, SetupConnectionOwned};
use stratum_apps::stratum_core::job_declaration_sv2::{
    AllocateMiningJobTokenOwned, DeclareMiningJobOwned, ProvideMissingTransactionsSuccessOwned,
};
use stratum_apps::stratum_core::mining_sv2::SetCustomMiningJobOwned;
use stratum_apps::stratum_core::parsers_sv2::{
    AnyMessage, AnyMessageOwned, CommonMessagesOwned, JobDeclarationOwned,
};
use stratum_apps::utils::types::OutboundFrame;
use template_fraud::FraudKind;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::node::NodeTemplate;
use job::build;

mod job;

/// Time allowed for one answer of the job declarator.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for one whole declaration (connect, token, declaration, transactions), while
/// it holds the proxy's job declaration connection.
const DECLARATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Declarations and custom jobs, as `GET /declarations` reports them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeclarationCounts {
    /// Declarations the pool accepted.
    pub declared: u64,
    /// Declarations the pool refused, by SV2 error code.
    pub refused: BTreeMap<String, u64>,
    /// Custom jobs the pool accepted.
    pub custom_jobs: u64,
    /// Custom jobs the pool refused, by SV2 error code.
    pub custom_jobs_refused: BTreeMap<String, u64>,
    /// Templates that could not be built (with the fraud kind, for instance).
    pub not_built: u64,
    /// The last refusal or failure, with its detail.
    pub last_error: Option<String>,
}

/// Shared counters.
pub type DeclarationStatus = Arc<Mutex<DeclarationCounts>>;

/// Record a change in the counters.
pub fn count(status: &DeclarationStatus, f: impl FnOnce(&mut DeclarationCounts)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

/// Where and how to declare.
#[derive(Debug, Clone)]
pub struct DeclareParams {
    /// The pool's job declaration address.
    pub address: String,
    /// The pool's authority key.
    pub authority: Secp256k1PublicKey,
    /// Fraud to put into the templates (tests).
    pub fraud: FraudPlan,
    /// Who declares (logs).
    pub user_identity: String,
}

/// The fraud kinds a dishonest proxy (tests only) puts into its declared templates: one
/// template each, in turn, shared by all its miners' declarers. Empty: honest.
#[derive(Debug, Clone, Default)]
pub struct FraudPlan {
    kinds: Arc<[FraudKind]>,
    turn: Arc<std::sync::atomic::AtomicUsize>,
}

impl FraudPlan {
    /// Kinds separated by commas (`coinbase-overclaim,non-final`); empty: honest.
    pub fn parse(list: &str) -> anyhow::Result<Self> {
        let kinds = list
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                k.parse::<FraudKind>()
                    .map_err(|e| anyhow!("fraud {k:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            kinds: kinds.into(),
            turn: Arc::default(),
        })
    }

    /// The kinds, in turn order.
    pub fn kinds(&self) -> &[FraudKind] {
        &self.kinds
    }

    /// The kind for the next declared template (None: honest).
    fn next(&self) -> Option<FraudKind> {
        if self.kinds.is_empty() {
            return None;
        }
        let i = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.kinds.get(i % self.kinds.len()).copied()
    }
}

/// The channel the jobs are for.
#[derive(Debug, Clone)]
pub struct ChannelShape {
    /// Channel id.
    pub channel_id: u32,
    /// Full extranonce size (prefix plus rollable part).
    pub full_extranonce_size: usize,
}

/// A declared job, ready to be set on the channel (`request_id` is the session's to fill).
#[derive(Debug, Clone)]
pub struct DeclaredWork {
    /// The message.
    pub set_custom: SetCustomMiningJobOwned,
    /// Block height.
    pub height: u64,
}

struct Jd {
    reader: NoiseTcpReadHalf,
    writer: NoiseTcpWriteHalf,
    next_request: u32,
}

/// The proxy's one job declaration connection, lent to one channel's declaration at a time
/// (opened on first use, and again after a failure).
pub type SharedJd = Arc<tokio::sync::Mutex<Option<JdConnection>>>;

/// An open job declaration connection (opaque outside this module).
pub struct JdConnection(Jd);

impl Jd {
    async fn connect(p: &DeclareParams) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(&p.address)
            .await
            .with_context(|| format!("cannot connect to the job declarator at {}", p.address))?;
        tcp.set_nodelay(true)?;
        let stream = connect_with_noise(tcp, Some(p.authority))
            .await
            .map_err(|e| anyhow!("noise handshake with the job declarator failed: {e:?}"))?;
        let (reader, writer) = stream.into_split();
        let mut jd = Self {
            reader,
            writer,
            next_request: 1,
        };
        let s = |v: &str| Str0255Owned::try_from(v.to_string()).map_err(|e| anyhow!("{e:?}"));
        jd.send(AnyMessageOwned::Common(
            CommonMessagesOwned::SetupConnection(SetupConnectionOwned {
                protocol: Protocol::JobDeclarationProtocol,
                min_version: 2,
                max_version: 2,
                flags: 0,
                endpoint_host: s(p.address.split(':').next().unwrap_or_default())?,
                endpoint_port: 0,
                vendor: s("hashpool-harness")?,
                hardware_version: s("proxy")?,
                firmware: s(env!("CARGO_PKG_VERSION"))?,
                device_id: s(&p.user_identity)?,
            }),
        ))
        .await?;
        match jd.recv().await? {
            AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionSuccess(_)) => Ok(jd),
            other => bail!("the job declarator refused the connection: {other:?}"),
        }
    }

    async fn send(&mut self, m: AnyMessageOwned) -> anyhow::Result<()> {
        let frame = OutboundFrame::from_message(m).map_err(|e| anyhow!("encode: {e:?}"))?;
        self.writer
            .write_frame(frame)
            .await
            .map_err(|e| anyhow!("write to the job declarator: {e:?}"))
    }

    async fn recv(&mut self) -> anyhow::Result<AnyMessageOwned> {
        let mut frame = tokio::time::timeout(ANSWER_TIMEOUT, self.reader.read_frame())
            .await
            .map_err(|_| anyhow!("the job declarator did not answer in {ANSWER_TIMEOUT:?}"))?
            .map_err(|e| anyhow!("job declarator connection: {e:?}"))?;
        let header = frame.header();
        Ok(AnyMessage::try_from((header, frame.payload()))
            .map_err(|e| anyhow!("undecodable answer from the job declarator: {e:?}"))?
            .into_owned())
    }

    fn request_id(&mut self) -> u32 {
        self.next_request = self.next_request.wrapping_add(1);
        self.next_request
    }

    /// A token and the pool's payout outputs.
    async fn allocate(&mut self, user: &str) -> anyhow::Result<(Vec<u8>, Vec<TxOut>)> {
        let request_id = self.request_id();
        self.send(AnyMessageOwned::JobDeclaration(
            JobDeclarationOwned::AllocateMiningJobToken(AllocateMiningJobTokenOwned {
                user_identifier: Str0255Owned::try_from(user.to_string())
                    .map_err(|e| anyhow!("{e:?}"))?,
                request_id,
            }),
        ))
        .await?;
        match self.recv().await? {
            AnyMessageOwned::JobDeclaration(
                JobDeclarationOwned::AllocateMiningJobTokenSuccess(s),
            ) => {
                let outputs: Vec<TxOut> = deserialize(s.coinbase_outputs.as_bytes())
                    .context("the pool's coinbase outputs do not decode")?;
                Ok((s.mining_job_token.as_bytes().to_vec(), outputs))
            }
            other => bail!("unexpected answer to AllocateMiningJobToken: {other:?}"),
        }
    }

    /// Declare; `Ok(Ok(token))` for `SetCustomMiningJob`, `Ok(Err((code, detail)))` when the
    /// pool refused.
    async fn declare(
        &mut self,
        mut m: DeclareMiningJobOwned,
        txs: &[Vec<u8>],
    ) -> anyhow::Result<Result<Vec<u8>, (String, String)>> {
        m.request_id = self.request_id();
        self.send(AnyMessageOwned::JobDeclaration(
            JobDeclarationOwned::DeclareMiningJob(m.clone()),
        ))
        .await?;
        loop {
            match self.recv().await? {
                AnyMessageOwned::JobDeclaration(
                    JobDeclarationOwned::ProvideMissingTransactions(p),
                ) => {
                    let list = p
                        .unknown_tx_position_list
                        .into_inner()
                        .into_iter()
                        .map(|i| {
                            let raw = txs
                                .get(usize::from(i))
                                .with_context(|| format!("asked for transaction {i}"))?;
                            B016MOwned::try_from(raw.clone()).map_err(|e| anyhow!("{e:?}"))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    self.send(AnyMessageOwned::JobDeclaration(
                        JobDeclarationOwned::ProvideMissingTransactionsSuccess(
                            ProvideMissingTransactionsSuccessOwned {
                                request_id: p.request_id,
                                transaction_list: Seq064KOwned::new(list)
                                    .map_err(|e| anyhow!("{e:?}"))?,
                            },
                        ),
                    ))
                    .await?;
                }
                AnyMessageOwned::JobDeclaration(JobDeclarationOwned::DeclareMiningJobSuccess(
                    s,
                )) => return Ok(Ok(s.new_mining_job_token.as_bytes().to_vec())),
                AnyMessageOwned::JobDeclaration(JobDeclarationOwned::DeclareMiningJobError(e)) => {
                    return Ok(Err((
                        String::from_utf8_lossy(e.error_code.as_bytes()).into_owned(),
                        String::from_utf8_lossy(e.error_details.as_bytes()).into_owned(),
                    )))
                }
                other => bail!("unexpected answer to DeclareMiningJob: {other:?}"),
            }
        }
    }
}

/// What became of one declaration.
enum Declared {
    /// Accepted: the custom job to mine.
    Work(DeclaredWork),
    /// Not declared (refused or not buildable; counted and logged): wait for the next
    /// template.
    Refused,
    /// Refused as `stale-chain-tip`: the operator's node and the pool's disagree on the tip,
    /// which happens for a moment after every block (the node that saw it first is ahead).
    /// Declared again shortly, unless a newer template comes first.
    TipDisagrees,
}

/// A declaration refused as `stale-chain-tip` is tried again after 300 ms, 600 ms, ... up to
/// 20 times per tip, about a minute in all (the pool's view of a new block usually lags its
/// node's by well under a second; past that minute the node and the pool are taken to disagree
/// for good, and only the node's new templates are declared).
const TIP_RETRY_PAUSE: Duration = Duration::from_millis(300);
const TIP_RETRIES: u32 = 20;

/// Declare one node template.
async fn declare_one(
    jd: &mut Jd,
    p: &DeclareParams,
    shape: &ChannelShape,
    t: &NodeTemplate,
    min_ntime: u32,
    status: &DeclarationStatus,
) -> anyhow::Result<Declared> {
    let (token, pool_outputs) = jd.allocate(&p.user_identity).await?;
    let fraud = p.fraud.next();
    if let Some(kind) = fraud {
        tracing::info!("fraud {kind}: this template is made invalid on purpose");
    }
    let job = match build(
        t,
        fraud,
        pool_outputs,
        &token,
        shape.full_extranonce_size,
        min_ntime,
    ) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(
                "cannot build a job from the node's template (waiting for the next one): {e:#}"
            );
            count(status, |s| {
                s.not_built += 1;
                s.last_error = Some(format!("{e:#}"));
            });
            return Ok(Declared::Refused);
        }
    };
    let mut answer = jd.declare(job.declare.clone(), &job.transactions).await?;
    if fraud == Some(FraudKind::ReusedToken) && answer.is_ok() {
        // The same allocation token again, for a second declaration.
        tracing::info!("fraud reused-token: declaring again with a used token");
        count(status, |s| s.declared += 1);
        answer = jd.declare(job.declare.clone(), &job.transactions).await?;
        if answer.is_ok() {
            tracing::error!("the pool accepted a reused job token");
            count(status, |s| s.declared += 1);
            return Ok(Declared::Refused);
        }
    }
    match answer {
        Ok(new_token) => {
            count(status, |s| s.declared += 1);
            tracing::info!(
                height = job.height,
                txs = job.transactions.len(),
                "job declared"
            );
            Ok(Declared::Work(job.custom(shape, new_token, fraud)?))
        }
        Err((code, detail)) => {
            tracing::warn!(height = job.height, "declaration refused: {code}: {detail}");
            count(status, |s| {
                *s.refused.entry(code.clone()).or_default() += 1;
                s.last_error = Some(format!("{code}: {detail}"));
            });
            Ok(if code == "stale-chain-tip" {
                Declared::TipDisagrees
            } else {
                Declared::Refused
            })
        }
    }
}

/// Declare every new template of the node for `shape`'s channel and send the jobs to the
/// session, until the session goes away. A lost connection to the declarator is reopened
/// with backoff.
pub async fn run(
    p: DeclareParams,
    shape: ChannelShape,
    mut templates: watch::Receiver<Option<Arc<NodeTemplate>>>,
    out: mpsc::Sender<DeclaredWork>,
    status: DeclarationStatus,
    shared: SharedJd,
) {
    let mut backoff = Duration::from_millis(100);
    let mut current = templates.borrow_and_update().clone();
    // One min_ntime per tip: channels_sv2 treats a changed min_ntime as a new tip and would
    // stale the shares in flight on the previous job.
    let mut tip_ntime: Option<(String, u32)> = None;
    // Declarations refused as `stale-chain-tip` on the tip `retry_tip`.
    let (mut retry_tip, mut tip_retries): (Option<String>, u32) = (None, 0);
    loop {
        if current.is_some() {
            let declared = async {
                // Held for the whole declaration: the connection serves one at a time. It is
                // taken out while in use, so a declaration cut off midway (its miner left and
                // this task was aborted, or it timed out) leaves no half-read connection.
                let mut slot = shared.lock().await;
                // The newest template: others may have declared for a while.
                let Some(t) = templates.borrow_and_update().clone() else {
                    return Ok(Declared::Refused);
                };
                let min_ntime = match &tip_ntime {
                    Some((prev, n)) if *prev == t.gbt.previousblockhash => *n,
                    _ => {
                        let n = t.gbt.curtime.max(t.gbt.mintime);
                        tip_ntime = Some((t.gbt.previousblockhash.clone(), n));
                        n
                    }
                };
                let mut conn = match slot.take() {
                    Some(JdConnection(jd)) => jd,
                    None => Jd::connect(&p).await?,
                };
                let r = declare_one(&mut conn, &p, &shape, &t, min_ntime, &status).await;
                if r.is_ok() {
                    *slot = Some(JdConnection(conn));
                }
                r
            };
            // One stuck declarator connection must not hold every channel of the proxy.
            let result = tokio::time::timeout(DECLARATION_TIMEOUT, declared)
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow!(
                        "a declaration took over {DECLARATION_TIMEOUT:?}: the job declarator connection is dropped"
                    ))
                });
            match result {
                Ok(Declared::Work(work)) => {
                    backoff = Duration::from_millis(100);
                    if out.send(work).await.is_err() {
                        return;
                    }
                }
                Ok(Declared::TipDisagrees) => {
                    backoff = Duration::from_millis(100);
                    // Counted per tip: new templates of the same tip come every few seconds.
                    let tip = templates
                        .borrow()
                        .as_ref()
                        .map(|t| t.gbt.previousblockhash.clone());
                    if tip != retry_tip {
                        retry_tip = tip;
                        tip_retries = 0;
                    }
                    if tip_retries < TIP_RETRIES {
                        tip_retries += 1;
                        tokio::select! {
                            _ = out.closed() => return,
                            // A newer template is declared instead (the loop takes the newest).
                            changed = templates.changed() => {
                                if changed.is_err() {
                                    return;
                                }
                            }
                            _ = tokio::time::sleep(TIP_RETRY_PAUSE * tip_retries) => {}
                        }
                        continue;
                    }
                }
                Ok(Declared::Refused) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!("job declaration failed ({e:#}); retrying in {backoff:?}");
                    count(&status, |s| s.last_error = Some(format!("{e:#}")));
                    tokio::select! {
                        _ = out.closed() => return,
                        // Backoff before reconnecting to the job declarator.
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        tokio::select! {
            _ = out.closed() => return,
            changed = templates.changed() => {
                if changed.is_err() {
                    return;
                }
                current = templates.borrow_and_update().clone();
            }
        }
    }
}
