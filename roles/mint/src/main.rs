//! `hashpool-mint`: load the config, run the mint until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Parser;
use hashpool_config::pool_side::{MintConfig, MINT_ENV_PREFIX};

/// The hashpool mint role (Cashu mint for ehash; quotes from the pool's share records, paid
/// for audited templates only).
#[derive(Parser, Debug)]
#[command(name = "hashpool-mint", version)]
struct Args {
    /// TOML config file; `HASHPOOL_MINT__*` variables override it (e.g. HASHPOOL_MINT__LISTEN).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    hashpool_config::role_main::run(
        MINT_ENV_PREFIX,
        args.config.as_deref(),
        |c: MintConfig, stop| mint::run(c, stop),
    )
    .await
}
