//! A miner's upstream channel: opening (and reopening) it, the difficulty its miner suggests,
//! and the custom jobs its declarer sets on it (`template_source = "miner"`).

use serde_json::{json, Value};
use stratum_apps::stratum_core::binary_sv2::U256Owned;
use stratum_apps::stratum_core::channels_sv2::server::jobs::factory::JobFactory;
use stratum_apps::stratum_core::mining_sv2::{
    SetCustomMiningJobOwned, SetNewPrevHashOwned, UpdateChannelOwned,
};
use stratum_apps::stratum_core::parsers_sv2::MiningOwned;
use tokio::sync::mpsc;

use super::{Session, KEPT_JOBS};
use crate::declare::{self, DeclaredWork};
use crate::share_window::ShareCounts;
use crate::sv1::{self, Request};
use crate::upstream::Upstream;

/// Shortest time between two `UpdateChannel`s one miner's suggestions send.
const SUGGEST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The next declared job; pending forever without a declarer.
pub(super) async fn recv_declared(
    rx: &mut Option<mpsc::Receiver<DeclaredWork>>,
) -> Option<DeclaredWork> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// `mining.suggest_difficulty`: the channel starts no easier than that (the pool may still
    /// set a harder target): a channel opened from now on is opened so. An open channel is
    /// asked with `UpdateChannel` (its `SetTarget` comes back as `mining.set_difficulty`)
    /// only for a target harder than it has, at most once per [`SUGGEST_INTERVAL`], and never
    /// when the proxy declares its own jobs (their targets are fixed when set): the pool then
    /// recomputes the channel's target from the proxy's configured hashrate and sends a new
    /// job, through the connection every miner of this proxy shares.
    pub(super) async fn on_suggest_difficulty(&mut self, r: Request) -> Result<(), String> {
        let Some(target) = r
            .params
            .first()
            .and_then(Value::as_f64)
            .and_then(sv1::target_for_difficulty)
        else {
            return self
                .line(sv1::error(
                    &r.id,
                    20,
                    "difficulty must be a positive number",
                ))
                .await;
        };
        self.suggested_target = Some(target);
        let harder = target.iter().rev().lt(self.target.iter().rev());
        let due = self
            .suggest_sent_at
            .is_none_or(|t| t.elapsed() >= SUGGEST_INTERVAL);
        if let (Some(up), true, true, false) =
            (&self.upstream, harder, due, self.shared.templates.is_some())
        {
            let update = MiningOwned::UpdateChannel(UpdateChannelOwned {
                channel_id: self.channel_id,
                nominal_hash_rate: self.shared.config.nominal_hashrate,
                maximum_target: U256Owned::from(target),
            });
            self.suggest_sent_at = Some(std::time::Instant::now());
            if !up.send(update) {
                tracing::debug!(
                    miner = self.id,
                    "suggested difficulty not passed on: the queue to the pool is full"
                );
            }
        }
        self.line(sv1::ok(&r.id, json!(true))).await
    }

    /// Set a declared job on the channel.
    pub(super) fn on_declared(&mut self, mut work: DeclaredWork) -> Result<(), String> {
        let Some(up) = &self.upstream else {
            return Ok(()); // the declarer of a lost channel; a new one starts with the next
        };
        self.next_request = self.next_request.wrapping_add(1);
        work.set_custom.request_id = self.next_request;
        work.set_custom.channel_id = self.channel_id;
        tracing::debug!(
            miner = self.id,
            height = work.height,
            "setting a custom job"
        );
        if up.send(MiningOwned::SetCustomMiningJob(work.set_custom.clone())) {
            self.custom_pending
                .insert(self.next_request, work.set_custom);
        }
        // Answers to older requests that never came are not waited for.
        while self.custom_pending.len() > KEPT_JOBS {
            if let Some(k) = self.custom_pending.keys().min().copied() {
                self.custom_pending.remove(&k);
            }
        }
        Ok(())
    }

    /// The pool accepted a custom job as `job_id`: give it to the miner.
    pub(super) async fn on_custom_job(
        &mut self,
        set: SetCustomMiningJobOwned,
        job_id: u32,
    ) -> Result<(), String> {
        let full = self.extranonce1.len() + self.extranonce2_size;
        let job = JobFactory::new(true, None, None)
            .new_extended_job_from_custom_job(set.clone(), self.extranonce1.clone(), full)
            .map_err(|e| format!("cannot rebuild the custom job: {e:?}"))?;
        let mut msg = job.get_job_message().clone();
        msg.job_id = job_id;
        msg.channel_id = self.channel_id;
        let new_tip = self
            .prev_hash
            .as_ref()
            .is_none_or(|p| p.prev_hash.to_array() != set.prev_hash.to_array());
        self.jobs.insert(job_id, msg);
        while self.jobs.len() > KEPT_JOBS {
            self.jobs.pop_first();
        }
        self.prev_hash = Some(SetNewPrevHashOwned {
            channel_id: self.channel_id,
            job_id,
            prev_hash: set.prev_hash,
            min_ntime: set.min_ntime,
            nbits: set.nbits,
        });
        self.send_current_job(new_tip).await
    }

    pub(super) async fn on_channel(&mut self, up: Upstream) -> Result<(), String> {
        let reopened = !self.extranonce1.is_empty();
        let info = up.info.clone();
        if let Some(templates) = self.shared.templates.clone() {
            if let Some(d) = self.declarer.take() {
                d.abort();
            }
            let (tx, rx) = mpsc::channel(4);
            let shape = declare::ChannelShape {
                channel_id: info.channel_id,
                full_extranonce_size: info.extranonce_prefix.len() + info.extranonce_size,
            };
            self.declarer = Some(tokio::spawn(declare::run(
                self.shared.declare_params(self.id),
                shape,
                templates,
                tx,
                self.shared.declarations.clone(),
                self.shared.jd.clone(),
            )));
            self.declared = Some(rx);
            self.custom_pending.clear();
        }
        tracing::info!(
            miner = self.id,
            channel = info.channel_id,
            ehash = info.ehash,
            "upstream channel open (extranonce1 {}, extranonce2 size {})",
            hex::encode(&info.extranonce_prefix),
            info.extranonce_size
        );
        self.channel_id = info.channel_id;
        self.extranonce1 = info.extranonce_prefix;
        self.extranonce2_size = info.extranonce_size;
        self.target = info.target;
        self.jobs.clear();
        self.prev_hash = None;
        // The channel's first job and SetNewPrevHash come through `inbound` like all others.
        // No share of an earlier channel is still waiting (`upstream_lost` answered them), so
        // no late answer can free one of this channel's slots in the share window.
        debug_assert!(self.pending.is_empty());
        self.upstream = Some(up);
        if reopened && self.subscribed {
            if !self.wants_extranonce {
                return Err("upstream channel changed and the miner did not subscribe to extranonce changes".into());
            }
            self.line(sv1::set_extranonce(
                &self.extranonce1,
                self.extranonce2_size,
            ))
            .await?;
            self.line(sv1::set_difficulty(&self.target)).await?;
            self.send_current_job(true).await?;
        }
        self.answer_subscribe().await
    }

    /// The channel is gone: every share waiting for the pool's answer is refused. A write
    /// that fails ends the session (the miner is not reading).
    pub(super) async fn upstream_lost(&mut self) -> Result<(), String> {
        self.upstream = None;
        // Declarations for a lost channel would never be set: its declarer stops here, and
        // the next channel starts its own.
        if let Some(d) = self.declarer.take() {
            d.abort();
        }
        self.declared = None;
        let pending: Vec<sv1::Id> = self.pending.drain().map(|(_, id)| id).collect();
        self.rejected += pending.len() as u64;
        ShareCounts::add(
            &self.shared.shares.refused_upstream_disconnected,
            pending.len() as u64,
        );
        for id in pending {
            self.line(sv1::error(&id, 20, "upstream-disconnected"))
                .await?;
        }
        Ok(())
    }
}
