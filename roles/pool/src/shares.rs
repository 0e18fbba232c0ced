//! Shares: validate with `channels_sv2`, then, for an accepted share, append its
//! `ehash:shares` record (and the template's `audit:tasks` record on its first share) and
//! answer it from what Redis did: recorded -> success; hash seen before -> `duplicate-share`;
//! not recorded -> `ehash-record-unavailable`. A share whose outcome could not be learned
//! before the pool stops is not answered at all. A share that finds a block also becomes a
//! `submitblock`.

use bitcoin::hashes::{sha256d, Hash};
use ehash::{share_amount, AuditTask, LockingPubkey, ShareRecord, TemplateKind};
use stratum_apps::stratum_core::binary_sv2::Str0255Owned;
use stratum_apps::stratum_core::channels_sv2::server::share_accounting::{
    ShareValidationError, ShareValidationResult,
};
use stratum_apps::stratum_core::mining_sv2::{
    SubmitSharesErrorOwned, SubmitSharesExtendedOwned, SubmitSharesSuccess,
};
use stratum_apps::stratum_core::parsers_sv2::MiningOwned;

use crate::block::{self, ShareHeader};
use crate::channel::JobTemplate;
use crate::connection::{Close, Connection};
use crate::sink::{AppendError, Appended, ShareAppend};

/// SV2 error code for a share refused because its record could not be stored.
pub const ERROR_RECORD_UNAVAILABLE: &str = "ehash-record-unavailable";
/// Shares of one connection waiting for their records; past this, shares are refused with
/// `ehash-record-unavailable` until Redis catches up (memory stays bounded under overload).
const MAX_PENDING_SHARES: usize = 4096;

/// SV2 error code for a share whose hash was seen before (on any channel, connection or
/// pool process).
const ERROR_DUPLICATE_SHARE: &str = "duplicate-share";

/// How a share is answered.
enum Answer {
    /// `SubmitShares.Success` with this work sum.
    Accept(u64),
    /// `SubmitShares.Error` with this code.
    Reject(&'static str),
    /// No answer: the outcome of its record is unknown (the pool is stopping).
    Silent,
}

/// The answer to one share, once its records are stored (or could not be).
pub struct ShareOutcome {
    channel_id: u32,
    sequence_number: u32,
    answer: Answer,
    /// When the share was read.
    received: std::time::Instant,
}

fn reject_code(e: &ShareValidationError) -> &'static str {
    match e {
        ShareValidationError::Invalid(c)
        | ShareValidationError::Stale(c)
        | ShareValidationError::InvalidJobId(c)
        | ShareValidationError::DoesNotMeetTarget(c)
        | ShareValidationError::VersionRollingNotAllowed(c)
        | ShareValidationError::DuplicateShare(c)
        | ShareValidationError::BadExtranonceSize(c) => c,
        ShareValidationError::InvalidCoinbase => "invalid-share",
        ShareValidationError::NoChainTip => "stale-share",
        ShareValidationError::SeenSharesBudgetExhausted => "seen-shares-budget-exhausted",
    }
}

impl Connection {
    /// A channel broke a limit (`why`). When other channels share the connection (a proxy's
    /// miners), only this one is closed, with `CloseChannel` naming the reason, so one miner
    /// cannot take the others down; a connection with no other channel is closed for `why`.
    fn close_misbehaving_channel(&mut self, channel_id: u32, why: Close) -> Result<(), Close> {
        if self.channels.len() <= 1 {
            return Err(why);
        }
        if let Some(ch) = self.channels.remove(&channel_id) {
            self.ctx.metrics.remove_channel(ch.id());
            self.ctx.metrics.channels.dec();
        }
        self.ctx
            .metrics
            .disconnects
            .with_label_values(&[why.label()])
            .inc();
        tracing::warn!(
            conn = self.id,
            channel = channel_id,
            reason = why.label(),
            "channel closed, the connection's other channels stay: {why:?}"
        );
        self.send_mining(vec![MiningOwned::CloseChannel(
            stratum_apps::stratum_core::mining_sv2::CloseChannelOwned {
                channel_id,
                reason_code: why
                    .label()
                    .to_string()
                    .try_into()
                    .map_err(|_| Close::Protocol("reason code".into()))?,
            },
        )])
    }

    fn reject(&self, channel_id: u32, sequence_number: u32, code: &str) -> Result<(), Close> {
        self.ctx
            .metrics
            .shares_rejected
            .with_label_values(&[code])
            .inc();
        tracing::debug!(
            conn = self.id,
            channel = channel_id,
            seq = sequence_number,
            "share rejected: {code}"
        );
        self.send_mining(vec![MiningOwned::SubmitSharesError(
            SubmitSharesErrorOwned {
                channel_id,
                sequence_number,
                error_code: Str0255Owned::try_from(code.to_string())
                    .map_err(|e| Close::Protocol(format!("{e:?}")))?,
            },
        )])
    }

