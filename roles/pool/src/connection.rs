//! One downstream connection: Noise handshake, `SetupConnection`, ehash negotiation, extended
//! channels, jobs on every template, shares. Frames are read and written by their own tasks
//! (the Noise halves are not cancellation-safe); this task owns the channels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use stratum_apps::stratum_core::codec_sv2::SerializedFrame;
use stratum_apps::stratum_core::noise_sv2::Responder;
use stratum_apps::stratum_core::parsers_sv2::{
    parse_message_frame_with_tlvs, AnyMessage, AnyMessageOwned, CommonMessagesOwned,
    ExtensionsNegotiationOwned, ExtensionsOwned, MiningOwned, Tlv,
};
use stratum_apps::tokio_util::sync::CancellationToken;
use stratum_apps::utils::types::OutboundFrame;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::channel::ChannelState;
use crate::noise_io::{self, ReadError};
use crate::shares::ShareOutcome;
use crate::PoolContext;

/// Frames buffered towards a slow client before it is disconnected, beyond
/// [`OUTBOUND_FRAMES_PER_CHANNEL`] for each channel it has open (a new tip sends every channel
/// a job and a prevhash at once). The queue is made for the most channels a connection may
/// open; tokio's queue allocates as it fills, not at its capacity.
const OUTBOUND_QUEUE: usize = 4096;
/// Room in the outbound queue per channel the connection has open.
const OUTBOUND_FRAMES_PER_CHANNEL: usize = 4;
/// Frames read ahead of processing.
const INBOUND_QUEUE: usize = 256;

/// Why the pool closed a connection (also the metric label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// Peer closed or the socket failed.
    PeerGone(String),
    /// A frame asking for more than `limits.max_message_bytes`: the encrypted body bytes it
    /// asked for so far (none of them read when the limit is below one Noise chunk).
    Oversize(usize),
    /// Noise handshake and `SetupConnection` not done within `limits.handshake_deadline_ms`.
    HandshakeDeadline,
    /// Nothing received for `limits.idle_timeout_secs`.
    Idle,
    /// Closed to admit a new connection at the total cap: the oldest connection past the
    /// set-up deadline without a channel.
    Evicted,
    /// Shares above the per-channel rate limit.
    ShareRate(u32),
    /// A message that cannot be decoded or is not allowed now.
    Protocol(String),
    /// The client does not read its frames: its queue passed its share, or a write took over
    /// 10 s.
    SlowClient,
    /// The pool is stopping.
    Shutdown,
}

impl Close {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Close::PeerGone(_) => "peer-gone",
            Close::Oversize(_) => "oversize-message",
            Close::HandshakeDeadline => "handshake-deadline",
            Close::Idle => "idle-timeout",
            Close::Evicted => "evicted",
            Close::ShareRate(_) => "share-rate-limit",
            Close::Protocol(_) => "protocol-error",
            Close::SlowClient => "slow-client",
            Close::Shutdown => "shutdown",
        }
    }
}

/// State of one connection.
pub struct Connection {
    pub(crate) ctx: Arc<PoolContext>,
    pub(crate) id: u64,
    pub(crate) out: mpsc::Sender<OutboundFrame>,
    pub(crate) channels: HashMap<u32, ChannelState>,
    pub(crate) pending: FuturesUnordered<futures::future::BoxFuture<'static, ShareOutcome>>,
    pub(crate) setup_done: bool,
    pub(crate) negotiated: Vec<u16>,
    /// The client selects its own work (`REQUIRES_WORK_SELECTION`): its channels mine only
    /// the custom jobs it sets, never the pool's templates.
    pub(crate) work_selection: bool,
    /// The source the connection counts under (IPv4 address or IPv6 /64).
    pub(crate) source: std::net::IpAddr,
}

