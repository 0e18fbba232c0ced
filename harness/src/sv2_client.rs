//! A misbehaving Stratum V2 client for fault scenarios: it speaks real Noise NX over TCP to the
//! pool, then sends garbage frames or floods shares, and reports when the pool cuts it off.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use stratum_apps::key_utils::Secp256k1PublicKey;
use stratum_apps::network_helpers::connect_with_noise;
use stratum_apps::network_helpers::noise_stream::{NoiseTcpReadHalf, NoiseTcpWriteHalf};
use stratum_apps::stratum_core::binary_sv2::{B032Owned, Str0255Owned, U256Owned};
use stratum_apps::stratum_core::codec_sv2::SerializedFrame;
use stratum_apps::stratum_core::common_messages_sv2::{Protocol, SetupConnectionOwned};
use stratum_apps::stratum_core::mining_sv2::{
    OpenExtendedMiningChannelOwned, SubmitSharesExtendedOwned,
};
use stratum_apps::stratum_core::parsers_sv2::{
    AnyMessage, AnyMessageOwned, CommonMessagesOwned, MiningOwned,
};
use stratum_apps::utils::types::OutboundFrame;
use tokio::net::TcpStream;

/// An SV2 client connected to the pool.
pub struct Sv2Client {
    reader: NoiseTcpReadHalf,
    writer: NoiseTcpWriteHalf,
}

impl std::fmt::Debug for Sv2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sv2Client")
    }
}

/// A channel the client opened, with its first job.
#[derive(Debug, Clone)]
pub struct OpenChannel {
    /// Channel id.
    pub channel_id: u32,
    /// A job id to submit on.
    pub job_id: u32,
    /// Rollable extranonce size.
    pub extranonce_size: usize,
    /// Minimum ntime of the job.
    pub ntime: u32,
    /// Version of the job.
    pub version: u32,
}

fn s0255(s: &str) -> anyhow::Result<Str0255Owned> {
    Str0255Owned::try_from(s.to_string()).map_err(|e| anyhow!("{e:?}"))
}

/// The pool's authority key, from SRI's base58 form.
pub(crate) fn authority_key(authority: &str) -> anyhow::Result<Secp256k1PublicKey> {
    Secp256k1PublicKey::from_str(authority).map_err(|e| anyhow!("authority key: {e:?}"))
}

/// `SetupConnection` for the mining protocol, version 2, no flags.
pub fn setup_connection() -> anyhow::Result<AnyMessageOwned> {
    setup_connection_as(0, "harness", "sv2-test-client", "flood")
}

/// `SetupConnection` for the mining protocol, version 2, with `flags` and these names.
pub fn setup_connection_as(
    flags: u32,
    vendor: &str,
    hardware: &str,
    device: &str,
) -> anyhow::Result<AnyMessageOwned> {
    Ok(AnyMessageOwned::Common(
        CommonMessagesOwned::SetupConnection(SetupConnectionOwned {
            protocol: Protocol::MiningProtocol,
            min_version: 2,
            max_version: 2,
            flags,
            endpoint_host: s0255("127.0.0.1")?,
            endpoint_port: 0,
            vendor: s0255(vendor)?,
            hardware_version: s0255(hardware)?,
            firmware: s0255("0")?,
            device_id: s0255(device)?,
        }),
    ))
}

impl Sv2Client {
    /// TCP connect and Noise handshake against `authority` (SRI base58 public key).
    pub async fn connect(addr: &str, authority: &str) -> anyhow::Result<Self> {
        let key = authority_key(authority)?;
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let stream = connect_with_noise(tcp, Some(key))
            .await
            .map_err(|e| anyhow!("noise handshake: {e:?}"))?;
        let (reader, writer) = stream.into_split();
        Ok(Self { reader, writer })
    }

    /// Like [`connect`](Self::connect), from local address `source` (any `127.x.y.z` works on
    /// Linux loopback, so a test can play many sources).
    pub async fn connect_from(
        addr: &str,
        authority: &str,
        source: std::net::Ipv4Addr,
    ) -> anyhow::Result<Self> {
        let key = authority_key(authority)?;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        let tcp = socket
            .connect(addr.parse()?)
            .await
            .with_context(|| format!("connect {addr} from {source}"))?;
        let stream = connect_with_noise(tcp, Some(key))
            .await
            .map_err(|e| anyhow!("noise handshake: {e:?}"))?;
        let (reader, writer) = stream.into_split();
        Ok(Self { reader, writer })
    }

    /// Send a message.
    pub async fn send(&mut self, msg: AnyMessageOwned) -> anyhow::Result<()> {
        let frame = OutboundFrame::from_message(msg).map_err(|e| anyhow!("encode: {e:?}"))?;
        self.writer
            .write_frame(frame)
            .await
            .map_err(|e| anyhow!("write: {e:?}"))
    }

    /// Send an already encoded frame (a message with TLVs, for instance).
    pub async fn send_frame(&mut self, frame: OutboundFrame) -> anyhow::Result<()> {
        self.writer
            .write_frame(frame)
            .await
            .map_err(|e| anyhow!("write: {e:?}"))
    }

    /// Receive one message within `timeout` (scaled by `HASHPOOL_TIMEOUT_SCALE`).
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<AnyMessageOwned> {
        let timeout = crate::wait::scaled(timeout);
        let mut frame = tokio::time::timeout(timeout, self.reader.read_frame())
            .await
            .map_err(|_| anyhow!("no message within {timeout:?}"))?
            .map_err(|e| anyhow!("connection closed: {e:?}"))?;
        let header = frame.header();
        Ok(AnyMessage::try_from((header, frame.payload()))
            .map_err(|e| anyhow!("decode: {e:?}"))?
            .into_owned())
    }

