//! The SV2 sniffer: a man in the middle the harness places between a proxy role and the pool.
//! Because the harness holds the pool's authority key pair, the sniffer answers the proxy's
//! Noise handshake as the pool would (the proxy checks the same authority key) and opens its
//! own Noise connection to the pool. Every SV2 frame is decrypted, recorded in order, and
//! re-encrypted on the other side, unchanged.
//!
//! On a step it can delay or blackhole frames, cut every connection, or cut a connection
//! between a share and the pool's answer to it: it lets the share reach the pool, reads the
//! pool's answer, records it without forwarding it and closes both sides. The recorded flows
//! render as stable text ([`render`]) for insta snapshots.

pub mod echo;
pub mod render;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use ehash::tlv::EHASH_EXTENSION_TYPE;
use stratum_apps::key_utils::{Secp256k1PublicKey, Secp256k1SecretKey};
use stratum_apps::network_helpers::connect_with_noise;
use stratum_apps::network_helpers::noise_stream::{NoiseTcpReadHalf, NoiseTcpStream};
use stratum_apps::stratum_core::codec_sv2::SerializedFrame;
use stratum_apps::stratum_core::mining_sv2::MESSAGE_TYPE_OPEN_EXTENDED_MINING_CHANNEL;
use stratum_apps::stratum_core::noise_sv2::Responder;
use stratum_apps::stratum_core::parsers_sv2::{
    parse_message_frame_with_tlvs, AnyMessage, AnyMessageOwned, MiningOwned,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::keys::AuthorityKeys;

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (a proxy role) to the pool.
    ToPool,
    /// From the pool to the client.
    ToClient,
}

/// One frame the sniffer saw.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Connection number, from 1 in accept order.
    pub conn: u64,
    /// Which way it went.
    pub direction: Direction,
    /// When the sniffer read it.
    pub at: Instant,
    /// SV2 message type.
    pub msg_type: u8,
    /// The decoded message (`None` when it did not decode).
    pub message: Option<AnyMessageOwned>,
    /// TLVs behind the message: (extension type, field type, length).
    pub tlvs: Vec<(u16, u8, u16)>,
    /// Whether the sniffer passed it on (false when blackholed or cut before it).
    pub forwarded: bool,
}

/// What the sniffer does to frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relay everything.
    Pass,
    /// Relay every frame after this delay.
    Delay(Duration),
    /// Drop every frame both ways and keep the connections open.
    Blackhole,
    /// Let the next share reach the pool, then cut its connection before the answer.
    CutBeforeNextAck,
}

/// A share whose answer the sniffer kept from the client before cutting the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutShare {
    /// Connection it was on.
    pub conn: u64,
    /// The share as the client sent it: channel, sequence, job, nonce, ntime, version.
    pub channel_id: u32,
    /// Sequence number.
    pub sequence_number: u32,
    /// Nonce.
    pub nonce: u32,
    /// Header time.
    pub ntime: u32,
    /// Header version.
    pub version: u32,
    /// The rolled extranonce.
    pub extranonce: Vec<u8>,
    /// The pool's answer: `None` when it accepted the share, else its error code.
    pub refused: Option<String>,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Captured>>,
    /// Frames are kept in `log` (off for a long run: the log would grow with every share).
    unrecorded: std::sync::atomic::AtomicBool,
    fault: Mutex<Option<Fault>>,
    cut_share: Mutex<Option<CutShare>>,
    connections: Mutex<Vec<CancellationToken>>,
    changed: Notify,
}

impl Shared {
    fn fault(&self) -> Fault {
        self.fault
            .lock()
            .map(|f| f.unwrap_or(Fault::Pass))
            .unwrap_or(Fault::Pass)
    }
    fn push(&self, c: Captured) {
        if self.unrecorded.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut log) = self.log.lock() {
            log.push(c);
        }
        self.changed.notify_waiters();
    }
}

