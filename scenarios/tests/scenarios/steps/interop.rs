//! SRI's translator in front of the pool, and what it may and may not earn.

use anyhow::anyhow;
use cucumber::{given, then, when};

use crate::world::HarnessWorld;

#[given(expr = "SRI's translator {string} in front of the pool, one channel per miner")]
async fn translator(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack_mut()?
        .start_translator(&name, false)
        .await?;
    Ok(())
}

#[given(expr = "SRI's translator {string} in front of the pool, its miners sharing one channel")]
async fn translator_shared(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack_mut()?.start_translator(&name, true).await?;
    Ok(())
}

#[when(expr = "miner {string} stops")]
async fn miner_stops(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    w.default_stack()?.miner(&name)?.process().stop().await?;
    Ok(())
}

#[then(expr = "translator {string} is still running, never restarted")]
async fn translator_running(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let status = stack.translator(&name)?.process().status();
    anyhow::ensure!(
        stack.translator(&name)?.process().pid().is_some() && status.restarts == 0,
        "translator {name} is not running as started: {status:?}"
    );
    Ok(())
}

#[then(expr = "every ehash:shares record is locked to proxy {string}'s key")]
async fn records_only_from(w: &mut HarnessWorld, proxy: String) -> anyhow::Result<()> {
    let key = w
        .default_stack()?
        .proxy(&proxy)?
        .locking_pubkey
        .ok_or_else(|| anyhow!("proxy {proxy} has no key"))?;
    let records = crate::steps::mining::share_records(w).await?;
    anyhow::ensure!(!records.is_empty(), "no ehash:shares records at all");
    for r in records.values() {
        anyhow::ensure!(
            r.locking_pubkey == key,
            "record {} is locked to {}, not proxy {proxy}'s key",
            r.share_hash,
            r.locking_pubkey
        );
    }
    Ok(())
}
