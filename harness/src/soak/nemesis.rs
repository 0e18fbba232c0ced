//! The nemesis: applies the schedule's faults to the running stack at their offsets and
//! undoes them when their time is up, while the workload's redemptions start at theirs and a
//! sampler records the stack every two seconds. One loop decides; everything that waits (a
//! stop, a start and its readiness, a reorganisation mining blocks, a lookup burst, taking
//! the database lock, a sample) runs beside it, so no fault holds back the next, and the
//! history keeps the times things really happened. What each fault does is in
//! [`super::actions`].

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::actions;
use super::history::{FaultEvent, History, Sample};
use super::schedule::{Fault, Schedule};
use super::workload;
use crate::sqlite_db::WriteLock;
use crate::Stack;

pub use actions::heal;

/// Between two samples of the stack.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// A wake-up this much later than asked is noted in the history.
const LOOP_LAG_NOTE: Duration = Duration::from_secs(3);

/// How long after the nemesis's end a process that fails to start is still started again
/// (the heal then tries once more).
const START_RETRIES_AFTER_END: Duration = Duration::from_secs(60);

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
/// database lock still held (for [`heal`] to release).
pub struct Outcome {
    /// Everything that happened.
    pub history: History,
    /// Redemptions, possibly still running.
    pub redemptions: Vec<tokio::task::JoinHandle<workload::RedemptionRecord>>,
    /// The mint database's lock, if a lock fault still holds it.
    pub lock: Option<WriteLock>,
}

/// Work that ended beside the loop.
enum Done {
    /// Fault i's apply or undo ("apply"/"undo"), begun at `at`.
    Fault(usize, &'static str, Duration, anyhow::Result<String>),
    /// Fault i's database lock, taken (or not) from `at`.
    Locked(usize, Duration, anyhow::Result<WriteLock>),
    /// A sample of the stack.
    Sampled(Sample),
}

type Beside<'a> = Pin<Box<dyn Future<Output = Done> + 'a>>;

/// The loop's bookkeeping of faults.
#[derive(Default)]
struct Faults {
    /// In effect: applying, applied and not yet undone (a start under way counts).
    active: BTreeSet<usize>,
    /// Applied without error or skip: only these are undone.
    applied: BTreeSet<usize>,
    /// Due to be undone while their apply was still running: undone once it ends.
    undo_after_apply: BTreeSet<usize>,
}

/// Run `schedule` against `stack` until its duration has passed. A fault is skipped while
/// `max_concurrent` faults are in effect or one is on its resource (the schedule keeps both
/// rules, but faults can overrun their time: a start that waits on a dependency, a reorg). A
/// start that fails (its readiness timed out while a dependency was down) is tried again
/// until a minute after the end, as a service manager restarts a unit that failed.
pub async fn run(stack: &Stack, schedule: &Schedule, started: Instant) -> Outcome {
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
    let mut n = Nemesis {
        stack,
        schedule,
        started,
        retry_until: started
            + Duration::from_millis(schedule.duration_ms)
            + START_RETRIES_AFTER_END,
        faults: Faults::default(),
        out: Outcome {
            history: History::new(schedule),
            redemptions: Vec::new(),
            lock: None,
        },
        beside: Default::default(),
        sampling: false,
    };
    let mut next_sample = Duration::ZERO;
    let mut queue = events.into_iter().peekable();
    let end = Duration::from_millis(schedule.duration_ms);
    while queue.peek().is_some() || started.elapsed() < end {
        let next_event = queue.peek().map(|(at, _)| Duration::from_millis(*at));
        let wake = next_event.unwrap_or(end).min(next_sample);
        // The schedule's clock: faults happen at their offsets.
        let done = tokio::select! {
            _ = tokio::time::sleep_until((started + wake).into()) => None,
            Some(done) = n.beside.next(), if !n.beside.is_empty() => Some(done),
        };
        // The loop woke far later than asked: something held it (the history says so).
        let late = started.elapsed().saturating_sub(wake);
        if done.is_none() && late > LOOP_LAG_NOTE {
            n.out.history.note(
                started,
                format!(
                    "the nemesis woke {:.1} s late ({} task(s) beside it)",
                    late.as_secs_f64(),
                    n.beside.len()
                ),
            );
        }
        if let Some(done) = done {
            n.ended(done);
            continue;
        }
        if started.elapsed() >= next_sample {
            if !n.sampling {
                n.sampling = true;
                n.beside.push(Box::pin(async move {
                    Done::Sampled(History::snapshot(stack, started).await)
                }));
            }
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
            Event::Apply(i) => n.apply(i),
            Event::Undo(i) => n.undo_due(i),
            Event::Redeem(i) => {
                match workload::spawn(stack, i, &schedule.redemptions[i], started) {
                    Ok(task) => n.out.redemptions.push(task),
                    Err(e) => n
                        .out
                        .history
                        .note(started, format!("redemption {i} not started: {e:#}")),
                }
            }
        }
    }
    while let Some(done) = n.beside.next().await {
        n.ended(done);
    }
    n.out
}

/// The loop's state.
struct Nemesis<'a> {
    stack: &'a Stack,
    schedule: &'a Schedule,
    started: Instant,
    /// Failed starts are tried again until then.
    retry_until: Instant,
    faults: Faults,
    out: Outcome,
    beside: futures::stream::FuturesUnordered<Beside<'a>>,
    /// A sample is being taken.
    sampling: bool,
}

