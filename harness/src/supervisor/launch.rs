//! Starting a supervised process and watching it: readiness raced against the process
//! exiting, and the monitor that restarts it by policy after an unexpected exit.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use anyhow::{anyhow, Context};
use nix::sys::signal::Signal;

use super::{
    Inner, Phase, RestartPolicy, LOG_LINES_ON_FAILURE, MAX_RESTART_BACKOFF, MIN_RESTART_BACKOFF,
};
use crate::logs::tail;
use crate::process::{describe_exit, spawn, Running};
use crate::wait::{scaled, wait_until};

impl Inner {
    pub(super) async fn launch(
        this: &Arc<Inner>,
        recovering: bool,
    ) -> anyhow::Result<(Running, u64)> {
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
pub(super) async fn monitor(inner: Weak<Inner>, mut running: Running, mut generation: u64) {
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
