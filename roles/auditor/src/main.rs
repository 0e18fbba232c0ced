//! `hashpool-auditor`: load the config, audit templates until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Parser;
use hashpool_config::pool_side::{AuditorConfig, AUDITOR_ENV_PREFIX};

/// The hashpool auditor role (checks every template that got a share with Bitcoin Core and
/// the pool policy; writes verdicts to audit:results).
#[derive(Parser, Debug)]
#[command(name = "hashpool-auditor", version)]
struct Args {
    /// TOML config file; `HASHPOOL_AUDITOR__*` variables override it (e.g.
    /// HASHPOOL_AUDITOR__WORKERS).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    hashpool_config::role_main::run(
        AUDITOR_ENV_PREFIX,
        args.config.as_deref(),
        |c: AuditorConfig, stop| auditor::run(c, stop),
    )
    .await
}
