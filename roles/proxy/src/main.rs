//! `hashpool-proxy`: load the config, run the proxy until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Parser;
use hashpool_config::miner_side::{ProxyConfig, PROXY_ENV_PREFIX};

/// The hashpool proxy (SV1 for miners, one SV2 channel per miner to the pool).
#[derive(Parser, Debug)]
#[command(name = "hashpool-proxy", version)]
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
    let config: ProxyConfig = match hashpool_config::Layers::new(PROXY_ENV_PREFIX)
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
    match proxy::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
