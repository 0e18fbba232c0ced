//! A supervised process: started and probed until ready (raced against early exit), restarted
//! by policy when it dies unexpectedly, stopped gracefully, and open to fault injection
//! (kill -9, stop/start, pause/resume).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::logs::tail;
use crate::process::{describe_exit, spawn, ProcessSpec, Running};
use crate::wait::{scaled, wait_until};

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
    /// Start with the recovery arguments next time (after [`Supervised::crash`]).
    recover_next: AtomicBool,
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
            recover_next: AtomicBool::new(false),
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

    /// Fault: SIGKILL the process group as a crash would, and leave it down until
    /// [`start_again`](Self::start_again): not restarted by policy, not an unexpected exit,
    /// not a stop (the soak's nemesis brings it back when it chooses). Returns how it ended.
    pub async fn crash(&self) -> anyhow::Result<String> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner
            .stopped_generation
            .fetch_max(self.status().generation, Ordering::SeqCst);
        let running = self
            .inner
            .current
            .lock()
            .map_err(|_| anyhow!("lock poisoned"))?
            .take()
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
        self.inner.status.send_modify(|s| {
            s.phase = Phase::Stopped;
            s.pid = None;
            s.last_exit = Some(how.clone());
        });
        Ok(how)
    }

    /// Graceful stop: SIGTERM, wait, SIGKILL. Not restarted. Returns how it exited.
    pub async fn stop(&self) -> anyhow::Result<String> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner
            .stopped_generation
            .fetch_max(self.status().generation, Ordering::SeqCst);
        let running = self
            .inner
            .current
            .lock()
            .map_err(|_| anyhow!("lock poisoned"))?
            .take();
        let how = match running {
            Some(running) => describe_exit(running.terminate(self.inner.stop_timeout).await?),
            None => "not running".to_string(),
        };
        self.inner.status.send_modify(|s| {
            s.phase = Phase::Stopped;
            s.pid = None;
            s.last_exit = Some(how.clone());
            if how != "not running" {
                s.stop_exits.push(how.clone());
            }
        });
        Ok(how)
    }

    /// Graceful stop through the program's own request (`ask`, e.g. lightningd's `stop` RPC):
    /// not restarted; if it has not exited within the stop timeout, SIGTERM then SIGKILL.
    /// Returns how it exited.
    pub async fn stop_with(
        &self,
        ask: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<String> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner
            .stopped_generation
            .fetch_max(self.status().generation, Ordering::SeqCst);
        let running = self
            .inner
            .current
            .lock()
            .map_err(|_| anyhow!("lock poisoned"))?
            .take();
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
        self.inner.status.send_modify(|s| {
            s.phase = Phase::Stopped;
            s.pid = None;
            s.last_exit = Some(how.clone());
            if how != "not running" {
                s.stop_exits.push(how.clone());
            }
        });
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
        let recovering = self.inner.recover_next.swap(false, Ordering::SeqCst);
        let (running, generation) = Inner::launch(&self.inner, recovering).await?;
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

impl Inner {
    async fn launch(this: &Arc<Inner>, recovering: bool) -> anyhow::Result<(Running, u64)> {
        let mut spec = this.spec.clone();
        if recovering {
            spec.args.extend(this.recovery_args.iter().map(Into::into));
        }
        let running = spawn(&spec)?;
        let mut generation = 0;
        this.status.send_modify(|s| {
            s.generation += 1;
            generation = s.generation;
            s.pid = Some(running.pid);
            s.phase = Phase::Starting;
        });
        *this.current.lock().map_err(|_| anyhow!("lock poisoned"))? = Some(running.clone());
        if let Err(e) = this.wait_ready(&running).await {
            let _ = running.signal(Signal::SIGKILL);
            running.exited().await;
            {
                // Only this start's process: another may have replaced it meanwhile.
                let mut current = this.current.lock().map_err(|_| anyhow!("lock poisoned"))?;
                if current.as_ref().is_some_and(|c| c.pid == running.pid) {
                    current.take();
                }
            }
            this.status.send_modify(|s| {
                s.phase = Phase::Failed(format!("{e:#}"));
                s.pid = None;
            });
            return Err(e);
        }
        this.status.send_modify(|s| s.phase = Phase::Ready);
        tracing::debug!(name = %this.spec.name, pid = running.pid, generation, "ready");
        Ok((running, generation))
    }

    async fn wait_ready(&self, running: &Running) -> anyhow::Result<()> {
        let probe = self.readiness.probe.clone();
        let ready = wait_until(&self.readiness.what, self.start_timeout, || probe());
        let result = tokio::select! {
            r = ready => r.map_err(anyhow::Error::from),
            status = running.exited() => match (self.readiness.probe)().await {
                // It got ready and then exited at once (a miner told to misbehave): the start
                // worked; the monitor reports the exit.
                Ok(()) => Ok(()),
                Err(_) => Err(anyhow!(
                    "exited during start-up ({}) while waiting for {}",
                    describe_exit(status),
                    self.readiness.what
                )),
            },
        };
        result.with_context(|| {
            format!(
                "{} (pid {}) did not become ready; command: {}\n--- last lines of {} ---\n{}\n--- last lines of {} ---\n{}",
                self.spec.name,
                running.pid,
                self.spec.command_line(),
                self.spec.stdout_log().display(),
                tail(&self.spec.stdout_log(), LOG_LINES_ON_FAILURE),
                self.spec.stderr_log().display(),
                tail(&self.spec.stderr_log(), LOG_LINES_ON_FAILURE),
            )
        })
    }
}

/// Watch one process; restart it by policy if it dies without being asked to.
async fn monitor(inner: Weak<Inner>, mut running: Running, mut generation: u64) {
    loop {
        let status = running.exited().await;
        let Some(this) = inner.upgrade() else { return };
        let current = this.status.borrow().generation;
        if this.stopping.load(Ordering::SeqCst)
            || current != generation
            || this.stopped_generation.load(Ordering::SeqCst) >= generation
        {
            return;
        }
        let how = describe_exit(status);
        let restarts = this.status.borrow().restarts;
        this.status.send_modify(|s| {
            s.last_exit = Some(how.clone());
            s.unexpected_exits.push(how.clone());
            s.pid = None;
        });
        let allowed = match this.policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnCrash { max_restarts } => restarts < max_restarts,
        };
        if !allowed {
            match this.policy {
                RestartPolicy::Never => {
                    tracing::info!(name = %this.spec.name, "exited ({how}); restart policy: never")
                }
                RestartPolicy::OnCrash { .. } => tracing::error!(
                    name = %this.spec.name,
                    "exited unexpectedly ({how}); not restarting after {restarts} restarts"
                ),
            }
            this.status
                .send_modify(|s| s.phase = Phase::Failed(format!("exited unexpectedly: {how}")));
            return;
        }
        tracing::warn!(name = %this.spec.name, "exited unexpectedly ({how}); restarting");
        let backoff =
            (MIN_RESTART_BACKOFF * 2u32.saturating_pow(restarts)).min(MAX_RESTART_BACKOFF);
        this.restarting.store(true, Ordering::SeqCst);
        // Restart backoff: a crash loop must not spin.
        tokio::time::sleep(scaled(backoff)).await; // restart backoff
        if this.stopping.load(Ordering::SeqCst) {
            this.restarting.store(false, Ordering::SeqCst);
            return;
        }
        this.status.send_modify(|s| s.restarts += 1);
        let launched = Inner::launch(&this, true).await;
        this.restarting.store(false, Ordering::SeqCst);
        match launched {
            Ok((r, g)) => {
                tracing::info!(name = %this.spec.name, pid = r.pid, generation = g, "restarted");
                running = r;
                generation = g;
            }
            Err(e) => {
                tracing::error!(name = %this.spec.name, "restart failed: {e:#}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("hh-sup-{name}-{}", std::process::id()))
    }

    /// Ready once the child has written its pid file.
    fn pidfile_ready(dir: &Path) -> Readiness {
        let file = dir.join("pid");
        Readiness {
            what: "pid file".into(),
            probe: Arc::new(move || {
                let file = file.clone();
                Box::pin(async move {
                    std::fs::read_to_string(&file)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            }),
        }
    }

    fn options(policy: RestartPolicy) -> SupervisorOptions {
        SupervisorOptions {
            policy,
            start_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(2),
            recovery_args: vec!["recovered".into()],
        }
    }

    fn sleeper(dir: &Path) -> ProcessSpec {
        ProcessSpec::new("sleeper", Path::new("/bin/sh"), dir)
            .arg("-c")
            .arg("echo \"$$ $0\" > pid.tmp && mv pid.tmp pid && exec sleep 600")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn kill9_is_restarted_by_policy() {
        let d = dir("restart");
        let sup = Supervised::start(
            sleeper(&d),
            pidfile_ready(&d),
            options(RestartPolicy::OnCrash { max_restarts: 3 }),
        )
        .await
        .unwrap();
        let first = sup.pid().unwrap();
        std::fs::remove_file(d.join("pid")).unwrap();
        let gen = sup.kill9().await.unwrap();
        let status = sup
            .wait_ready_after(gen, Duration::from_secs(10))
            .await
            .unwrap();
        assert_ne!(status.pid, Some(first));
        assert_eq!(status.restarts, 1);
        assert_eq!(status.last_exit.as_deref(), Some("killed by SIGKILL"));
        // The restart after a crash got the recovery arguments ($0 of `sh -c`).
        let pidfile = std::fs::read_to_string(d.join("pid")).unwrap();
        assert!(pidfile.trim().ends_with("recovered"), "{pidfile}");
        assert_eq!(sup.stop().await.unwrap(), "killed by SIGTERM");
        assert_eq!(sup.status().phase, Phase::Stopped);
        std::fs::remove_dir_all(&d).ok();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn early_exit_fails_start_with_the_log_tail() {
        let d = dir("early");
        let spec = ProcessSpec::new("broken", Path::new("/bin/sh"), &d)
            .arg("-c")
            .arg("echo 'Error: bad option -frobnicate' >&2; exit 1");
        let err = Supervised::start(spec, pidfile_ready(&d), options(RestartPolicy::Never))
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exit code 1"), "{msg}");
        assert!(msg.contains("bad option -frobnicate"), "{msg}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn never_policy_reports_the_crash() {
        let d = dir("never");
        let sup = Supervised::start(
            sleeper(&d),
            pidfile_ready(&d),
            options(RestartPolicy::Never),
        )
        .await
        .unwrap();
        sup.kill9().await.unwrap();
        let mut rx = sup.inner.status.subscribe();
        let failed = wait_until("failed phase", Duration::from_secs(5), || {
            let s = rx.borrow_and_update().clone();
            async move {
                match s.phase {
                    Phase::Failed(why) => Ok(why),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await
        .unwrap();
        assert!(failed.contains("SIGKILL"), "{failed}");
        std::fs::remove_dir_all(&d).ok();
    }
}
