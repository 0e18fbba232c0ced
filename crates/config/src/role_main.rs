//! What every role's `main` does: log set-up, layered config, SIGTERM/SIGINT, exit codes.
//! A role binary is then only argument parsing plus `role_main::run`.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Exit code for a config that cannot be loaded or that the role refuses.
pub const EXIT_BAD_CONFIG: u8 = 2;

/// A config the role refuses (its `validate()`): `run` exits with [`EXIT_BAD_CONFIG`].
#[derive(Debug)]
pub struct InvalidConfig(pub String);

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidConfig {}

/// `config.validate()`'s refusal as an error `run` exits 2 on: `invalid <role> config: ...`.
pub fn invalid(role: &str, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(InvalidConfig(format!("invalid {role} config: {why}")))
}

/// Resolves on SIGTERM or SIGINT (the harness stops roles with SIGTERM).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        // Without signal handlers the process still stops on the default action.
        _ => std::future::pending().await,
    }
}

/// Log to stdout (`RUST_LOG`, default `info` with cdk-axum's websocket disconnect noise off), load `T` from defaults, `file` and
/// `<env_prefix>__*`, then run `role(config, shutdown)`. Config errors (loading, or an
/// [`InvalidConfig`] from the role) exit with 2, other role errors with 1; either is printed
/// once, on stderr.
pub async fn run<T, F, Fut>(env_prefix: &str, file: Option<&Path>, role: F) -> ExitCode
where
    T: Serialize + DeserializeOwned + Default,
    F: FnOnce(T, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            // cdk-axum logs a websocket client that went away at ERROR; nothing is wrong then.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,cdk_axum::ws=off".into()),
        )
        .with_ansi(false)
        .init();
    let config: T = match crate::Layers::new(env_prefix)
        .file(file)
        .and_then(|l| l.load())
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match role(config, Box::pin(shutdown_signal())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<InvalidConfig>().is_some() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard one (the common soft limit of 1024 is a
/// default, not a decision); returns the soft limit now in force, if finite. Roles that hold
/// one socket per client (pool, proxy, a many-connection miner) call it once at start.
#[allow(unsafe_code)]
pub fn raise_descriptor_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own and have no other effect.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}
