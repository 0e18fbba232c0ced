//! The pool's side of a Noise NX connection, with frames bounded as they are read. The encrypted
//! header (22 bytes) is read and decrypted first; the body is then read one Noise chunk (at
//! most 65,535 bytes) at a time, and a frame is refused as soon as what its header asks for
//! is over the limit: before any of its body is read when the limit is below one chunk (the
//! mining port's 16 KiB), else once the body read so far passes the limit, so a connection
//! never holds more than the limit plus one chunk. (SRI's `NoiseTcpStream` reads every frame
//! whole, up to 16 MiB, before its caller can look at the header.) Writes time out.

use std::time::Duration;

use stratum_apps::stratum_core::codec_sv2::{
    Decoded, Decrypted, EncodableFrame, Handshake, NoiseDecoder, NoiseEncoder, SerializedFrame,
    TransportDecryptState, TransportEncryptState,
};
use stratum_apps::stratum_core::noise_sv2::{Responder, AEAD_MAC_LEN, ELLSWIFT_ENCODING_SIZE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Plaintext one Noise chunk carries (a 65,535-byte chunk less its MAC).
const PLAINTEXT_CHUNK: usize = 65_535 - AEAD_MAC_LEN;
/// Longest one frame write may take: a client that does not read is let go.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why reading a frame failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The peer closed the socket or it failed.
    Closed,
    /// A frame over the limit: the encrypted bytes its header or body asked for so far (the
    /// codec asks one chunk at a time, so this is at most the limit plus one chunk).
    Oversize(usize),
    /// A write did not finish within [`WRITE_TIMEOUT`].
    WriteTimeout,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// Bytes that do not decrypt or decode.
    Codec(String),
}

/// Encrypted bytes a payload of `plaintext` bytes takes on the wire (a MAC per chunk).
pub fn encrypted_len(plaintext: usize) -> usize {
    plaintext + plaintext.div_ceil(PLAINTEXT_CHUNK) * AEAD_MAC_LEN
}

/// Reads frames of at most `max_payload` plaintext bytes.
pub struct FrameReader {
    read: OwnedReadHalf,
    decoder: NoiseDecoder,
    state: Option<TransportDecryptState>,
    buf: Vec<u8>,
    max_encrypted: usize,
}

/// Writes frames.
pub struct FrameWriter {
    write: OwnedWriteHalf,
    encoder: NoiseEncoder,
    state: TransportEncryptState,
}

/// Answer the client's Noise NX handshake as `responder`; each read of it within `timeout`.
pub async fn accept(
    tcp: TcpStream,
    responder: Box<Responder>,
    timeout: Duration,
    max_payload: usize,
) -> Result<(FrameReader, FrameWriter), ReadError> {
    let (mut read, mut write) = tcp.into_split();
    let mut decoder = NoiseDecoder::new();
    let mut encoder = NoiseEncoder::new();
    let handshake = Handshake::responder(responder);
    let first = loop {
        let mut buf = vec![0u8; decoder.writable_len()];
        tokio::time::timeout(timeout, read.read_exact(&mut buf))
            .await
            .map_err(|_| ReadError::HandshakeTimeout)?
            .map_err(|_| ReadError::Closed)?;
        decoder.writable().copy_from_slice(&buf);
        match decoder.next_handshake_frame::<Responder>() {
            Ok(Decoded::Frame(frame)) => break frame,
            Ok(Decoded::Incomplete(_)) => continue,
            Err(e) => return Err(ReadError::Codec(format!("{e:?}"))),
        }
    };
    let payload: [u8; ELLSWIFT_ENCODING_SIZE] = first
        .payload()
        .try_into()
        .map_err(|_| ReadError::Codec("first handshake message has the wrong size".into()))?;
    let (second, transport) = handshake
        .step_1(payload)
        .map_err(|e| ReadError::Codec(format!("{e:?}")))?;
    write
        .write_all(encoder.encode_handshake(second).as_ref())
        .await
        .map_err(|_| ReadError::Closed)?;
    let (encrypt, decrypt) = transport.split();
    Ok((
        FrameReader {
            read,
            decoder,
            state: Some(decrypt),
            buf: Vec::new(),
            max_encrypted: encrypted_len(max_payload),
        },
        FrameWriter {
            write,
            encoder,
            state: encrypt,
        },
    ))
}

