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
        let close = MiningOwned::CloseChannel(CloseChannelOwned {
            channel_id: self.channel_id,
            reason_code: Str0255Owned::try_from("miner-disconnected".to_string())
                .unwrap_or_else(|_| Str0255Owned::try_from(String::new()).expect("empty fits")),
        });
        if let Ok(frame) = OutboundFrame::from_message(AnyMessageOwned::Mining(close)) {
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

    /// Channels open on the connection now (0 without a connection).
    pub fn open_channels(&self) -> usize {
        self.link
            .try_lock()
            .ok()
            .and_then(|l| {
                l.as_ref()
                    .map(|l| l.routes.lock().map(|r| r.channels.len()).unwrap_or(0))
            })
            .unwrap_or(0)
    }

    async fn link(&self, p: &OpenParams) -> anyhow::Result<Arc<Link>> {
        let mut held = self.link.lock().await;
        if let Some(link) = held.as_ref().filter(|l| !l.closed.is_cancelled()) {
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
        tokio::spawn(route(c.raw_in, link.routes.clone(), link.closed.clone()));
        tracing::info!(pool = %p.address, ehash = c.ehash, "connected to the pool: one connection for all miners");
        *held = Some(link.clone());
        Ok(link)
    }

    async fn open_inner(&self, p: &OpenParams) -> anyhow::Result<Upstream> {
        let link = self.link(p).await?;
        let request_id = link.next_request.fetch_add(1, Ordering::Relaxed);
        let (inbound_tx, inbound) = mpsc::channel(CHANNEL_QUEUE);
        let (answer_tx, answer) = oneshot::channel();
        link.routes
            .lock()
            .map_err(|_| anyhow!("routes lock poisoned"))?
            .opening
            .insert(request_id, (answer_tx, inbound_tx));
        link.out
            .try_send(upstream::open_frame(p, request_id, link.ehash)?)
            .map_err(|_| anyhow!("pool connection closed"))?;
        let s = match answer.await {
            Ok(Ok(s)) => s,
            Ok(Err(code)) => return Err(upstream::channel_refusal(&code)),
            Err(_) => anyhow::bail!("pool connection lost while opening the channel"),
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
            early: Vec::new(),
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
                if let Some((answer, tx)) = r.opening.remove(&s.request_id) {
                    // The route first: the channel's first job follows this answer.
                    r.channels.insert(s.channel_id, tx);
                    let _ = answer.send(Ok(s));
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
                    let stuck = match r.channels.get(&ch) {
                        Some(tx) => tx.try_send(m).is_err(),
                        None => false,
                    };
                    if stuck {
                        tracing::warn!(
                            channel = ch,
                            "a miner's session stopped reading: its channel is dropped"
                        );
                        r.channels.remove(&ch);
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
