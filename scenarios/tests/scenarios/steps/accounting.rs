//! Share accounting steps: the harness's own SV2 client mines real shares, replays them on
//! other channels and after pool restarts, tweaks header fields, and checks what the pool
//! recorded against Bitcoin Core and the client's own header arithmetic.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::{Block, Transaction, Witness};
use cucumber::{given, then, when};
use ehash::{AuditTask, LockingPubkey, AUDIT_TASKS_STREAM};
use harness::invariants::stream_entries;
use harness::sv2_miner::{MinedShare, ShareAnswer, Sv2Miner, Tweak};
use harness::wait::wait_until;
use serde_json::{json, Value};

use super::mining::share_records;
use crate::world::HarnessWorld;

/// Pool restarts tried before giving up on keeping the tip unchanged across one.
const SAME_TIP_ATTEMPTS: usize = 4;
/// Channels opened after a restart to get the original extranonce prefix back.
const PREFIX_ATTEMPTS: usize = 8;
/// How far ahead replayable shares put their time (a restarted pool's jobs start at its
/// start time; a share older than that could not be replayed at all).
const REPLAY_NTIME_AHEAD_SECS: u32 = 3600;

/// One of the harness's SV2 clients.
pub struct Client {
    pub(crate) miner: Sv2Miner,
    /// The locking key its channels carry.
    pub key: LockingPubkey,
    /// Its secret (hex).
    pub secret: String,
    /// The channel it mines on.
    pub(crate) channel: u32,
    /// Shares the pool accepted, in order.
    pub accepted: Vec<MinedShare>,
    /// The last replay step's replays: the share, the hash its fields give on the replay
    /// channel, the answer.
    pub replays: Vec<(MinedShare, String, ShareAnswer)>,
    /// The last tweaked share and its answer.
    pub tweaked: Option<(MinedShare, ShareAnswer)>,
    /// A share mined and kept back, to submit later.
    pub kept: Option<MinedShare>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("key", &self.key.to_string())
            .field("channel", &self.channel)
            .field("accepted", &self.accepted.len())
            .finish()
    }
}

pub(crate) fn client<'a>(w: &'a mut HarnessWorld, name: &str) -> anyhow::Result<&'a mut Client> {
    w.clients
        .get_mut(name)
        .ok_or_else(|| anyhow!("no SV2 client {name:?} in this scenario"))
}

/// Connect a client to the default stack's pool and open one channel with `key`.
async fn connect(w: &mut HarnessWorld, key: LockingPubkey) -> anyhow::Result<(Sv2Miner, u32)> {
    let pool = w.default_stack()?.pool()?;
    let mut miner = Sv2Miner::connect(&pool.sv2_addr, &pool.authority.public, true).await?;
    let channel = open(&mut w.sv2_channels, &mut miner, key).await?;
    Ok((miner, channel))
}

/// Open a channel and tell the sweep (`announced`) about its extranonce prefix.
async fn open(
    announced: &mut Vec<(u32, String)>,
    miner: &mut Sv2Miner,
    key: LockingPubkey,
) -> anyhow::Result<u32> {
    let id = miner.open_channel(Some(key)).await?;
    let prefix = miner
        .channels
        .get(&id)
        .map(|c| hex::encode(&c.extranonce_prefix))
        .unwrap_or_default();
    announced.push((id, prefix));
    Ok(id)
}

#[given(expr = "an SV2 client {string} with a locking key and a channel")]
async fn new_client(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let (secret, key) = harness::keys::locking_keys();
    let (miner, channel) = connect(w, key).await?;
    w.clients.insert(
        name,
        Client {
            miner,
            key,
            secret,
            channel,
            accepted: Vec::new(),
            replays: Vec::new(),
            tweaked: None,
            kept: None,
        },
    );
    Ok(())
}

