//! Spawning and reaping child processes.
//!
//! Every child:
//! - runs in its own process group (signals go to the group, so helpers it forks go too);
//! - has stdin closed and stdout/stderr appended to `stdout.log`/`stderr.log` in its directory;
//! - gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies even if the harness is killed with SIGKILL.
//!   The death signal fires when the *thread* that forked the child exits, so all children are
//!   forked by one spawner thread that lives as long as the harness process;
//! - is reaped by a waiter thread that publishes its exit status on a watch channel;
//! - is listed in a process-wide registry, so an interrupted harness (SIGINT/SIGTERM) or a
//!   panicking one can still stop every child ([`kill_all`], [`install_interrupt_handler`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Short name for logs and errors ("bitcoind", "redis").
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; `stdout.log` and `stderr.log` are written here.
    pub dir: PathBuf,
    /// Soft and hard `RLIMIT_NOFILE` for the process (as `ulimit -n` would set), if given.
    pub nofile_limit: Option<u64>,
    /// Someone else's program (SRI's translator): the invariant sweep counts only panics in
    /// its logs, and takes death by SIGTERM (it may have no handler) as its clean stop.
    pub foreign: bool,
}

impl ProcessSpec {
    /// A spec with no arguments.
    pub fn new(name: &str, program: &Path, dir: &Path) -> Self {
        Self {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            dir: dir.to_path_buf(),
            nofile_limit: None,
            foreign: false,
        }
    }

    /// Mark it as someone else's program (see [`ProcessSpec::foreign`]).
    pub fn foreign(mut self) -> Self {
        self.foreign = true;
        self
    }

    /// Start the process with at most `n` open descriptors (`ulimit -n n`).
    pub fn nofile_limit(mut self, n: u64) -> Self {
        self.nofile_limit = Some(n);
        self
    }

    /// Append an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Set an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Where stdout goes.
    pub fn stdout_log(&self) -> PathBuf {
        self.dir.join("stdout.log")
    }

    /// Where stderr goes.
    pub fn stderr_log(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    /// The command line, for logs.
    pub fn command_line(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// A spawned child. Dropping it does not stop it: stopping is the supervisor's decision.
#[derive(Debug, Clone)]
pub struct Running {
    /// Process id, also its process group id.
    pub pid: u32,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Running {
    /// The exit status, once the child has exited and been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Wait for the child to exit.
    pub async fn exited(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        loop {
            if let Some(status) = *rx.borrow_and_update() {
                return status;
            }
            if rx.changed().await.is_err() {
                // The waiter thread is gone without a status; treat as killed.
                return ExitStatus::from_raw(libc::SIGKILL);
            }
        }
    }

    /// Signal the whole process group; an already-exited child is not an error.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        if self.exit_status().is_some() {
            return Ok(());
        }
        match killpg(Pid::from_raw(self.pid as i32), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(anyhow!(
                "cannot send {signal} to process group {}: {e}",
                self.pid
            )),
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub async fn terminate(&self, grace: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGCONT)?; // a paused process cannot act on SIGTERM
        self.signal(Signal::SIGTERM)?;
        match tokio::time::timeout(grace, self.exited()).await {
            Ok(status) => Ok(status),
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    "no exit {grace:?} after SIGTERM: sending SIGKILL"
                );
                self.signal(Signal::SIGKILL)?;
                Ok(self.exited().await)
            }
        }
    }
}

/// Describe an exit status as a person would ("exit code 1", "killed by SIGKILL").
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the harness spawner thread");
        Mutex::new(tx)
    })
}

fn registry() -> &'static Mutex<BTreeMap<u32, String>> {
    static LIVE: OnceLock<Mutex<BTreeMap<u32, String>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Children that are running right now: (pid, name).
pub fn live_children() -> Vec<(u32, String)> {
    registry()
        .lock()
        .map(|m| m.iter().map(|(p, n)| (*p, n.clone())).collect())
        .unwrap_or_default()
}

/// Send `signal` to every live child's process group.
pub fn kill_all(signal: Signal) {
    for (pid, _) in live_children() {
        let _ = killpg(Pid::from_raw(pid as i32), signal);
    }
}

/// What a child inherits from the harness's environment; everything else it gets only from
/// its [`ProcessSpec`].
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "LLVM_PROFILE_FILE",
];

