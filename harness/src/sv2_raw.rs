//! An SV2 client at the level of Noise frames, for the cases `Sv2Client` (built on SRI's
//! `NoiseTcpStream`) cannot play: it can send a frame's encrypted header and hold its body
//! back, to show whether the pool bounds a frame by its header or reads the body first.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use stratum_apps::stratum_core::codec_sv2::{
    Decoded, Decrypted, Handshake, InitiatorSent, NoiseDecoder, NoiseEncoder,
    TransportDecryptState, TransportEncryptState, ENCRYPTED_SV2_FRAME_HEADER_SIZE,
};
use stratum_apps::stratum_core::noise_sv2::{Initiator, INITIATOR_EXPECTED_HANDSHAKE_MESSAGE_SIZE};
use stratum_apps::stratum_core::parsers_sv2::{AnyMessage, AnyMessageOwned, CommonMessagesOwned};
use stratum_apps::utils::types::OutboundFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A Noise NX session with the pool, frame by frame.
pub struct RawSv2Client {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    decoder: NoiseDecoder,
    decrypt: Option<TransportDecryptState>,
    encoder: NoiseEncoder,
    encrypt: TransportEncryptState,
}

impl std::fmt::Debug for RawSv2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawSv2Client")
    }
}

impl RawSv2Client {
    /// TCP connect and the Noise NX handshake against `authority` (SRI base58 public key).
    pub async fn connect(addr: &str, authority: &str) -> anyhow::Result<Self> {
        let key = crate::sv2_client::authority_key(authority)?;
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let (mut read, mut write) = tcp.into_split();
        let initiator = Initiator::from_raw_k(key.into_bytes()).map_err(|e| anyhow!("{e:?}"))?;
        let (first, handshake) = Handshake::initiator(initiator)
            .step_0()
            .map_err(|e| anyhow!("{e:?}"))?;
        let mut encoder = NoiseEncoder::new();
        let mut decoder = NoiseDecoder::new();
        write
            .write_all(encoder.encode_handshake(first).as_ref())
            .await?;
        let timeout = crate::wait::scaled(Duration::from_secs(5));
        let second = loop {
            let mut buf = vec![0u8; decoder.writable_len()];
            tokio::time::timeout(timeout, read.read_exact(&mut buf))
                .await
                .map_err(|_| anyhow!("no handshake answer within {timeout:?}"))??;
            decoder.writable().copy_from_slice(&buf);
            match decoder.next_handshake_frame::<InitiatorSent>() {
                Ok(Decoded::Frame(frame)) => break frame,
                Ok(Decoded::Incomplete(_)) => continue,
                Err(e) => bail!("handshake answer: {e:?}"),
            }
        };
        let payload: [u8; INITIATOR_EXPECTED_HANDSHAKE_MESSAGE_SIZE] = second
            .payload()
            .try_into()
            .map_err(|_| anyhow!("handshake answer has the wrong size"))?;
        let (encrypt, decrypt) = handshake
            .step_2(payload)
            .map_err(|e| anyhow!("handshake: {e:?}"))?
            .split();
        Ok(Self {
            read,
            write,
            decoder,
            decrypt: Some(decrypt),
            encoder,
            encrypt,
        })
    }

    /// Send one message, whole.
    pub async fn send(&mut self, msg: AnyMessageOwned) -> anyhow::Result<()> {
        let frame = OutboundFrame::from_message(msg).map_err(|e| anyhow!("encode: {e:?}"))?;
        let buf = self
            .encoder
            .encode_transport(frame, &mut self.encrypt)
            .map_err(|e| anyhow!("{e:?}"))?;
        self.write.write_all(buf.as_ref()).await?;
        Ok(())
    }

    /// Send only the encrypted header of a frame whose payload is `len` bytes, and none of
    /// its body.
    pub async fn send_header_of(&mut self, len: usize) -> anyhow::Result<()> {
        let l = u32::try_from(len)?.to_le_bytes();
        anyhow::ensure!(l[3] == 0, "{len} bytes do not fit the 24-bit length");
        let mut bytes = vec![0x00, 0x00, 0x00, l[0], l[1], l[2]];
        bytes.resize(6 + len, 0x41);
        let frame = stratum_apps::stratum_core::codec_sv2::SerializedFrame::from_bytes(bytes)
            .map_err(|e| anyhow!("frame: {e:?}"))?;
        let buf = self
            .encoder
            .encode_transport(OutboundFrame::Raw(frame), &mut self.encrypt)
            .map_err(|e| anyhow!("{e:?}"))?;
        let bytes: &[u8] = buf.as_ref();
        self.write
            .write_all(&bytes[..ENCRYPTED_SV2_FRAME_HEADER_SIZE])
            .await?;
        Ok(())
    }

    /// The next message.
    pub async fn recv(&mut self) -> anyhow::Result<AnyMessageOwned> {
        loop {
            let mut buf = vec![0u8; self.decoder.writable_len()];
            self.read.read_exact(&mut buf).await?;
            self.decoder.writable().copy_from_slice(&buf);
            let state = self.decrypt.take().context("no decryption state")?;
            match self.decoder.next_transport_frame(state) {
                Ok(Decrypted::Frame(mut frame, state)) => {
                    self.decrypt = Some(state);
                    let header = frame.header();
                    return Ok(AnyMessage::try_from((header, frame.payload()))
                        .map_err(|e| anyhow!("decode: {e:?}"))?
                        .into_owned());
                }
                Ok(Decrypted::Incomplete(_, state)) => self.decrypt = Some(state),
                Err(e) => bail!("undecryptable frame: {e:?}"),
            }
        }
    }

    /// `SetupConnection` for mining, answered with success.
    pub async fn setup(&mut self) -> anyhow::Result<()> {
        self.send(crate::sv2_client::setup_connection()?).await?;
        let t = crate::wait::scaled(Duration::from_secs(5));
        match tokio::time::timeout(t, self.recv()).await {
            Ok(Ok(AnyMessageOwned::Common(CommonMessagesOwned::SetupConnectionSuccess(_)))) => {
                Ok(())
            }
            Ok(other) => bail!("SetupConnection answered with {other:?}"),
            Err(_) => bail!("SetupConnection not answered within {t:?}"),
        }
    }

    /// How long until the pool closed the connection (reading and dropping what it sends);
    /// an error if it is still open after `timeout` (scaled by `HASHPOOL_TIMEOUT_SCALE`).
    pub async fn closed_within(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let timeout = crate::wait::scaled(timeout);
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            let left = timeout
                .checked_sub(start.elapsed())
                .ok_or_else(|| anyhow!("still open after {timeout:?}"))?;
            match tokio::time::timeout(left, self.read.read(&mut buf)).await {
                Err(_) => bail!("still open after {timeout:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
                Ok(Ok(_)) => continue,
            }
        }
    }
}