    pub(crate) fn on_submit(&mut self, s: SubmitSharesExtendedOwned) -> Result<(), Close> {
        let received = std::time::Instant::now();
        let ctx = self.ctx.clone();
        if self.pending.len() >= MAX_PENDING_SHARES {
            // Redis is not keeping up: refuse rather than queue without bound.
            return self.reject(s.channel_id, s.sequence_number, ERROR_RECORD_UNAVAILABLE);
        }
        let Some(ch) = self.channels.get_mut(&s.channel_id) else {
            return self.reject(s.channel_id, s.sequence_number, "invalid-channel-id");
        };
        ch.submitted += 1;
        if !ch.bucket.take() {
            tracing::warn!(
                conn = self.id,
                channel = s.channel_id,
                "share rate above {}/s (burst {}): disconnecting",
                ctx.config.limits.max_shares_per_sec,
                ctx.config.limits.share_burst
            );
            return self.close_misbehaving_channel(s.channel_id, Close::ShareRate(s.channel_id));
        }
        let job = ch.job_template(s.job_id);
        if let Some(JobTemplate::Declared(d)) = &job {
            // A custom job on a tip that is no longer the pool's is stale: the pool has no
            // future job to stale it with.
            let current = ctx
                .templates
                .borrow()
                .as_ref()
                .map(|t| t.prev_hash.prev_hash.to_array());
            if current != Some(d.prev_hash) {
                return self.reject(s.channel_id, s.sequence_number, "stale-share");
            }
        }
        let (hash, found) = match ch.channel.validate_share(s.clone()) {
            Ok(ShareValidationResult::Valid(hash)) => (hash, None),
            Ok(ShareValidationResult::BlockFound(hash, _, coinbase)) => (hash, Some(coinbase)),
            Err(e) => {
                let code = match &e {
                    // A job this channel was given on an older tip (channels_sv2 keeps the jobs
                    // of the last tip only: after a reorganisation's several tip changes the
                    // job is gone): the share is stale, not a job the pool never sent.
                    ShareValidationError::InvalidJobId(_) if ch.issued_earlier(s.job_id) => {
                        "stale-share"
                    }
                    _ => reject_code(&e),
                };
                let exhausted = matches!(e, ShareValidationError::SeenSharesBudgetExhausted);
                self.reject(s.channel_id, s.sequence_number, code)?;
                if exhausted {
                    return self.close_misbehaving_channel(
                        s.channel_id,
                        Close::Protocol("duplicate-share budget exhausted".into()),
                    );
                }
                return Ok(());
            }
        };
        ch.count_for_vardiff();
        let work = ch.channel.get_share_accounting().get_last_batch_work_sum();
        let header = ShareHeader {
            version: s.version,
            ntime: s.ntime,
            nonce: s.nonce,
        };

        if let (Some(coinbase), Some(job)) = (found, &job) {
            submit_block(ctx.clone(), job.clone(), header, coinbase);
        }
        let seen_key = match &job {
            Some(JobTemplate::Declared(d)) => Some(d.seen_key.clone()),
            _ => ch.seen_key(),
        };

        let record = match (ch.locking_pubkey, &job, seen_key) {
            (Some(locking_pubkey), Some(job), Some(tip)) => {
                let prefix = ch.channel.get_extranonce_prefix();
                let Some(record) = share_record(
                    &hash,
                    job.template_id(),
                    locking_pubkey,
                    ctx.config.min_bits,
                    &s,
                    prefix,
                ) else {
                    // Cannot happen while channel targets are clamped to min_bits.
                    tracing::error!(
                        conn = self.id,
                        "accepted share {hash} is below min_bits {}",
                        ctx.config.min_bits
                    );
                    return self.reject(s.channel_id, s.sequence_number, "difficulty-too-low");
                };
                Some((tip, record))
            }
            _ => None,
        };
        let audit = match (&record, &job) {
            (Some(_), Some(job)) if job.claim_audit(&ctx.store) => {
                let task = ch
                    .coinbase(s.job_id, s.extranonce.as_bytes())
                    .and_then(|coinbase| audit_task(&ctx, job, header, &coinbase));
                if task.is_none() {
                    tracing::error!(
                        conn = self.id,
                        "cannot build the audit task of template {}",
                        job.template_id()
                    );
                    job.release_audit(&ctx.store);
                }
                task.map(|t| (job.clone(), t))
            }
            _ => None,
        };
        let template_id = job.as_ref().map(JobTemplate::template_id);

        let (channel_id, sequence_number) = (s.channel_id, s.sequence_number);
        let (Some((tip, record)), Some(template_id)) = (record, template_id) else {
            // No locking key (or no template): nothing to record, the share earns nothing.
            self.pending.push(Box::pin(async move {
                ShareOutcome {
                    channel_id,
                    sequence_number,
                    answer: Answer::Accept(work),
                    received,
                }
            }));
            return Ok(());
        };
        self.pending.push(Box::pin(async move {
            let (claimed, fields) = match audit {
                Some((job, task)) => (Some(job), Some(task.to_fields())),
                None => (None, None),
            };
            let result = ctx
                .sink
                .append(ShareAppend {
                    seen_key: tip,
                    record,
                    audit: (template_id, fields),
                })
                .await;
            if !matches!(result, Ok(Appended::Recorded)) {
                if let Some(job) = claimed {
                    job.release_audit(&ctx.store);
                }
            }
            let answer = match result {
                Ok(Appended::Recorded) => Answer::Accept(work),
                Ok(Appended::Duplicate) => {
                    tracing::info!(
                        channel = channel_id,
                        seq = sequence_number,
                        "share hash already recorded (replayed share): duplicate-share"
                    );
                    Answer::Reject(ERROR_DUPLICATE_SHARE)
                }
                Ok(Appended::NoAuditTask) => {
                    tracing::warn!(
                        channel = channel_id,
                        seq = sequence_number,
                        template = template_id,
                        "share refused: its template's audit task is not in Redis yet"
                    );
                    Answer::Reject(ERROR_RECORD_UNAVAILABLE)
                }
                Err(AppendError::NotRecorded(e)) => {
                    tracing::warn!(
                        channel = channel_id,
                        seq = sequence_number,
                        "share refused, its record was not stored: {e}"
                    );
                    Answer::Reject(ERROR_RECORD_UNAVAILABLE)
                }
                Err(AppendError::Stopped) => Answer::Silent,
            };
            ShareOutcome {
                channel_id,
                sequence_number,
                answer,
                received,
            }
        }));
        Ok(())
    }

