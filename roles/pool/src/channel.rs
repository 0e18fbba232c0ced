//! One extended channel: the `channels_sv2` state plus what the pool adds (locking key,
//! vardiff, share-rate bucket, counters), and the job messages each template produces.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use bitcoin::{Amount, ScriptBuf, Target, TxOut};
use ehash::LockingPubkey;
use stratum_apps::stratum_core::binary_sv2::U256Owned;
use stratum_apps::stratum_core::channels_sv2::server::extended::ExtendedChannel;
use stratum_apps::stratum_core::channels_sv2::server::jobs::JobOrigin;
use stratum_apps::stratum_core::channels_sv2::{Vardiff, VardiffState};
use stratum_apps::stratum_core::mining_sv2::{
    SetCustomMiningJobOwned, SetNewPrevHashOwned as MiningSetNewPrevHash, SetTargetOwned,
};
use stratum_apps::stratum_core::parsers_sv2::MiningOwned;

use crate::custom_job::DeclaredJob;
use crate::limits::TokenBucket;
use crate::template::{TemplateRecord, TemplateStore};

/// A channel of a connection.
pub struct ChannelState {
    /// `channels_sv2` channel (jobs, share validation, targets).
    pub channel: ExtendedChannel,
    /// Vardiff.
    pub vardiff: VardiffState,
    /// Operator's key (from the ehash TLV); `None`: shares earn nothing.
    pub locking_pubkey: Option<LockingPubkey>,
    /// Share-rate limit.
    pub bucket: TokenBucket,
    /// Shares submitted on this channel.
    pub submitted: u64,
    /// Shares accepted on this channel.
    pub accepted: u64,
    /// Previous block hash of the last job sent.
    tip: Option<[u8; 32]>,
    /// Its seen-share-hashes key in Redis (`ehash:seen:<prev hash>`).
    seen_key: Option<std::sync::Arc<str>>,
    /// Declared templates of this channel's custom jobs, by job id.
    declared: HashMap<u32, Arc<DeclaredJob>>,
    /// Its place in the per-source channel count; released when the channel is dropped.
    pub source_slot: Option<crate::limits::IpSlot>,
}

/// The template a job mines.
#[derive(Debug, Clone)]
pub enum JobTemplate {
    /// One of the pool's (by id; the record is in the template store while kept).
    Pool(u64),
    /// One an operator declared.
    Declared(Arc<DeclaredJob>),
}

impl JobTemplate {
    /// Its template id.
    pub fn template_id(&self) -> u64 {
        match self {
            JobTemplate::Pool(id) => *id,
            JobTemplate::Declared(d) => d.template_id,
        }
    }

    /// Claim its audit task (the first share's); see [`TemplateStore::claim_audit`].
    pub fn claim_audit(&self, store: &TemplateStore) -> bool {
        match self {
            JobTemplate::Pool(id) => store.claim_audit(*id),
            JobTemplate::Declared(d) => d.claim_audit(),
        }
    }

    /// Give the claim back.
    pub fn release_audit(&self, store: &TemplateStore) {
        match self {
            JobTemplate::Pool(id) => store.release_audit(*id),
            JobTemplate::Declared(d) => d.release_audit(),
        }
    }
}

impl ChannelState {
    /// Wrap a new channel.
    pub fn new(
        channel: ExtendedChannel,
        locking_pubkey: Option<LockingPubkey>,
        bucket: TokenBucket,
    ) -> anyhow::Result<Self> {
        let vardiff = VardiffState::new().map_err(|e| anyhow!("vardiff: {e:?}"))?;
        Ok(Self {
            channel,
            vardiff,
            locking_pubkey,
            bucket,
            submitted: 0,
            accepted: 0,
            tip: None,
            seen_key: None,
            declared: HashMap::new(),
            source_slot: None,
        })
    }

    /// The seen-share-hashes key of the tip this channel's jobs build on.
    pub fn seen_key(&self) -> Option<std::sync::Arc<str>> {
        self.seen_key.clone()
    }

    /// Channel id.
    pub fn id(&self) -> u32 {
        self.channel.get_channel_id()
    }

    /// The messages that bring this channel onto `record`: on a new tip (or the first
    /// template) a future job plus `SetNewPrevHash`; on the same tip a new active job.
    pub fn on_template(
        &mut self,
        record: &TemplateRecord,
        payout: &ScriptBuf,
    ) -> anyhow::Result<Vec<MiningOwned>> {
        let outputs = reward_outputs(record, payout);
        let tip = record.prev_hash.prev_hash.to_array();
        if self.tip == Some(tip) {
            let mut template = record.template.clone();
            template.future_template = false;
            self.channel
                .on_new_template(template, outputs)
                .map_err(|e| anyhow!("new template on channel {}: {e:?}", self.id()))?;
            let job = self
                .channel
                .get_active_job()
                .context("no active job after a template")?;
            return Ok(vec![MiningOwned::NewExtendedMiningJob(
                job.get_job_message().clone(),
            )]);
        }
        self.channel
            .on_new_template(record.template.clone(), outputs)
            .map_err(|e| anyhow!("future template on channel {}: {e:?}", self.id()))?;
        let job_id = self
            .channel
            .get_future_job_id_from_template_id(record.template_id)
            .context("future job missing after on_new_template")?;
        let job = self
            .channel
            .get_future_job(job_id)
            .context("future job missing")?
            .get_job_message()
            .clone();
        self.channel
            .on_set_new_prev_hash(record.prev_hash.clone())
            .map_err(|e| anyhow!("new tip on channel {}: {e:?}", self.id()))?;
        self.tip = Some(tip);
        self.seen_key = Some(ehash::seen_key(&record.prev_hash_display).into());
        Ok(vec![
            MiningOwned::NewExtendedMiningJob(job),
            MiningOwned::SetNewPrevHash(MiningSetNewPrevHash {
                channel_id: self.id(),
                job_id,
                prev_hash: record.prev_hash.prev_hash.clone(),
                min_ntime: record.prev_hash.header_timestamp,
                nbits: record.prev_hash.n_bits,
            }),
        ])
    }

