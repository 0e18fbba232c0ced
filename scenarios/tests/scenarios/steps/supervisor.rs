//! Supervisor steps: faults (kill -9, pause), restarts, isolation of stacks.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use cucumber::{given, then, when};
use harness::logs::LogCursor;
use harness::supervisor::Supervised;
use harness::wait::wait_until;
use serde_json::Value;

use super::Role;
use crate::world::{HarnessWorld, DEFAULT_STACK};

/// How long a supervisor gets to bring a killed process back.
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

fn process(w: &HarnessWorld, role: Role) -> anyhow::Result<&Supervised> {
    let stack = w.default_stack()?;
    Ok(match role {
        Role::Bitcoind => stack.bitcoind()?.process(),
        Role::Redis => stack.redis()?.process(),
    })
}

#[given("a stack with Redis")]
async fn redis_stack(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.start_stack(DEFAULT_STACK, None, true).await
}

#[when(expr = "{role} is killed with SIGKILL")]
async fn kill9(w: &mut HarnessWorld, role: Role) -> anyhow::Result<()> {
    if role == Role::Bitcoind {
        let info = w.default_stack()?.bitcoind()?.chain_info().await?;
        w.tip_before = Some((info.blocks, info.bestblockhash));
    }
    w.expect_exit(role.process_name());
    let p = process(w, role)?;
    let restarts = p.status().restarts;
    let generation = p.kill9().await?;
    w.restarts_before = Some(restarts);
    w.killed_generation = Some(generation);
    Ok(())
}

#[then(expr = "the supervisor restarts {role}")]
async fn restarted(w: &mut HarnessWorld, role: Role) -> anyhow::Result<()> {
    let generation = w.killed_generation.context("nothing was killed")?;
    let p = process(w, role)?;
    let before = w.restarts_before.context("no restart count taken")?;
    let status = p.wait_ready_after(generation, RESTART_TIMEOUT).await?;
    anyhow::ensure!(
        status.restarts == before + 1 && status.generation == generation + 1,
        "expected exactly 1 restart, status {status:?} (restarts before: {before})"
    );
    anyhow::ensure!(
        status.last_exit.as_deref() == Some("killed by SIGKILL"),
        "previous process ended with {:?}",
        status.last_exit
    );
    w.default_stack()?.write_summary()?;
    Ok(())
}

#[then("the chain height and tip are as before the kill")]
async fn same_tip(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let (height, hash) = w.tip_before.context("no tip remembered")?;
    let info = w.default_stack()?.bitcoind()?.chain_info().await?;
    anyhow::ensure!(
        info.blocks == height && info.bestblockhash == hash,
        "tip is {} at {}, was {hash} at {height}",
        info.bestblockhash,
        info.blocks
    );
    Ok(())
}

#[when(expr = "{role} is paused")]
async fn pause(w: &mut HarnessWorld, role: Role) -> anyhow::Result<()> {
    let p = process(w, role)?;
    p.pause()?;
    wait_os_state(p, "stopped by SIGSTOP", |s| s == Some('T')).await
}

#[when(expr = "{role} is resumed")]
async fn resume(w: &mut HarnessWorld, role: Role) -> anyhow::Result<()> {
    let p = process(w, role)?;
    p.resume()?;
    wait_os_state(p, "running again after SIGCONT", |s| {
        s.is_some_and(|c| c != 'T')
    })
    .await
}

#[when("the pool is paused")]
async fn pause_pool(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let p = w.default_stack()?.pool()?.process();
    p.pause()?;
    wait_os_state(p, "stopped by SIGSTOP", |s| s == Some('T')).await
}

#[when("the pool is resumed")]
async fn resume_pool(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let p = w.default_stack()?.pool()?.process();
    p.resume()?;
    wait_os_state(p, "running again after SIGCONT", |s| {
        s.is_some_and(|c| c != 'T')
    })
    .await
}

/// Wait until the kernel reports the process in a state `ok` accepts.
async fn wait_os_state(
    p: &Supervised,
    what: &str,
    ok: fn(Option<char>) -> bool,
) -> anyhow::Result<()> {
    harness::wait::wait_until(
        &format!("{} to be {what}", p.name()),
        Duration::from_secs(5),
        || {
            let state = p.os_state();
            async move {
                if ok(state) {
                    Ok(())
                } else {
                    Err(format!("/proc state {state:?}"))
                }
            }
        },
    )
    .await?;
    Ok(())
}

#[then(expr = "bitcoind RPC does not answer within {int} ms")]
async fn rpc_silent(w: &mut HarnessWorld, ms: u64) -> anyhow::Result<()> {
    let rpc = w.default_stack()?.bitcoind()?.rpc();
    let r = rpc
        .call_timeout::<Value>("getblockcount", &[], Duration::from_millis(ms))
        .await;
    anyhow::ensure!(r.is_err(), "paused bitcoind answered: {r:?}");
    Ok(())
}

#[then("bitcoind RPC answers")]
async fn rpc_answers(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let rpc = w.default_stack()?.bitcoind()?.rpc();
    rpc.call_timeout::<Value>("getblockcount", &[], Duration::from_secs(10))
        .await?;
    Ok(())
}