/// Mine and submit until `n` shares (time `ahead` seconds past the tip's minimum) are
/// accepted; a share that went stale under a new tip is mined again.
async fn mine_accepted(c: &mut Client, n: usize, ahead: u32) -> anyhow::Result<()> {
    let mut stale = 0;
    let target = c.accepted.len() + n;
    while c.accepted.len() < target {
        let min_ntime = c
            .miner
            .channels
            .get(&c.channel)
            .and_then(|ch| ch.tip)
            .map(|t| t.1)
            .context("the client's channel has no tip")?;
        let tweak = Tweak {
            ntime: Some(min_ntime + ahead),
            version: None,
        };
        let share = c.miner.mine(c.channel, tweak).await?;
        match c.miner.submit(&share, None).await? {
            ShareAnswer::Accepted => c.accepted.push(share),
            ShareAnswer::Rejected(code) if code == "stale-share" && stale < 5 => stale += 1,
            ShareAnswer::Rejected(code) => bail!("share {} refused: {code}", share.hash),
        }
    }
    Ok(())
}

#[when(
    expr = "client {string} has {int} shares accepted with ntime an hour ahead of the tip's minimum"
)]
async fn accepted_ahead(w: &mut HarnessWorld, name: String, n: usize) -> anyhow::Result<()> {
    mine_accepted(client(w, &name)?, n, REPLAY_NTIME_AHEAD_SECS).await
}

/// Bitcoin Core's tip.
async fn best_tip(w: &HarnessWorld) -> anyhow::Result<String> {
    Ok(w.default_stack()?
        .bitcoind()?
        .rpc()
        .call("getbestblockhash", &[])
        .await?)
}

#[when(expr = "client {string} replays its accepted shares on a second channel")]
async fn replay_second_channel(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    for attempt in 1..=SAME_TIP_ATTEMPTS {
        let best = best_tip(w).await?;
        let c = w
            .clients
            .get_mut(&name)
            .ok_or_else(|| anyhow!("no SV2 client {name:?}"))?;
        // Only shares of the current tip are replayed: a block found since makes the others
        // stale, which says nothing about the second channel. (All accepted shares stay in
        // `accepted` for the record checks.)
        if !c.accepted.iter().any(|s| s.tip == best) {
            mine_accepted(c, 3, REPLAY_NTIME_AHEAD_SECS).await?;
        }
        let replayable: Vec<_> = c
            .accepted
            .iter()
            .filter(|s| s.tip == best)
            .cloned()
            .collect();
        let second = open(&mut w.sv2_channels, &mut c.miner, c.key).await?;
        c.replays.clear();
        for share in replayable {
            let expected = c.miner.hash_on(second, &share)?;
            let answer = c.miner.submit(&share, Some(second)).await?;
            c.replays.push((share, expected, answer));
        }
        let stale = ShareAnswer::Rejected("stale-share".into());
        if !c.replays.iter().any(|(_, _, a)| *a == stale) {
            return Ok(());
        }
        // Any other answer than the two expected is a finding, whatever the tip did.
        if let Some((share, _, a)) = c.replays.iter().find(|(_, _, a)| {
            *a != stale && *a != ShareAnswer::Rejected("difficulty-too-low".into())
        }) {
            anyhow::bail!(
                "replay of {} on the second channel was answered {a:?}",
                share.hash
            );
        }
        let now = best_tip(w).await?;
        let c = client(w, &name)?;
        anyhow::ensure!(
            c.replays.iter().any(|(s, _, _)| s.tip != now),
            "a replay was answered stale-share while the tip stayed {now}"
        );
        tracing::info!(
            "a block was found during the replays (attempt {attempt}): again on the new tip"
        );
    }
    anyhow::bail!("the tip moved during every one of {SAME_TIP_ATTEMPTS} replay attempts")
}

