//! The pool's side of a Noise NX connection, with frames bounded by their header: the encrypted
//! header (22 bytes) is read and decrypted first, and a frame whose declared payload is over
//! the limit is refused before one byte of its body is read or a buffer for it is allocated.
//! (SRI's `NoiseTcpStream` sizes its read buffer from the header and reads the whole frame
//! before the caller can look at it: up to 16 MiB per connection.)

use std::time::Duration;

use stratum_apps::stratum_core::codec_sv2::{
    Decoded, Decrypted, EncodableFrame, Handshake, NoiseDecoder, NoiseEncoder, SerializedFrame,
    TransportDecryptState, TransportEncryptState, ENCRYPTED_SV2_FRAME_HEADER_SIZE,
};
use stratum_apps::stratum_core::noise_sv2::{Responder, AEAD_MAC_LEN, ELLSWIFT_ENCODING_SIZE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Plaintext one Noise chunk carries (a 65,535-byte chunk less its MAC).
const PLAINTEXT_CHUNK: usize = 65_535 - AEAD_MAC_LEN;

/// Why reading a frame failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The peer closed the socket or it failed.
    Closed,
    /// A header declaring this many encrypted payload bytes, over the limit; the body was not
    /// read.
    Oversize(usize),
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
        loop {
            let expected = self.decoder.writable_len();
            // After a header, the decoder asks for the body it declared: refuse it unread.
            if expected > self.max_encrypted.max(ENCRYPTED_SV2_FRAME_HEADER_SIZE) {
                return Err(ReadError::Oversize(expected));
            }
            self.buf.resize(expected, 0);
            self.read
                .read_exact(&mut self.buf)
                .await
                .map_err(|_| ReadError::Closed)?;
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
        self.write
            .write_all(buf.as_ref())
            .await
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

    #[test]
    fn encrypted_length_adds_a_mac_per_chunk() {
        assert_eq!(encrypted_len(0), 0);
        assert_eq!(encrypted_len(1), 17);
        assert_eq!(encrypted_len(PLAINTEXT_CHUNK), 65_535);
        assert_eq!(encrypted_len(PLAINTEXT_CHUNK + 1), 65_535 + 17);
    }
}