#[then("the stacks use different ports and directories")]
async fn isolated(w: &mut HarnessWorld) -> anyhow::Result<()> {
    anyhow::ensure!(w.stacks.len() >= 2, "only {} stack(s)", w.stacks.len());
    let mut ports = HashSet::new();
    let mut dirs: HashSet<std::path::PathBuf> = HashSet::new();
    for (name, stack) in &w.stacks {
        let dir = stack.dir().to_path_buf();
        for other in &dirs {
            anyhow::ensure!(
                !dir.starts_with(other) && !other.starts_with(&dir),
                "stack {name} shares {}",
                dir.display()
            );
        }
        dirs.insert(dir);
        let s = stack.summary();
        for role in &s.roles {
            let port = role
                .endpoint
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_string();
            anyhow::ensure!(
                ports.insert(port.clone()),
                "port {port} of {name}/{} is used twice",
                role.name
            );
        }
    }
    Ok(())
}

#[when(expr = "a stack is started whose bitcoind gets the unknown option {string}")]
async fn bad_start(w: &mut HarnessWorld, option: String) -> anyhow::Result<()> {
    let result = harness::Stack::builder("broken", &w.config)
        .chain(harness::Chain::Regtest)
        .bitcoind_arg(&option)
        .keep_on_failure(false)
        .start()
        .await;
    let err = match result {
        Ok(stack) => {
            stack.shutdown(false).await?;
            anyhow::bail!("bitcoind started despite the option {option}");
        }
        Err(e) => e,
    };
    w.last_error = Some(format!("{err:#}"));
    Ok(())
}

#[then(expr = "the start fails with an error that quotes {string} from bitcoind's log")]
async fn failed_with(w: &mut HarnessWorld, needle: String) -> anyhow::Result<()> {
    let err = w.last_error.as_deref().context("no error recorded")?;
    anyhow::ensure!(
        err.contains("exited during start-up"),
        "error does not say it exited: {err}"
    );
    anyhow::ensure!(
        err.contains(&needle),
        "error does not quote {needle:?}: {err}"
    );
    anyhow::ensure!(
        err.contains("last lines of"),
        "error carries no log tail: {err}"
    );
    Ok(())
}

#[when("the pool and then bitcoind are stopped")]
async fn pool_and_bitcoind_stopped(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    stack.pool()?.process().stop().await?;
    stack.bitcoind()?.process().stop().await?;
    Ok(())
}

/// Start the pool while bitcoind is down; once its log says it waits for bitcoind (and the
/// process is still alive), start bitcoind; the pool's start must then end ready.
#[then("the pool, started again, waits for bitcoind and becomes ready once bitcoind starts")]
async fn pool_waits_for_bitcoind(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let pool = stack.pool()?.process();
    let bitcoind = stack.bitcoind()?.process();
    let mut log = LogCursor::at_end(&pool.spec().stdout_log());
    let waited = async {
        wait_until(
            "the starting pool's log saying it waits for bitcoind, with its process alive",
            Duration::from_secs(30),
            || {
                let lines = log.new_lines().unwrap_or_default();
                let waiting = lines.iter().any(|l| l.contains("waiting for bitcoind"));
                let alive = pool.pid().is_some();
                async move {
                    match (waiting, alive) {
                        (true, true) => Ok(()),
                        _ => Err(format!("waiting logged: {waiting}, pid alive: {alive}")),
                    }
                }
            },
        )
        .await?;
        anyhow::ensure!(
            pool.status().phase == harness::supervisor::Phase::Starting,
            "the pool is {:?}, not still starting, while bitcoind is down",
            pool.status().phase
        );
        bitcoind.start_again().await
    };
    let (started, waited) = tokio::join!(pool.start_again(), waited);
    waited?;
    started.context("the pool did not become ready after bitcoind came back")?;
    Ok(())
}

#[given(expr = "a reconnecting honest miner {string} behind proxy {string}")]
async fn reconnecting_miner(
    w: &mut HarnessWorld,
    name: String,
    proxy: String,
) -> anyhow::Result<()> {
    let opts = harness::roles::MinerOptions {
        reconnect: true,
        hashrate: Some(500_000.0),
        ..Default::default()
    };
    w.default_stack_mut()?
        .start_miner(&name, &proxy, &opts)
        .await?;
    Ok(())
}

#[when(expr = "proxy {string} is stopped for {int} seconds and started again")]
async fn proxy_down_for(w: &mut HarnessWorld, name: String, secs: u64) -> anyhow::Result<()> {
    let proxy = w.default_stack()?.proxy(&name)?.process();
    proxy.stop().await?;
    // The fault's length: how long miners find no proxy (nothing is awaited).
    tokio::time::sleep(Duration::from_secs(secs)).await; // fault length
    proxy.start_again().await
}

#[then(expr = "miner {string} is still running, never restarted, and logged connecting again")]
async fn miner_still_running(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let miner = w.default_stack()?.miner(&name)?;
    let status = miner.process().status();
    anyhow::ensure!(
        miner.process().pid().is_some()
            && status.restarts == 0
            && status.unexpected_exits.is_empty(),
        "miner {name} is not running as started: {status:?}"
    );
    let log = std::fs::read_to_string(miner.process().spec().stdout_log())?;
    anyhow::ensure!(
        log.contains("connecting again"),
        "miner {name}'s log never says it connected again"
    );
    Ok(())
}