/// Serve one accepted TCP connection until it closes; returns why.
pub async fn serve(
    ctx: Arc<PoolContext>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    stop: CancellationToken,
    tracked: crate::admission::Tracked,
) -> Close {
    let accepted_at = Instant::now();
    let limits = ctx.config.limits.clone();
    let deadline = Duration::from_millis(limits.handshake_deadline_ms);
    let (public, secret) = ctx.authority;
    let cert = Duration::from_secs(ctx.config.cert_validity_secs);
    let responder = match Responder::from_authority_kp(&public, &secret, cert) {
        Ok(r) => r,
        Err(e) => return Close::Protocol(format!("noise responder: {e:?}")),
    };
    let max = limits.max_message_bytes;
    // The deadline covers the whole handshake (accept's own timeout is per read).
    let handshake = tokio::time::timeout(deadline, noise_io::accept(tcp, responder, deadline, max));
    let (mut reader, mut writer) = match handshake.await.unwrap_or(Err(ReadError::HandshakeTimeout))
    {
        Ok(halves) => halves,
        Err(ReadError::HandshakeTimeout) => return Close::HandshakeDeadline,
        Err(ReadError::Closed) => {
            return Close::PeerGone("closed during the noise handshake".into())
        }
        Err(e) => return Close::Protocol(format!("noise handshake: {e:?}")),
    };
    let (in_tx, mut in_rx) = mpsc::channel::<Result<SerializedFrame, Close>>(INBOUND_QUEUE);
    let read_task = tokio::spawn(async move {
        loop {
            // A frame asking for more than `max` closes the connection (unread below one chunk).
            let item = reader.read_frame().await.map_err(|e| match e {
                ReadError::Oversize(encrypted) => Close::Oversize(encrypted),
                ReadError::Closed => Close::PeerGone("socket closed".into()),
                other => Close::Protocol(format!("unreadable frame: {other:?}")),
            });
            let end = item.is_err();
            if in_tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    let queue = OUTBOUND_QUEUE + OUTBOUND_FRAMES_PER_CHANNEL * limits.max_channels_per_connection;
    let (out_tx, mut out_rx) = mpsc::channel::<OutboundFrame>(queue);
    // Ends with the write error, if a write failed.
    let mut write_task = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if let Err(e) = writer.write_frame(frame).await {
                return Some(e);
            }
        }
        writer.shutdown().await;
        None
    });
    let mut write_ended = false;

    let mut conn = Connection {
        ctx: ctx.clone(),
        id,
        out: out_tx,
        channels: HashMap::new(),
        pending: FuturesUnordered::new(),
        setup_done: false,
        negotiated: Vec::new(),
        work_selection: false,
        source: crate::admission::source_of(peer.ip()),
    };
    let mut templates = ctx.templates.clone();
    templates.mark_unchanged();
    let mut vardiff =
        tokio::time::interval(Duration::from_secs(ctx.config.vardiff_interval_secs.max(1)));
    // 0: a quiet, set-up connection is never cut (TCP keepalive finds dead peers).
    let idle =
        (limits.idle_timeout_secs > 0).then(|| Duration::from_secs(limits.idle_timeout_secs));
    let mut last_frame = Instant::now();
    let setup_deadline = tokio::time::Instant::from_std(accepted_at + deadline);
    tracing::debug!(conn = id, %peer, "handshake done");

    let close = loop {
        tokio::select! {
            _ = stop.cancelled() => break Close::Shutdown,
            _ = tracked.evict.cancelled() => break Close::Evicted,
            frame = in_rx.recv() => match frame {
                Some(Ok(mut frame)) => {
                    last_frame = Instant::now();
                    let result = conn.on_frame(&mut frame).await;
                    tracked.has_channel.store(!conn.channels.is_empty(), std::sync::atomic::Ordering::Relaxed);
                    if let Err(close) = result {
                        break close;
                    }
                }
                Some(Err(close)) => break close,
                None => break Close::PeerGone("reader ended".into()),
            },
            Some(outcome) = conn.pending.next(), if !conn.pending.is_empty() => {
                if let Err(close) = conn.on_share_outcome(outcome) {
                    break close;
                }
            }
            changed = templates.changed() => {
                if changed.is_err() {
                    break Close::Shutdown;
                }
                let record = templates.borrow_and_update().clone();
                if let Some(record) = record {
                    if let Err(close) = conn.on_template(&record) {
                        break close;
                    }
                }
            }
            _ = vardiff.tick() => {
                if let Err(close) = conn.on_vardiff() {
                    break close;
                }
            }
            ended = &mut write_task, if !write_ended => {
                write_ended = true;
                break match ended {
                    Ok(Some(ReadError::WriteTimeout)) => Close::SlowClient,
                    _ => Close::PeerGone("write failed".into()),
                };
            }
            _ = tokio::time::sleep_until(setup_deadline), if !conn.setup_done => break Close::HandshakeDeadline,
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(last_frame + idle.unwrap_or_default())), if idle.is_some() => break Close::Idle,
        }
    };
    // Answer shares already validated and being recorded, so none is left unanswered.
    while let Some(outcome) = conn.pending.next().await {
        let _ = conn.on_share_outcome(outcome);
    }
    for ch in conn.channels.values() {
        ctx.metrics.remove_channel(ch.id());
    }
    ctx.metrics.channels.sub(conn.channels.len() as i64);
    drop(conn);
    read_task.abort();
    // Frames already queued (a CloseChannel, an error) get a moment to go out; a client that
    // does not read loses them, and its socket is closed now, not whenever it reads.
    if !write_ended
        && tokio::time::timeout(Duration::from_secs(2), &mut write_task)
            .await
            .is_err()
    {
        write_task.abort();
    }
    close
}

