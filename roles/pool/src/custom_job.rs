//! `SetCustomMiningJob`: an operator mines a job it declared (see [`crate::jd`]) on one of its
//! extended channels. Checked inline, all cheap: the token names a declaration and is used
//! once; the job builds on the pool's current tip with its nbits; `min_ntime` is between the
//! tip's median time past + 1 and ten minutes ahead of the pool's clock; version, merkle path
//! and the whole coinbase (version, prefix, sequence, lock time, outputs: byte for byte, with
//! a zero extranonce) are the declared ones, so the block the pool audits and submits is the
//! block the operator declared and hashes. A refused message uses up its token. Errors are the spec's `invalid-mining-job-token` and
//! `invalid-job-param-value-<field>`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use stratum_apps::stratum_core::binary_sv2::Str0255Owned;
use stratum_apps::stratum_core::mining_sv2::{
    SetCustomMiningJobErrorOwned, SetCustomMiningJobOwned, SetCustomMiningJobSuccess,
};
use stratum_apps::stratum_core::parsers_sv2::MiningOwned;

use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::{OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness};

use crate::block::BlockBody;
use crate::connection::{Close, Connection};
use crate::jd::{DeclaredTemplate, DECLARED_EXTRANONCE_LEN};
use crate::template::TemplateRecord;

/// How far ahead of the pool's clock `min_ntime` may be. Shares may carry times up to two
/// hours past `min_ntime` (consensus allows blocks two hours ahead), so this stays small.
const MAX_FUTURE_NTIME_SECS: u64 = 600;

/// A declared template being mined on a channel, with its own template id.
#[derive(Debug)]
pub struct DeclaredJob {
    /// Template id (same numbering as the pool's templates).
    pub template_id: u64,
    /// What the operator declared.
    pub template: Arc<DeclaredTemplate>,
    /// Parent block hash (internal order).
    pub prev_hash: [u8; 32],
    /// Parent block hash, display order.
    pub prev_hash_display: String,
    /// Compact target.
    pub nbits: u32,
    /// Seen-share-hashes key of its tip.
    pub seen_key: Arc<str>,
    audit_claimed: AtomicBool,
}

impl DeclaredJob {
    /// The block body shares on this job complete.
    pub fn body(&self) -> BlockBody<'_> {
        BlockBody {
            prev_hash: self.prev_hash,
            nbits: self.nbits,
            merkle_path: &self.template.merkle_path,
            transactions: &self.template.transactions,
        }
    }

    /// Claim the audit task (first caller only).
    pub fn claim_audit(&self) -> bool {
        !self.audit_claimed.swap(true, Ordering::AcqRel)
    }

    /// Give the claim back after the append failed.
    pub fn release_audit(&self) {
        self.audit_claimed.store(false, Ordering::Release);
    }
}

/// The checks of a custom job against the declaration and the current tip; `Err` is the SV2
/// error code.
pub fn check_custom_job(
    m: &SetCustomMiningJobOwned,
    declared: &DeclaredTemplate,
    tip: &TemplateRecord,
    now: u64,
) -> Result<(), &'static str> {
    if m.prev_hash.to_array() != tip.prev_hash.prev_hash.to_array() || declared.height != tip.height
    {
        return Err("invalid-job-param-value-prev-hash");
    }
    if m.nbits != tip.nbits {
        return Err("invalid-job-param-value-nbits");
    }
    if m.min_ntime < tip.mintime || u64::from(m.min_ntime) > now + MAX_FUTURE_NTIME_SECS {
        return Err("invalid-job-param-value-min-ntime");
    }
    if m.version != declared.version {
        return Err("invalid-job-param-value-version");
    }
    let cb = &declared.coinbase;
    let input = cb
        .input
        .first()
        .ok_or("invalid-job-param-value-coinbase-prefix")?;
    if m.coinbase_tx_version != cb.version.0 as u32 {
        return Err("invalid-job-param-value-coinbase-tx-version");
    }
    let script = input.script_sig.as_bytes();
    let declared_prefix = script
        .get(..script.len().saturating_sub(DECLARED_EXTRANONCE_LEN))
        .unwrap_or_default();
    if m.coinbase_prefix.as_bytes() != declared_prefix {
        return Err("invalid-job-param-value-coinbase-prefix");
    }
    if m.coinbase_tx_input_n_sequence != input.sequence.0 {
        return Err("invalid-job-param-value-coinbase-tx-input-n-sequence");
    }
    if m.coinbase_tx_locktime != cb.lock_time.to_consensus_u32() {
        return Err("invalid-job-param-value-coinbase-tx-locktime");
    }
    if m.coinbase_tx_outputs.as_ref() != declared.coinbase_outputs.as_slice() {
        return Err("invalid-job-param-value-coinbase-tx-outputs");
    }
    // What the channel will build from this message, byte for byte the declared coinbase
    // (witness included): the coinbase hashed is the coinbase declared.
    if serialize(&mined_coinbase(m)?) != serialize(cb) {
        return Err("invalid-job-param-value-coinbase-prefix");
    }
    let path: Vec<[u8; 32]> = m
        .merkle_path
        .clone()
        .into_inner()
        .iter()
        .map(|h| h.to_array())
        .collect();
    if path != declared.merkle_path {
        return Err("invalid-job-param-value-merkle-path");
    }
    Ok(())
}