#[then("each replay on the second channel gives another header, above the target, and is refused with difficulty-too-low")]
async fn second_channel_outcome(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let replays: Vec<_> = w.clients.values().flat_map(|c| c.replays.clone()).collect();
    anyhow::ensure!(!replays.is_empty(), "nothing was replayed");
    for (share, hash_there, answer) in replays {
        anyhow::ensure!(
            hash_there != share.hash,
            "share {} gives the same header on another channel",
            share.hash
        );
        anyhow::ensure!(
            answer == ShareAnswer::Rejected("difficulty-too-low".into()),
            "replay of {} (header {hash_there} on the second channel) was answered {answer:?}",
            share.hash
        );
    }
    Ok(())
}

#[when(
    expr = "the pool is killed with SIGKILL and restarts on the same tip, and client {string} replays its accepted shares on a new channel with their extranonce prefix"
)]
async fn replay_after_restart(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    for attempt in 1..=SAME_TIP_ATTEMPTS {
        let best = best_tip(w).await?;
        let c = client(w, &name)?;
        c.accepted.retain(|s| s.tip == best);
        if c.accepted.is_empty() {
            // The tip moved (a block was found): mine replayable shares on the new one.
            mine_accepted(c, 3, REPLAY_NTIME_AHEAD_SECS).await?;
        }
        let tip = c.accepted[0].tip.clone();
        let prefix = c
            .miner
            .channels
            .get(&c.channel)
            .map(|ch| ch.extranonce_prefix.clone())
            .context("no channel")?;
        super::faults::kill_and_restart_pool(w).await?;
        let best = best_tip(w).await?;
        let key = client(w, &name)?.key;
        let (mut miner, mut channel) = connect(w, key).await?;
        let mut tries = 1;
        while miner.channels.get(&channel).map(|c| &c.extranonce_prefix) != Some(&prefix) {
            anyhow::ensure!(
                tries < PREFIX_ATTEMPTS,
                "no channel with extranonce prefix {} in {PREFIX_ATTEMPTS} tries",
                hex::encode(&prefix)
            );
            channel = open(&mut w.sv2_channels, &mut miner, key).await?;
            tries += 1;
        }
        let c = client(w, &name)?;
        c.miner = miner;
        c.channel = channel;
        let on_tip = c
            .miner
            .channels
            .get(&channel)
            .and_then(|ch| ch.tip_display());
        if best != tip || on_tip.as_deref() != Some(tip.as_str()) {
            tracing::info!("attempt {attempt}: the tip moved from {tip} across the restart; again");
            continue;
        }
        c.replays.clear();
        for share in c.accepted.clone() {
            let expected = c.miner.hash_on(channel, &share)?;
            let answer = c.miner.submit(&share, Some(channel)).await?;
            c.replays.push((share, expected, answer));
        }
        return Ok(());
    }
    bail!("the tip moved across each of {SAME_TIP_ATTEMPTS} pool restarts")
}

#[then(expr = "every replayed share gives the same header and is refused with {string}")]
async fn replays_refused(w: &mut HarnessWorld, code: String) -> anyhow::Result<()> {
    let replays: Vec<_> = w.clients.values().flat_map(|c| c.replays.clone()).collect();
    anyhow::ensure!(!replays.is_empty(), "nothing was replayed");
    for (share, hash_there, answer) in replays {
        anyhow::ensure!(
            hash_there == share.hash,
            "the replay of {} gives header {hash_there}: not a replay",
            share.hash
        );
        anyhow::ensure!(
            answer == ShareAnswer::Rejected(code.clone()),
            "replay of {} was answered {answer:?}, expected {code}",
            share.hash
        );
    }
    Ok(())
}

#[then(expr = "each share client {string} saw accepted has exactly one record locked to its key")]
async fn one_record_each(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    // `share_records` fails on a hash recorded twice.
    let records = share_records(w).await?;
    let c = client(w, &name)?;
    anyhow::ensure!(
        !c.accepted.is_empty(),
        "client {name} had no share accepted"
    );
    for share in &c.accepted {
        let r = records
            .get(&share.hash)
            .with_context(|| format!("accepted share {} has no record", share.hash))?;
        anyhow::ensure!(
            r.locking_pubkey == c.key && r.extranonce == hex::encode(&share.extranonce),
            "record of {} does not match the share: {r:?}",
            share.hash
        );
    }
    Ok(())
}

