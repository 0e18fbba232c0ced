//! `hashpool-pool`: load the config, run the pool until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Parser;
use hashpool_config::pool_side::{PoolConfig, POOL_ENV_PREFIX};

/// The hashpool pool role (SV2 server; templates from bitcoind; share records in Redis).
#[derive(Parser, Debug)]
#[command(name = "hashpool-pool", version)]
struct Args {
    /// TOML config file; `HASHPOOL_POOL__*` variables override it (e.g. HASHPOOL_POOL__LISTEN).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
    let config: PoolConfig = match hashpool_config::Layers::new(POOL_ENV_PREFIX)
        .file(args.config.as_deref())
        .and_then(|l| l.load())
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = async {
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
            _ => std::future::pending().await,
        }
    };
    match pool::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