/// The coinbase `channels_sv2` builds for a custom job, with a zero extranonce.
fn mined_coinbase(m: &SetCustomMiningJobOwned) -> Result<Transaction, &'static str> {
    let outputs: Vec<TxOut> = deserialize(m.coinbase_tx_outputs.as_ref())
        .map_err(|_| "invalid-job-param-value-coinbase-tx-outputs")?;
    let mut script_sig = m.coinbase_prefix.as_bytes().to_vec();
    script_sig.extend(std::iter::repeat_n(0u8, DECLARED_EXTRANONCE_LEN));
    Ok(Transaction {
        version: bitcoin::transaction::Version(m.coinbase_tx_version as i32),
        lock_time: LockTime::from_consensus(m.coinbase_tx_locktime),
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: ScriptBuf::from_bytes(script_sig),
            sequence: Sequence(m.coinbase_tx_input_n_sequence),
            witness: Witness::from_slice(&[vec![0u8; 32]]),
        }],
        output: outputs,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Connection {
    pub(crate) fn on_set_custom_job(&mut self, m: SetCustomMiningJobOwned) -> Result<(), Close> {
        let (channel_id, request_id) = (m.channel_id, m.request_id);
        let answer = match self.custom_job(m) {
            Ok(job_id) => MiningOwned::SetCustomMiningJobSuccess(SetCustomMiningJobSuccess {
                channel_id,
                request_id,
                job_id,
            }),
            Err(code) => {
                tracing::info!(
                    conn = self.id,
                    channel = channel_id,
                    "custom job refused: {code}"
                );
                MiningOwned::SetCustomMiningJobError(SetCustomMiningJobErrorOwned {
                    channel_id,
                    request_id,
                    error_code: Str0255Owned::try_from(code.to_string())
                        .map_err(|e| Close::Protocol(format!("{e:?}")))?,
                })
            }
        };
        let label = match &answer {
            MiningOwned::SetCustomMiningJobError(e) => {
                String::from_utf8_lossy(e.error_code.as_bytes()).into_owned()
            }
            _ => "accepted".into(),
        };
        self.ctx
            .metrics
            .custom_jobs
            .with_label_values(&[&label])
            .inc();
        self.send_mining(vec![answer])
    }

    /// Install a custom job; `Err` is the SV2 error code.
    fn custom_job(&mut self, m: SetCustomMiningJobOwned) -> Result<u32, &'static str> {
        if !self.work_selection {
            return Err("work-selection-not-negotiated");
        }
        let ctx = self.ctx.clone();
        let Some(ch) = self.channels.get_mut(&m.channel_id) else {
            return Err("invalid-channel-id");
        };
        let declared = ctx
            .jobs
            .take_declared(m.token.as_ref())
            .ok_or("invalid-mining-job-token")?;
        let tip = ctx.templates.borrow().clone().ok_or("stale-chain-tip")?;
        check_custom_job(&m, &declared, &tip, unix_now())?;
        let template_id = ctx.next_template_id().map_err(|e| {
            tracing::error!("{e:#}");
            "internal-error"
        })?;
        let job = Arc::new(DeclaredJob {
            template_id,
            template: declared,
            prev_hash: tip.prev_hash.prev_hash.to_array(),
            prev_hash_display: tip.prev_hash_display.clone(),
            nbits: tip.nbits,
            seen_key: ehash::seen_key(&tip.prev_hash_display).into(),
            audit_claimed: AtomicBool::new(false),
        });
        let job_id = ch.add_custom_job(m, job.clone()).map_err(|e| {
            tracing::info!(conn = self.id, "custom job: {e:#}");
            "invalid-job-param-value-coinbase-prefix"
        })?;
        tracing::info!(
            conn = self.id,
            channel = ch.id(),
            job_id,
            template_id,
            height = job.template.height,
            txs = job.template.transactions.len(),
            "custom job set"
        );
        Ok(job_id)
    }
}

#[cfg(test)]
mod tests {
    use bitcoin::Amount;
    use stratum_apps::stratum_core::binary_sv2::{Seq0255Owned, U256Owned};

    use super::*;

    fn tip() -> TemplateRecord {
        let gbt = sv2_templates::BlockTemplate {
            version: 0x2000_0000,
            previousblockhash: "11".repeat(32),
            transactions: Vec::new(),
            coinbasevalue: 5_000_000_000,
            curtime: 1_700_000_100,
            mintime: 1_700_000_000,
            bits: "1e0377ae".into(),
            height: 111,
            default_witness_commitment: None,
            target: "00".repeat(32),
        };
        TemplateRecord::from_gbt(&gbt, 7).unwrap()
    }