    /// Run vardiff; on a new target return `SetTarget` and a job carrying it.
    pub fn retarget(
        &mut self,
        record: Option<&TemplateRecord>,
        payout: &ScriptBuf,
    ) -> anyhow::Result<Vec<MiningOwned>> {
        let hashrate = self.channel.get_nominal_hashrate();
        let spm = self.channel.get_shares_per_minute();
        let new = self
            .vardiff
            .try_vardiff(hashrate, self.channel.get_target(), spm)
            .map_err(|e| anyhow!("vardiff: {e:?}"))?;
        let (Some(new_hashrate), Some(record)) = (new, record) else {
            return Ok(Vec::new());
        };
        self.channel
            .update_channel(new_hashrate, None)
            .map_err(|e| anyhow!("update channel {}: {e:?}", self.id()))?;
        tracing::debug!(
            channel = self.id(),
            hashrate = new_hashrate,
            "vardiff: new target"
        );
        let mut out = vec![MiningOwned::SetTarget(SetTargetOwned {
            channel_id: self.id(),
            maximum_target: U256Owned::from(self.channel.get_target().to_le_bytes()),
        })];
        // Jobs carry the target of their creation: send a fresh one.
        if self.tip == Some(record.prev_hash.prev_hash.to_array()) {
            out.extend(self.on_template(record, payout)?);
        }
        Ok(out)
    }

    /// Whether `job_id` was given to this channel before its active job (job ids of a channel
    /// only grow): a share on it is late, not on a job the pool never sent.
    pub fn issued_earlier(&self, job_id: u32) -> bool {
        self.channel
            .get_active_job()
            .is_some_and(|active| job_id < active.get_job_id())
    }

    /// The template job `job_id` (active or past) mines.
    pub fn job_template(&self, job_id: u32) -> Option<JobTemplate> {
        let job = match self.channel.get_active_job() {
            Some(j) if j.get_job_id() == job_id => Some(j),
            _ => self.channel.get_past_job(job_id),
        }?;
        match job.get_origin() {
            JobOrigin::NewTemplate(t) => Some(JobTemplate::Pool(t.template_id)),
            JobOrigin::SetCustomMiningJob(_) => self
                .declared
                .get(&job_id)
                .cloned()
                .map(JobTemplate::Declared),
        }
    }

    /// Install a custom job mining `declared`; returns its job id.
    pub fn add_custom_job(
        &mut self,
        m: SetCustomMiningJobOwned,
        declared: Arc<DeclaredJob>,
    ) -> anyhow::Result<u32> {
        let job_id = self
            .channel
            .on_set_custom_mining_job(m)
            .map_err(|e| anyhow!("custom job on channel {}: {e:?}", self.id()))?;
        self.declared.insert(job_id, declared);
        // Forget declarations of jobs the channel no longer validates shares for.
        let channel = &self.channel;
        self.declared.retain(|id, _| {
            channel
                .get_active_job()
                .is_some_and(|j| j.get_job_id() == *id)
                || channel.get_past_job(*id).is_some()
        });
        Ok(job_id)
    }

    /// The full segwit coinbase of a share on job `job_id` with this rollable extranonce.
    pub fn coinbase(&self, job_id: u32, extranonce: &[u8]) -> Option<Vec<u8>> {
        let job = match self.channel.get_active_job() {
            Some(j) if j.get_job_id() == job_id => Some(j),
            _ => self.channel.get_past_job(job_id),
        }?;
        let mut coinbase = job.get_coinbase_tx_prefix_with_bip141();
        coinbase.extend_from_slice(self.channel.get_extranonce_prefix());
        coinbase.extend_from_slice(extranonce);
        coinbase.extend(job.get_coinbase_tx_suffix_with_bip141());
        Some(coinbase)
    }

    /// Accepted over submitted.
    pub fn acceptance(&self) -> f64 {
        if self.submitted == 0 {
            return 1.0;
        }
        self.accepted as f64 / self.submitted as f64
    }

    /// Count an accepted share for vardiff.
    pub fn count_for_vardiff(&mut self) {
        self.vardiff.increment_shares_since_last_update();
    }
}

/// The pool's reward output: the whole coinbase value to the payout script.
pub fn reward_outputs(record: &TemplateRecord, payout: &ScriptBuf) -> Vec<TxOut> {
    vec![TxOut {
        value: Amount::from_sat(record.template.coinbase_tx_value_remaining),
        script_pubkey: payout.clone(),
    }]
}

/// The easier of two targets is the larger; clamp `requested` to the pool's easiest.
pub fn clamp_target(requested: Target, pool_max: Target) -> Target {
    requested.min(pool_max)
}
