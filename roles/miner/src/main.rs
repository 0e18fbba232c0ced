//! `hashpool-miner`: a simulated SV1 CPU miner.

use clap::Parser;
use miner::{Behaviour, MinerConfig};

/// Mine on an SV1 proxy with real SHA-256d; print share results and a summary on exit.
#[derive(Parser, Debug)]
#[command(name = "hashpool-miner", version)]
struct Args {
    /// Proxy address (host:port).
    #[arg(long)]
    proxy: String,
    /// Worker name sent with mining.authorize.
    #[arg(long, default_value = "sim-miner")]
    user: String,
    /// Hashing threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Cap on total hashes per second (default: no cap).
    #[arg(long)]
    hashrate: Option<f64>,
    /// honest, below-target, duplicate, stale or malformed.
    #[arg(long, default_value = "honest")]
    behaviour: Behaviour,
    /// Stop after this many seconds (default: until SIGTERM/SIGINT).
    #[arg(long)]
    duration: Option<f64>,
    /// Do not log each share result.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = MinerConfig {
        proxy: args.proxy,
        user: args.user,
        threads: args.threads,
        hashrate_limit: args.hashrate,
        behaviour: args.behaviour,
        log_shares: !args.quiet,
    };
    let duration = args.duration;
    let shutdown = async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        let limit = async {
            match duration {
                Some(secs) => tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            _ = limit => {},
        }
    };
    match miner::run(config, shutdown).await {
        Ok(report) => {
            println!("miner finished ({}): {}", report.ended, report.line());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