    /// `SetupConnection` and an extended channel without ehash; waits for the first job.
    pub async fn open_channel(&mut self) -> anyhow::Result<OpenChannel> {
        self.setup().await?;
        self.open_extended(7).await
    }

    /// `SetupConnection` for the mining protocol; waits for `SetupConnectionSuccess`.
    pub async fn setup(&mut self) -> anyhow::Result<()> {
        self.send(setup_connection()?).await?;
        let t = Duration::from_secs(5);
        match self.recv(t).await? {
            AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionSuccess(_)) => Ok(()),
            other => bail!("SetupConnection answered with {other:?}"),
        }
    }

    /// Open an extended channel without ehash on a set-up connection; waits for its first
    /// job and `SetNewPrevHash`. A refusal is an error naming the SV2 code.
    pub async fn open_extended(&mut self, request_id: u32) -> anyhow::Result<OpenChannel> {
        let t = Duration::from_secs(5);
        self.send(AnyMessageOwned::Mining(
            MiningOwned::OpenExtendedMiningChannel(OpenExtendedMiningChannelOwned {
                request_id,
                user_identity: s0255("sv2-test-client")?,
                nominal_hash_rate: 1.0e6,
                max_target: U256Owned::from([0xff; 32]),
                min_extranonce_size: 8,
            }),
        ))
        .await?;
        let (mut channel_id, mut extranonce_size) = (None, 0);
        let mut job: Option<(u32, u32)> = None;
        let mut ntime = None;
        while channel_id.is_none() || job.is_none() || ntime.is_none() {
            match self.recv(t).await? {
                AnyMessageOwned::Mining(MiningOwned::OpenExtendedMiningChannelSuccess(s)) => {
                    channel_id = Some(s.channel_id);
                    extranonce_size = usize::from(s.extranonce_size);
                }
                AnyMessageOwned::Mining(MiningOwned::NewExtendedMiningJob(j)) => {
                    job = Some((j.job_id, j.version))
                }
                AnyMessageOwned::Mining(MiningOwned::SetNewPrevHash(p)) => {
                    ntime = Some(p.min_ntime)
                }
                AnyMessageOwned::Mining(MiningOwned::OpenMiningChannelError(e)) => {
                    bail!(
                        "channel refused: {}",
                        String::from_utf8_lossy(e.error_code.as_bytes())
                    )
                }
                _ => {}
            }
        }
        let (job_id, version) = job.unwrap_or_default();
        Ok(OpenChannel {
            channel_id: channel_id.unwrap_or_default(),
            job_id,
            extranonce_size,
            ntime: ntime.unwrap_or_default(),
            version,
        })
    }

    /// `CloseChannel` for `channel_id`.
    pub async fn close_channel(&mut self, channel_id: u32) -> anyhow::Result<()> {
        self.send(AnyMessageOwned::Mining(MiningOwned::CloseChannel(
            stratum_apps::stratum_core::mining_sv2::CloseChannelOwned {
                channel_id,
                reason_code: s0255("done")?,
            },
        )))
        .await
    }

    /// A frame with a valid header but a payload that decodes as nothing (encrypted properly).
    pub async fn send_garbage_frame(&mut self) -> anyhow::Result<()> {
        let mut bytes = vec![0x00, 0x00, 0x1b, 0x05, 0x00, 0x00];
        bytes.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0x01]);
        let frame = SerializedFrame::from_bytes(bytes).map_err(|e| anyhow!("frame: {e:?}"))?;
        self.writer
            .write_frame(OutboundFrame::Raw(frame))
            .await
            .map_err(|e| anyhow!("write: {e:?}"))
    }

    /// A well-formed, encrypted frame whose payload is `len` bytes (a SetupConnection that is
    /// far too big).
    pub async fn send_oversize_frame(&mut self, len: usize) -> anyhow::Result<()> {
        let l = u32::try_from(len)?.to_le_bytes();
        let mut bytes = vec![0x00, 0x00, 0x00, l[0], l[1], l[2]];
        bytes.resize(6 + len, 0x41);
        let frame = SerializedFrame::from_bytes(bytes).map_err(|e| anyhow!("frame: {e:?}"))?;
        self.writer
            .write_frame(OutboundFrame::Raw(frame))
            .await
            .map_err(|e| anyhow!("write: {e:?}"))
    }

    /// Submit shares as fast as possible until the pool closes the connection or `max` were
    /// sent; returns how many went out.
    pub async fn flood(&mut self, ch: &OpenChannel, max: u32) -> u32 {
        let Ok(extranonce) = B032Owned::try_from(vec![0u8; ch.extranonce_size]) else {
            return 0;
        };
        let mut sent = 0;
        while sent < max {
            let share = SubmitSharesExtendedOwned {
                channel_id: ch.channel_id,
                sequence_number: sent,
                job_id: ch.job_id,
                nonce: sent,
                ntime: ch.ntime,
                version: ch.version,
                extranonce: extranonce.clone(),
            };
            if self
                .send(AnyMessageOwned::Mining(MiningOwned::SubmitSharesExtended(
                    share,
                )))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// Read until the pool closes the connection; returns how long that took, or an error if
    /// it stayed open for `timeout` (scaled by `HASHPOOL_TIMEOUT_SCALE`).
    pub async fn closed_within(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let timeout = crate::wait::scaled(timeout);
        let start = Instant::now();
        loop {
            let left = timeout
                .checked_sub(start.elapsed())
                .ok_or_else(|| anyhow!("still open after {timeout:?}"))?;
            match tokio::time::timeout(left, self.reader.read_frame()).await {
                Err(_) => bail!("still open after {timeout:?}"),
                Ok(Err(_)) => return Ok(start.elapsed()),
                Ok(Ok(_)) => continue,
            }
        }
    }
}
