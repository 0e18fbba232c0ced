//! What each fault does to the stack, and the heal that undoes whatever is still in effect.
//! The loop that decides when is [`super::nemesis`].

use std::time::{Duration, Instant};

use super::profile::FORK_NODE;
use super::schedule::{Fault, REPLAY_MINER_PREFIX};
use crate::sqlite_db::WriteLock;
use crate::supervisor::{Phase, Supervised};
use crate::Stack;

pub(super) fn process<'a>(stack: &'a Stack, name: &str) -> anyhow::Result<&'a Supervised> {
    stack
        .processes()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow::anyhow!("no process {name} in this stack"))
}

/// Pause between two failed starts of one process.
const START_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Start `name` again (miners behind a proxy connect again by themselves); a start that
/// fails is tried again, two seconds later, until `retry_until`, and the result says how many
/// failed and the last reason.
pub(super) async fn start_again(
    stack: &Stack,
    name: &str,
    retry_until: Instant,
) -> anyhow::Result<String> {
    let proc = process(stack, name)?;
    if proc.status().phase == Phase::Ready {
        return Ok("already running".into());
    }
    let mut failed = 0usize;
    let mut last = String::new();
    while let Err(e) = proc.start_again().await {
        failed += 1;
        last = e.root_cause().to_string();
        if Instant::now() >= retry_until {
            return Err(e.context(format!("{failed} failed start(s)")));
        }
        // Backoff between two starts of a process whose dependency is still down.
        tokio::time::sleep(START_RETRY_PAUSE).await;
    }
    Ok(if failed == 0 {
        "started again".into()
    } else {
        format!("started again after {failed} failed start(s), the last: {last}")
    })
}

/// Why fault `fault` cannot be applied now (`Ok("skipped: ...")`): a process it needs is not
/// up (its start is still under way, or failed).
pub(super) fn not_up(stack: &Stack, fault: &Fault) -> Option<anyhow::Result<String>> {
    let needs: Vec<&str> = match fault {
        Fault::Reorg { .. } => vec!["bitcoind", "bitcoind-fork"],
        Fault::LookupBurst { .. } | Fault::MintDbLock => vec!["mint"],
        Fault::Replay { .. } => vec!["pool", "proxy-alice"],
        f => f.process().into_iter().collect(),
    };
    for p in needs {
        let proc = match process(stack, p) {
            Ok(proc) => proc,
            Err(e) => return Some(Err(e)),
        };
        if proc.status().phase != Phase::Ready || proc.pid().is_none() {
            let phase = match proc.status().phase {
                // The whole start error (log tails) is in the start's own history entry.
                Phase::Failed(_) => "its last start failed".to_string(),
                other => format!("{other:?}"),
            };
            return Some(Ok(format!("skipped: {p} is not up ({phase})")));
        }
    }
    None
}

/// Apply a fault that takes long (it mines blocks, or waits on hundreds of answers).
pub(super) async fn apply_beside(stack: &Stack, fault: &Fault) -> anyhow::Result<String> {
    match fault {
        Fault::Reorg { depth } => {
            let r = match stack.reorganise(FORK_NODE, *depth).await {
                Ok(r) => r,
                // The pool's miners outpaced the branch: no reorganisation, as on a real
                // chain where the attacker has less hash power. Not a failure of the stack.
                Err(e) if format!("{e:#}").contains("outgr") => {
                    return Ok(format!(
                        "skipped: the pool's chain outgrew the branch ({e:#})"
                    ))
                }
                Err(e) => return Err(e),
            };
            Ok(format!(
                "{} block(s) replaced by {} in {:.1} s",
                r.replaced.len(),
                r.branch.len(),
                r.took.as_secs_f64()
            ))
        }
        Fault::LookupBurst { keys } => {
            let t = Instant::now();
            crate::ehash_api::fresh_key_lookups(&stack.mint()?.addr, *keys as usize).await?;
            Ok(format!(
                "{keys} answered in {:.1} s",
                t.elapsed().as_secs_f64()
            ))
        }
        f => anyhow::bail!("{} does not run beside the loop", f.describe()),
    }
}

/// Take a process down (SIGKILL held down, or a clean stop: lightningd's own `stop`).
pub(super) async fn take_down(stack: &Stack, fault: &Fault) -> anyhow::Result<String> {
    match fault {
        Fault::Kill { process: p } => process(stack, p)?.crash().await,
        Fault::Terminate { process: p } if p.starts_with("lightning-") => {
            // lightningd's clean stop is its `stop` command.
            let rpc = stack
                .lightning(p.trim_start_matches("lightning-"))?
                .rpc_path()
                .to_path_buf();
            process(stack, p)?
                .stop_with(async move {
                    let _ = crate::lightning::call(&rpc, "stop", serde_json::json!({})).await;
                })
                .await
        }
        Fault::Terminate { process: p } => process(stack, p)?.stop().await,
        f => anyhow::bail!("{} takes no process down", f.describe()),
    }
}

