//! Shares: validate with `channels_sv2`, then, for an accepted share, append its
//! `ehash:shares` record (and the template's `audit:tasks` record on its first share) and
//! only then acknowledge it. A share that finds a block also becomes a `submitblock`.

use bitcoin::hashes::Hash;
use ehash::{
    share_amount, AuditTask, ShareRecord, TemplateKind, AUDIT_TASKS_STREAM, SHARES_STREAM,
};
use stratum_apps::stratum_core::binary_sv2::Str0255Owned;
use stratum_apps::stratum_core::channels_sv2::server::share_accounting::{
    ShareValidationError, ShareValidationResult,
};
use stratum_apps::stratum_core::mining_sv2::{
    SubmitSharesErrorOwned, SubmitSharesExtendedOwned, SubmitSharesSuccess,
};
use stratum_apps::stratum_core::parsers_sv2::MiningOwned;

use crate::block::{self, ShareHeader};
use crate::connection::{Close, Connection};

/// SV2 error code for a share refused because its record could not be stored.
pub const ERROR_RECORD_UNAVAILABLE: &str = "ehash-record-unavailable";

/// The answer to one share, once its records are stored (or could not be).
pub struct ShareOutcome {
    channel_id: u32,
    sequence_number: u32,
    /// Work sum on success, SV2 error code otherwise.
    result: Result<u64, String>,
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
            return Err(Close::ShareRate(s.channel_id));
        }
        let (hash, block) = match ch.channel.validate_share(s.clone()) {
            Ok(ShareValidationResult::Valid(hash)) => (hash, None),
            Ok(ShareValidationResult::BlockFound(hash, template_id, coinbase)) => {
                (hash, Some((template_id, coinbase)))
            }
            Err(e) => {
                let code = reject_code(&e);
                let exhausted = matches!(e, ShareValidationError::SeenSharesBudgetExhausted);
                self.reject(s.channel_id, s.sequence_number, code)?;
                if exhausted {
                    return Err(Close::Protocol("duplicate-share budget exhausted".into()));
                }
                return Ok(());
            }
        };
        ch.count_for_vardiff();
        let work = ch.channel.get_share_accounting().get_last_batch_work_sum();
        let template_id = block
            .as_ref()
            .and_then(|b| b.0)
            .or_else(|| ch.template_of_job(s.job_id));
        let header = ShareHeader {
            version: s.version,
            ntime: s.ntime,
            nonce: s.nonce,
        };

        if let Some((Some(tid), coinbase)) = block {
            submit_block(ctx.clone(), tid, header, coinbase);
        }

        let record = match (ch.locking_pubkey, template_id) {
            (Some(locking_pubkey), Some(template_id)) => {
                let Some(amount) = share_amount(&hash.to_byte_array(), ctx.config.min_bits) else {
                    // Cannot happen while channel targets are clamped to min_bits.
                    tracing::error!(
                        conn = self.id,
                        "accepted share {hash} is below min_bits {}",
                        ctx.config.min_bits
                    );
                    return self.reject(s.channel_id, s.sequence_number, "difficulty-too-low");
                };
                Some(ShareRecord {
                    share_hash: hash.to_string(),
                    template_id,
                    channel_id: s.channel_id,
                    locking_pubkey,
                    amount,
                    ntime: s.ntime,
                })
            }
            _ => None,
        };
        let audit = match template_id {
            Some(tid) if ctx.store.claim_audit(tid) => {
                let task = ctx.store.get(tid).and_then(|rec| {
                    let coinbase = ch.coinbase(s.job_id, s.extranonce.as_bytes())?;
                    let (bytes, _) = block::assemble(&rec, header, &coinbase).ok()?;
                    Some(AuditTask {
                        template_id: tid,
                        kind: TemplateKind::Pool,
                        prev_hash: rec.prev_hash_display.clone(),
                        height: rec.height,
                        block: hex::encode(bytes),
                        payout_script: hex::encode(ctx.payout.as_bytes()),
                    })
                });
                if task.is_none() {
                    tracing::error!(
                        conn = self.id,
                        "cannot build the audit task of template {tid}"
                    );
                    ctx.store.release_audit(tid);
                }
                task
            }
            _ => None,
        };

        let (channel_id, sequence_number) = (s.channel_id, s.sequence_number);
        self.pending.push(Box::pin(async move {
            let mut result = Ok(work);
            if let Some(task) = audit {
                if let Err(e) = ctx.sink.append(AUDIT_TASKS_STREAM, task.to_fields()).await {
                    ctx.store.release_audit(task.template_id);
                    result = Err(e);
                }
            }
            if let (Ok(_), Some(record)) = (&result, record) {
                if let Err(e) = ctx.sink.append(SHARES_STREAM, record.to_fields()).await {
                    result = Err(e);
                }
            }
            ctx.metrics.set_redis_ok(result.is_ok());
            let result = result.map_err(|e| {
                tracing::warn!(
                    channel = channel_id,
                    seq = sequence_number,
                    "share refused, its record was not stored: {e}"
                );
                ERROR_RECORD_UNAVAILABLE.to_string()
            });
            ShareOutcome {
                channel_id,
                sequence_number,
                result,
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
        match o.result {
            Ok(work) => {
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
            Err(code) => self.reject(o.channel_id, o.sequence_number, &code),
        }
    }
}

/// Assemble and submit a found block in the background; the share is answered meanwhile.
fn submit_block(
    ctx: std::sync::Arc<crate::PoolContext>,
    template_id: u64,
    header: ShareHeader,
    coinbase: Vec<u8>,
) {
    {
        tokio::spawn(async move {
            let Some(record) = ctx.store.get(template_id) else {
                tracing::error!("block found on template {template_id}, which is no longer kept");
                ctx.metrics
                    .blocks_rejected
                    .with_label_values(&["template-gone"])
                    .inc();
                return;
            };
            let (bytes, hash) = match block::assemble(&record, header, &coinbase) {
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
            match block::submit(&ctx.rpc, &bytes).await {
                Ok(()) => {
                    ctx.metrics.blocks_found.inc();
                    tracing::info!(%hash, height = record.height, template_id, "block found and accepted by bitcoind");
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
                        tracing::warn!(%hash, height = record.height, "found block is not on the best chain (inconclusive): another block at this height arrived first");
                    } else {
                        tracing::error!(%hash, height = record.height, "bitcoind refused the found block: {reason}");
                    }
                }
            }
        });
    }
}
