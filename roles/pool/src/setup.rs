//! Connection set-up messages: `SetupConnection`, `RequestExtensions`, opening and updating
//! extended channels.

use bitcoin::Target;
use ehash::{LockingPubkey, EHASH_EXTENSION_TYPE, LOCKING_PUBKEY_FIELD};
use stratum_apps::stratum_core::binary_sv2::{B032Owned, Seq064KOwned, Str0255Owned, U256Owned};
use stratum_apps::stratum_core::channels_sv2::extranonce_manager::ExtranonceAllocatorError;
use stratum_apps::stratum_core::channels_sv2::server::extended::ExtendedChannel;
use stratum_apps::stratum_core::common_messages_sv2::{
    has_requires_std_job, has_work_selection, Protocol, SetupConnectionErrorOwned,
    SetupConnectionOwned, SetupConnectionSuccess,
};
use stratum_apps::stratum_core::extensions_sv2::{
    RequestExtensionsOwned, RequestExtensionsSuccessOwned,
};
use stratum_apps::stratum_core::mining_sv2::{
    OpenExtendedMiningChannelOwned, OpenExtendedMiningChannelSuccessOwned,
    OpenMiningChannelErrorOwned, SetTargetOwned, UpdateChannelErrorOwned, UpdateChannelOwned,
};
use stratum_apps::stratum_core::parsers_sv2::{
    AnyMessageOwned, CommonMessagesOwned, ExtensionsNegotiationOwned, ExtensionsOwned, MiningOwned,
    Tlv,
};

use crate::channel::{clamp_target, ChannelState};
use crate::connection::{Close, Connection};
use crate::limits::TokenBucket;

/// SV2 error code when every channel slot of the pool's extranonce space is taken.
pub const ERROR_EXTRANONCE_EXHAUSTED: &str = "extranonce-space-exhausted";

/// SV2 error code for a channel past `limits.max_channels_per_connection` or
/// `limits.max_channels_per_ip`.
pub const ERROR_TOO_MANY_CHANNELS: &str = "too-many-channels";

/// The only Stratum V2 protocol version the pool speaks.
const PROTOCOL_VERSION: u16 = 2;

fn str0255(s: &str) -> Str0255Owned {
    Str0255Owned::try_from(s.to_string())
        .unwrap_or_else(|_| Str0255Owned::try_from(String::new()).expect("empty string fits"))
}

