//! An SV2 mining client in the harness: it opens extended channels on the pool (with or
//! without the ehash locking key), keeps their jobs and tips, mines real shares in process and
//! submits them, honest or tweaked (ntime, version), and can replay a share on another channel.
//!
//! Its header construction (coinbase from prefix + extranonce + suffix, merkle root from the
//! path, header hashing with rust-bitcoin) is written apart from the pool's validation code,
//! so what it computes is a second opinion on what the pool accepts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bitcoin::block::{Header, Version};
use bitcoin::hashes::{sha256d, Hash};
use bitcoin::{BlockHash, CompactTarget, TxMerkleNode};
use ehash::{LockingPubkey, EHASH_EXTENSION_TYPE, LOCKING_PUBKEY_FIELD};
use stratum_apps::stratum_core::binary_sv2::{B032Owned, Seq064KOwned, Str0255Owned, U256Owned};
use stratum_apps::stratum_core::codec_sv2::SerializedFrame;
use stratum_apps::stratum_core::extensions_sv2::RequestExtensionsOwned;
use stratum_apps::stratum_core::mining_sv2::{
    OpenExtendedMiningChannelOwned, SubmitSharesExtendedOwned,
};
use stratum_apps::stratum_core::parsers_sv2::{
    AnyMessageOwned, CommonMessagesOwned, ExtensionsNegotiationOwned, ExtensionsOwned, MiningOwned,
    Tlv, TlvList,
};
use stratum_apps::utils::types::OutboundFrame;

use crate::sv2_client::Sv2Client;
use crate::wait::scaled;

/// Time allowed for one answer from the pool.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One job of a channel.
#[derive(Debug, Clone)]
pub struct Job {
    /// Job id.
    pub job_id: u32,
    /// Header version.
    pub version: u32,
    /// Coinbase before the extranonce (witness stripped).
    pub coinbase_prefix: Vec<u8>,
    /// Coinbase after the extranonce (witness stripped).
    pub coinbase_suffix: Vec<u8>,
    /// Merkle path of the coinbase (internal order).
    pub merkle_path: Vec<[u8; 32]>,
    /// Waiting for a `SetNewPrevHash`.
    pub future: bool,
}

/// What the client knows of one of its channels.
#[derive(Debug, Clone)]
pub struct Channel {
    /// Channel id.
    pub channel_id: u32,
    /// The pool's part of the extranonce.
    pub extranonce_prefix: Vec<u8>,
    /// The rollable part's size.
    pub extranonce_size: usize,
    /// Share target (little-endian).
    pub target: [u8; 32],
    /// Jobs by id.
    pub jobs: BTreeMap<u32, Job>,
    /// The job to mine on (the newest active one).
    pub active: Option<u32>,
    /// Previous block hash (internal order), minimum ntime and nbits of the tip.
    pub tip: Option<([u8; 32], u32, u32)>,
}

impl Channel {
    /// Previous block hash of the tip, display order.
    pub fn tip_display(&self) -> Option<String> {
        self.tip.map(|(mut h, _, _)| {
            h.reverse();
            hex::encode(h)
        })
    }
}

/// Header fields a share may be tweaked with (otherwise the job's).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tweak {
    /// Header time (default: the tip's minimum).
    pub ntime: Option<u32>,
    /// Header version (default: the job's).
    pub version: Option<u32>,
}

/// A share found in process.
#[derive(Debug, Clone)]
pub struct MinedShare {
    /// What goes on the wire (the sequence number is set at submission).
    pub share: SubmitSharesExtendedOwned,
    /// Its header hash, display order.
    pub hash: String,
    /// Previous block hash it commits to, display order.
    pub tip: String,
    /// The whole extranonce (prefix + rolled part), for comparing with records.
    pub extranonce: Vec<u8>,
}

/// The pool's answer to a share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareAnswer {
    /// `SubmitShares.Success`.
    Accepted,
    /// `SubmitShares.Error` with its code.
    Rejected(String),
}

/// An SV2 client that mines.
pub struct Sv2Miner {
    client: Sv2Client,
    /// Channels by id.
    pub channels: BTreeMap<u32, Channel>,
    answers: BTreeMap<(u32, u32), ShareAnswer>,
    next_request: u32,
    next_seq: u32,
    ehash: bool,
}

fn s0255(s: &str) -> anyhow::Result<Str0255Owned> {
    Str0255Owned::try_from(s.to_string()).map_err(|e| anyhow!("{e:?}"))
}

