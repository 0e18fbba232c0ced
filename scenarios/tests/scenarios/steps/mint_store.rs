//! The mint's own store under pressure: its database locked by another process while share
//! records arrive, and signed lookups from many fresh keys. The oracles are the pool's
//! records in Redis, the mint's answers over HTTP and the database file's size as SQLite
//! counts it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use cucumber::{then, when};
use ehash::{MINT_DEAD_STREAM, SHARES_STREAM};
use harness::ehash_api;
use harness::invariants::stream_entries;
use harness::sqlite_db::{logical_size, WriteLock};
use harness::wait::{scaled, wait_until};

use crate::world::HarnessWorld;

/// Wait until `miner` has `total` accepted shares, `while_what` happens.
async fn more_accepted(
    m: &harness::roles::MinerRole,
    miner: &str,
    total: usize,
    while_what: &str,
) -> anyhow::Result<()> {
    wait_until(
        &format!("miner {miner} to have {total} accepted shares while {while_what}"),
        Duration::from_secs(60),
        || async {
            let now = m.log().accepted.len();
            if now >= total {
                Ok(())
            } else {
                Err(format!("{now} accepted"))
            }
        },
    )
    .await?;
    Ok(())
}

#[when(
    expr = "another process holds the mint database's write lock while miner {string} gets {int} more accepted shares, for at least {int} seconds in all"
)]
async fn lock_mint_db(
    w: &mut HarnessWorld,
    miner: String,
    n: usize,
    secs: u64,
) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let path = stack.mint()?.db_path();
    let m = stack.miner(&miner)?;
    let before = m.log().accepted.len();
    let lock = WriteLock::take(&path)?;
    let taken = Instant::now();
    let outcome = async {
        more_accepted(m, &miner, before + n, "the mint's database is locked").await?;
        // The fault lasts at least `secs`: longer than the mint's busy timeout (10 s).
        let rest = Duration::from_secs(secs).saturating_sub(taken.elapsed());
        tokio::time::sleep(rest).await; // the fault's own length, not a synchronisation
        anyhow::Ok(())
    }
    .await;
    lock.release()?;
    println!(
        "[scenario] the mint's database was locked for {:.1} s",
        taken.elapsed().as_secs_f64()
    );
    outcome
}

#[when(
    expr = "the mint is paused while miner {string} gets {int} more accepted shares, and another process holds its database's write lock for {int} seconds from when it resumes"
)]
async fn backlog_then_lock(
    w: &mut HarnessWorld,
    miner: String,
    n: usize,
    secs: u64,
) -> anyhow::Result<()> {
    // The mint and cdk log every write the lock refuses at ERROR: caused on purpose. So does
    // the wallet's saga recovery while the lock lasts (the mint can neither replay nor
    // restore a batch it never signed); the recovery succeeds once the lock is gone, which
    // the steps after this one check (every quote minted).
    w.expected_log_errors.extend([
        "database is locked".to_string(),
        "cdk_sql_common::common: Query".to_string(),
        "Failed query with error".to_string(),
        "restore response does not cover every expected output exactly once".to_string(),
    ]);
    let stack = w.default_stack()?;
    let mint = stack.mint()?;
    let m = stack.miner(&miner)?;
    let before = m.log().accepted.len();
    mint.process().pause()?;
    let backlog = more_accepted(m, &miner, before + n, "the mint is paused").await;
    let lock = WriteLock::take(&mint.db_path());
    mint.process().resume()?;
    backlog?;
    let lock = lock?;
    let taken = Instant::now();
    // The fault's own length: longer than the mint's busy timeout (10 s) several times over.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    lock.release()?;
    println!(
        "[scenario] the mint resumed with a backlog into a database locked for {:.1} s",
        taken.elapsed().as_secs_f64()
    );
    Ok(())
}

#[then("every share record has exactly one quote")]
async fn every_record_quoted(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let mint = stack.mint()?;
    let mut conn = stack.redis()?.connect().await?;
    let records: Vec<ehash::ShareRecord> = harness::invariants::share_records(&mut conn)
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    anyhow::ensure!(!records.is_empty(), "no share record");
    let mut secrets = Vec::new();
    for (_, proxy) in stack.proxies() {
        if let (Some(k), Some(s)) = (proxy.locking_pubkey, &proxy.locking_secret) {
            secrets.push((k, s.clone()));
        }
    }
    wait_until(
        &format!("a quote for each of the {} share record(s)", records.len()),
        Duration::from_secs(60),
        || async {
            let mut quoted = HashSet::new();
            for (_, secret) in &secrets {
                for q in ehash_api::lookup(&mint.addr, secret)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    if !quoted.insert(q.share_hash.clone()) {
                        return Err(format!("share {} has two quotes", q.share_hash));
                    }
                }
            }
            let missing: Vec<&str> = records
                .iter()
                .filter(|r| !quoted.contains(&r.share_hash))
                .map(|r| r.share_hash.as_str())
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} record(s) have no quote: {missing:?}",
                    missing.len(),
                    records.len()
                ))
            }
        },
    )
    .await?;
    Ok(())
}