    pub(crate) fn on_share_outcome(&mut self, o: ShareOutcome) -> Result<(), Close> {
        self.ctx
            .metrics
            .share_ack_seconds
            .observe(o.received.elapsed().as_secs_f64());
        match o.answer {
            Answer::Accept(work) => {
                if let Some(ch) = self.channels.get_mut(&o.channel_id) {
                    ch.accepted += 1;
                }
                self.ctx.metrics.shares_accepted.inc();
                self.send_mining(vec![MiningOwned::SubmitSharesSuccess(
                    SubmitSharesSuccess {
                        channel_id: o.channel_id,
                        last_sequence_number: o.sequence_number,
                        new_submits_accepted_count: 1,
                        new_shares_sum: work,
                    },
                )])
            }
            Answer::Reject(code) => self.reject(o.channel_id, o.sequence_number, code),
            Answer::Silent => {
                tracing::warn!(
                    channel = o.channel_id,
                    seq = o.sequence_number,
                    "share left unanswered: its record's outcome is unknown and the pool is stopping"
                );
                Ok(())
            }
        }
    }
}

/// The `ehash:shares` record of a share `channels_sv2` accepted with `hash` on a channel
/// locked to `locking_pubkey` (the pool's own per-share work after validation; `None` below
/// `min_bits`).
pub fn share_record(
    hash: &sha256d::Hash,
    template_id: u64,
    locking_pubkey: LockingPubkey,
    min_bits: u32,
    share: &SubmitSharesExtendedOwned,
    extranonce_prefix: &[u8],
) -> Option<ShareRecord> {
    let internal = hash.to_byte_array();
    let amount = share_amount(&internal, min_bits)?;
    let rolled = share.extranonce.as_bytes();
    let mut extranonce = String::with_capacity(2 * (extranonce_prefix.len() + rolled.len()));
    push_hex(&mut extranonce, extranonce_prefix.iter().chain(rolled));
    let mut share_hash = String::with_capacity(64);
    // Display order: the hash read as a number, most significant byte first.
    push_hex(&mut share_hash, internal.iter().rev());
    Some(ShareRecord {
        share_hash,
        template_id,
        channel_id: share.channel_id,
        locking_pubkey,
        amount,
        ntime: share.ntime,
        version: share.version,
        nonce: share.nonce,
        extranonce,
    })
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Append `bytes` to `out` as lower-case hex.
fn push_hex<'a>(out: &mut String, bytes: impl Iterator<Item = &'a u8>) {
    for b in bytes {
        out.push(HEX_DIGITS[usize::from(b >> 4)] as char);
        out.push(HEX_DIGITS[usize::from(b & 0xf)] as char);
    }
}

