//! The SV2 side: the Noise connection to the pool, `SetupConnection`, ehash negotiation, and
//! the `OpenExtendedMiningChannel` frame that carries the operator's locking key as a TLV. One
//! connection serves all of a proxy's miners ([`crate::multiplex`]).

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ehash::{LockingPubkey, EHASH_EXTENSION_TYPE, LOCKING_PUBKEY_FIELD};
use stratum_apps::key_utils::Secp256k1PublicKey;
use stratum_apps::network_helpers::{connect_with_noise, Error as NetError};
use stratum_apps::stratum_core::binary_sv2::{Seq064KOwned, Str0255Owned, U256Owned};
use stratum_apps::stratum_core::codec_sv2::SerializedFrame;
use stratum_apps::stratum_core::common_messages_sv2::{Protocol, SetupConnectionOwned};
use stratum_apps::stratum_core::extensions_sv2::RequestExtensionsOwned;
use stratum_apps::stratum_core::mining_sv2::{
    OpenExtendedMiningChannelOwned, SubmitSharesExtendedOwned,
};
use stratum_apps::stratum_core::parsers_sv2::{
    AnyMessage, AnyMessageOwned, CommonMessagesOwned, ExtensionsNegotiationOwned, ExtensionsOwned,
    MiningOwned, Tlv, TlvList,
};
use stratum_apps::utils::types::OutboundFrame;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub use crate::share_window::{ShareSent, ShareSlots, ShareWindow};

/// An open extended channel.
#[derive(Debug, Clone)]
pub struct ChannelInfo {
    /// Channel id.
    pub channel_id: u32,
    /// SV1 extranonce1.
    pub extranonce_prefix: Vec<u8>,
    /// SV1 extranonce2 size.
    pub extranonce_size: usize,
    /// Initial target (little-endian).
    pub target: [u8; 32],
    /// Whether the pool agreed to ehash (the locking key went through).
    pub ehash: bool,
}

/// One miner's channel on the proxy's pool connection. Dropping it closes the channel.
pub struct Upstream {
    /// Messages from the pool for this channel (closed when the connection ends).
    pub inbound: mpsc::Receiver<MiningOwned>,
    pub(crate) outbound: mpsc::Sender<OutboundFrame>,
    /// This channel's shares waiting for the pool's answer, counted in its connection's window.
    pub(crate) shares: ShareSlots,
    /// The channel.
    pub info: ChannelInfo,
    /// Sends `CloseChannel` and forgets the route when dropped.
    pub(crate) _guard: crate::multiplex::ChannelGuard,
}

impl Upstream {
    /// Send a mining message; `false` if the connection is gone.
    pub fn send(&self, msg: MiningOwned) -> bool {
        match OutboundFrame::from_message(AnyMessageOwned::Mining(msg)) {
            Ok(frame) => self.outbound.try_send(frame).is_ok(),
            Err(_) => false,
        }
    }

    /// Send a share, unless the connection's window of shares waiting for the pool's answer
    /// is full (then nothing is sent). Each share sent is answered with [`Self::answered`].
    pub fn send_share(&self, share: SubmitSharesExtendedOwned) -> ShareSent {
        if !self.shares.take() {
            return ShareSent::Busy;
        }
        if self.send(MiningOwned::SubmitSharesExtended(share)) {
            ShareSent::Sent
        } else {
            self.shares.give_back(1);
            ShareSent::Gone
        }
    }

    /// `n` shares of this channel were answered (or given up).
    pub fn answered(&self, n: usize) {
        self.shares.give_back(n);
    }
}

/// What to open.
#[derive(Debug, Clone)]
pub struct OpenParams {
    /// Pool address.
    pub address: String,
    /// Pool authority key.
    pub authority: Secp256k1PublicKey,
    /// Operator's locking key.
    pub locking_pubkey: Option<LockingPubkey>,
    /// Announced hashrate.
    pub nominal_hashrate: f32,
    /// Easiest target the miner takes (little-endian; all 0xff: any), from its
    /// `mining.suggest_difficulty`.
    pub max_target: [u8; 32],
    /// Rollable extranonce bytes wanted.
    pub min_extranonce_size: u16,
    /// `user_identity` of the channel.
    pub user_identity: String,
    /// Ask for work selection (the proxy declares its own templates).
    pub work_selection: bool,
    /// Time allowed for TCP connect, Noise handshake and channel opening together.
    pub open_timeout: Duration,
}