impl<'a> Nemesis<'a> {
    /// Apply fault `i`, or record why it is skipped.
    fn apply(&mut self, i: usize) {
        let (stack, schedule) = (self.stack, self.schedule);
        let f = &schedule.faults[i].fault;
        let at = self.started.elapsed();
        if let Some(skip) = skip_reason(stack, schedule, &self.faults, f) {
            self.out
                .history
                .fault(FaultEvent::new(i, "apply", f, at, at, skip));
            return;
        }
        self.faults.active.insert(i);
        match f {
            Fault::Pause { .. }
            | Fault::LinkDelay { .. }
            | Fault::LinkBlackhole
            | Fault::LinkCut => {
                let r = actions::at_once(stack, f, true);
                if r.is_ok() && schedule.faults[i].for_ms > 0 {
                    self.faults.applied.insert(i);
                } else {
                    self.faults.active.remove(&i);
                }
                let now = self.started.elapsed();
                self.out
                    .history
                    .fault(FaultEvent::new(i, "apply", f, at, now, r));
            }
            Fault::MintDbLock => self.beside.push(Box::pin(async move {
                Done::Locked(i, at, actions::lock_mint_db(stack).await)
            })),
            Fault::Kill { .. } | Fault::Terminate { .. } => {
                self.beside.push(Box::pin(async move {
                    Done::Fault(i, "apply", at, actions::take_down(stack, f).await)
                }))
            }
            Fault::Reorg { .. } | Fault::LookupBurst { .. } => {
                self.beside.push(Box::pin(async move {
                    Done::Fault(i, "apply", at, actions::apply_beside(stack, f).await)
                }))
            }
            Fault::Replay { .. } => self.beside.push(Box::pin(async move {
                Done::Fault(i, "apply", at, actions::replay(stack, f, true).await)
            })),
        }
    }

    /// Fault `i`'s time is up.
    fn undo_due(&mut self, i: usize) {
        if self.faults.applied.contains(&i) {
            self.undo(i);
        } else if self.faults.active.contains(&i) {
            // Its apply is still running (a slow stop): undone when that ends.
            self.faults.undo_after_apply.insert(i);
        } else {
            let f = &self.schedule.faults[i].fault;
            let at = self.started.elapsed();
            let nothing = Ok("nothing to undo: the fault was not applied".into());
            self.out
                .history
                .fault(FaultEvent::new(i, "undo", f, at, at, nothing));
        }
    }