impl FrameReader {
    /// From now on, refuse frames over `max_payload` plaintext bytes.
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.max_encrypted = encrypted_len(max_payload);
    }

    /// The next frame. Not cancellation-safe: read from one task that is never cancelled.
    pub async fn read_frame(&mut self) -> Result<SerializedFrame, ReadError> {
        // Encrypted body bytes of this frame asked for so far (the header is not counted).
        let mut body = 0usize;
        let mut header_read = false;
        loop {
            let expected = self.decoder.writable_len();
            if header_read {
                body += expected;
                // Refused unread: the whole body when it fits one chunk, else this chunk.
                if body > self.max_encrypted {
                    return Err(ReadError::Oversize(body));
                }
            }
            self.buf.resize(expected, 0);
            self.read
                .read_exact(&mut self.buf)
                .await
                .map_err(|_| ReadError::Closed)?;
            header_read = true;
            self.decoder.writable().copy_from_slice(&self.buf);
            let state = self
                .state
                .take()
                .ok_or_else(|| ReadError::Codec("a failed decryption left no state".into()))?;
            match self.decoder.next_transport_frame(state) {
                Ok(Decrypted::Frame(frame, state)) => {
                    self.state = Some(state);
                    return Ok(frame);
                }
                Ok(Decrypted::Incomplete(_, state)) => self.state = Some(state),
                Err(e) => return Err(ReadError::Codec(format!("{e:?}"))),
            }
        }
    }
}

impl FrameWriter {
    /// Encrypt and write one frame.
    pub async fn write_frame<F: EncodableFrame>(&mut self, frame: F) -> Result<(), ReadError> {
        let buf = self
            .encoder
            .encode_transport(frame, &mut self.state)
            .map_err(|e| ReadError::Codec(format!("{e:?}")))?;
        tokio::time::timeout(WRITE_TIMEOUT, self.write.write_all(buf.as_ref()))
            .await
            .map_err(|_| ReadError::WriteTimeout)?
            .map_err(|_| ReadError::Closed)
    }

    /// Close the write side.
    pub async fn shutdown(&mut self) {
        let _ = self.write.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use stratum_apps::key_utils::{Secp256k1PublicKey, Secp256k1SecretKey};
    use stratum_apps::network_helpers::connect_with_noise;
    use stratum_apps::network_helpers::noise_stream::NoiseTcpWriteHalf;
    use stratum_apps::utils::types::OutboundFrame;

    #[test]
    fn encrypted_length_adds_a_mac_per_chunk() {
        assert_eq!(encrypted_len(0), 0);
        assert_eq!(encrypted_len(1), 17);
        assert_eq!(encrypted_len(PLAINTEXT_CHUNK), 65_535);
        assert_eq!(encrypted_len(PLAINTEXT_CHUNK + 1), 65_535 + 17);
    }

    /// A pool side reading with `max` and SRI's client writing to it, over loopback TCP.
    async fn pair(max: usize) -> (FrameReader, NoiseTcpWriteHalf) {
        // SRI's example authority key pair.
        let public =
            Secp256k1PublicKey::from_str("9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72")
                .unwrap();
        let secret =
            Secp256k1SecretKey::from_str("mkDLTBBRxdBv998612qipDYoTK3YUrqLe8uWw7gu3iXbSrn2n")
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connect_with_noise(tcp, Some(public)).await.unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let responder = Responder::from_authority_kp(
            &public.into_bytes(),
            &secret.into_bytes(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let (reader, _writer) = accept(tcp, responder, Duration::from_secs(5), max)
            .await
            .unwrap();
        let (_, write) = client.await.unwrap().into_split();
        (reader, write)
    }

    /// A frame with a `len`-byte payload.
    fn frame(len: usize) -> OutboundFrame {
        let l = (len as u32).to_le_bytes();
        let mut bytes = vec![0x00, 0x00, 0x00, l[0], l[1], l[2]];
        bytes.resize(6 + len, 0x41);
        OutboundFrame::Raw(SerializedFrame::from_bytes(bytes).unwrap())
    }

    async fn read_after_writing(max: usize, len: usize) -> Result<usize, ReadError> {
        let (mut reader, mut write) = pair(max).await;
        // The writer may be cut off mid-frame by a refusing reader: its result does not matter.
        let writer = tokio::spawn(async move { write.write_frame(frame(len)).await });
        let got = reader.read_frame().await;
        writer.abort();
        got.map(|mut f| f.payload().len())
    }

    #[tokio::test]
    async fn frames_up_to_the_limit_pass_and_one_byte_more_is_refused() {
        for max in [16_384, 100_000, 200_000] {
            assert_eq!(read_after_writing(max, max).await, Ok(max), "max {max}");
            assert!(
                matches!(
                    read_after_writing(max, max + 1).await,
                    Err(ReadError::Oversize(_))
                ),
                "max {max}, one byte more"
            );
        }
    }

    #[tokio::test]
    async fn a_large_declared_frame_is_refused_within_the_limit_plus_one_chunk() {
        // Under one chunk: refused before any body byte is asked for.
        let got = read_after_writing(16_384, 1_000_000).await;
        assert_eq!(got, Err(ReadError::Oversize(65_535)));
        // Over one chunk: refused once the body asked for passes the limit.
        let Err(ReadError::Oversize(asked)) = read_after_writing(100_000, 10_000_000).await else {
            panic!("a 10 MB frame passed a 100 kB limit");
        };
        assert!(asked > encrypted_len(100_000) && asked <= encrypted_len(100_000) + 65_535);
    }
}
