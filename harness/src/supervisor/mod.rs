//! A supervised process: started and probed until ready (raced against early exit), restarted
//! by policy when it dies unexpectedly, stopped gracefully, and open to fault injection
//! (kill -9, stop/start, pause/resume).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use tokio::sync::watch;

mod launch;

use crate::process::{describe_exit, ProcessSpec, Running};
use crate::wait::wait_until;
use launch::monitor;

/// Lines of each log shown when a process fails to start.
const LOG_LINES_ON_FAILURE: usize = 25;
/// First pause before a restart; doubles per consecutive restart up to [`MAX_RESTART_BACKOFF`].
const MIN_RESTART_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause before a restart.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(5);

/// An async check that the process answers its protocol: `Err(observation)` means not yet.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What "ready" means for a process.
#[derive(Clone)]
pub struct Readiness {
    /// Human description of what is awaited ("bitcoind RPC getblockchaininfo on :1234").
    pub what: String,
    /// The check.
    pub probe: Probe,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("what", &self.what)
            .finish()
    }
}

/// What the supervisor does when the process exits without being asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Leave it dead; the status says why.
    Never,
    /// Restart it, at most this many times over the supervisor's life.
    OnCrash {
        /// Restart budget.
        max_restarts: u32,
    },
}

/// Lifecycle phase.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Phase {
    /// Spawned, probing readiness.
    #[default]
    Starting,
    /// Answering its protocol.
    Ready,
    /// Stopped by request.
    Stopped,
    /// SIGSTOPped.
    Paused,
    /// Dead and not restarted (policy or failed restart); the reason.
    Failed(String),
}

/// Observable state of a supervised process.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Increments at every spawn.
    pub generation: u64,
    /// Current process id.
    pub pid: Option<u32>,
    /// Current phase.
    pub phase: Phase,
    /// Restarts the supervisor made after crashes.
    pub restarts: u32,
    /// How the previous process ended.
    pub last_exit: Option<String>,
    /// How every process that died without being asked to ended, in order (crashes,
    /// kill -9 faults, a role that gave up).
    pub unexpected_exits: Vec<String>,
    /// How every process stopped on request ended, in order ("exit code 0" when it shut
    /// down cleanly on SIGTERM).
    pub stop_exits: Vec<String>,
}

/// How a process is supervised.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// What to do when it dies unexpectedly.
    pub policy: RestartPolicy,
    /// Readiness deadline per start.
    pub start_timeout: Duration,
    /// SIGTERM grace before SIGKILL.
    pub stop_timeout: Duration,
    /// Extra arguments for a restart after a crash (bitcoind: `-reindex`, because blocks it
    /// accepted since its last flush are on disk but not in its block index).
    pub recovery_args: Vec<String>,
}

impl SupervisorOptions {
    /// Options without recovery arguments; `timeouts` is (start, stop).
    pub fn new(policy: RestartPolicy, timeouts: (Duration, Duration)) -> Self {
        Self {
            policy,
            start_timeout: timeouts.0,
            stop_timeout: timeouts.1,
            recovery_args: Vec::new(),
        }
    }
}

struct Inner {
    spec: ProcessSpec,
    readiness: Readiness,
    policy: RestartPolicy,
    start_timeout: Duration,
    stop_timeout: Duration,
    recovery_args: Vec<String>,
    current: Mutex<Option<Running>>,
    stopping: AtomicBool,
    /// The newest generation a stop, crash or kill was asked for: its exit is no surprise,
    /// even if a new start has cleared `stopping` before its monitor woke up.
    stopped_generation: AtomicU64,
    /// The monitor is between an unexpected exit and its restart: a start by hand waits.
    restarting: AtomicBool,
    status: watch::Sender<Status>,
}

/// A process under supervision. Dropping it kills the process group (use [`stop`] to stop
/// gracefully).
///
/// [`stop`]: Supervised::stop
pub struct Supervised {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervised")
            .field("name", &self.inner.spec.name)
            .field("status", &*self.inner.status.borrow())
            .finish()
    }
}

