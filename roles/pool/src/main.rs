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
    hashpool_config::role_main::run(
        POOL_ENV_PREFIX,
        args.config.as_deref(),
        |c: PoolConfig, stop| pool::run(c, stop),
    )
    .await
}
