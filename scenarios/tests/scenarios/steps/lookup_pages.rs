//! Lookup pages: a key's quotes come in pages of at most `MAX_LOOKUP_PAGE`, each quote once,
//! checked against the share records in Redis (what the pool wrote, not the mint's tables).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use cucumber::{then, when};
use harness::ehash_api;
use harness::roles::MinerOptions;
use harness::wait::wait_until;

use crate::world::HarnessWorld;

/// The share hashes of every record locked to `key` (hex).
async fn record_hashes(w: &HarnessWorld, key: &str) -> anyhow::Result<HashSet<String>> {
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    Ok(harness::invariants::share_records(&mut conn)
        .await?
        .into_iter()
        .filter(|(_, r)| r.locking_pubkey.to_string() == key)
        .map(|(_, r)| r.share_hash)
        .collect())
}

/// Proxy `name`'s locking key and secret (hex).
fn key_of(w: &HarnessWorld, name: &str) -> anyhow::Result<(String, String)> {
    let proxy = w.default_stack()?.proxy(name)?;
    let key = proxy
        .locking_pubkey
        .context("the proxy has no locking key")?;
    let secret = proxy.locking_secret.clone().context("no locking secret")?;
    Ok((key.to_string(), secret))
}

#[when(
    expr = "a farm of {int} miners in one process mines behind proxy {string} until its key has {int} share records, then stops"
)]
async fn farm_until(
    w: &mut HarnessWorld,
    connections: usize,
    proxy: String,
    records: usize,
) -> anyhow::Result<()> {
    let opts = MinerOptions {
        connections,
        hashrate: Some(100_000.0 * connections as f64),
        log_shares: false,
        ..Default::default()
    };
    w.default_stack_mut()?
        .start_miner("page-farm", &proxy, &opts)
        .await?;
    let (key, _) = key_of(w, &proxy)?;
    wait_until(
        &format!("proxy {proxy}'s key to have {records} share records"),
        Duration::from_secs(120),
        || async {
            let n = record_hashes(w, &key)
                .await
                .map_err(|e| e.to_string())?
                .len();
            if n >= records {
                Ok(())
            } else {
                Err(format!("{n} records"))
            }
        },
    )
    .await?;
    w.default_stack()?
        .miner("page-farm")?
        .process()
        .stop()
        .await?;
    Ok(())
}

/// Page through every quote of `secret`'s key, `limit` at a time: the share hash of each
/// quote in order, and the size of each page.
async fn page_through(
    mint: &str,
    mint_key: &ehash::LockingPubkey,
    secret: &str,
    limit: u32,
) -> anyhow::Result<(Vec<String>, Vec<usize>)> {
    let mut hashes = Vec::new();
    let mut sizes = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = ehash_api::signed_lookup_for(mint_key, secret)?;
        req.limit = Some(limit);
        req.after = after.clone();
        let (code, body) = ehash_api::post_lookup(mint, &serde_json::to_string(&req)?).await?;
        anyhow::ensure!(code == 200, "a page answered {code}: {body}");
        let page: serde_json::Value = serde_json::from_str(&body)?;
        let quotes = page["quotes"].as_array().context("no quotes array")?;
        sizes.push(quotes.len());
        for q in quotes {
            hashes.push(q["share_hash"].as_str().context("share_hash")?.to_string());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok((hashes, sizes)),
        }
    }
}

#[then(
    expr = "{string}'s quotes come in pages of at most {int}, full but the last: one for each share record of its key, each once"
)]
async fn pages(w: &mut HarnessWorld, proxy: String, limit: u32) -> anyhow::Result<()> {
    let (key, secret) = key_of(w, &proxy)?;
    let mint = w.default_stack()?.mint()?.addr.clone();
    let mint_key = ehash_api::mint_pubkey(&mint).await?;
    let max = limit as usize;
    // The mint takes the last records a moment after the pool wrote them.
    wait_until(
        &format!("{proxy}'s quotes, in pages of {limit}, to match its share records"),
        Duration::from_secs(60),
        || async {
            let records = record_hashes(w, &key).await.map_err(|e| e.to_string())?;
            let (hashes, sizes) = page_through(&mint, &mint_key, &secret, limit)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let seen: HashSet<String> = hashes.iter().cloned().collect();
            if seen.len() != hashes.len() {
                return Err(format!(
                    "{} quotes, {} distinct shares",
                    hashes.len(),
                    seen.len()
                ));
            }
            if seen != records {
                return Err(format!(
                    "{} quotes for {} records: {} without a record, {} records without a quote",
                    seen.len(),
                    records.len(),
                    seen.difference(&records).count(),
                    records.difference(&seen).count()
                ));
            }
            let shaped = sizes.iter().all(|n| *n <= max)
                && sizes[..sizes.len() - 1].iter().all(|n| *n == max)
                && sizes.len() == records.len().div_ceil(max).max(1);
            if shaped {
                Ok(())
            } else {
                Err(format!(
                    "{} records came in pages of {sizes:?} (at most {limit}, full but the last)",
                    records.len()
                ))
            }
        },
    )
    .await?;
    Ok(())
}

#[then(
    expr = "a lookup asking for {int} quotes a page is refused with status {int} and code {int}"
)]
async fn too_big(w: &mut HarnessWorld, limit: u32, status: u16, code: u64) -> anyhow::Result<()> {
    let (_, secret) = key_of(w, "alice")?;
    let mint = w.default_stack()?.mint()?.addr.clone();
    let mut req = ehash_api::signed_lookup(&mint, &secret).await?;
    req.limit = Some(limit);
    let (got, body) = ehash_api::post_lookup(&mint, &serde_json::to_string(&req)?).await?;
    anyhow::ensure!(
        got == status && body.contains(&format!("\"code\":{code}")),
        "answered {got}: {body}"
    );
    Ok(())
}

#[then(
    expr = "an unissued-only lookup of {string}'s key returns none of the quotes its wallet minted"
)]
async fn unissued_only(w: &mut HarnessWorld, proxy: String) -> anyhow::Result<()> {
    let (key, secret) = key_of(w, &proxy)?;
    let mint = w.default_stack()?.mint()?.addr.clone();
    let records = record_hashes(w, &key).await?;
    let mut req = ehash_api::signed_lookup(&mint, &secret).await?;
    req.unissued_only = true;
    let (code, body) = ehash_api::post_lookup(&mint, &serde_json::to_string(&req)?).await?;
    anyhow::ensure!(code == 200, "answered {code}: {body}");
    let page: serde_json::Value = serde_json::from_str(&body)?;
    let left = page["quotes"].as_array().context("no quotes array")?;
    anyhow::ensure!(
        left.is_empty(),
        "{} of {} quotes still listed as unissued after the wallet minted them all: {:?}",
        left.len(),
        records.len(),
        left.iter().take(3).collect::<Vec<_>>()
    );
    Ok(())
}
