//! The proxy's window of shares waiting for the pool: its size, what it holds, what it
//! refused (checked against the miner's own log).

use std::time::Duration;

use cucumber::{given, then};
use harness::wait::wait_until;

use crate::world::HarnessWorld;

#[given(expr = "proxies started from now on keep at most {int} shares waiting for the pool")]
async fn proxy_share_window(w: &mut HarnessWorld, n: usize) -> anyhow::Result<()> {
    w.default_stack_mut()?.set_proxy_share_window(n);
    Ok(())
}

#[then(expr = "proxy {string} has {int} shares waiting for the pool's answer")]
async fn proxy_in_flight(w: &mut HarnessWorld, proxy: String, n: usize) -> anyhow::Result<()> {
    let p = w.default_stack()?.proxy(&proxy)?;
    wait_until(
        &format!("proxy {proxy} to have {n} shares waiting for the pool's answer"),
        Duration::from_secs(10),
        || async {
            let counts = p.shares().await.map_err(|e| e.to_string())?;
            if counts.in_flight == n {
                Ok(())
            } else {
                Err(format!(
                    "{} waiting (window {})",
                    counts.in_flight, counts.max_in_flight
                ))
            }
        },
    )
    .await?;
    Ok(())
}

#[then(
    expr = "proxy {string} counts as refused with upstream-busy exactly the shares miner {string} saw refused so"
)]
async fn proxy_busy_count(
    w: &mut HarnessWorld,
    proxy: String,
    miner: String,
) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let seen = stack
        .miner(&miner)?
        .log()
        .rejected_by_reason()
        .get("upstream-busy")
        .copied()
        .unwrap_or(0);
    let counts = stack.proxy(&proxy)?.shares().await?;
    anyhow::ensure!(
        counts.refused_upstream_busy == seen as u64,
        "proxy {proxy} counts {} upstream-busy refusals, miner {miner}'s log shows {seen}",
        counts.refused_upstream_busy
    );
    Ok(())
}