impl Connection {
    pub(crate) fn on_setup(&mut self, m: SetupConnectionOwned) -> Result<(), Close> {
        let refuse = |code: &str| {
            AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionError(
                SetupConnectionErrorOwned {
                    flags: 0,
                    error_code: str0255(code),
                },
            ))
        };
        if self.setup_done {
            return Err(Close::Protocol("second SetupConnection".into()));
        }
        if m.protocol != Protocol::MiningProtocol {
            self.send(refuse("unsupported-protocol"))?;
            return Err(Close::Protocol(format!(
                "protocol {:?} is not served",
                m.protocol
            )));
        }
        if !(m.min_version..=m.max_version).contains(&PROTOCOL_VERSION) {
            self.send(refuse("protocol-version-mismatch"))?;
            return Err(Close::Protocol(format!(
                "versions {}..={}",
                m.min_version, m.max_version
            )));
        }
        if has_requires_std_job(m.flags) {
            self.send(refuse("unsupported-feature-flags"))?;
            return Err(Close::Protocol(
                "standard jobs requested; only extended channels are served".into(),
            ));
        }
        if has_work_selection(m.flags) {
            if self.ctx.config.jd_listen.is_empty() {
                self.send(refuse("unsupported-feature-flags"))?;
                return Err(Close::Protocol(
                    "work selection requested; this pool serves no job declaration (jd_listen)"
                        .into(),
                ));
            }
            self.work_selection = true;
        }
        self.setup_done = true;
        self.send(AnyMessageOwned::Common(
            CommonMessagesOwned::SetupConnectionSuccess(SetupConnectionSuccess {
                used_version: PROTOCOL_VERSION,
                flags: 0,
            }),
        ))
    }

    pub(crate) fn on_request_extensions(&mut self, m: RequestExtensionsOwned) -> Result<(), Close> {
        if !self.setup_done {
            return Err(Close::Protocol(
                "RequestExtensions before SetupConnection".into(),
            ));
        }
        let requested: Vec<u16> = m.requested_extensions.clone().into_inner();
        self.negotiated = requested
            .iter()
            .copied()
            .filter(|e| *e == EHASH_EXTENSION_TYPE)
            .collect();
        let supported = Seq064KOwned::new(self.negotiated.clone())
            .map_err(|e| Close::Protocol(format!("{e:?}")))?;
        tracing::debug!(conn = self.id, ?requested, negotiated = ?self.negotiated, "extensions");
        self.send(AnyMessageOwned::Extensions(
            ExtensionsOwned::ExtensionsNegotiation(
                ExtensionsNegotiationOwned::RequestExtensionsSuccess(
                    RequestExtensionsSuccessOwned {
                        request_id: m.request_id,
                        supported_extensions: supported,
                    },
                ),
            ),
        ))
    }

    pub(crate) fn refuse_standard(&mut self, request_id: u32) -> Result<(), Close> {
        self.send(AnyMessageOwned::Mining(
            MiningOwned::OpenMiningChannelError(OpenMiningChannelErrorOwned {
                request_id,
                error_code: str0255("standard-channels-not-supported"),
            }),
        ))
    }

    pub(crate) fn on_open(
        &mut self,
        m: OpenExtendedMiningChannelOwned,
        tlvs: Vec<Tlv>,
    ) -> Result<(), Close> {
        let request_id = m.request_id;
        match self.open_channel(m, &tlvs) {
            Ok(msgs) => self.send_mining(msgs),
            Err(code) => {
                tracing::info!(conn = self.id, "refused to open a channel: {code}");
                self.send(AnyMessageOwned::Mining(
                    MiningOwned::OpenMiningChannelError(OpenMiningChannelErrorOwned {
                        request_id,
                        error_code: str0255(&code),
                    }),
                ))
            }
        }
    }

    /// Open a channel; `Err` is the SV2 error code.
    fn open_channel(
        &mut self,
        m: OpenExtendedMiningChannelOwned,
        tlvs: &[Tlv],
    ) -> Result<Vec<MiningOwned>, String> {
        let ctx = self.ctx.clone();
        let cap = ctx.config.limits.max_channels_per_connection;
        if self.channels.len() >= cap {
            ctx.metrics
                .refused
                .with_label_values(&["channels-per-connection"])
                .inc();
            return Err(ERROR_TOO_MANY_CHANNELS.into());
        }
        let source_slot = ctx
            .channel_sources
            .acquire(self.source, ctx.config.limits.max_channels_per_ip)
            .ok_or_else(|| {
                ctx.metrics
                    .refused
                    .with_label_values(&["channels-per-ip"])
                    .inc();
                ERROR_TOO_MANY_CHANNELS.to_string()
            })?;
        let locking_pubkey = match tlvs.iter().find(|t| {
            t.r#type.extension_type == EHASH_EXTENSION_TYPE
                && t.r#type.field_type == LOCKING_PUBKEY_FIELD
        }) {
            Some(tlv) => Some(LockingPubkey::from_slice(&tlv.value).map_err(|e| {
                tracing::warn!(conn = self.id, "bad locking pubkey TLV: {e}");
                "invalid-locking-pubkey".to_string()
            })?),
            None => None,
        };
        let record = ctx.templates.borrow().clone().ok_or("no-template-yet")?;
        let (prefix, rollable) = {
            let mut alloc = ctx.allocator.lock().map_err(|_| "internal-error")?;
            let prefix = alloc
                .allocate_extended(usize::from(m.min_extranonce_size))
                .map_err(|e| {
                    tracing::info!(conn = self.id, "extranonce allocation: {e:?}");
                    match e {
                        ExtranonceAllocatorError::CapacityExhausted => {
                            ERROR_EXTRANONCE_EXHAUSTED.to_string()
                        }
                        _ => "min-extranonce-size-too-large".to_string(),
                    }
                })?;
            (prefix, u16::from(alloc.rollable_extranonce_size()))
        };
        let channel_id = ctx
            .next_channel_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let requested = Target::from_le_bytes(m.max_target.to_array());
        let user = String::from_utf8_lossy(m.user_identity.as_bytes()).into_owned();
        let channel = ExtendedChannel::new_for_pool(
            channel_id,
            user.clone(),
            prefix,
            clamp_target(requested, ctx.max_target),
            m.nominal_hash_rate,
            true,
            rollable,
            1,
            ctx.config.shares_per_minute,
            ctx.config.pool_tag.clone(),
            None,
        )
        .map_err(|e| {
            tracing::info!(conn = self.id, "channel refused: {e:?}");
            "invalid-nominal-hashrate".to_string()
        })?;
        let limits = &ctx.config.limits;
        let mut state = ChannelState::new(
            channel,
            locking_pubkey,
            TokenBucket::new(limits.max_shares_per_sec, limits.share_burst),
        )
        .map_err(|e| e.to_string())?;
        let success = OpenExtendedMiningChannelSuccessOwned {
            request_id: m.request_id,
            channel_id,
            target: U256Owned::from(state.channel.get_target().to_le_bytes()),
            extranonce_size: rollable,
            extranonce_prefix: B032Owned::try_from(state.channel.get_extranonce_prefix().to_vec())
                .map_err(|_| "internal-error")?,
            group_channel_id: 0,
        };
        let mut msgs = vec![MiningOwned::OpenExtendedMiningChannelSuccess(success)];
        if !self.work_selection {
            msgs.extend(state.on_template(&record, &ctx.payout).map_err(|e| {
                tracing::error!(conn = self.id, "first job for channel {channel_id}: {e:#}");
                "internal-error".to_string()
            })?);
        }
        tracing::info!(
            conn = self.id,
            channel = channel_id,
            user = %user,
            locking_pubkey = %state.locking_pubkey.map(|k| k.to_string()).unwrap_or_else(|| "none (no ehash)".into()),
            "channel opened"
        );
        state.source_slot = Some(source_slot);
        self.channels.insert(channel_id, state);
        ctx.metrics.channels.inc();
        Ok(msgs)
    }

    pub(crate) fn on_update_channel(&mut self, m: UpdateChannelOwned) -> Result<(), Close> {
        let max = self.ctx.max_target;
        let record = self.ctx.templates.borrow().clone();
        let payout = self.ctx.payout.clone();
        let Some(ch) = self.channels.get_mut(&m.channel_id) else {
            return self.send(AnyMessageOwned::Mining(MiningOwned::UpdateChannelError(
                UpdateChannelErrorOwned {
                    channel_id: m.channel_id,
                    error_code: str0255("invalid-channel-id"),
                },
            )));
        };
        let requested = clamp_target(Target::from_le_bytes(m.maximum_target.to_array()), max);
        if let Err(e) = ch
            .channel
            .update_channel(m.nominal_hash_rate, Some(requested))
        {
            tracing::info!(
                conn = self.id,
                channel = m.channel_id,
                "update refused: {e:?}"
            );
            return self.send(AnyMessageOwned::Mining(MiningOwned::UpdateChannelError(
                UpdateChannelErrorOwned {
                    channel_id: m.channel_id,
                    error_code: str0255("invalid-nominal-hashrate"),
                },
            )));
        }
        let mut msgs = vec![MiningOwned::SetTarget(SetTargetOwned {
            channel_id: m.channel_id,
            maximum_target: U256Owned::from(ch.channel.get_target().to_le_bytes()),
        })];
        if let (Some(record), false) = (record, self.work_selection) {
            msgs.extend(ch.on_template(&record, &payout)?);
        }
        self.send_mining(msgs)
    }
}