/// The pool refused this proxy (`SetupConnection` or the channel refused), or the endpoint is
/// not the pool the authority key names (the Noise handshake failed): retrying unchanged will
/// not help, so the miners waiting for work are told with an SV1 error.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// `OpenMiningChannelError` codes that say "not now" rather than "never": the proxy retries.
const TRANSIENT_CHANNEL_ERRORS: &[&str] = &[
    "no-template-yet",
    "internal-error",
    "min-extranonce-size-too-large",
    "extranonce-space-exhausted",
];

fn str0255(s: &str) -> anyhow::Result<Str0255Owned> {
    Str0255Owned::try_from(s.to_string()).map_err(|e| anyhow!("string too long: {e:?}"))
}

/// A set-up connection to the pool: decoded messages in, frames out.
pub struct Connected {
    /// Every message from the pool, in order (closed when the connection ends).
    pub raw_in: mpsc::Receiver<AnyMessageOwned>,
    /// Frames to the pool.
    pub out: mpsc::Sender<OutboundFrame>,
    /// The pool agreed to the ehash extension.
    pub ehash: bool,
}

/// TCP connect, Noise handshake, `SetupConnection` and (with a locking key) the ehash
/// extension negotiation.
pub async fn connect(p: &OpenParams) -> anyhow::Result<Connected> {
    let tcp = TcpStream::connect(&p.address)
        .await
        .with_context(|| format!("cannot connect to the pool at {}", p.address))?;
    tcp.set_nodelay(true)?;
    let stream = connect_with_noise(tcp, Some(p.authority))
        .await
        .map_err(|e| match e {
            // The pool's certificate did not verify against the configured key, or what came
            // back was no Noise handshake: retrying will not change that.
            NetError::CodecError(_) | NetError::HandshakeRemoteInvalidMessage => {
                anyhow::Error::new(Refused(format!(
                    "noise handshake with {} failed: its certificate does not verify against \
                     pool_authority_public_key (wrong authority key?): {e:?}",
                    p.address
                )))
            }
            // Closed or timed out (a pool at its connection limit, restarting, or slow).
            e => anyhow!("noise handshake with {} did not finish: {e:?}", p.address),
        })?;
    let (mut reader, mut writer) = stream.into_split();
    let (in_tx, mut raw_in) = mpsc::channel::<AnyMessageOwned>(1024);
    tokio::spawn(async move {
        loop {
            let mut frame: SerializedFrame = match reader.read_frame().await {
                Ok(f) => f,
                Err(_) => return,
            };
            let header = frame.header();
            let Ok(msg) = AnyMessage::try_from((header, frame.payload())) else {
                tracing::warn!(
                    "undecodable message {:#04x} from the pool: closing",
                    header.msg_type()
                );
                return;
            };
            if in_tx.send(msg.into_owned()).await.is_err() {
                return;
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::channel::<OutboundFrame>(4096);
    tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if writer.write_frame(f).await.is_err() {
                return;
            }
        }
    });
    let send = |m: AnyMessageOwned| -> anyhow::Result<()> {
        let f = OutboundFrame::from_message(m).map_err(|e| anyhow!("encode: {e:?}"))?;
        out_tx
            .try_send(f)
            .map_err(|_| anyhow!("pool connection closed"))
    };

    send(AnyMessageOwned::Common(
        CommonMessagesOwned::SetupConnection(SetupConnectionOwned {
            protocol: Protocol::MiningProtocol,
            min_version: 2,
            max_version: 2,
            // Version rolling, and work selection when the proxy declares its own templates.
            flags: 0b100 | if p.work_selection { 0b10 } else { 0 },
            endpoint_host: str0255(p.address.split(':').next().unwrap_or_default())?,
            endpoint_port: p
                .address
                .rsplit(':')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            vendor: str0255("hashpool-harness")?,
            hardware_version: str0255("proxy")?,
            firmware: str0255(env!("CARGO_PKG_VERSION"))?,
            device_id: str0255("hashpool-proxy")?,
        }),
    ))?;
    match raw_in.recv().await {
        Some(AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionSuccess(_))) => {}
        Some(AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionError(e))) => {
            return Err(Refused(format!(
                "pool refused SetupConnection: {}",
                String::from_utf8_lossy(e.error_code.as_bytes())
            ))
            .into())
        }
        other => bail!("unexpected answer to SetupConnection: {other:?}"),
    }

    let mut ehash = false;
    if p.locking_pubkey.is_some() {
        send(AnyMessageOwned::Extensions(
            ExtensionsOwned::ExtensionsNegotiation(ExtensionsNegotiationOwned::RequestExtensions(
                RequestExtensionsOwned {
                    request_id: 1,
                    requested_extensions: Seq064KOwned::new(vec![EHASH_EXTENSION_TYPE])
                        .map_err(|e| anyhow!("{e:?}"))?,
                },
            )),
        ))?;
        match raw_in.recv().await {
            Some(AnyMessageOwned::Extensions(ExtensionsOwned::ExtensionsNegotiation(
                ExtensionsNegotiationOwned::RequestExtensionsSuccess(s),
            ))) => {
                ehash = s
                    .supported_extensions
                    .into_inner()
                    .contains(&EHASH_EXTENSION_TYPE)
            }
            Some(AnyMessageOwned::Extensions(_)) => {}
            other => bail!("unexpected answer to RequestExtensions: {other:?}"),
        }
        if !ehash {
            tracing::warn!(
                "the pool at {} does not support the ehash extension: shares earn no ehash",
                p.address
            );
        }
    }

    Ok(Connected {
        raw_in,
        out: out_tx,
        ehash,
    })
}

