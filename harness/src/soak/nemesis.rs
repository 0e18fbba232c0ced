//! The nemesis: applies the schedule's faults to the running stack at their offsets and
//! undoes them when their time is up, while the workload's redemptions start at theirs and a
//! sampler records the stack every two seconds. One loop owns the stack, so faults apply in
//! order; a slow one (a reorganisation mines blocks) delays the next, and the history keeps
//! the times they really happened.

use std::time::{Duration, Instant};

use super::history::{FaultEvent, History};
use super::profile::FORK_NODE;
use super::schedule::{Fault, Schedule};
use super::workload;
use crate::sqlite_db::WriteLock;
use crate::supervisor::{Phase, Supervised};
use crate::Stack;

/// Between two samples of the stack.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Start fault i.
    Apply(usize),
    /// Undo fault i.
    Undo(usize),
    /// Start redemption i.
    Redeem(usize),
}

/// What the loop leaves behind: the history, the redemption tasks still running, and a
/// database lock still held (released by [`heal`]).
pub struct Outcome {
    /// Everything that happened.
    pub history: History,
    /// Redemptions, possibly still running.
    pub redemptions: Vec<tokio::task::JoinHandle<workload::RedemptionRecord>>,
    lock: Option<WriteLock>,
}

fn process<'a>(stack: &'a Stack, name: &str) -> anyhow::Result<&'a Supervised> {
    stack
        .processes()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow::anyhow!("no process {name} in this stack"))
}

