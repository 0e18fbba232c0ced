//! `hashpool-miner`: a simulated SV1 CPU miner.

use clap::Parser;
use miner::{Behaviour, MinerConfig};

/// Mine on an SV1 proxy with real SHA-256d, as one miner or many (--connections); print share
/// results and a summary on exit. Exits non-zero when a connection could not reach the proxy or
/// was ended by what the proxy sent (a line it cannot parse, a refused subscribe); a connection
/// the proxy closed or lost later does not. With --reconnect, every connection that ends is
/// made again a second later, until SIGTERM.
#[derive(Parser, Debug)]
#[command(name = "hashpool-miner", version)]
struct Args {
    /// Proxy address (host:port).
    #[arg(long)]
    proxy: String,
    /// Worker name sent with mining.authorize (USER.N for connection N when there are several).
    #[arg(long, default_value = "sim-miner")]
    user: String,
    /// Simulated miners: SV1 connections to the proxy, each with its own subscribe, jobs and
    /// shares, all hashed by the same threads (1..=10000).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Hashing threads, shared by every connection (1..=256).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Cap on hashes per second over every connection (default: no cap).
    #[arg(long)]
    hashrate: Option<f64>,
    /// honest, below-target, duplicate, stale, malformed or string-ids.
    #[arg(long, default_value = "honest")]
    behaviour: Behaviour,
    /// Stop after this many seconds (default: until SIGTERM/SIGINT).
    #[arg(long)]
    duration: Option<f64>,
    /// Do not log each share result.
    #[arg(long)]
    quiet: bool,
    /// Connect again one second after a connection ends, however it ended (a real miner
    /// does); without it a connection that ends is done.
    #[arg(long)]
    reconnect: bool,
    /// Send `mining.suggest_difficulty` with this difficulty before subscribing.
    #[arg(long)]
    suggest_difficulty: Option<f64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = MinerConfig {
        proxy: args.proxy,
        user: args.user,
        connections: args.connections,
        threads: args.threads,
        hashrate_limit: args.hashrate,
        behaviour: args.behaviour,
        log_shares: !args.quiet,
        reconnect: args.reconnect,
        suggest_difficulty: args.suggest_difficulty,
    };
    let duration = args.duration;
    let connections = args.connections;
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
            for (index, error) in &report.errors {
                if connections > 1 {
                    eprintln!("error on connection {index}: {error}");
                } else {
                    eprintln!("error: {error}");
                }
            }
            if report.errors.is_empty() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