/// `bytes` as lower-case hex in `buf` (which must hold twice their length).
pub(crate) fn hex_into<'a>(bytes: &[u8], buf: &'a mut [u8]) -> &'a str {
    let n = (2 * bytes.len()).min(buf.len());
    for (i, b) in bytes.iter().take(n / 2).enumerate() {
        buf[2 * i] = HEX_DIGITS[usize::from(b >> 4)];
        buf[2 * i + 1] = HEX_DIGITS[usize::from(b & 0xf)];
    }
    std::str::from_utf8(&buf[..n]).unwrap_or_default()
}

/// The audit task of `job`'s template from one share's coinbase and header.
fn audit_task(
    ctx: &crate::PoolContext,
    job: &JobTemplate,
    header: ShareHeader,
    coinbase: &[u8],
) -> Option<AuditTask> {
    let payout_script = hex::encode(ctx.payout.as_bytes());
    match job {
        JobTemplate::Pool(tid) => {
            let rec = ctx.store.get(*tid)?;
            let (bytes, _) = block::assemble(rec.body(), header, coinbase).ok()?;
            Some(AuditTask {
                template_id: *tid,
                kind: TemplateKind::Pool,
                prev_hash: rec.prev_hash_display.clone(),
                height: rec.height,
                block: hex::encode(bytes),
                payout_script,
                payout_sats: rec.coinbase_value,
            })
        }
        JobTemplate::Declared(d) => {
            let (bytes, _) = block::assemble(d.body(), header, coinbase).ok()?;
            Some(AuditTask {
                template_id: d.template_id,
                kind: TemplateKind::Declared,
                prev_hash: d.prev_hash_display.clone(),
                height: d.template.height,
                block: hex::encode(bytes),
                payout_script,
                payout_sats: d.template.payout_sats,
            })
        }
    }
}

/// Assemble and submit a found block in the background; the share is answered meanwhile.
fn submit_block(
    ctx: std::sync::Arc<crate::PoolContext>,
    job: JobTemplate,
    header: ShareHeader,
    coinbase: Vec<u8>,
) {
    tokio::spawn(async move {
        let template_id = job.template_id();
        let pool_record;
        let (body, height) = match &job {
            JobTemplate::Pool(tid) => {
                let Some(record) = ctx.store.get(*tid) else {
                    tracing::error!(
                        "block found on template {template_id}, which is no longer kept"
                    );
                    ctx.metrics
                        .blocks_rejected
                        .with_label_values(&["template-gone"])
                        .inc();
                    return;
                };
                pool_record = record;
                (pool_record.body(), pool_record.height)
            }
            JobTemplate::Declared(d) => (d.body(), d.template.height),
        };
        let (bytes, hash) = match block::assemble(body, header, &coinbase) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("cannot assemble the found block: {e:#}");
                ctx.metrics
                    .blocks_rejected
                    .with_label_values(&["assembly"])
                    .inc();
                return;
            }
        };
        let mut outcome = block::submit(&ctx.rpc, &bytes).await;
        // bitcoind down, or without the block's parent (it came back from a crash behind the
        // pool's tip, which the pool keeps its miners on until the node catches up): the block
        // is valid for the network, so it is offered again until the node takes it or says
        // something else.
        let until = tokio::time::Instant::now() + block::RESUBMIT_FOR;
        while let Err(reason) = &outcome {
            if tokio::time::Instant::now() >= until
                || !block::worth_resubmitting(&ctx.rpc, reason, &hash).await
            {
                break;
            }
            tracing::warn!(%hash, height, "bitcoind could not take the found block yet ({reason}): offered again in 1 s");
            // Resubmission pace while the node catches up.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            outcome = block::submit(&ctx.rpc, &bytes).await;
        }
        match outcome {
            Ok(()) => {
                ctx.metrics.blocks_found.inc();
                tracing::info!(%hash, height, template_id, "block found and accepted by bitcoind");
                ctx.kick.notify_one();
            }
            Err(reason) => {
                ctx.metrics
                    .blocks_rejected
                    .with_label_values(&[reason.as_str()])
                    .inc();
                if reason == "inconclusive" {
                    // Valid, but another block at this height reached bitcoind first: a
                    // lost race (an orphan), not a fault of the pool.
                    tracing::warn!(%hash, height, "found block is not on the best chain (inconclusive): another block at this height arrived first");
                } else if let JobTemplate::Declared(_) = job {
                    // The operator's template, not the pool's: its audit fails it as well.
                    tracing::warn!(%hash, height, template_id, "bitcoind refused a block on an operator's declared template: {reason}");
                } else {
                    tracing::error!(%hash, height, template_id, "bitcoind refused the found block: {reason}");
                }
            }
        }
    });
}
