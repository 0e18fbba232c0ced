//! A farm: many simulated miners in one process behind one proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{anyhow, Context};
use cucumber::{given, then, when};
use harness::roles::MinerOptions;

use crate::world::HarnessWorld;

#[given(expr = "the pool pays shares from {int} leading zero bits")]
async fn min_bits(w: &mut HarnessWorld, bits: u32) -> anyhow::Result<()> {
    w.pool_options.min_bits = bits;
    Ok(())
}

#[given(expr = "a proxy {string} with a locking key, announcing {int} H\\/s per miner")]
async fn farm_proxy(w: &mut HarnessWorld, name: String, hashrate: u32) -> anyhow::Result<()> {
    w.default_stack_mut()?
        .start_proxy(&name, true, hashrate as f32)
        .await?;
    Ok(())
}

#[when(
    expr = "{int} simulated miners in one process {string} at {int} H\\/s each start behind proxy {string}"
)]
async fn many_in_one(
    w: &mut HarnessWorld,
    n: usize,
    name: String,
    hashrate: u64,
    proxy: String,
) -> anyhow::Result<()> {
    let opts = MinerOptions {
        connections: n,
        hashrate: Some((n as u64 * hashrate) as f64),
        ..MinerOptions::default()
    };
    w.default_stack_mut()?
        .start_miner(&name, &proxy, &opts)
        .await?;
    Ok(())
}

#[then(
    expr = "each of the {int} miners of {string} gets work and an accepted share within {int} s"
)]
async fn each_mines(w: &mut HarnessWorld, n: usize, name: String, secs: u64) -> anyhow::Result<()> {
    let miner = w.default_stack()?.miner(&name)?;
    harness::wait::wait_until(
        &format!("each of the {n} connections of miner {name} to get work and an accepted share"),
        Duration::from_secs(secs),
        || {
            let log = miner.log();
            async move {
                let missing: Vec<usize> = (0..n)
                    .filter(|c| !log.with_accepted.contains(c))
                    .collect();
                if log.with_work.len() >= n && missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "{} subscribed, {} with work, {} with an accepted share; first without: {:?}",
                        log.subscribed.len(),
                        log.with_work.len(),
                        log.with_accepted.len(),
                        &missing[..missing.len().min(5)]
                    ))
                }
            }
        },
    )
    .await?;
    Ok(())
}

#[then(
    expr = "the ehash records of miner {string}'s shares name one channel per connection, {int} in all, locked to proxy {string}'s key"
)]
async fn one_channel_each(
    w: &mut HarnessWorld,
    name: String,
    n: usize,
    proxy: String,
) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let key = stack
        .proxy(&proxy)?
        .locking_pubkey
        .ok_or_else(|| anyhow!("proxy {proxy} has no key"))?;
    let log = stack.miner(&name)?.log();
    let records = crate::steps::mining::share_records(w).await?;
    let mut channels: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    for (hash, conn) in &log.accepted_on {
        let r = records
            .get(hash)
            .with_context(|| format!("accepted share {hash} of connection {conn} has no record"))?;
        anyhow::ensure!(
            r.locking_pubkey == key,
            "record {hash} is locked to {}, not proxy {proxy}'s {key}",
            r.locking_pubkey
        );
        channels.entry(*conn).or_default().insert(r.channel_id);
    }
    anyhow::ensure!(
        channels.len() == n,
        "{} connections have records, expected {n}",
        channels.len()
    );
    let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
    for (conn, ids) in &channels {
        anyhow::ensure!(
            ids.len() == 1,
            "connection {conn}'s shares name channels {ids:?}"
        );
        for id in ids {
            if let Some(other) = owner.insert(*id, *conn) {
                anyhow::bail!("channel {id} carries the shares of connections {other} and {conn}");
            }
        }
    }
    Ok(())
}

#[when(expr = "{int} honest farm miners at {int} H\\/s start behind proxy {string}")]
async fn farm(w: &mut HarnessWorld, n: usize, hashrate: u64, proxy: String) -> anyhow::Result<()> {
    for i in 0..n {
        crate::steps::mining::start_miner(
            w,
            &format!("farm-{i}"),
            &proxy,
            "honest",
            Some(hashrate as f64),
        )
        .await?;
    }
    Ok(())
}

#[then(expr = "every farm miner has {int} accepted share(s)")]
async fn farm_accepted(w: &mut HarnessWorld, n: usize) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let farm: Vec<_> = stack
        .miners()
        .filter(|m| m.name.starts_with("farm-"))
        .collect();
    anyhow::ensure!(!farm.is_empty(), "no farm miners");
    harness::wait::wait_until(
        &format!(
            "{} farm miners to have {n} accepted shares each",
            farm.len()
        ),
        Duration::from_secs(90),
        || {
            let short: Vec<String> = farm
                .iter()
                .filter(|m| m.log().accepted.len() < n)
                .map(|m| m.name.clone())
                .collect();
            async move {
                if short.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still short: {short:?}"))
                }
            }
        },
    )
    .await?;
    Ok(())
}