/// Apply (`on`) or undo a fault that acts at once: a pause (SIGSTOP, SIGCONT) or a fault on
/// the pool's SV2 links (the sniffer every proxy reaches the pool through).
pub(super) fn at_once(stack: &Stack, fault: &Fault, on: bool) -> anyhow::Result<String> {
    use crate::sniffer::Fault as Link;
    let link = |to: Link| -> anyhow::Result<()> {
        stack.sniffer()?.set_fault(to);
        Ok(())
    };
    match (fault, on) {
        (Fault::Pause { process }, _) => pause(stack, process, on),
        (Fault::LinkDelay { ms }, true) => {
            link(Link::Delay(Duration::from_millis(*ms)))?;
            Ok(format!("every frame {ms} ms late"))
        }
        (Fault::LinkBlackhole, true) => {
            link(Link::Blackhole)?;
            Ok("every frame dropped".into())
        }
        (Fault::LinkDelay { .. }, false) => {
            link(Link::Pass)?;
            Ok("every frame relayed again".into())
        }
        (Fault::LinkBlackhole, false) => {
            link(Link::Pass)?;
            stack.sniffer()?.cut_all();
            Ok("every connection cut, frames relayed again".into())
        }
        (Fault::LinkCut, true) => {
            stack.sniffer()?.cut_all();
            Ok("every connection cut".into())
        }
        (f, _) => anyhow::bail!("{} does not act at once", f.describe()),
    }
}

/// Start (`on`) or stop a replaying miner. Stopping it says what it saw: shares accepted,
/// and refused by reason.
pub(super) async fn replay(stack: &Stack, fault: &Fault, on: bool) -> anyhow::Result<String> {
    let Fault::Replay { behaviour } = fault else {
        anyhow::bail!("{} runs no replaying miner", fault.describe());
    };
    let miner = stack.miner(&behaviour.miner())?;
    if on {
        if let Err(e) = miner.process().start_again().await {
            // Not left failed: it runs only while its fault is in effect.
            let _ = miner.process().stop().await;
            return Err(e);
        }
        return Ok("started".into());
    }
    let stopped = miner.process().stop().await?;
    let log = miner.log();
    Ok(format!(
        "{stopped}; so far {} accepted, refused {:?}",
        log.accepted.len(),
        log.rejected_by_reason()
    ))
}

/// SIGSTOP (`stop`) or SIGCONT a process for a pause fault.
pub(super) fn pause(stack: &Stack, name: &str, stop: bool) -> anyhow::Result<String> {
    let proc = process(stack, name)?;
    if stop {
        proc.pause()?;
        return Ok("paused".into());
    }
    if proc.status().phase != Phase::Paused {
        return Ok(format!("{name} was not paused ({:?})", proc.status().phase));
    }
    proc.resume()?;
    Ok("resumed".into())
}

/// Hold the mint database's write lock (the lock is released by [`release`]).
pub(super) async fn lock_mint_db(stack: &Stack) -> anyhow::Result<WriteLock> {
    let path = stack.mint()?.db_path();
    tokio::task::spawn_blocking(move || WriteLock::take(&path)).await?
}

/// Release a lock [`lock_mint_db`] took.
pub(super) async fn release(lock: WriteLock) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || lock.release()).await??;
    Ok("released".into())
}

/// Undo everything still in effect: release the lock, resume what is paused, start what is
/// down (nodes and Redis first, roles after, miners last). Returns what could not be healed.
pub async fn heal(stack: &Stack, lock: Option<WriteLock>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(l) = lock {
        if let Err(e) = release(l).await {
            problems.push(format!("releasing the mint's database: {e:#}"));
        }
    }
    stack.resume_paused();
    if let Ok(sniffer) = stack.sniffer() {
        sniffer.set_fault(crate::sniffer::Fault::Pass);
    }
    // stack.processes() lists the nodes and Redis before the roles that need them. A
    // replaying miner runs only while its fault is in effect.
    let replaying = format!("miner-{REPLAY_MINER_PREFIX}");
    for (name, p) in stack.processes() {
        if name.starts_with(&replaying) && p.pid().is_some() {
            if let Err(e) = p.stop().await {
                problems.push(format!("{name} did not stop: {e:#}"));
            }
        }
    }
    let (miners, others): (Vec<_>, Vec<_>) = stack
        .processes()
        .into_iter()
        .filter(|(name, _)| !name.starts_with(&replaying))
        .partition(|(name, _)| name.starts_with("miner-"));
    for (name, p) in others.into_iter().chain(miners) {
        if p.status().phase != Phase::Ready || p.pid().is_none() {
            if let Err(e) = p.start_again().await {
                problems.push(format!("{name} did not start again: {e:#}"));
            }
        }
    }
    problems
}
