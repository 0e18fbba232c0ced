//! All of a proxy's miners on one SV2 connection to the pool: one extended channel per miner.
//!
//! The connection is opened when the first miner asks for a channel and again, once, when
//! it was lost and a miner asks again: concurrent requests wait for the one connect, and a
//! failed connect is not retried for a backoff (from `reconnect_min_ms`, doubling to
//! `reconnect_max_ms`, with +-25 % jitter so that proxies do not return in step); every miner
//! asking meanwhile gets that failure at once. A thousand miners make one connect attempt
//! per backoff, not a thousand. A routing task reads every message and hands it to the channel
//! it names; `OpenExtendedMiningChannel` answers are matched by request id, and the route is
//! in place before the answer is handed over, so no job for a new channel is missed. A
//! session that stops reading (its queue full) loses its route, and then its channel, rather
//! than stall every other miner. When the connection ends every route closes: each session
//! sees its channel lost and asks for a new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Channels the pool still talks about with no miner here, already closed once.
    closed_unrouted: std::collections::HashSet<u32>,
}

/// Unrouted channel ids remembered before the set starts over.
const MAX_CLOSED_UNROUTED: usize = 4096;

struct Link {
    out: mpsc::Sender<OutboundFrame>,
    ehash: bool,
    routes: Arc<Mutex<Routes>>,
    closed: CancellationToken,
    next_request: AtomicU32,
}

/// The proxy's one pool connection, shared by its miners.
pub struct Multiplexer {
    state: tokio::sync::Mutex<LinkState>,
    /// First and longest wait after a failed connect.
    backoff: (Duration, Duration),
    /// Shares sent and not answered yet (one connection at a time uses it).
    shares: Arc<upstream::ShareWindow>,
}

#[derive(Default)]
struct LinkState {
    link: Option<Arc<Link>>,
    failed: Option<Failure>,
}

/// The last connect attempt failed: no new attempt before `retry_at`.
struct Failure {
    retry_at: Instant,
    delay: Duration,
    error: String,
    /// The pool refused this proxy for good (kept as [`upstream::Refused`]).
    refused: bool,
}

impl Failure {
    fn error(&self) -> anyhow::Error {
        let left = self.retry_at.saturating_duration_since(Instant::now());
        if self.refused {
            anyhow::Error::new(upstream::Refused(self.error.clone()))
        } else {
            anyhow!("{} (next connect attempt in {left:?})", self.error)
        }
    }
}