    fn outputs(sats: u64) -> Vec<u8> {
        serialize(&vec![TxOut {
            value: Amount::from_sat(sats),
            script_pubkey: ScriptBuf::new_op_return([7u8; 4]),
        }])
    }

    fn job(tip: &TemplateRecord) -> SetCustomMiningJobOwned {
        SetCustomMiningJobOwned {
            channel_id: 1,
            request_id: 1,
            token: vec![1u8; 16].try_into().unwrap(),
            version: 0x2000_0000,
            prev_hash: tip.prev_hash.prev_hash.clone(),
            min_ntime: 1_700_000_100,
            nbits: tip.nbits,
            coinbase_tx_version: 2,
            coinbase_prefix: vec![1u8, 111, 0x14].try_into().unwrap(),
            coinbase_tx_input_n_sequence: u32::MAX,
            coinbase_tx_outputs: outputs(5_000_000_000).try_into().unwrap(),
            coinbase_tx_locktime: 0,
            merkle_path: Seq0255Owned::new(vec![U256Owned::from([5u8; 32])]).unwrap(),
        }
    }

    /// The declaration `job` matches: its coinbase is the one the channel builds.
    fn declared(tip: &TemplateRecord) -> DeclaredTemplate {
        let m = job(tip);
        DeclaredTemplate {
            height: 111,
            version: 0x2000_0000,
            coinbase: mined_coinbase(&m).unwrap(),
            coinbase_outputs: m.coinbase_tx_outputs.as_ref().to_vec(),
            transactions: Vec::new(),
            merkle_path: vec![[5u8; 32]],
            payout_sats: 5_000_000_000,
        }
    }

    #[test]
    fn a_job_matching_its_declaration_and_the_tip_passes() {
        let tip = tip();
        assert_eq!(
            check_custom_job(&job(&tip), &declared(&tip), &tip, 1_700_000_200),
            Ok(())
        );
    }

    #[test]
    fn each_field_off_names_itself() {
        let tip = tip();
        let now = 1_700_000_200;
        let check = |m: SetCustomMiningJobOwned| check_custom_job(&m, &declared(&tip), &tip, now);
        type Change = Box<dyn Fn(&mut SetCustomMiningJobOwned)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "invalid-job-param-value-prev-hash",
                Box::new(|m| m.prev_hash = U256Owned::from([9u8; 32])),
            ),
            (
                "invalid-job-param-value-nbits",
                Box::new(|m| m.nbits = 0x207f_ffff),
            ),
            (
                "invalid-job-param-value-min-ntime",
                Box::new(|m| m.min_ntime = 1_699_999_999),
            ),
            (
                "invalid-job-param-value-min-ntime",
                Box::new(|m| m.min_ntime = 1_700_000_801),
            ),
            (
                "invalid-job-param-value-version",
                Box::new(|m| m.version = 0x2000_0004),
            ),
            (
                "invalid-job-param-value-coinbase-tx-version",
                Box::new(|m| m.coinbase_tx_version = 1),
            ),
            (
                "invalid-job-param-value-coinbase-prefix",
                Box::new(|m| m.coinbase_prefix = vec![1u8, 110, 0x14].try_into().unwrap()),
            ),
            (
                "invalid-job-param-value-coinbase-tx-input-n-sequence",
                Box::new(|m| m.coinbase_tx_input_n_sequence = 0),
            ),
            (
                "invalid-job-param-value-coinbase-tx-locktime",
                Box::new(|m| m.coinbase_tx_locktime = 500),
            ),
            (
                "invalid-job-param-value-coinbase-tx-outputs",
                Box::new(|m| m.coinbase_tx_outputs = outputs(5_000_000_001).try_into().unwrap()),
            ),
            (
                "invalid-job-param-value-merkle-path",
                Box::new(|m| m.merkle_path = Seq0255Owned::new(Vec::new()).unwrap()),
            ),
        ];
        for (code, change) in cases {
            let mut m = job(&tip);
            change(&mut m);
            assert_eq!(check(m), Err(code));
        }
        let stale = DeclaredTemplate {
            height: 110,
            ..declared(&tip)
        };
        assert_eq!(
            check_custom_job(&job(&tip), &stale, &tip, now),
            Err("invalid-job-param-value-prev-hash"),
            "declared for another height"
        );
        let mut other_witness = declared(&tip);
        other_witness.coinbase.input[0].witness = Witness::from_slice(&[vec![1u8; 32]]);
        assert_eq!(
            check_custom_job(&job(&tip), &other_witness, &tip, now),
            Err("invalid-job-param-value-coinbase-prefix"),
            "the mined coinbase would differ from the declared one"
        );
    }
}
