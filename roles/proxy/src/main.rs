//! `hashpool-proxy`: load the config, run the proxy until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Parser;
use hashpool_config::miner_side::{ProxyConfig, PROXY_ENV_PREFIX};

/// The hashpool proxy (SV1 for miners, one SV2 channel per miner to the pool).
#[derive(Parser, Debug)]
#[command(name = "hashpool-proxy", version)]
struct Args {
    /// TOML config file; `HASHPOOL_PROXY__*` variables override it (e.g. HASHPOOL_PROXY__LISTEN).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    hashpool_config::role_main::run(
        PROXY_ENV_PREFIX,
        args.config.as_deref(),
        |c: ProxyConfig, stop| proxy::run(c, stop),
    )
    .await
}