/// `delay` with up to 25 % either way.
fn jittered(delay: Duration) -> Duration {
    use rand::Rng;
    delay.mul_f64(rand::thread_rng().gen_range(0.75..1.25))
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

impl Routes {
    /// Send `CloseChannel` for `ch` and, once it is queued, remember it as closed here: what
    /// the pool still sends for it is then not answered again.
    fn close(&mut self, out: &mpsc::Sender<OutboundFrame>, ch: u32, reason: &str) {
        let queued = close_frame(ch, reason).is_some_and(|f| out.try_send(f).is_ok());
        if queued {
            if self.closed_unrouted.len() >= MAX_CLOSED_UNROUTED {
                self.closed_unrouted.clear();
            }
            self.closed_unrouted.insert(ch);
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
            r.close(&self.out, self.channel_id, "miner-disconnected");
        }
    }
}

impl Multiplexer {
    /// No connection yet; after a failed connect wait `reconnect_min` at first, doubling up
    /// to `reconnect_max`.
    /// Shares wait for the pool's answer in `shares`.
    pub fn new(
        reconnect_min: Duration,
        reconnect_max: Duration,
        shares: Arc<upstream::ShareWindow>,
    ) -> Self {
        Self {
            state: tokio::sync::Mutex::default(),
            backoff: (reconnect_min, reconnect_max.max(reconnect_min)),
            shares,
        }
    }

    /// Open a channel for one miner (connecting first if there is no live connection), within
    /// `p.open_timeout`.
    pub async fn open_channel(&self, p: &OpenParams) -> anyhow::Result<Upstream> {
        // Not under the timeout: a connect in progress bounds itself by `open_timeout` and
        // leaves its failure for every miner waiting on it.
        let link = self.link(p).await?;
        tokio::time::timeout(p.open_timeout, self.open_on(link, p))
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
        let mut state = self.state.lock().await;
        // Dead once its routing task ended or its writer is gone.
        if let Some(link) = state
            .link
            .as_ref()
            .filter(|l| !l.closed.is_cancelled() && !l.out.is_closed())
        {
            return Ok(link.clone());
        }
        if let Some(f) = state
            .failed
            .as_ref()
            .filter(|f| Instant::now() < f.retry_at)
        {
            return Err(f.error());
        }
        let connect = tokio::time::timeout(p.open_timeout, upstream::connect(p));
        let c = match connect.await.unwrap_or_else(|_| {
            Err(anyhow!(
                "connect and handshake with {} took over {:?} (`open_timeout_ms`)",
                p.address,
                p.open_timeout
            ))
        }) {
            Ok(c) => c,
            Err(e) => {
                let (min, max) = self.backoff;
                let delay = match &state.failed {
                    Some(f) => (f.delay * 2).min(max),
                    None => min,
                };
                let wait = jittered(delay);
                tracing::warn!(pool = %p.address, "cannot connect to the pool ({e:#}); next attempt in {wait:?}");
                state.failed = Some(Failure {
                    retry_at: Instant::now() + wait,
                    delay,
                    error: match e.downcast_ref::<upstream::Refused>() {
                        Some(r) => r.0.clone(),
                        None => format!("{e:#}"),
                    },
                    refused: e.downcast_ref::<upstream::Refused>().is_some(),
                });
                return Err(e);
            }
        };
        state.failed = None;
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
        state.link = Some(link.clone());
        Ok(link)
    }

    async fn open_on(&self, link: Arc<Link>, p: &OpenParams) -> anyhow::Result<Upstream> {
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
            // Only a pool that speaks ehash (ours) answers every share on its own; another
            // may confirm shares in batches, leaving some unanswered until more come, which
            // a full window would never send: its shares are counted, never refused.
            shares: upstream::ShareSlots::new(self.shares.clone(), link.ehash),
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
                    _ => r.close(&out, s.channel_id, "open-abandoned"),
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
                    let is_close = matches!(m, MiningOwned::CloseChannel(_));
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
                            r.close(&out, ch, "miner-stuck");
                        }
                        // Its session is gone without closing it (an open given up just
                        // after the answer came): close it at the pool too.
                        Some(Err(false)) => {
                            r.channels.remove(&ch);
                            r.close(&out, ch, "miner-disconnected");
                        }
                        Some(Ok(())) => {}
                        // No miner here: its CloseChannel may have been lost on a full
                        // queue, so the pool still counts it. Close it again, once.
                        None => {
                            if !is_close && !r.closed_unrouted.contains(&ch) {
                                r.close(&out, ch, "no-miner");
                            }
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use std::sync::atomic::AtomicUsize;

    /// A listener that accepts and at once closes (so every Noise handshake fails), counting
    /// the connections it got.
    async fn slamming_door() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                drop(tcp);
            }
        });
        (addr, count)
    }

    fn params(address: String) -> OpenParams {
        OpenParams {
            address,
            // SRI's example authority key.
            authority: stratum_apps::key_utils::Secp256k1PublicKey::from_str(
                "9auqWEzQDVyd2oe1JVGFLMLHZtCo2FFqZwtKA5gd9xbuEu7PH72",
            )
            .unwrap(),
            locking_pubkey: None,
            nominal_hashrate: 1.0,
            max_target: [0xff; 32],
            min_extranonce_size: 8,
            user_identity: "test".into(),
            work_selection: false,
            open_timeout: Duration::from_secs(5),
        }
    }

    /// `SetTarget` for `channel_id`, from the pool.
    fn set_target(channel_id: u32) -> AnyMessageOwned {
        use stratum_apps::stratum_core::binary_sv2::U256Owned;
        use stratum_apps::stratum_core::mining_sv2::SetTargetOwned;
        AnyMessageOwned::Mining(MiningOwned::SetTarget(SetTargetOwned {
            channel_id,
            maximum_target: U256Owned::from([0xff; 32]),
        }))
    }

    /// Frames `route` queued towards the pool for `messages`, with the queue `room` frames deep.
    async fn closes_for(messages: Vec<AnyMessageOwned>, room: usize, known: &[u32]) -> usize {
        let (raw_tx, raw_in) = mpsc::channel(16);
        let (out, mut sent) = mpsc::channel(room);
        let routes = Arc::new(Mutex::new(Routes::default()));
        for ch in known {
            routes.lock().unwrap().closed_unrouted.insert(*ch);
        }
        let task = tokio::spawn(route(raw_in, routes, CancellationToken::new(), out));
        for m in messages {
            raw_tx.send(m).await.unwrap();
        }
        drop(raw_tx);
        task.await.unwrap();
        let mut n = 0;
        while sent.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn a_channel_with_no_miner_is_closed_once() {
        let jobs = vec![set_target(7), set_target(7), set_target(8)];
        assert_eq!(
            closes_for(jobs.clone(), 16, &[]).await,
            2,
            "one close per channel"
        );
        // Already closed here (by its miner leaving): not closed again.
        assert_eq!(closes_for(jobs, 16, &[7, 8]).await, 0);
    }

    #[tokio::test]
    async fn a_close_lost_on_a_full_queue_is_tried_again() {
        // Room for one frame: the second channel's close is lost, and retried on its next message.
        let (raw_tx, raw_in) = mpsc::channel(16);
        let (out, mut sent) = mpsc::channel(1);
        let routes = Arc::new(Mutex::new(Routes::default()));
        let task = tokio::spawn(route(raw_in, routes, CancellationToken::new(), out));
        raw_tx.send(set_target(1)).await.unwrap();
        raw_tx.send(set_target(2)).await.unwrap();
        // Wait for the first close to be queued, then drain it: the queue has room again.
        let first = sent.recv().await;
        assert!(first.is_some());
        raw_tx.send(set_target(2)).await.unwrap();
        drop(raw_tx);
        task.await.unwrap();
        assert!(
            sent.try_recv().is_ok(),
            "channel 2 was not closed on its second message"
        );
    }

    #[tokio::test]
    async fn a_failed_connect_is_tried_once_per_backoff_however_many_miners_ask() {
        let (addr, connects) = slamming_door().await;
        let mux = Arc::new(Multiplexer::new(
            Duration::from_secs(1),
            Duration::from_secs(5),
            Arc::new(upstream::ShareWindow::new(4096)),
        ));
        let p = params(addr);
        let asks: Vec<_> = (0..50)
            .map(|_| {
                let (mux, p) = (mux.clone(), p.clone());
                tokio::spawn(async move { mux.open_channel(&p).await.is_err() })
            })
            .collect();
        for a in asks {
            assert!(
                a.await.unwrap(),
                "an open succeeded against a closing listener"
            );
        }
        assert_eq!(connects.load(Ordering::SeqCst), 1, "50 miners, one connect");
        // Within the backoff (1 s less 25 % jitter at least): answered without connecting.
        assert!(mux.open_channel(&p).await.is_err());
        assert_eq!(connects.load(Ordering::SeqCst), 1);
        // Past the longest jittered wait, one new attempt.
        tokio::time::sleep(Duration::from_millis(1300)).await; // the backoff under test
        assert!(mux.open_channel(&p).await.is_err());
        assert_eq!(connects.load(Ordering::SeqCst), 2);
    }
}
