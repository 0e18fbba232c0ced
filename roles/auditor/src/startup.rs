//! Start-up: what the auditor needs before its workers run, retried while bitcoind or Redis
//! is down or restarting (as the pool does), failing at once on a configuration error.

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context};
use hashpool_config::pool_side::AuditorConfig;
use hashpool_streams::Consumer;

use crate::node::AuditNode;
use ehash::AUDIT_TASKS_STREAM;

use crate::{GROUP, LIBRARY};

/// Errors no retry mends: bad credentials, a URL that does not parse, Redis refusing the
/// auditor's user.
fn is_config_error(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    [
        "401",
        "Unauthorized",
        "NOAUTH",
        "WRONGPASS",
        "NOPERM",
        "did not parse",
        "InvalidClientConfig",
    ]
    .iter()
    .any(|p| text.contains(p))
}

/// Longest pause between two attempts to reach bitcoind and Redis at start-up.
const MAX_STARTUP_BACKOFF: Duration = Duration::from_secs(2);

/// What start-up needs, retried until it is there (a node or Redis restarting with the
/// auditor must not stop it): the audit node answering (and any rewind a crash left half
/// done undone), the auditor's Redis function loaded, its consumer group made (readiness
/// probes look for it). Ok(false) if `shutdown` came first.
pub(crate) async fn prepare(
    config: &AuditorConfig,
    node: &AuditNode,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> anyhow::Result<bool> {
    let timeout = Duration::from_millis(config.redis.append_timeout_ms);
    let mut backoff = Duration::from_millis(100);
    let mut recovered = false;
    for attempt in 1u32.. {
        let step = async {
            node.rpc()
                .call::<u64>("getblockcount", &[])
                .await
                .with_context(|| {
                    format!("bitcoind at {} does not answer", config.bitcoind.rpc_url)
                })?;
            // A rewind a crash left half done is undone before anything else (else at the
            // first audit).
            if !recovered {
                recovered = true;
                if let Err(e) = node.recover().await {
                    tracing::warn!("audit node: checking for a rewind left half done failed (retried at the first audit): {e}");
                }
            }
            let mut conn = hashpool_streams::connect(&config.redis.url, timeout).await?;
            let loaded = redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(LIBRARY)
                .query_async::<String>(&mut conn)
                .await;
            if let Err(e) = loaded {
                // Redis before 7 has no FUNCTION: no retry helps.
                if e.to_string().to_lowercase().contains("unknown command") {
                    return Ok(Err(anyhow!(
                        "loading the auditor's Redis function (Redis 7 or later is needed): {e}"
                    )));
                }
                return Err(e.into());
            }
            Consumer::join(
                &config.redis.url,
                AUDIT_TASKS_STREAM,
                GROUP,
                &config.consumer,
                timeout,
            )
            .await?;
            anyhow::Ok(Ok(()))
        };
        tokio::select! {
            _ = &mut *shutdown => return Ok(false),
            r = step => match r {
                Ok(Ok(())) => return Ok(true),
                Ok(Err(fatal)) => return Err(fatal),
                Err(e) if is_config_error(&e) => {
                    return Err(e.context("a configuration error, not an outage: fix the config"))
                }
                Err(e) if attempt == 1 || attempt.is_multiple_of(30) => tracing::warn!(
                    "waiting for bitcoind and Redis at start-up (attempt {attempt}): {e:#}"
                ),
                Err(_) => {}
            },
        }
        tokio::select! {
            _ = &mut *shutdown => return Ok(false),
            // Backoff between attempts to reach bitcoind and Redis at start-up.
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_STARTUP_BACKOFF);
    }
    Err(anyhow!("unreachable: the attempt counter overflowed"))
}