    /// Record work that ended beside the loop, and start what follows from it (an undo that
    /// waited for its apply).
    fn ended(&mut self, done: Done) {
        let now = self.started.elapsed();
        let (i, what, at, r) = match done {
            Done::Sampled(s) => {
                self.out.history.samples.push(s);
                self.sampling = false;
                return;
            }
            Done::Locked(i, at, Ok(lock)) => {
                self.out.lock = Some(lock);
                (i, "apply", at, Ok("write lock held".to_string()))
            }
            Done::Locked(i, at, Err(e)) => (i, "apply", at, Err(e)),
            Done::Fault(i, what, at, r) => (i, what, at, r),
        };
        let scheduled = &self.schedule.faults[i];
        let worked = r.as_ref().is_ok_and(|s| !s.starts_with("skipped"));
        if what == "undo" || !worked || scheduled.for_ms == 0 {
            self.faults.active.remove(&i);
        } else {
            self.faults.applied.insert(i);
        }
        self.out
            .history
            .fault(FaultEvent::new(i, what, &scheduled.fault, at, now, r));
        if what == "apply" && self.faults.undo_after_apply.remove(&i) && worked {
            self.undo(i);
        }
    }

    /// Undo applied fault `i`: resume a pause at once; start a process again, or release the
    /// lock, beside the loop.
    fn undo(&mut self, i: usize) {
        let (stack, retry_until) = (self.stack, self.retry_until);
        let f = &self.schedule.faults[i].fault;
        let at = self.started.elapsed();
        self.faults.applied.remove(&i);
        match f {
            Fault::Kill { process } | Fault::Terminate { process } => {
                self.beside.push(Box::pin(async move {
                    let r = actions::start_again(stack, process, retry_until).await;
                    Done::Fault(i, "undo", at, r)
                }))
            }
            Fault::Pause { .. } | Fault::LinkDelay { .. } | Fault::LinkBlackhole => {
                self.faults.active.remove(&i);
                let r = actions::at_once(stack, f, false);
                let now = self.started.elapsed();
                self.out
                    .history
                    .fault(FaultEvent::new(i, "undo", f, at, now, r));
            }
            Fault::MintDbLock => {
                let lock = self.out.lock.take();
                self.beside.push(Box::pin(async move {
                    let r = match lock {
                        Some(l) => actions::release(l).await,
                        None => Ok("no lock held".into()),
                    };
                    Done::Fault(i, "undo", at, r)
                }))
            }
            Fault::Replay { .. } => self.beside.push(Box::pin(async move {
                Done::Fault(i, "undo", at, actions::replay(stack, f, false).await)
            })),
            Fault::Reorg { .. } | Fault::LookupBurst { .. } | Fault::LinkCut => {
                self.faults.active.remove(&i);
            }
        }
    }
}

/// Why fault `f` is skipped now, if it is: a process it needs is not up, `max_concurrent`
/// faults are in effect, or one in effect is on its resource.
fn skip_reason(
    stack: &Stack,
    schedule: &Schedule,
    faults: &Faults,
    f: &Fault,
) -> Option<anyhow::Result<String>> {
    if let Some(skip) = actions::not_up(stack, f) {
        return Some(skip);
    }
    if faults.active.len() >= schedule.max_concurrent {
        return Some(Ok(format!(
            "skipped: {} fault(s) still in effect (at most {} at once)",
            faults.active.len(),
            schedule.max_concurrent
        )));
    }
    let resource = f.resource();
    let busy: BTreeMap<String, usize> = faults
        .active
        .iter()
        .map(|j| (schedule.faults[*j].fault.resource(), *j))
        .collect();
    busy.get(&resource).map(|j| {
        Ok(format!(
            "skipped: fault {j} on {resource} is still in effect"
        ))
    })
}