/// Start `spec`. Returns once the child exists (not once it is ready).
pub fn spawn(spec: &ProcessSpec) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&spec.dir)
        .with_context(|| format!("cannot create {}", spec.dir.display()))?;
    let open = |path: PathBuf| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open log {}", path.display()))
    };
    let stdout = open(spec.stdout_log())?;
    let stderr = open(spec.stderr_log())?;

    let mut command = Command::new(&spec.program);
    // A cleared environment plus what a process needs to run and what the spec passes: a
    // `HASHPOOL_POOL__*` left in the runner's shell must not change a stack.
    command.env_clear();
    for key in INHERITED_ENV {
        if let Some(v) = std::env::var_os(key) {
            command.env(key, v);
        }
    }
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    set_parent_death_signal(&mut command, spec.nofile_limit);

    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| anyhow!("spawner lock poisoned"))?
        .send((command, reply_tx))
        .map_err(|_| anyhow!("the harness spawner thread is gone"))?;
    let mut child = reply_rx
        .recv()
        .map_err(|_| anyhow!("the harness spawner thread is gone"))?
        .with_context(|| format!("cannot start {} ({})", spec.name, spec.program.display()))?;

    let pid = child.id();
    if let Ok(mut live) = registry().lock() {
        live.insert(pid, spec.name.clone());
    }
    let (exit_tx, exit_rx) = watch::channel(None);
    let name = spec.name.clone();
    std::thread::Builder::new()
        .name(format!("wait-{name}-{pid}"))
        .spawn(move || {
            let status = child
                .wait()
                .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
            if let Ok(mut live) = registry().lock() {
                live.remove(&pid);
            }
            tracing::debug!(%name, pid, status = %describe_exit(status), "process exited");
            let _ = exit_tx.send(Some(status));
        })
        .context("cannot start a waiter thread")?;
    tracing::debug!(name = %spec.name, pid, cmd = %spec.command_line(), "spawned");
    Ok(Running { pid, exit: exit_rx })
}

#[allow(unsafe_code)]
fn set_parent_death_signal(command: &mut Command, nofile: Option<u64>) {
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (prctl, getppid, setrlimit).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if nix::unistd::getppid().as_raw() != parent {
                // The harness died before prctl took effect.
                return Err(std::io::Error::other("harness exited during spawn"));
            }
            if let Some(n) = nofile {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// On SIGINT or SIGTERM: stop every child (SIGTERM, then SIGKILL after `grace`), then exit
/// with 130 or 143. Call once, from inside a tokio runtime.
pub fn install_interrupt_handler(grace: Duration) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        let children = live_children();
        eprintln!(
            "[harness] interrupted: stopping {} child process(es)",
            children.len()
        );
        kill_all(Signal::SIGCONT);
        kill_all(Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while !live_children().is_empty() && std::time::Instant::now() < deadline {
            // Poll interval while children exit after SIGTERM.
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
        }
        kill_all(Signal::SIGKILL);
        std::process::exit(code);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("hh-proc-{name}-{}", std::process::id()))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn output_goes_to_log_files_and_exit_is_reported() {
        let d = dir("echo");
        let spec = ProcessSpec::new("sh", Path::new("/bin/sh"), &d)
            .arg("-c")
            .arg("echo out; echo err >&2; exit 3");
        let running = spawn(&spec).unwrap();
        let status = running.exited().await;
        assert_eq!(describe_exit(status), "exit code 3");
        assert_eq!(std::fs::read_to_string(spec.stdout_log()).unwrap(), "out\n");
        assert_eq!(std::fs::read_to_string(spec.stderr_log()).unwrap(), "err\n");
        std::fs::remove_dir_all(&d).ok();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn terminate_escalates_to_sigkill_and_reaps() {
        let d = dir("trap");
        let spec = ProcessSpec::new("sh", Path::new("/bin/sh"), &d)
            .arg("-c")
            .arg("trap '' TERM; echo up; while :; do sleep 0.05; done");
        let running = spawn(&spec).unwrap();
        crate::logs::LogCursor::at_start(&spec.stdout_log())
            .wait_for("up", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(live_children().iter().any(|(p, _)| *p == running.pid));
        let status = running.terminate(Duration::from_millis(200)).await.unwrap();
        assert_eq!(describe_exit(status), "killed by SIGKILL");
        assert!(!live_children().iter().any(|(p, _)| *p == running.pid));
        std::fs::remove_dir_all(&d).ok();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn children_do_not_inherit_the_runners_role_settings() {
        // A variable left in a contributor's shell must not reach a role: only what the
        // harness passes does (PATH and HOME among it).
        std::env::set_var("HASHPOOL_POOL__HH_LEAK_PROBE", "leaked");
        let d = dir("env");
        let spec = ProcessSpec::new("sh", Path::new("/bin/sh"), &d)
            .arg("-c")
            .arg("env")
            .env("HASHPOOL_POOL__PASSED", "yes");
        let running = spawn(&spec).unwrap();
        running.exited().await;
        let env = std::fs::read_to_string(spec.stdout_log()).unwrap();
        assert!(!env.contains("HH_LEAK_PROBE"), "{env}");
        assert!(env.contains("HASHPOOL_POOL__PASSED=yes"), "{env}");
        assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let d = dir("missing");
        let err = spawn(&ProcessSpec::new("nope", Path::new("/no/such/program"), &d)).unwrap_err();
        assert!(format!("{err:#}").contains("/no/such/program"), "{err:#}");
        std::fs::remove_dir_all(&d).ok();
    }
}
