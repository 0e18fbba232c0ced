//! All of a proxy's miners on one SV2 connection to the pool: one extended channel per miner.
//!
//! The connection is opened when the first miner asks for a channel and again, once, when
//! it was lost and a miner asks again (the miners' sessions back off; concurrent requests
//! wait for the one connect). A routing task reads every message and hands it to the channel
//! it names; `OpenExtendedMiningChannel` answers are matched by request id, and the route is
//! in place before the answer is handed over, so no job for a new channel is missed. A
//! session that stops reading (its queue full) loses its route, and then its channel, rather
//! than stall every other miner. When the connection ends every route closes: each session
//! sees its channel lost and asks for a new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use stratum_apps::stratum_core::binary_sv2::Str0255Owned;
use stratum_apps::stratum_core::mining_sv2::{
    CloseChannelOwned, OpenExtendedMiningChannelSuccessOwned,
};
use stratum_apps::stratum_core::parsers_sv2::{AnyMessageOwned, MiningOwned};
use stratum_apps::utils::types::OutboundFrame;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::upstream::{self, ChannelInfo, OpenParams, Upstream};

/// Messages queued per channel before a session counts as stuck.
const CHANNEL_QUEUE: usize = 1024;

type Opening = (
    oneshot::Sender<Result<OpenExtendedMiningChannelSuccessOwned, String>>,
    mpsc::Sender<MiningOwned>,
);

#[derive(Default)]
struct Routes {
    channels: HashMap<u32, mpsc::Sender<MiningOwned>>,
    opening: HashMap<u32, Opening>,
}

struct Link {
    out: mpsc::Sender<OutboundFrame>,
    ehash: bool,
    routes: Arc<Mutex<Routes>>,
    closed: CancellationToken,
    next_request: AtomicU32,
}

/// The proxy's one pool connection, shared by its miners.
#[derive(Default)]
pub struct Multiplexer {
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
}

/// Removes an unanswered open request when its caller gives up.
struct PendingOpen {
    routes: Arc<Mutex<Routes>>,
    request_id: u32,
}

impl Drop for PendingOpen {
    fn drop(&mut self) {
        if let Ok(mut r) = self.routes.lock() {
            r.opening.remove(&self.request_id);
        }
    }
}

/// `CloseChannel` for `channel_id`, as a frame.
fn close_frame(channel_id: u32, reason: &str) -> Option<OutboundFrame> {
    let close = MiningOwned::CloseChannel(CloseChannelOwned {
        channel_id,
        reason_code: Str0255Owned::try_from(reason.to_string()).ok()?,
    });
    OutboundFrame::from_message(AnyMessageOwned::Mining(close)).ok()
}

/// Closes a channel when its miner's [`Upstream`] is dropped.
pub struct ChannelGuard {
    channel_id: u32,
    out: mpsc::Sender<OutboundFrame>,
    routes: Arc<Mutex<Routes>>,
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        if let Ok(mut r) = self.routes.lock() {
            r.channels.remove(&self.channel_id);
        }
        if let Some(frame) = close_frame(self.channel_id, "miner-disconnected") {
            let _ = self.out.try_send(frame);
        }
    }
}

impl Multiplexer {
    /// Open a channel for one miner (connecting first if there is no live connection), within
    /// `p.open_timeout`.
    pub async fn open_channel(&self, p: &OpenParams) -> anyhow::Result<Upstream> {
        tokio::time::timeout(p.open_timeout, self.open_inner(p))
            .await
            .map_err(|_| {
                anyhow!(
                    "opening a channel at {} took over {:?} (`open_timeout_ms`)",
                    p.address,
                    p.open_timeout
                )
            })?
    }

    async fn link(&self, p: &OpenParams) -> anyhow::Result<Arc<Link>> {
        let mut held = self.link.lock().await;
        // Dead once its routing task ended or its writer is gone.
        if let Some(link) = held
            .as_ref()
            .filter(|l| !l.closed.is_cancelled() && !l.out.is_closed())
        {
            return Ok(link.clone());
        }
        let c = upstream::connect(p).await?;
        let link = Arc::new(Link {
            out: c.out,
            ehash: c.ehash,
            routes: Arc::default(),
            closed: CancellationToken::new(),
            next_request: AtomicU32::new(1),
        });
        tokio::spawn(route(
            c.raw_in,
            link.routes.clone(),
            link.closed.clone(),
            link.out.clone(),
        ));
        tracing::info!(pool = %p.address, ehash = c.ehash, "connected to the pool: one connection for all miners");
        *held = Some(link.clone());
        Ok(link)
    }