#[when(
    regex = r#"^client "([^"]+)" submits a share with (ntime two hours and two minutes ahead|ntime at the parent's median time past|version bit 31 set)$"#
)]
async fn tweaked_share(w: &mut HarnessWorld, name: String, tweak: String) -> anyhow::Result<()> {
    let rpc = w.default_stack()?.bitcoind()?.rpc();
    let info: Value = rpc.call("getblockchaininfo", &[]).await?;
    let mtp = info["mediantime"].as_u64().context("mediantime")? as u32;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as u32;
    let c = client(w, &name)?;
    let ch = c.miner.channels.get(&c.channel).context("no channel")?;
    let min_ntime = ch.tip.context("no tip")?.1;
    let job_version = ch
        .active
        .and_then(|j| ch.jobs.get(&j))
        .context("no job")?
        .version;
    let tweak = match tweak.as_str() {
        "ntime two hours and two minutes ahead" => Tweak {
            ntime: Some(min_ntime.max(now) + 2 * 3600 + 120),
            version: None,
        },
        "ntime at the parent's median time past" => Tweak {
            ntime: Some(mtp),
            version: None,
        },
        _ => Tweak {
            ntime: None,
            version: Some(job_version | 0x8000_0000),
        },
    };
    let share = c.miner.mine(c.channel, tweak).await?;
    let answer = c.miner.submit(&share, None).await?;
    c.tweaked = Some((share, answer));
    Ok(())
}

#[then(expr = "the share is refused with {string} and has no record")]
async fn tweaked_refused(w: &mut HarnessWorld, code: String) -> anyhow::Result<()> {
    let records = share_records(w).await?;
    let (share, answer) = w
        .clients
        .values()
        .find_map(|c| c.tweaked.clone())
        .context("no tweaked share")?;
    anyhow::ensure!(
        answer == ShareAnswer::Rejected(code.clone()),
        "share {} was answered {answer:?}, expected {code}",
        share.hash
    );
    anyhow::ensure!(
        !records.contains_key(&share.hash),
        "refused share {} has a record",
        share.hash
    );
    Ok(())
}

#[then(expr = "Bitcoin Core refuses the same share's block with {string}")]
async fn core_refuses(w: &mut HarnessWorld, reason: String) -> anyhow::Result<()> {
    let (share, _) = w
        .clients
        .values()
        .find_map(|c| c.tweaked.clone())
        .context("no tweaked share")?;
    let c = w.clients.values().next().context("no client")?;
    let ch = c.miner.channels.get(&c.channel).context("no channel")?;
    let job = ch
        .jobs
        .get(&share.share.job_id)
        .context("the share's job is gone")?;
    anyhow::ensure!(
        job.merkle_path.is_empty(),
        "the template has transactions; this check needs an empty mempool"
    );
    // The block is the header and the coinbase (with its witness reserved value).
    let mut coinbase_bytes = job.coinbase_prefix.clone();
    coinbase_bytes.extend_from_slice(&share.extranonce);
    coinbase_bytes.extend_from_slice(&job.coinbase_suffix);
    let mut coinbase: Transaction = deserialize(&coinbase_bytes)?;
    coinbase.input[0].witness = Witness::from_slice(&[[0u8; 32]]);
    let header = c.miner.header_of(&share)?;
    let block = Block {
        header,
        txdata: vec![coinbase],
    };
    anyhow::ensure!(
        block.block_hash().to_string() == share.hash,
        "rebuilt block {} is not the share {}",
        block.block_hash(),
        share.hash
    );
    let verdict: Value = w
        .default_stack()?
        .bitcoind()?
        .rpc()
        .call(
            "getblocktemplate",
            &[json!({"mode": "proposal", "data": hex::encode(serialize(&block))})],
        )
        .await?;
    let got = verdict.as_str().unwrap_or("null (valid)");
    anyhow::ensure!(
        got.starts_with(&reason),
        "Bitcoin Core said {got} of the share's block, expected {reason}"
    );
    Ok(())
}