impl Supervised {
    /// Spawn `spec` and wait until `readiness` holds; the error carries the log tails.
    pub async fn start(
        spec: ProcessSpec,
        readiness: Readiness,
        options: SupervisorOptions,
    ) -> anyhow::Result<Self> {
        let inner = Arc::new(Inner {
            spec,
            readiness,
            policy: options.policy,
            start_timeout: options.start_timeout,
            stop_timeout: options.stop_timeout,
            recovery_args: options.recovery_args,
            current: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stopped_generation: AtomicU64::new(0),
            restarting: AtomicBool::new(false),
            status: watch::channel(Status::default()).0,
        });
        let (running, generation) = Inner::launch(&inner, false).await?;
        tokio::spawn(monitor(Arc::downgrade(&inner), running, generation));
        Ok(Self { inner })
    }

    /// Short name.
    pub fn name(&self) -> &str {
        &self.inner.spec.name
    }

    /// The spec it runs.
    pub fn spec(&self) -> &ProcessSpec {
        &self.inner.spec
    }

    /// Current status.
    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// Current pid, if running.
    pub fn pid(&self) -> Option<u32> {
        self.status().pid
    }

    fn running(&self) -> anyhow::Result<Running> {
        self.inner
            .current
            .lock()
            .map_err(|_| anyhow!("supervisor lock poisoned"))?
            .clone()
            .ok_or_else(|| anyhow!("{} is not running", self.name()))
    }

    /// Fault: SIGKILL the process group, as a crash would. The restart policy applies.
    /// Returns the generation that was killed.
    pub async fn kill9(&self) -> anyhow::Result<u64> {
        let generation = self.status().generation;
        let running = self.running()?;
        tracing::info!(name = self.name(), pid = running.pid, "fault: SIGKILL");
        running.signal(Signal::SIGKILL)?;
        running.exited().await;
        Ok(generation)
    }

    /// Fault: SIGSTOP (the process stops answering but keeps its sockets).
    pub fn pause(&self) -> anyhow::Result<()> {
        self.running()?.signal(Signal::SIGSTOP)?;
        self.inner.status.send_modify(|s| s.phase = Phase::Paused);
        Ok(())
    }

