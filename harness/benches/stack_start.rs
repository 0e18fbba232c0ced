//! Stack start time: bitcoind from the cached chain plus Redis, spawn to both answering,
//! median of 5 per chain. `just bench` (or `cargo bench -p harness --bench stack_start`).

use std::time::{Duration, Instant};

use harness::{Chain, HarnessConfig, Stack};

const RUNS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = HarnessConfig::load(None)?;
    println!("| chain | runs | spawn to ready, median | min | max | whole Stack::start, median |");
    println!("|---|---|---|---|---|---|");
    for chain in [Chain::Signet, Chain::Regtest] {
        // Build the cache outside the measurement.
        Stack::builder("bench-warmup", &config)
            .chain(chain)
            .start()
            .await?
            .shutdown(false)
            .await?;
        let mut ready = Vec::new();
        let mut whole = Vec::new();
        for i in 0..RUNS {
            let t = Instant::now();
            let stack = Stack::builder(&format!("bench-{i}"), &config)
                .chain(chain)
                .redis()
                .start()
                .await?;
            whole.push(t.elapsed());
            ready.push(stack.start_time());
            stack.shutdown(false).await?;
        }
        let (min, max) = (ready.iter().min().copied(), ready.iter().max().copied());
        println!(
            "| {chain} | {RUNS} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            median(ready.clone()).as_secs_f64() * 1e3,
            min.unwrap_or_default().as_secs_f64() * 1e3,
            max.unwrap_or_default().as_secs_f64() * 1e3,
            median(whole).as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