#[then(regex = r"^the pool loses the answer to at least one record append$")]
async fn lost_answer(w: &mut HarnessWorld) -> anyhow::Result<()> {
    super::faults::wait_metric_at_least(w, "hashpool_pool_redis_unknown_outcomes_total", 1.0).await
}

#[then("the pool settles every append whose answer it lost")]
async fn settled(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let pool = w.default_stack()?.pool()?;
    wait_until(
        "every unknown append outcome to be resolved",
        Duration::from_secs(30),
        || async {
            let m = pool.metrics().await.map_err(|e| e.to_string())?;
            let unknown = m.get("hashpool_pool_redis_unknown_outcomes_total");
            let resolved = m.sum("hashpool_pool_redis_resolved_total");
            if unknown >= 1.0 && resolved == unknown {
                Ok(())
            } else {
                Err(format!("{unknown} unknown, {resolved} resolved"))
            }
        },
    )
    .await?;
    Ok(())
}

#[then(expr = "the audit tasks come from {int} pool epochs and no template id names two templates")]
async fn epochs(w: &mut HarnessWorld, n: usize) -> anyhow::Result<()> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    let mut ids = HashSet::new();
    let mut epochs = HashSet::new();
    for (entry, fields) in stream_entries(&mut conn, AUDIT_TASKS_STREAM).await? {
        let t = AuditTask::from_fields(&fields).with_context(|| format!("audit task {entry}"))?;
        anyhow::ensure!(
            ids.insert(t.template_id),
            "template id {} names two audit tasks",
            t.template_id
        );
        epochs.insert(ehash::template_epoch(t.template_id));
    }
    let records = share_records(w).await?;
    for r in records.values() {
        anyhow::ensure!(
            ids.contains(&r.template_id),
            "share {} names template {}, which has no audit task",
            r.share_hash,
            r.template_id
        );
    }
    anyhow::ensure!(
        epochs.len() == n,
        "audit tasks come from {} epochs ({epochs:?}), expected {n}",
        epochs.len()
    );
    Ok(())
}

#[given("a signet stack with a pool that reaches Redis through a fault proxy")]
async fn pool_via_fault_proxy(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.pool_options.redis_via_fault_proxy = true;
    super::mining::stack_with_pool(w).await
}

#[when("the fault proxy holds the pool's requests to Redis")]
async fn hold_requests(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.default_stack()?.redis_fault_proxy()?.hold();
    Ok(())
}

#[when("the fault proxy delivers the held requests and Redis has acted on them")]
async fn release_requests(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let proxy = w.default_stack()?.redis_fault_proxy()?;
    proxy.release();
    wait_until(
        "the held requests to reach Redis and their connections to close",
        Duration::from_secs(10),
        || {
            let n = proxy.holding_connections();
            async move {
                if n == 0 {
                    Ok(())
                } else {
                    Err(format!("{n} connection(s) still holding"))
                }
            }
        },
    )
    .await?;
    Ok(())
}

#[then(expr = "the pool settles every append whose answer it lost, fencing off at least {int}")]
async fn settled_fenced(w: &mut HarnessWorld, n: usize) -> anyhow::Result<()> {
    settled(w).await?;
    let m = w.default_stack()?.pool()?.metrics().await?;
    let refused = m.get("hashpool_pool_redis_resolved_total{result=\"refused\"}");
    anyhow::ensure!(
        refused >= n as f64,
        "{refused} append(s) fenced off, expected at least {n}"
    );
    Ok(())
}