    async fn open_inner(&self, p: &OpenParams) -> anyhow::Result<Upstream> {
        let link = self.link(p).await?;
        let request_id = link.next_request.fetch_add(1, Ordering::Relaxed);
        let (inbound_tx, inbound) = mpsc::channel(CHANNEL_QUEUE);
        let (answer_tx, answer) = oneshot::channel();
        {
            let mut r = link
                .routes
                .lock()
                .map_err(|_| anyhow!("routes lock poisoned"))?;
            // Checked under the lock the routing task clears: an entry made after the
            // connection ended would never be answered.
            anyhow::ensure!(!link.closed.is_cancelled(), "pool connection lost");
            r.opening.insert(request_id, (answer_tx, inbound_tx));
        }
        // Forgets the request if this open is given up (timeout): a late answer then gets
        // `CloseChannel` from the routing task instead of a route to nobody.
        let _pending = PendingOpen {
            routes: link.routes.clone(),
            request_id,
        };
        link.out
            .try_send(upstream::open_frame(p, request_id, link.ehash)?)
            .map_err(|_| anyhow!("pool connection closed"))?;
        let s = tokio::select! {
            a = answer => match a {
                Ok(Ok(s)) => s,
                Ok(Err(code)) => return Err(upstream::channel_refusal(&code)),
                Err(_) => anyhow::bail!("pool connection lost while opening the channel"),
            },
            _ = link.closed.cancelled() => anyhow::bail!("pool connection lost while opening the channel"),
        };
        Ok(Upstream {
            inbound,
            outbound: link.out.clone(),
            info: ChannelInfo {
                channel_id: s.channel_id,
                extranonce_prefix: s.extranonce_prefix.as_bytes().to_vec(),
                extranonce_size: usize::from(s.extranonce_size),
                target: s.target.to_array(),
                ehash: link.ehash,
            },
            _guard: ChannelGuard {
                channel_id: s.channel_id,
                out: link.out.clone(),
                routes: link.routes.clone(),
            },
        })
    }
}

/// The channel a pool message is for, if it names one.
fn channel_of(m: &MiningOwned) -> Option<u32> {
    Some(match m {
        MiningOwned::NewExtendedMiningJob(j) => j.channel_id,
        MiningOwned::NewMiningJob(j) => j.channel_id,
        MiningOwned::SetNewPrevHash(p) => p.channel_id,
        MiningOwned::SetTarget(t) => t.channel_id,
        MiningOwned::SubmitSharesSuccess(s) => s.channel_id,
        MiningOwned::SubmitSharesError(e) => e.channel_id,
        MiningOwned::CloseChannel(c) => c.channel_id,
        MiningOwned::SetExtranoncePrefix(x) => x.channel_id,
        MiningOwned::SetCustomMiningJobSuccess(s) => s.channel_id,
        MiningOwned::SetCustomMiningJobError(e) => e.channel_id,
        MiningOwned::UpdateChannelError(e) => e.channel_id,
        _ => return None,
    })
}

/// Hand every message from the pool to its channel until the connection ends.
async fn route(
    mut raw_in: mpsc::Receiver<AnyMessageOwned>,
    routes: Arc<Mutex<Routes>>,
    closed: CancellationToken,
    out: mpsc::Sender<OutboundFrame>,
) {
    while let Some(msg) = raw_in.recv().await {
        let AnyMessageOwned::Mining(m) = msg else {
            tracing::debug!("ignoring {msg:?} from the pool");
            continue;
        };
        let Ok(mut r) = routes.lock() else {
            break;
        };
        match m {
            MiningOwned::OpenExtendedMiningChannelSuccess(s) => {
                match r.opening.remove(&s.request_id) {
                    Some((answer, tx)) if !answer.is_closed() => {
                        // The route first: the channel's first job follows this answer.
                        r.channels.insert(s.channel_id, tx);
                        let _ = answer.send(Ok(s));
                    }
                    // Nobody waits for it any more (the open timed out): give it back.
                    _ => {
                        if let Some(frame) = close_frame(s.channel_id, "open-abandoned") {
                            let _ = out.try_send(frame);
                        }
                    }
                }
            }
            MiningOwned::OpenMiningChannelError(e) => {
                if let Some((answer, _)) = r.opening.remove(&e.request_id) {
                    let _ = answer.send(Err(
                        String::from_utf8_lossy(e.error_code.as_bytes()).into_owned()
                    ));
                }
            }
            m => match channel_of(&m) {
                Some(ch) => {
                    // Full or closed, without carrying the message back.
                    let failed = r.channels.get(&ch).map(|tx| {
                        tx.try_send(m)
                            .map_err(|e| matches!(e, mpsc::error::TrySendError::Full(_)))
                    });
                    match failed {
                        Some(Err(true)) => {
                            tracing::warn!(
                                channel = ch,
                                "a miner's session stopped reading: its channel is closed"
                            );
                            r.channels.remove(&ch);
                            if let Some(frame) = close_frame(ch, "miner-stuck") {
                                let _ = out.try_send(frame);
                            }
                        }
                        // Its session is gone without closing it (an open given up just
                        // after the answer came): close it at the pool too.
                        Some(Err(false)) => {
                            r.channels.remove(&ch);
                            if let Some(frame) = close_frame(ch, "miner-disconnected") {
                                let _ = out.try_send(frame);
                            }
                        }
                        _ => {}
                    }
                }
                None => tracing::debug!("ignoring {m:?} from the pool"),
            },
        }
    }
    closed.cancel();
    if let Ok(mut r) = routes.lock() {
        // Every session sees its channel lost and asks for a new one.
        r.channels.clear();
        r.opening.clear();
    }
    tracing::warn!("pool connection lost: every miner's channel is reopened on a new one");
}