/// Work that runs beside the loop, so that it does not hold back the faults after it: a
/// start (it waits for readiness, which may need a dependency still down), a reorganisation
/// (it mines blocks), a lookup burst. Gives the fault, "apply" or "undo", when it began and
/// its result.
type Beside<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (usize, &'static str, Duration, anyhow::Result<String>)>
            + 'a,
    >,
>;

/// How long after the nemesis's end a process that fails to start is still started again
/// (the heal then tries once more).
const START_RETRIES_AFTER_END: Duration = Duration::from_secs(60);

/// Run `schedule` against `stack` until its duration has passed. Starts, reorganisations and
/// lookup bursts run beside the loop; a start that fails (its readiness timed out while a
/// dependency was down) is tried again until a minute after the end, as a service manager
/// restarts a unit that failed.
pub async fn run(stack: &Stack, schedule: &Schedule, started: Instant) -> Outcome {
    use futures::StreamExt;
    let mut events: Vec<(u64, Event)> = Vec::new();
    for (i, f) in schedule.faults.iter().enumerate() {
        events.push((f.at_ms, Event::Apply(i)));
        if f.for_ms > 0 {
            events.push((f.at_ms + f.for_ms, Event::Undo(i)));
        }
    }
    for (i, r) in schedule.redemptions.iter().enumerate() {
        events.push((r.at_ms, Event::Redeem(i)));
    }
    // Undo before apply at the same offset: a resource is free again before the next fault.
    events.sort_by_key(|(at, e)| (*at, !matches!(e, Event::Undo(_)), *e));
    let mut out = Outcome {
        history: History::new(schedule),
        redemptions: Vec::new(),
        lock: None,
    };
    let mut beside: futures::stream::FuturesUnordered<Beside<'_>> = Default::default();
    let mut next_sample = Duration::ZERO;
    let mut queue = events.into_iter().peekable();
    let end = Duration::from_millis(schedule.duration_ms);
    let retry_starts_until = started + end + START_RETRIES_AFTER_END;
    // Faults in effect: applied and not yet undone (a start under way counts), or applying.
    let mut active: std::collections::BTreeSet<usize> = Default::default();
    // Faults whose apply worked: only those are undone.
    let mut applied: std::collections::BTreeSet<usize> = Default::default();
    while queue.peek().is_some() || started.elapsed() < end {
        let next_event = queue.peek().map(|(at, _)| Duration::from_millis(*at));
        let wake = next_event.unwrap_or(end).min(next_sample);
        // The schedule's clock: faults happen at their offsets.
        tokio::select! {
            _ = tokio::time::sleep_until((started + wake).into()) => {}
            Some((i, what, at, r)) = beside.next(), if !beside.is_empty() => {
                active.remove(&i);
                let f = &schedule.faults[i].fault;
                out.history.fault(FaultEvent::new(i, what, f, at, started.elapsed(), r));
                continue;
            }
        }
        if started.elapsed() >= next_sample {
            out.history.sample(stack, started).await;
            next_sample = started.elapsed() + SAMPLE_EVERY;
        }
        let due = queue
            .peek()
            .is_some_and(|(at, _)| started.elapsed() >= Duration::from_millis(*at));
        if !due {
            continue;
        }
        let Some((_, event)) = queue.next() else {
            continue;
        };
        match event {
            Event::Apply(i) => {
                let f = &schedule.faults[i].fault;
                let at = started.elapsed();
                if let Some(skip) = not_up(stack, f) {
                    out.history
                        .fault(FaultEvent::new(i, "apply", f, at, at, skip));
                } else if active.len() >= schedule.max_concurrent {
                    // Starts that overran their time keep their faults in effect.
                    let skip = Ok(format!(
                        "skipped: {} fault(s) still in effect (at most {} at once)",
                        active.len(),
                        schedule.max_concurrent
                    ));
                    out.history
                        .fault(FaultEvent::new(i, "apply", f, at, at, skip));
                } else if matches!(f, Fault::Reorg { .. } | Fault::LookupBurst { .. }) {
                    active.insert(i);
                    beside.push(Box::pin(async move {
                        (i, "apply", at, apply_beside(stack, f).await)
                    }));
                } else {
                    let r = apply(stack, f, &mut out).await;
                    if r.is_ok() {
                        active.insert(i);
                        applied.insert(i);
                    }
                    out.history
                        .fault(FaultEvent::new(i, "apply", f, at, started.elapsed(), r));
                }
            }
            Event::Undo(i) => {
                let f = &schedule.faults[i].fault;
                let at = started.elapsed();
                if !applied.contains(&i) {
                    let nothing = Ok("nothing to undo: the fault was not applied".into());
                    out.history
                        .fault(FaultEvent::new(i, "undo", f, at, at, nothing));
                    continue;
                }
                match f {
                    Fault::Kill { process: p } | Fault::Terminate { process: p } => {
                        let p = p.clone();
                        beside.push(Box::pin(async move {
                            let r = start_again(stack, &p, retry_starts_until).await;
                            (i, "undo", at, r)
                        }));
                    }
                    _ => {
                        active.remove(&i);
                        let r = undo(stack, f, &mut out.lock).await;
                        out.history
                            .fault(FaultEvent::new(i, "undo", f, at, started.elapsed(), r));
                    }
                }
            }
            Event::Redeem(i) => {
                match workload::spawn(stack, i, &schedule.redemptions[i], started) {
                    Ok(task) => out.redemptions.push(task),
                    Err(e) => out
                        .history
                        .note(started, format!("redemption {i} not started: {e:#}")),
                }
            }
        }
    }
    while let Some((i, what, at, r)) = beside.next().await {
        let f = &schedule.faults[i].fault;
        out.history
            .fault(FaultEvent::new(i, what, f, at, started.elapsed(), r));
    }
    out
}

/// Start `name` again (miners behind a proxy connect again by themselves); a start that
/// fails is tried again until `retry_until`, and the result says how many failed and why.
async fn start_again(stack: &Stack, name: &str, retry_until: Instant) -> anyhow::Result<String> {
    let proc = process(stack, name)?;
    if proc.status().phase == Phase::Ready {
        return Ok("already running".into());
    }
    let mut failed = Vec::new();
    while let Err(e) = proc.start_again().await {
        failed.push(e.root_cause().to_string());
        if Instant::now() >= retry_until {
            return Err(e.context(format!("{} failed start(s)", failed.len())));
        }
    }
    let mut said = String::from("started again");
    if let Some(last) = failed.last() {
        said += &format!(" after {} failed start(s), the last: {last}", failed.len());
    }
    Ok(said)
}

/// Why fault `fault` cannot be applied now (`Ok("skipped: ...")`): a process it needs is not
/// up (its start is still under way, or failed).
fn not_up(stack: &Stack, fault: &Fault) -> Option<anyhow::Result<String>> {
    let needs: Vec<&str> = match fault {
        Fault::Reorg { .. } => vec!["bitcoind", "bitcoind-fork"],
        Fault::LookupBurst { .. } | Fault::MintDbLock => vec!["mint"],
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
async fn apply_beside(stack: &Stack, fault: &Fault) -> anyhow::Result<String> {
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

/// Start a fault that applies at once (a signal, the lock); [`not_up`] was asked first.
async fn apply(stack: &Stack, fault: &Fault, out: &mut Outcome) -> anyhow::Result<String> {
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
        Fault::Pause { process: p } => process(stack, p)?.pause().map(|()| "paused".into()),
        Fault::Reorg { .. } | Fault::LookupBurst { .. } => apply_beside(stack, fault).await,
        Fault::MintDbLock => {
            let path = stack.mint()?.db_path();
            let held = tokio::task::spawn_blocking(move || WriteLock::take(&path)).await??;
            out.lock = Some(held);
            Ok("write lock held".into())
        }
    }
}

/// End a pause or a lock (stopped processes are started by [`start_again`]).
async fn undo(
    stack: &Stack,
    fault: &Fault,
    lock: &mut Option<WriteLock>,
) -> anyhow::Result<String> {
    Ok(match fault {
        Fault::Pause { process: p } => {
            let proc = process(stack, p)?;
            if proc.status().phase != Phase::Paused {
                return Ok(format!("{p} was not paused ({:?})", proc.status().phase));
            }
            proc.resume()?;
            "resumed".into()
        }
        Fault::MintDbLock => match lock.take() {
            Some(l) => {
                tokio::task::spawn_blocking(move || l.release()).await??;
                "released".into()
            }
            None => "no lock held".into(),
        },
        _ => String::new(),
    })
}

/// Undo everything still in effect: release the lock, resume what is paused, start what is
/// down (nodes and Redis first, roles after, miners last). Returns what could not be healed.
pub async fn heal(stack: &Stack, out: &mut Outcome) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(l) = out.lock.take() {
        match tokio::task::spawn_blocking(move || l.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("releasing the mint's database: {e:#}")),
            Err(e) => problems.push(format!("releasing the mint's database: {e}")),
        }
    }
    stack.resume_paused();
    // stack.processes() lists the nodes and Redis before the roles that need them.
    let (miners, others): (Vec<_>, Vec<_>) = stack
        .processes()
        .into_iter()
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
