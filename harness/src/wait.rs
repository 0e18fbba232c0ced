//! Waiting on conditions, never on the clock: poll with backoff until a deadline, and say
//! what was awaited and what was last seen when it does not happen.

use std::future::Future;
use std::time::{Duration, Instant};

/// First poll interval; doubles up to [`MAX_POLL_INTERVAL`].
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Longest pause between two polls.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A condition did not hold in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:.1?} waiting for {what} (last seen: {last})")]
pub struct Timeout {
    /// What was awaited.
    pub what: String,
    /// How long.
    pub waited: Duration,
    /// The last observation the condition reported.
    pub last: String,
}

/// Scale for every harness timeout: `HASHPOOL_TIMEOUT_SCALE=3` on a slow machine.
pub fn scaled(timeout: Duration) -> Duration {
    let scale = std::env::var("HASHPOOL_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    timeout.mul_f64(scale)
}

/// Poll `check` until it returns `Ok(value)`; `Err(observation)` means "not yet" and is
/// reported if the (scaled) `timeout` passes first.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<T, Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let timeout = scaled(timeout);
    let start = Instant::now();
    let mut interval = MIN_POLL_INTERVAL;
    loop {
        let last = match check().await {
            Ok(value) => return Ok(value),
            Err(observation) => observation,
        };
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(Timeout {
                what: what.to_string(),
                waited,
                last,
            });
        }
        // A poll interval inside a bounded wait, not a synchronisation sleep.
        tokio::time::sleep(interval.min(timeout - waited)).await; // poll interval
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
    }
}

/// Read from `stream` (discarding what comes) until the peer closes it, by EOF or reset;
/// `false` if it is still open after `timeout` (not scaled: callers pass a scaled one).
pub async fn tcp_closed_within(stream: &mut tokio::net::TcpStream, timeout: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(timeout, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let v = wait_until("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            let n = n;
            async move {
                if n >= 3 {
                    Ok(n)
                } else {
                    Err(format!("n={n}"))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn timeout_names_what_and_last_observation() {
        let err = wait_until("the impossible", Duration::from_millis(30), || async {
            Err::<(), _>("still impossible".to_string())
        })
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("the impossible") && msg.contains("still impossible"),
            "{msg}"
        );
    }
}
