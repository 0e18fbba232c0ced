//! Growth: what one request costs as history grows (`cargo bench -p harness --bench growth`,
//! in `just bench`; role binaries from $HASHPOOL_BIN_DIR, release under `just bench`).
//!
//! One Redis and one mint; one operator key whose history is built through the real path:
//! share records pipelined into `ehash:shares` (a `valid` verdict first, so the mint pays each
//! quote as it makes it), then minted by one cdk wallet that keeps every proof in a sqlite
//! file, as an operator's wallet does. At each size (10^3, 10^4 and 10^5 quotes;
//! `HASHPOOL_GROWTH_MAX=1000000` adds 10^6) it measures:
//!
//! - a signed lookup of the key's unissued quotes (p50 and p99 of 30, after a first one timed
//!   apart: it drops from the key's index what the wallet minted since the last lookup);
//! - a NUT-29 batch mint of 100 new quotes by the wallet that holds the whole history;
//! - settling one template with 1,000 quotes (its verdict appended once its quotes exist,
//!   until all are PAID: the mint's own counter);
//! - Redis `used_memory` once the mint trimmed what it acknowledged, and the mint database's
//!   size on disk.
//!
//! Each figure is printed with its slope: its value at the largest size over its value at the
//! smallest. Goal (the growth issue): per-request figures within 1.5x, memory growing only
//! with work not yet settled. Not measured here: the redemption reserve (it needs bitcoind
//! and Core Lightning; the `redemption` bench times it on a small history).

use std::time::{Duration, Instant};

use harness::roles::MintOptions;
use harness::{ehash_api, HarnessConfig, Stack};

/// Quotes added per template while the history grows.
const CHUNK: usize = 10_000;
/// Quotes per NUT-29 batch while the wallet mints the history.
const BATCH: usize = 500;
/// Lookups timed at each size.
const LOOKUPS: usize = 30;

/// The figures at one history size.
#[derive(Debug, Default, Clone)]
struct Figures {
    size: usize,
    lookup_p50_ms: f64,
    lookup_p99_ms: f64,
    lookup_first_ms: f64,
    mint_100_ms: f64,
    settle_1000_ms: f64,
    redis_mb: f64,
    db_mb: f64,
}

/// The history under construction: the stack, the key, the wallet, and how far it has got.
struct History {
    stack: Stack,
    secret: String,
    key: ehash::LockingPubkey,
    wallet: cdk::wallet::Wallet,
    conn: redis::aio::MultiplexedConnection,
    /// Quotes made so far.
    quotes: usize,
    /// Templates used so far.
    templates: u32,
}

impl History {
    async fn new(config: &HarnessConfig) -> anyhow::Result<Self> {
        let mut stack = Stack::builder("bench-growth", config)
            .redis()
            .start()
            .await?;
        // The mint trims what it acknowledged every second (no other reader here).
        let streams = hashpool_config::pool_side::StreamsSection {
            trim_interval_secs: 1,
            trim_min_age_secs: 0,
            ..Default::default()
        };
        stack
            .start_mint(&MintOptions {
                streams: Some(streams),
                ..MintOptions::default()
            })
            .await?;
        let (secret, key) = harness::keys::locking_keys();
        let wallet =
            ehash_api::file_wallet(&stack.mint()?.url, &stack.dir().join("wallet.sqlite")).await?;
        let conn = stack.redis()?.connect().await?;
        Ok(Self {
            stack,
            secret,
            key,
            wallet,
            conn,
            quotes: 0,
            templates: 0,
        })
    }

    fn next_template(&mut self) -> u64 {
        self.templates += 1;
        ehash::template_id(7, self.templates)
    }

    async fn verdict(&mut self, template_id: u64) -> anyhow::Result<()> {
        harness::redis::append_valid_verdict(&mut self.conn, template_id).await
    }

    async fn records(&mut self, template_id: u64, n: usize) -> anyhow::Result<()> {
        harness::redis::append_share_records(&mut self.conn, template_id, self.key, n).await?;
        self.quotes += n;
        Ok(())
    }