/// A running SV2 sniffer.
pub struct Sv2Sniffer {
    addr: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Sv2Sniffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sv2Sniffer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Sv2Sniffer {
    /// Listen on `listen` and relay to the pool at `pool`, whose authority key pair is `keys`.
    pub async fn start(listen: &str, pool: &str, keys: &AuthorityKeys) -> anyhow::Result<Self> {
        let public = Secp256k1PublicKey::from_str(&keys.public)
            .map_err(|e| anyhow!("authority public key: {e:?}"))?;
        let secret = Secp256k1SecretKey::from_str(&keys.secret)
            .map_err(|e| anyhow!("authority secret key: {e:?}"))?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("SV2 sniffer cannot listen on {listen}"))?;
        let addr = listener.local_addr()?.to_string();
        let shared: Arc<Shared> = Arc::default();
        let pool = pool.to_string();
        let state = shared.clone();
        let task = tokio::spawn(async move {
            let next = AtomicU64::new(1);
            while let Ok((client, _)) = listener.accept().await {
                let conn = next.fetch_add(1, Ordering::SeqCst);
                let cut = CancellationToken::new();
                if let Ok(mut c) = state.connections.lock() {
                    c.retain(|t| !t.is_cancelled());
                    c.push(cut.clone());
                }
                let link = Link {
                    conn,
                    state: state.clone(),
                    cut,
                };
                tokio::spawn(link.run(client, pool.clone(), public, secret));
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// `host:port` clients connect to instead of the pool.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Set what happens to frames from now on.
    pub fn set_fault(&self, fault: Fault) {
        // Forget the last cut share first, so a cut that follows at once is not wiped out.
        if fault == Fault::CutBeforeNextAck {
            if let Ok(mut c) = self.shared.cut_share.lock() {
                *c = None;
            }
        }
        if let Ok(mut f) = self.shared.fault.lock() {
            *f = Some(fault);
        }
    }

    /// Keep recording frames (the default) or not: a soak relays for minutes and looks at no
    /// frame, so it turns recording off and the sniffer's memory stays flat.
    pub fn set_recording(&self, on: bool) {
        self.shared.unrecorded.store(!on, Ordering::Relaxed);
    }

    /// Close every open connection now (both sides).
    pub fn cut_all(&self) {
        if let Ok(c) = self.shared.connections.lock() {
            c.iter().for_each(CancellationToken::cancel);
        }
    }

    /// Everything recorded so far, in the order the sniffer read it.
    pub fn captured(&self) -> Vec<Captured> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Wait until `done` holds for the recorded frames; `what` names it in the error.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Captured]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + crate::wait::scaled(timeout);
        loop {
            let notified = self.shared.changed.notified();
            // Read under the lock: the log is not copied on every wake-up.
            let found = match self.shared.log.lock() {
                Ok(log) => done(&log),
                Err(_) => None,
            };
            if let Some(t) = found {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "the SV2 sniffer did not see {what} within {:?} ({} frames recorded)",
                crate::wait::scaled(timeout),
                self.captured().len()
            );
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Wait for the share cut by [`Fault::CutBeforeNextAck`].
    pub async fn cut_share(&self, timeout: Duration) -> anyhow::Result<CutShare> {
        self.wait_until("a share cut before its answer", timeout, |_| {
            self.shared.cut_share.lock().ok().and_then(|c| c.clone())
        })
        .await
    }
}

impl Drop for Sv2Sniffer {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

/// One client connection and its pool connection.
struct Link {
    conn: u64,
    state: Arc<Shared>,
    cut: CancellationToken,
}

impl Link {
    async fn run(
        self,
        client: TcpStream,
        pool: String,
        public: Secp256k1PublicKey,
        secret: Secp256k1SecretKey,
    ) {
        let cut = self.cut.clone();
        // A cut also ends a connection still in its handshakes.
        let opened = tokio::select! {
            _ = cut.cancelled() => None,
            o = open_both(client, &pool, public, secret) => o,
        };
        let Some((down, up)) = opened else {
            return;
        };
        let (down_read, down_write) = down.into_split();
        let (up_read, up_write) = up.into_split();
        let link = Arc::new(self);
        // The share whose answer is to be kept back on this connection.
        let armed: Arc<Mutex<Option<CutShare>>> = Arc::default();
        let (to_pool, to_pool_rx) = tokio::sync::mpsc::channel::<Outgoing>(1024);
        let (to_client, to_client_rx) = tokio::sync::mpsc::channel::<Outgoing>(1024);
        // One writer per direction, so a side that stops reading stalls only its own direction.
        let writers = [
            tokio::spawn(write_side(up_write, to_pool_rx, cut.clone())),
            tokio::spawn(write_side(down_write, to_client_rx, cut.clone())),
        ];
        let upward =
            tokio::spawn(
                link.clone()
                    .pump(down_read, Direction::ToPool, to_pool, armed.clone()),
            );
        let downward =
            tokio::spawn(
                link.clone()
                    .pump(up_read, Direction::ToClient, to_client, armed),
            );
        let _ = tokio::join!(upward, downward);
        link.cut.cancel();
        for w in writers {
            let _ = w.await;
        }
    }

    /// Read frames one way, record them, apply the fault and pass them on.
    async fn pump(
        self: Arc<Self>,
        mut from: NoiseTcpReadHalf,
        direction: Direction,
        to: tokio::sync::mpsc::Sender<Outgoing>,
        armed: Arc<Mutex<Option<CutShare>>>,
    ) {
        loop {
            let mut frame = tokio::select! {
                _ = self.cut.cancelled() => break,
                f = from.read_frame() => match f { Ok(f) => f, Err(_) => break },
            };
            let (message, tlvs) = decode(&mut frame);
            let mut captured = Captured {
                conn: self.conn,
                direction,
                at: Instant::now(),
                msg_type: frame.header().msg_type(),
                message,
                tlvs,
                forwarded: true,
            };
            let fault = self.state.fault();
            let cut_now = self.arm_or_trigger(&captured, &armed);
            if cut_now || fault == Fault::Blackhole {
                captured.forwarded = false;
            }
            let read_at = captured.at;
            self.state.push(captured);
            if cut_now {
                self.cut.cancel();
                break;
            }
            let release = match fault {
                Fault::Blackhole => continue,
                // Each frame leaves `d` after it was read; later frames are not held up more.
                Fault::Delay(d) => Some(tokio::time::Instant::from_std(read_at + d)),
                _ => None,
            };
            if to.send(Outgoing { frame, release }).await.is_err() {
                break;
            }
        }
        self.cut.cancel();
    }

    /// Under [`Fault::CutBeforeNextAck`]: take the fault for the next share going to the pool
    /// (checked and consumed under one lock, so exactly one connection arms), and say whether
    /// `c` is the pool's answer to the armed share (the connection is then cut before it).
    fn arm_or_trigger(&self, c: &Captured, armed: &Mutex<Option<CutShare>>) -> bool {
        let Ok(mut armed) = armed.lock() else {
            return false;
        };
        match (&c.message, c.direction) {
            (
                Some(AnyMessageOwned::Mining(MiningOwned::SubmitSharesExtended(s))),
                Direction::ToPool,
            ) if armed.is_none() => {
                let Ok(mut fault) = self.state.fault.lock() else {
                    return false;
                };
                if *fault != Some(Fault::CutBeforeNextAck) {
                    return false;
                }
                *fault = Some(Fault::Pass);
                *armed = Some(CutShare {
                    conn: self.conn,
                    channel_id: s.channel_id,
                    sequence_number: s.sequence_number,
                    nonce: s.nonce,
                    ntime: s.ntime,
                    version: s.version,
                    extranonce: s.extranonce.as_ref().to_vec(),
                    refused: None,
                });
                false
            }
            (Some(AnyMessageOwned::Mining(m)), Direction::ToClient) => {
                let Some(share) = armed.as_mut() else {
                    return false;
                };
                let answer = match m {
                    MiningOwned::SubmitSharesSuccess(s)
                        if s.channel_id == share.channel_id
                            && s.last_sequence_number >= share.sequence_number =>
                    {
                        Some(None)
                    }
                    MiningOwned::SubmitSharesError(e)
                        if e.channel_id == share.channel_id
                            && e.sequence_number == share.sequence_number =>
                    {
                        Some(Some(
                            String::from_utf8_lossy(e.error_code.as_bytes()).into_owned(),
                        ))
                    }
                    _ => None,
                };
                let Some(refused) = answer else {
                    return false;
                };
                share.refused = refused;
                if let Ok(mut out) = self.state.cut_share.lock() {
                    *out = Some(share.clone());
                }
                self.state.changed.notify_waiters();
                true
            }
            _ => false,
        }
    }
}

/// A frame on its way out, and when it may leave (under [`Fault::Delay`]).
struct Outgoing {
    frame: SerializedFrame,
    release: Option<tokio::time::Instant>,
}

/// Write one direction's frames until the link is cut or its pump ends.
async fn write_side(
    mut to: stratum_apps::network_helpers::noise_stream::NoiseTcpWriteHalf,
    mut frames: tokio::sync::mpsc::Receiver<Outgoing>,
    cut: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = cut.cancelled() => break,
            f = frames.recv() => f,
        };
        let Some(Outgoing { frame, release }) = next else {
            break;
        };
        if let Some(at) = release {
            tokio::select! {
                _ = cut.cancelled() => break,
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        if to.write_frame(frame).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Answer the client's handshake as the pool, then open the sniffer's own connection to it.
async fn open_both(
    client: TcpStream,
    pool: &str,
    public: Secp256k1PublicKey,
    secret: Secp256k1SecretKey,
) -> Option<(NoiseTcpStream, NoiseTcpStream)> {
    let _ = client.set_nodelay(true);
    let responder = Responder::from_authority_kp(
        &public.into_bytes(),
        &secret.into_bytes(),
        Duration::from_secs(3600),
    )
    .ok()?;
    let timeout = crate::wait::scaled(Duration::from_secs(10));
    let down = NoiseTcpStream::accept(client, responder, timeout)
        .await
        .ok()?;
    let tcp = TcpStream::connect(pool).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let up = connect_with_noise(tcp, Some(public)).await.ok()?;
    Some((down, up))
}

/// Decode a frame for the record (TLVs read as if the ehash extension were negotiated).
fn decode(frame: &mut SerializedFrame) -> (Option<AnyMessageOwned>, Vec<(u16, u8, u16)>) {
    let header = frame.header();
    if header.msg_type() == MESSAGE_TYPE_OPEN_EXTENDED_MINING_CHANNEL {
        return match parse_message_frame_with_tlvs(header, frame.payload(), &[EHASH_EXTENSION_TYPE])
        {
            Ok((m, tlvs)) => (
                Some(m.into_owned()),
                tlvs.unwrap_or_default()
                    .iter()
                    .map(|t| (t.r#type.extension_type, t.r#type.field_type, t.length))
                    .collect(),
            ),
            Err(_) => (None, Vec::new()),
        };
    }
    match AnyMessage::try_from((header, frame.payload())) {
        Ok(m) => (Some(m.into_owned()), Vec::new()),
        Err(_) => (None, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sv2_client::Sv2Client;
    use stratum_apps::stratum_core::mining_sv2::SetTargetOwned;

    fn set_target(channel_id: u32) -> AnyMessageOwned {
        AnyMessageOwned::Mining(MiningOwned::SetTarget(SetTargetOwned {
            channel_id,
            maximum_target: [0xffu8; 32].into(),
        }))
    }

    async fn through_sniffer() -> (echo::EchoEndpoint, Sv2Sniffer, Sv2Client) {
        let keys = crate::keys::authority_keys();
        let echo = echo::EchoEndpoint::start("127.0.0.1:0", &keys)
            .await
            .unwrap();
        let sniffer = Sv2Sniffer::start("127.0.0.1:0", echo.addr(), &keys)
            .await
            .unwrap();
        // The client checks the sniffer's certificate against the pool's authority key.
        let client = Sv2Client::connect(sniffer.addr(), &keys.public)
            .await
            .unwrap();
        (echo, sniffer, client)
    }

    fn channel_of(m: &AnyMessageOwned) -> Option<u32> {
        match m {
            AnyMessageOwned::Mining(MiningOwned::SetTarget(t)) => Some(t.channel_id),
            _ => None,
        }
    }

    #[tokio::test]
    async fn relays_and_records_both_ways_in_order() {
        let (_echo, sniffer, mut client) = through_sniffer().await;
        client.send(set_target(7)).await.unwrap();
        let back = client.recv(Duration::from_secs(5)).await.unwrap();
        assert_eq!(channel_of(&back), Some(7));
        let log = sniffer.captured();
        let seen: Vec<_> = log
            .iter()
            .map(|c| {
                (
                    c.conn,
                    c.direction,
                    c.message.as_ref().and_then(channel_of),
                    c.forwarded,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (1, Direction::ToPool, Some(7), true),
                (1, Direction::ToClient, Some(7), true)
            ]
        );
    }

    #[tokio::test]
    async fn blackhole_keeps_the_connection_and_drops_frames() {
        let (_echo, sniffer, mut client) = through_sniffer().await;
        sniffer.set_fault(Fault::Blackhole);
        client.send(set_target(1)).await.unwrap();
        assert!(client.recv(Duration::from_millis(300)).await.is_err());
        let log = sniffer.captured();
        assert_eq!(log.len(), 1);
        assert!(!log[0].forwarded);
        sniffer.set_fault(Fault::Pass);
        client.send(set_target(2)).await.unwrap();
        let back = client.recv(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            channel_of(&back),
            Some(2),
            "the connection survived the blackhole"
        );
    }

    #[tokio::test]
    async fn delay_holds_each_frame() {
        let (_echo, sniffer, mut client) = through_sniffer().await;
        sniffer.set_fault(Fault::Delay(Duration::from_millis(100)));
        let start = Instant::now();
        client.send(set_target(3)).await.unwrap();
        client.recv(Duration::from_secs(5)).await.unwrap();
        // Delayed once on the way in and once on the way back.
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
        // Frames sent together are each delayed from when they were read, not queued behind
        // each other's delays (five in a row would otherwise take a second).
        let start = Instant::now();
        for ch in 0..5 {
            client.send(set_target(ch)).await.unwrap();
        }
        for ch in 0..5 {
            let back = client.recv(Duration::from_secs(5)).await.unwrap();
            assert_eq!(channel_of(&back), Some(ch), "order kept");
        }
        assert!(
            start.elapsed() < Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn cut_all_closes_the_client() {
        let (_echo, sniffer, mut client) = through_sniffer().await;
        client.send(set_target(4)).await.unwrap();
        client.recv(Duration::from_secs(5)).await.unwrap();
        sniffer.cut_all();
        client.closed_within(Duration::from_secs(5)).await.unwrap();
    }
}