/// The `OpenExtendedMiningChannel` frame for one miner, with the locking key as a TLV when the
/// pool agreed to ehash.
pub fn open_frame(p: &OpenParams, request_id: u32, ehash: bool) -> anyhow::Result<OutboundFrame> {
    let open = MiningOwned::OpenExtendedMiningChannel(OpenExtendedMiningChannelOwned {
        request_id,
        user_identity: str0255(&p.user_identity)?,
        nominal_hash_rate: p.nominal_hashrate,
        max_target: U256Owned::from(p.max_target),
        min_extranonce_size: p.min_extranonce_size,
    });
    Ok(match (ehash, p.locking_pubkey) {
        (true, Some(key)) => {
            let tlvs = TlvList::from_slice(&[Tlv::new(
                EHASH_EXTENSION_TYPE,
                LOCKING_PUBKEY_FIELD,
                key.as_bytes().to_vec(),
            )])
            .map_err(|e| anyhow!("tlv: {e:?}"))?;
            let bytes = tlvs
                .build_frame_bytes_with_tlvs(open)
                .map_err(|e| anyhow!("tlv frame: {e:?}"))?;
            OutboundFrame::Raw(
                SerializedFrame::from_bytes(bytes).map_err(|e| anyhow!("frame: {e:?}"))?,
            )
        }
        _ => OutboundFrame::from_message(AnyMessageOwned::Mining(open))
            .map_err(|e| anyhow!("encode: {e:?}"))?,
    })
}

/// Map an `OpenMiningChannelError` code: "not now" codes are retried, the rest are refusals.
pub fn channel_refusal(code: &str) -> anyhow::Error {
    if TRANSIENT_CHANNEL_ERRORS.contains(&code) {
        anyhow!("pool could not open the channel now: {code}")
    } else {
        Refused(format!("pool refused the channel: {code}")).into()
    }
}

/// The TLV the proxy puts on `OpenExtendedMiningChannel`, as SRI's codec serializes it.
pub fn locking_pubkey_tlv_bytes(key: &LockingPubkey) -> anyhow::Result<Vec<u8>> {
    Tlv::new(
        EHASH_EXTENSION_TYPE,
        LOCKING_PUBKEY_FIELD,
        key.as_bytes().to_vec(),
    )
    .encode()
    .map_err(|e| anyhow!("tlv: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sri_tlv_encoding_equals_ehash_wire_format() {
        let key: LockingPubkey =
            "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
                .parse()
                .unwrap();
        assert_eq!(locking_pubkey_tlv_bytes(&key).unwrap(), key.encode_tlv());
    }
}