impl Connection {
    /// Queue a message; a client whose queue is full is too slow and gets disconnected.
    pub(crate) fn send(&self, msg: AnyMessageOwned) -> Result<(), Close> {
        let frame = OutboundFrame::from_message(msg)
            .map_err(|e| Close::Protocol(format!("encode: {e:?}")))?;
        // The queue has room for the most channels a connection may open; the backlog a
        // client may leave unread is bounded by the channels it has.
        let queued = self.out.max_capacity() - self.out.capacity();
        if queued >= OUTBOUND_QUEUE + OUTBOUND_FRAMES_PER_CHANNEL * self.channels.len() {
            return Err(Close::SlowClient);
        }
        self.out.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Close::SlowClient,
            mpsc::error::TrySendError::Closed(_) => Close::PeerGone("socket closed".into()),
        })
    }

    pub(crate) fn send_mining(&self, msgs: Vec<MiningOwned>) -> Result<(), Close> {
        msgs.into_iter()
            .try_for_each(|m| self.send(AnyMessageOwned::Mining(m)))
    }

    async fn on_frame(&mut self, frame: &mut SerializedFrame) -> Result<(), Close> {
        use stratum_apps::stratum_core::mining_sv2::MESSAGE_TYPE_OPEN_EXTENDED_MINING_CHANNEL;
        let header = frame.header();
        let bad = |e| {
            Close::Protocol(format!(
                "undecodable message type {:#04x}: {e:?}",
                header.msg_type()
            ))
        };
        let (msg, tlvs): (AnyMessageOwned, Option<Vec<Tlv>>) = if header.msg_type()
            == MESSAGE_TYPE_OPEN_EXTENDED_MINING_CHANNEL
            && header.ext_type_without_channel_msg() == 0
        {
            let (m, t) = parse_message_frame_with_tlvs(header, frame.payload(), &self.negotiated)
                .map_err(bad)?;
            (m.into_owned(), t)
        } else {
            (
                AnyMessage::try_from((header, frame.payload()))
                    .map_err(bad)?
                    .into_owned(),
                None,
            )
        };
        match msg {
            AnyMessageOwned::Common(CommonMessagesOwned::SetupConnection(m)) => self.on_setup(m),
            AnyMessageOwned::Extensions(ExtensionsOwned::ExtensionsNegotiation(
                ExtensionsNegotiationOwned::RequestExtensions(m),
            )) => self.on_request_extensions(m),
            _ if !self.setup_done => Err(Close::Protocol("message before SetupConnection".into())),
            AnyMessageOwned::Mining(MiningOwned::OpenExtendedMiningChannel(m)) => {
                self.on_open(m, tlvs.unwrap_or_default())
            }
            AnyMessageOwned::Mining(MiningOwned::OpenStandardMiningChannel(m)) => {
                self.refuse_standard(m.request_id)
            }
            AnyMessageOwned::Mining(MiningOwned::SubmitSharesExtended(m)) => self.on_submit(m),
            AnyMessageOwned::Mining(MiningOwned::UpdateChannel(m)) => self.on_update_channel(m),
            AnyMessageOwned::Mining(MiningOwned::SetCustomMiningJob(m)) => {
                self.on_set_custom_job(m)
            }
            AnyMessageOwned::Mining(MiningOwned::CloseChannel(m)) => {
                if let Some(ch) = self.channels.remove(&m.channel_id) {
                    self.ctx.metrics.remove_channel(ch.id());
                    self.ctx.metrics.channels.dec();
                }
                Ok(())
            }
            other => Err(Close::Protocol(format!(
                "unexpected message from a client: {}",
                message_name(&other)
            ))),
        }
    }

    fn on_template(&mut self, record: &crate::template::TemplateRecord) -> Result<(), Close> {
        if self.work_selection {
            return Ok(()); // the client mines its own templates
        }
        let payout = self.ctx.payout.clone();
        let mut out = Vec::new();
        for ch in self.channels.values_mut() {
            match ch.on_template(record, &payout) {
                Ok(msgs) => out.extend(msgs),
                Err(e) => tracing::error!(
                    conn = self.id,
                    "cannot make a job for template {}: {e:#}",
                    record.template_id
                ),
            }
        }
        self.send_mining(out)
    }

    fn on_vardiff(&mut self) -> Result<(), Close> {
        if self.work_selection {
            // A custom job keeps the target it was set under; a new one needs a new
            // declaration, so channels that select their work keep the target they opened with.
            return Ok(());
        }
        let record = self.ctx.templates.borrow().clone();
        let payout = self.ctx.payout.clone();
        let mut out = Vec::new();
        for ch in self.channels.values_mut() {
            match ch.retarget(record.as_deref(), &payout) {
                Ok(msgs) => out.extend(msgs),
                Err(e) => tracing::warn!(conn = self.id, channel = ch.id(), "vardiff: {e:#}"),
            }
            let id = ch.id().to_string();
            self.ctx
                .metrics
                .channel_hashrate
                .with_label_values(&[&id])
                .set(f64::from(ch.channel.get_nominal_hashrate()));
            self.ctx
                .metrics
                .channel_acceptance
                .with_label_values(&[&id])
                .set(ch.acceptance());
        }
        self.send_mining(out)
    }
}

/// A message's name for logs.
pub fn message_name(msg: &AnyMessageOwned) -> String {
    let dbg = format!("{msg:?}");
    dbg.split(['(', ' ', '{'])
        .take(2)
        .collect::<Vec<_>>()
        .join("::")
}

impl From<anyhow::Error> for Close {
    fn from(e: anyhow::Error) -> Self {
        Close::Protocol(format!("{e:#}"))
    }
}