    /// The kernel's state letter for the process (`/proc/<pid>/stat`: `S` sleeping, `R`
    /// running, `T` stopped by a signal, ...), or `None` if it is not running.
    pub fn os_state(&self) -> Option<char> {
        let pid = self.pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ...`: comm may hold spaces and parentheses; state follows the last ')'.
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    /// Undo [`pause`](Self::pause).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.running()?.signal(Signal::SIGCONT)?;
        self.inner.status.send_modify(|s| s.phase = Phase::Ready);
        Ok(())
    }

    /// Mark a stop as asked for (its exit is no surprise to the monitor) and take the
    /// running process, if any.
    fn take_for_stop(&self) -> anyhow::Result<Option<Running>> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner
            .stopped_generation
            .fetch_max(self.status().generation, Ordering::SeqCst);
        Ok(self
            .inner
            .current
            .lock()
            .map_err(|_| anyhow!("lock poisoned"))?
            .take())
    }

    /// Record a stop that was asked for: `how` it ended, counted among the stop exits (which
    /// must be clean) unless it was a crash on purpose or there was nothing to stop.
    fn mark_stopped(&self, how: &str, stop_exit: bool) {
        self.inner.status.send_modify(|s| {
            s.phase = Phase::Stopped;
            s.pid = None;
            s.last_exit = Some(how.to_string());
            if stop_exit && how != "not running" {
                s.stop_exits.push(how.to_string());
            }
        });
    }

    /// Fault: SIGKILL the process group as a crash would, and leave it down until
    /// [`start_again`](Self::start_again): not restarted by policy, not an unexpected exit,
    /// not a stop (the soak's nemesis brings it back when it chooses). Returns how it ended.
    pub async fn crash(&self) -> anyhow::Result<String> {
        let running = self
            .take_for_stop()?
            .ok_or_else(|| anyhow!("{} is not running", self.name()))?;
        tracing::info!(
            name = self.name(),
            pid = running.pid,
            "fault: SIGKILL, held down"
        );
        // A paused process dies of SIGKILL too; SIGCONT first so its group goes at once.
        let _ = running.signal(Signal::SIGCONT);
        running.signal(Signal::SIGKILL)?;
        let how = describe_exit(running.exited().await);
        self.mark_stopped(&how, false);
        Ok(how)
    }

    /// Graceful stop: SIGTERM, wait, SIGKILL. Not restarted. Returns how it exited.
    pub async fn stop(&self) -> anyhow::Result<String> {
        let running = self.take_for_stop()?;
        let how = match running {
            Some(running) => describe_exit(running.terminate(self.inner.stop_timeout).await?),
            None => "not running".to_string(),
        };
        self.mark_stopped(&how, true);
        Ok(how)
    }

    /// Graceful stop through the program's own request (`ask`, e.g. lightningd's `stop` RPC):
    /// not restarted; if it has not exited within the stop timeout, SIGTERM then SIGKILL.
    /// Returns how it exited.
    pub async fn stop_with(
        &self,
        ask: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<String> {
        let running = self.take_for_stop()?;
        let how = match running {
            Some(running) => {
                ask.await;
                let status =
                    match tokio::time::timeout(self.inner.stop_timeout, running.exited()).await {
                        Ok(status) => status,
                        Err(_) => running.terminate(self.inner.stop_timeout).await?,
                    };
                describe_exit(status)
            }
            None => "not running".to_string(),
        };
        self.mark_stopped(&how, true);
        Ok(how)
    }

    /// Start again after [`stop`](Self::stop) (same spec, same data).
    pub async fn start_again(&self) -> anyhow::Result<()> {
        // A process that exited on its own (and was not restarted) is still the current one
        // until something replaces it.
        if self.inner.restarting.load(Ordering::SeqCst) {
            // The monitor is restarting it by policy: wait for that instead of a second copy.
            let inner = self.inner.clone();
            wait_until(
                &format!("{}'s restart by the supervisor to finish", self.name()),
                self.inner.start_timeout + MAX_RESTART_BACKOFF,
                || {
                    let inner = inner.clone();
                    async move {
                        if inner.restarting.load(Ordering::SeqCst) {
                            Err("restarting".to_string())
                        } else {
                            Ok(())
                        }
                    }
                },
            )
            .await?;
        }
        let alive = self.running().is_ok_and(|r| r.exit_status().is_none());
        if alive && self.status().phase == Phase::Ready {
            return Ok(());
        }
        anyhow::ensure!(!alive, "{} is already running", self.name());
        self.inner.stopping.store(false, Ordering::SeqCst);
        // Without recovery arguments: the stack's nodes are peers of one another, and a node
        // fetches the blocks it forgot from them (a -reindex would take longer than a start).
        let (running, generation) = Inner::launch(&self.inner, false).await?;
        tokio::spawn(monitor(Arc::downgrade(&self.inner), running, generation));
        Ok(())
    }

    /// Stop, then start again.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Wait until a process newer than `generation` is ready (after a crash restart).
    pub async fn wait_ready_after(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> anyhow::Result<Status> {
        let mut rx = self.inner.status.subscribe();
        let what = format!(
            "{} to be restarted and ready (after generation {generation})",
            self.name()
        );
        let status = wait_until(&what, timeout, || {
            let s = rx.borrow_and_update().clone();
            async move {
                match &s.phase {
                    Phase::Ready if s.generation > generation => Ok(s),
                    Phase::Failed(why) => Err(format!("failed: {why}")),
                    other => Err(format!("generation {} {other:?}", s.generation)),
                }
            }
        })
        .await?;
        Ok(status)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner
            .stopped_generation
            .fetch_max(self.status().generation, Ordering::SeqCst);
        if let Ok(mut current) = self.inner.current.lock() {
            if let Some(running) = current.take() {
                if running.exit_status().is_none() {
                    tracing::warn!(name = %self.inner.spec.name, pid = running.pid, "dropped while running: SIGKILL");
                    let _ = running.signal(Signal::SIGCONT);
                    let _ = running.signal(Signal::SIGKILL);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