impl Sv2Miner {
    /// Connect (Noise NX against `authority`), `SetupConnection` with version rolling, and
    /// negotiate the ehash extension if `ehash`.
    pub async fn connect(addr: &str, authority: &str, ehash: bool) -> anyhow::Result<Self> {
        let mut client = Sv2Client::connect(addr, authority).await?;
        client
            .send(crate::sv2_client::setup_connection_as(
                0b100,
                "hashpool-harness",
                "sv2-miner",
                "sv2-miner",
            )?)
            .await?;
        match client.recv(scaled(ANSWER_TIMEOUT)).await? {
            AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionSuccess(_)) => {}
            other => bail!("SetupConnection answered with {other:?}"),
        }
        if ehash {
            client
                .send(AnyMessageOwned::Extensions(
                    ExtensionsOwned::ExtensionsNegotiation(
                        ExtensionsNegotiationOwned::RequestExtensions(RequestExtensionsOwned {
                            request_id: 1,
                            requested_extensions: Seq064KOwned::new(vec![EHASH_EXTENSION_TYPE])
                                .map_err(|e| anyhow!("{e:?}"))?,
                        }),
                    ),
                ))
                .await?;
            match client.recv(scaled(ANSWER_TIMEOUT)).await? {
                AnyMessageOwned::Extensions(ExtensionsOwned::ExtensionsNegotiation(
                    ExtensionsNegotiationOwned::RequestExtensionsSuccess(s),
                )) if s
                    .supported_extensions
                    .clone()
                    .into_inner()
                    .contains(&EHASH_EXTENSION_TYPE) => {}
                other => bail!("the pool did not agree to the ehash extension: {other:?}"),
            }
        }
        Ok(Self {
            client,
            channels: BTreeMap::new(),
            answers: BTreeMap::new(),
            next_request: 1,
            next_seq: 1,
            ehash,
        })
    }

    /// Open an extended channel (with `locking` in the ehash TLV if given) and wait until it
    /// has an active job.
    pub async fn open_channel(&mut self, locking: Option<LockingPubkey>) -> anyhow::Result<u32> {
        let request_id = self.next_request;
        self.next_request += 1;
        let open = MiningOwned::OpenExtendedMiningChannel(OpenExtendedMiningChannelOwned {
            request_id,
            user_identity: s0255("sv2-miner")?,
            nominal_hash_rate: 1.0,
            max_target: U256Owned::from([0xff; 32]),
            min_extranonce_size: 8,
        });
        let frame = match locking {
            Some(key) => {
                anyhow::ensure!(self.ehash, "connect with ehash to send a locking key");
                let bytes = TlvList::from_slice(&[Tlv::new(
                    EHASH_EXTENSION_TYPE,
                    LOCKING_PUBKEY_FIELD,
                    key.as_bytes().to_vec(),
                )])
                .map_err(|e| anyhow!("tlv: {e:?}"))?
                .build_frame_bytes_with_tlvs(open)
                .map_err(|e| anyhow!("tlv frame: {e:?}"))?;
                OutboundFrame::Raw(
                    SerializedFrame::from_bytes(bytes).map_err(|e| anyhow!("frame: {e:?}"))?,
                )
            }
            None => OutboundFrame::from_message(AnyMessageOwned::Mining(open))
                .map_err(|e| anyhow!("encode: {e:?}"))?,
        };
        self.client.send_frame(frame).await?;
        let deadline = Instant::now() + scaled(ANSWER_TIMEOUT);
        let mut opened: Option<u32> = None;
        loop {
            if let Some(id) = opened {
                if self.channels.get(&id).is_some_and(|c| c.active.is_some()) {
                    return Ok(id);
                }
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .context("no channel with an active job within the answer timeout")?;
            match self.client.recv(left).await? {
                AnyMessageOwned::Mining(MiningOwned::OpenExtendedMiningChannelSuccess(s))
                    if s.request_id == request_id =>
                {
                    opened = Some(s.channel_id);
                    self.channels.insert(
                        s.channel_id,
                        Channel {
                            channel_id: s.channel_id,
                            extranonce_prefix: s.extranonce_prefix.as_bytes().to_vec(),
                            extranonce_size: usize::from(s.extranonce_size),
                            target: s.target.to_array(),
                            jobs: BTreeMap::new(),
                            active: None,
                            tip: None,
                        },
                    );
                }
                AnyMessageOwned::Mining(MiningOwned::OpenMiningChannelError(e)) => bail!(
                    "channel refused: {}",
                    String::from_utf8_lossy(e.error_code.as_bytes())
                ),
                other => self.apply(other),
            }
        }
    }

    /// Apply one message from the pool to the client's state.
    fn apply(&mut self, msg: AnyMessageOwned) {
        let AnyMessageOwned::Mining(m) = msg else {
            return;
        };
        match m {
            MiningOwned::NewExtendedMiningJob(j) => {
                if let Some(c) = self.channels.get_mut(&j.channel_id) {
                    let future = j.is_future();
                    c.jobs.insert(
                        j.job_id,
                        Job {
                            job_id: j.job_id,
                            version: j.version,
                            coinbase_prefix: j.coinbase_tx_prefix.as_ref().to_vec(),
                            coinbase_suffix: j.coinbase_tx_suffix.as_ref().to_vec(),
                            merkle_path: j
                                .merkle_path
                                .into_inner()
                                .into_iter()
                                .map(|h| h.to_array())
                                .collect(),
                            future,
                        },
                    );
                    if !future && c.tip.is_some() {
                        c.active = Some(j.job_id);
                    }
                }
            }
            MiningOwned::SetNewPrevHash(p) => {
                if let Some(c) = self.channels.get_mut(&p.channel_id) {
                    c.tip = Some((p.prev_hash.to_array(), p.min_ntime, p.nbits));
                    if let Some(job) = c.jobs.get_mut(&p.job_id) {
                        job.future = false;
                    }
                    c.jobs.retain(|id, j| *id == p.job_id || j.future);
                    c.active = Some(p.job_id);
                }
            }
            MiningOwned::SetTarget(t) => {
                if let Some(c) = self.channels.get_mut(&t.channel_id) {
                    c.target = t.maximum_target.to_array();
                }
            }
            MiningOwned::SubmitSharesSuccess(s) => {
                self.answers.insert(
                    (s.channel_id, s.last_sequence_number),
                    ShareAnswer::Accepted,
                );
            }
            MiningOwned::SubmitSharesError(e) => {
                self.answers.insert(
                    (e.channel_id, e.sequence_number),
                    ShareAnswer::Rejected(String::from_utf8_lossy(e.error_code.as_bytes()).into()),
                );
            }
            _ => {}
        }
    }

    /// Read and apply messages for `window` (to catch up on jobs).
    pub async fn pump(&mut self, window: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + window;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.client.recv(left).await {
                Ok(m) => self.apply(m),
                Err(e) if e.to_string().starts_with("no message") => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Find a share on `channel_id`'s active job that meets the channel target, with the
    /// header tweaked as asked. Hashing runs on a blocking thread.
    pub async fn mine(&self, channel_id: u32, tweak: Tweak) -> anyhow::Result<MinedShare> {
        let c = self
            .channels
            .get(&channel_id)
            .with_context(|| format!("no channel {channel_id}"))?
            .clone();
        let job = c
            .active
            .and_then(|id| c.jobs.get(&id))
            .context("the channel has no active job")?
            .clone();
        let (prev, min_ntime, nbits) = c.tip.context("the channel has no tip")?;
        let tip = c.tip_display().unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let ntime = tweak.ntime.unwrap_or(min_ntime);
            let version = tweak.version.unwrap_or(job.version);
            let target = bitcoin::Target::from_le_bytes(c.target);
            // A random start so two searches do not find the same share.
            let mut rolled = vec![0u8; c.extranonce_size];
            let seed: u64 = rand::random();
            for (i, b) in seed.to_le_bytes().iter().enumerate().take(rolled.len()) {
                rolled[i] = *b;
            }
            for counter in 0u64.. {
                let n = 8.min(rolled.len());
                rolled[..n].copy_from_slice(&(seed ^ counter).to_le_bytes()[..n]);
                let mut extranonce = c.extranonce_prefix.clone();
                extranonce.extend_from_slice(&rolled);
                let mut header = header(&job, &extranonce, (prev, nbits), version, ntime, 0);
                for nonce in 0..=u32::MAX {
                    header.nonce = nonce;
                    let hash = header.block_hash();
                    if target.is_met_by(hash) {
                        return Ok(MinedShare {
                            share: SubmitSharesExtendedOwned {
                                channel_id,
                                sequence_number: 0,
                                job_id: job.job_id,
                                nonce,
                                ntime,
                                version,
                                extranonce: B032Owned::try_from(rolled.clone())
                                    .map_err(|e| anyhow!("extranonce: {e:?}"))?,
                            },
                            hash: hash.to_string(),
                            tip,
                            extranonce,
                        });
                    }
                    if nonce == 1 << 24 {
                        break; // next extranonce
                    }
                }
            }
            bail!("no share found")
        })
        .await?
    }

    /// The header `share` has on its own channel.
    pub fn header_of(&self, share: &MinedShare) -> anyhow::Result<Header> {
        let c = self
            .channels
            .get(&share.share.channel_id)
            .context("the share's channel is gone")?;
        let job = c
            .jobs
            .get(&share.share.job_id)
            .context("the share's job is gone")?;
        let (prev, _, nbits) = c.tip.context("the channel has no tip")?;
        Ok(header(
            job,
            &share.extranonce,
            (prev, nbits),
            share.share.version,
            share.share.ntime,
            share.share.nonce,
        ))
    }

    /// The header hash (display order) `share`'s fields give on `channel_id`'s active job:
    /// that channel's extranonce prefix with the share's rolled part, version, time, nonce.
    pub fn hash_on(&self, channel_id: u32, share: &MinedShare) -> anyhow::Result<String> {
        let c = self
            .channels
            .get(&channel_id)
            .with_context(|| format!("no channel {channel_id}"))?;
        let job = c
            .active
            .and_then(|id| c.jobs.get(&id))
            .context("the channel has no active job")?;
        let (prev, _, nbits) = c.tip.context("the channel has no tip")?;
        let mut extranonce = c.extranonce_prefix.clone();
        extranonce.extend_from_slice(share.share.extranonce.as_ref());
        Ok(header(
            job,
            &extranonce,
            (prev, nbits),
            share.share.version,
            share.share.ntime,
            share.share.nonce,
        )
        .block_hash()
        .to_string())
    }

    /// Submit `share` (on its own channel, or on `channel_id` if given: a replay) and wait for
    /// the pool's answer.
    pub async fn submit(
        &mut self,
        share: &MinedShare,
        channel_id: Option<u32>,
    ) -> anyhow::Result<ShareAnswer> {
        let mut s = share.share.clone();
        if let Some(id) = channel_id {
            let c = self
                .channels
                .get(&id)
                .with_context(|| format!("no channel {id}"))?;
            s.channel_id = id;
            s.job_id = c.active.context("the channel has no active job")?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        s.sequence_number = seq;
        let key = (s.channel_id, seq);
        self.client
            .send(AnyMessageOwned::Mining(MiningOwned::SubmitSharesExtended(
                s,
            )))
            .await?;
        let deadline = Instant::now() + scaled(ANSWER_TIMEOUT);
        loop {
            if let Some(a) = self.answers.remove(&key) {
                return Ok(a);
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .with_context(|| format!("no answer to share {} within the timeout", share.hash))?;
            let m = self.client.recv(left).await?;
            self.apply(m);
        }
    }
}

/// The header of a share on `job` with this whole extranonce, on tip (prev hash in internal
/// order, nbits).
pub fn header(
    job: &Job,
    extranonce: &[u8],
    tip: ([u8; 32], u32),
    version: u32,
    ntime: u32,
    nonce: u32,
) -> Header {
    Header {
        version: Version::from_consensus(version as i32),
        prev_blockhash: BlockHash::from_byte_array(tip.0),
        merkle_root: TxMerkleNode::from_byte_array(merkle_root(job, extranonce)),
        time: ntime,
        bits: CompactTarget::from_consensus(tip.1),
        nonce,
    }
}

/// Merkle root of `job` with this whole extranonce.
pub fn merkle_root(job: &Job, extranonce: &[u8]) -> [u8; 32] {
    let mut coinbase = job.coinbase_prefix.clone();
    coinbase.extend_from_slice(extranonce);
    coinbase.extend_from_slice(&job.coinbase_suffix);
    let mut acc = sha256d::Hash::hash(&coinbase).to_byte_array();
    for sibling in &job.merkle_path {
        let mut buf = [0u8; 64];
        buf[..32].copy_from_slice(&acc);
        buf[32..].copy_from_slice(sibling);
        acc = sha256d::Hash::hash(&buf).to_byte_array();
    }
    acc
}