    /// Wait until the mint's counter of `event` quotes reaches `n`.
    async fn counted(&self, event: &str, n: usize) -> anyhow::Result<()> {
        let mint = self.stack.mint()?;
        harness::wait::wait_until(
            &format!("{n} quotes {event}"),
            Duration::from_secs(1800),
            || async {
                let m = mint.metrics().await.map_err(|e| e.to_string())?;
                let got = m.get(&format!("hashpool_mint_quotes_total{{event=\"{event}\"}}"));
                if got >= n as f64 {
                    Ok(())
                } else {
                    Err(format!("{got} {event}"))
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Wait until the mint has trimmed both streams it reads of everything it acknowledged.
    async fn trimmed(&self) -> anyhow::Result<()> {
        let conn = self.conn.clone();
        harness::wait::wait_until(
            "the mint to trim ehash:shares and audit:results to nothing",
            Duration::from_secs(60),
            || {
                let mut conn = conn.clone();
                async move {
                    let mut lens = Vec::new();
                    for stream in [ehash::SHARES_STREAM, ehash::AUDIT_RESULTS_STREAM] {
                        let n: u64 = redis::cmd("XLEN")
                            .arg(stream)
                            .query_async(&mut conn)
                            .await
                            .map_err(|e| e.to_string())?;
                        lens.push(format!("{stream} {n}"));
                        if n > 0 {
                            return Err(lens.join(", "));
                        }
                    }
                    Ok(())
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Mint every unissued quote of the key into the history wallet; the time the last batch
    /// took.
    async fn mint_unissued(&self) -> anyhow::Result<Duration> {
        let mint = self.stack.mint()?;
        let quotes: Vec<_> = ehash_api::lookup(&mint.addr, &self.secret)
            .await?
            .into_iter()
            .filter(|q| q.state == "PAID")
            .collect();
        let mut last = Duration::ZERO;
        for chunk in quotes.chunks(BATCH) {
            ehash_api::import_paid(&self.wallet, chunk, &self.secret).await?;
            let ids: Vec<&str> = chunk.iter().map(|q| q.quote.as_str()).collect();
            let t = Instant::now();
            self.wallet
                .batch_mint(&ids, ehash_api::fewest_proofs(), None, None)
                .await
                .map_err(|e| anyhow::anyhow!("batch mint: {e}"))?;
            last = t.elapsed();
        }
        Ok(last)
    }

    /// Grow the history to `size` quotes, all minted.
    async fn grow_to(&mut self, size: usize) -> anyhow::Result<()> {
        while self.quotes < size {
            let t = self.next_template();
            self.verdict(t).await?;
            let n = (size - self.quotes).min(CHUNK);
            self.records(t, n).await?;
        }
        self.counted("paid", self.quotes).await?;
        self.mint_unissued().await?;
        Ok(())
    }

    async fn measure(&mut self) -> anyhow::Result<Figures> {
        let size = self.quotes;
        // Lookups of the unissued quotes (none: the history is minted).
        let mint_addr = self.stack.mint()?.addr.clone();
        let mint_key = ehash_api::mint_pubkey(&mint_addr).await?;
        let mut times = Vec::new();
        // The first lookup after the wallet minted drops what it minted from the key's index
        // of unissued quotes (a cost of what was minted since the last lookup, not of the
        // history): timed apart, then LOOKUPS more.
        let mut first_ms = None;
        for _ in 0..=LOOKUPS {
            let mut req = ehash_api::signed_lookup_for(&mint_key, &self.secret)?;
            req.unissued_only = true;
            let body = serde_json::to_string(&req)?;
            let t = Instant::now();
            let (code, answer) = ehash_api::post_lookup(&mint_addr, &body).await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            anyhow::ensure!(code == 200, "lookup answered {code}: {answer}");
            if first_ms.is_none() {
                first_ms = Some(ms);
            } else {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        // A batch mint of 100 by the wallet holding everything.
        let t = self.next_template();
        self.verdict(t).await?;
        self.records(t, 100).await?;
        self.counted("paid", self.quotes).await?;
        let mint_100 = self.mint_unissued().await?;
        // One template of 1,000 quotes settled once its verdict comes.
        let t = self.next_template();
        self.records(t, 1000).await?;
        self.counted("created", self.quotes).await?;
        let started = Instant::now();
        self.verdict(t).await?;
        self.counted("paid", self.quotes).await?;
        let settle = started.elapsed();
        self.mint_unissued().await?;
        self.trimmed().await?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn)
            .await?;
        let used: f64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN);
        let db = self.stack.mint()?.db_path();
        let db_bytes: u64 = ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                std::fs::metadata(format!("{}{suffix}", db.display()))
                    .ok()
                    .map(|m| m.len())
            })
            .sum();
        Ok(Figures {
            size,
            lookup_p50_ms: pct(0.5),
            lookup_p99_ms: pct(0.99),
            lookup_first_ms: first_ms.unwrap_or(f64::NAN),
            mint_100_ms: mint_100.as_secs_f64() * 1000.0,
            settle_1000_ms: settle.as_secs_f64() * 1000.0,
            redis_mb: used / 1_048_576.0,
            db_mb: db_bytes as f64 / 1_048_576.0,
        })
    }
}

fn slope(rows: &[Figures], f: impl Fn(&Figures) -> f64) -> String {
    match (rows.first(), rows.last()) {
        (Some(a), Some(b)) if f(a) > 0.0 => format!("{:.2}x", f(b) / f(a)),
        _ => "-".into(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = HarnessConfig::load(None)?;
    let max: usize = std::env::var("HASHPOOL_GROWTH_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let sizes: Vec<usize> = [1_000, 10_000, 100_000, 1_000_000]
        .into_iter()
        .filter(|s| *s <= max)
        .collect();
    let mut h = History::new(&config).await?;
    let mut rows = Vec::new();
    for size in sizes {
        let t = Instant::now();
        h.grow_to(size).await?;
        eprintln!(
            "[growth] history of {size} quotes built and minted in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        rows.push(h.measure().await?);
    }
    h.stack.shutdown(false).await?;
    println!("| quotes in the history | lookup (unissued) p50 / p99 | first lookup after minting the growth | batch mint of 100 | settle 1,000 | Redis used_memory (streams trimmed) | mint database |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} / {:.1} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} MB | {:.1} MB |",
            r.size,
            r.lookup_p50_ms,
            r.lookup_p99_ms,
            r.lookup_first_ms,
            r.mint_100_ms,
            r.settle_1000_ms,
            r.redis_mb,
            r.db_mb
        );
    }
    println!(
        "| slope (largest over smallest; goal 1.5x per request) | {} / {} | {} | {} | {} | {} | {} |",
        slope(&rows, |r| r.lookup_p50_ms),
        slope(&rows, |r| r.lookup_p99_ms),
        slope(&rows, |r| r.lookup_first_ms),
        slope(&rows, |r| r.mint_100_ms),
        slope(&rows, |r| r.settle_1000_ms),
        slope(&rows, |r| r.redis_mb),
        slope(&rows, |r| r.db_mb)
    );
    Ok(())
}