#[when(expr = "{int} lookups are signed by fresh keys")]
async fn fresh_key_lookups(w: &mut HarnessWorld, n: usize) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let mint = stack.mint()?;
    let path = mint.db_path();
    let size_before = logical_size(&path)?;
    let started = Instant::now();
    ehash_api::fresh_key_lookups(&mint.addr, n).await?;
    let took = started.elapsed();
    anyhow::ensure!(
        took < scaled(Duration::from_secs(600)),
        "{n} lookups took {took:?}"
    );
    println!(
        "[scenario] {n} fresh-key lookups in {:.1} s ({:.0}/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    w.counter_before = Some(size_before as f64);
    Ok(())
}

#[then(expr = "the mint's database grew by less than {int} KB")]
async fn db_growth(w: &mut HarnessWorld, kb: u64) -> anyhow::Result<()> {
    let before = w.counter_before.context("no size remembered")? as u64;
    let path = w.default_stack()?.mint()?.db_path();
    let after = logical_size(&path).with_context(|| format!("{}", path.display()))?;
    let grew = after.saturating_sub(before);
    anyhow::ensure!(
        grew < kb * 1024,
        "the mint's database grew by {grew} bytes ({before} -> {after}), the bound is {kb} KB"
    );
    Ok(())
}

/// The share hash of the record no quote can be made of (no share has it).
const UNQUOTABLE_SHARE: &str = "dead0000000000000000000000000000000000000000000000000000000000de";

#[when("a share record whose locking key is no curve point reaches the mint")]
async fn unquotable_record(w: &mut HarnessWorld) -> anyhow::Result<()> {
    use redis::AsyncCommands;
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    // A real record of this run, with another share hash and a key that is no point (x = 0
    // is on no secp256k1 point): only the key makes it unquotable.
    let (_, mut fields) = stream_entries(&mut conn, SHARES_STREAM)
        .await?
        .into_iter()
        .last()
        .context("no share record to copy")?;
    fields.insert("share_hash".into(), UNQUOTABLE_SHARE.into());
    fields.insert("locking_pubkey".into(), format!("02{}", "00".repeat(32)));
    let pairs: Vec<(String, String)> = fields.into_iter().collect();
    let _: String = conn.xadd(SHARES_STREAM, "*", &pairs).await?;
    // The mint logs the record it sets aside at ERROR: caused on purpose.
    w.expected_log_errors
        .push(format!("no quote can be made, sent to {MINT_DEAD_STREAM}"));
    Ok(())
}

#[then(
    expr = "that record is in mint:dead with a reason naming {string}, and nothing is left pending"
)]
async fn unquotable_is_dead(w: &mut HarnessWorld, why: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let mut conn = stack.redis()?.connect().await?;
    let reason = wait_until(
        "the unquotable record to be in mint:dead",
        Duration::from_secs(30),
        || {
            let mut conn = conn.clone();
            async move {
                let dead = stream_entries(&mut conn, MINT_DEAD_STREAM)
                    .await
                    .map_err(|e| e.to_string())?;
                dead.into_iter()
                    .find(|(_, f)| {
                        f.get("share_hash").map(String::as_str) == Some(UNQUOTABLE_SHARE)
                    })
                    .and_then(|(_, f)| f.get("dead_reason").cloned())
                    .ok_or_else(|| "not there".to_string())
            }
        },
    )
    .await?;
    anyhow::ensure!(reason.contains(&why), "its reason is {reason:?}");
    // Nothing pending for it: the mint's group acknowledged it with its dead letter.
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(SHARES_STREAM)
        .arg("mint")
        .query_async(&mut conn)
        .await?;
    anyhow::ensure!(
        pending.count() == 0,
        "the mint's group still has {} share record(s) pending",
        pending.count()
    );
    Ok(())
}

#[when(expr = "miner {string} has {int} more accepted shares")]
async fn more_shares(w: &mut HarnessWorld, miner: String, n: usize) -> anyhow::Result<()> {
    let m = w.default_stack()?.miner(&miner)?;
    let before = m.log().accepted.len();
    more_accepted(m, &miner, before + n, "it goes on mining").await
}
