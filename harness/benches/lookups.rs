//! Signed lookups from 100,000 fresh keys against a mint (release roles from
//! $HASHPOOL_BIN_DIR; `just bench` builds them) while the operator's own wallet key looks up
//! its quotes every 20 ms: lookups per second, the operator's lookup latency (p50, p99) beside
//! the limit, and how much the mint's database grew (SQLite's own page count) beside the
//! limit. Fresh keys must leave no state: the mint keeps a key's last timestamp in memory only
//! while it can still be replayed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::ehash_api;
use harness::roles::MinerOptions;
use harness::sqlite_db::logical_size;
use harness::{Chain, HarnessConfig, Stack};

/// Fresh keys that look up.
const FRESH: usize = 100_000;
/// Concurrent fresh-key clients.
const CLIENTS: usize = 8;
/// The operator's lookup p99 must stay under this.
const P99_LIMIT: Duration = Duration::from_millis(50);
/// The database may grow by at most this.
const GROWTH_LIMIT: u64 = 1024 * 1024;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = HarnessConfig::load(None)?;
    let mut s = Stack::builder("bench-lookups", &config)
        .chain(Chain::Signet)
        .redis()
        .start()
        .await?;
    s.start_pool_side(&Default::default(), &Default::default())
        .await?;
    s.start_proxy("operator", true, 500_000.0).await?;
    s.start_miner("cpu", "operator", &MinerOptions::default())
        .await?;
    let proxy = s.proxy("operator")?;
    harness::wait::wait_until(
        "the operator to mint some ehash",
        Duration::from_secs(120),
        || async {
            let st = proxy.wallet_status().await.map_err(|e| e.to_string())?;
            if st.minted > 0 {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            }
        },
    )
    .await?;
    s.miner("cpu")?.process().stop().await?;
    let mint = s.mint()?;
    let (addr, db) = (mint.addr.clone(), mint.db_path());
    let secret = proxy.locking_secret.clone().unwrap_or_default();
    let key = ehash_api::mint_pubkey(&addr).await?;
    let before = logical_size(&db)?;

    let done = Arc::new(AtomicBool::new(false));
    let operator = {
        let (addr, done) = (addr.clone(), done.clone());
        tokio::spawn(async move {
            let mut took = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let t = Instant::now();
                let req = ehash_api::signed_lookup_for(&key, &secret)?;
                let (code, _) =
                    ehash_api::post_lookup(&addr, &serde_json::to_string(&req)?).await?;
                anyhow::ensure!(code == 200, "the operator's lookup answered {code}");
                took.push(t.elapsed());
                // The operator's wallet polls; 20 ms apart is far busier than it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(took)
        })
    };
    let start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let addr = addr.clone();
        clients.spawn(async move {
            for _ in 0..FRESH / CLIENTS {
                let (secret, _) = harness::keys::locking_keys();
                let req = ehash_api::signed_lookup_for(&key, &secret)?;
                let (code, body) =
                    ehash_api::post_lookup(&addr, &serde_json::to_string(&req)?).await?;
                anyhow::ensure!(code == 200, "a fresh key's lookup answered {code}: {body}");
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = clients.join_next().await {
        r??;
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::SeqCst);
    let mut took = operator.await??;
    took.sort();
    let pct = |p: f64| took[((took.len() as f64 * p) as usize).min(took.len() - 1)];
    let grew = logical_size(&db)?.saturating_sub(before);
    s.shutdown(false).await?;

    println!("| fresh-key lookups | per second | operator lookups | operator p50 | operator p99 | p99 limit | database growth | growth limit |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {FRESH} | {:.0} | {} | {:.1} ms | {:.1} ms | {} ms | {} KB | {} KB |",
        FRESH as f64 / elapsed.as_secs_f64(),
        took.len(),
        pct(0.5).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        P99_LIMIT.as_millis(),
        grew / 1024,
        GROWTH_LIMIT / 1024
    );
    anyhow::ensure!(
        pct(0.99) <= P99_LIMIT,
        "the operator's p99 is above the limit"
    );
    anyhow::ensure!(grew <= GROWTH_LIMIT, "the database grew past the limit");
    Ok(())
}
