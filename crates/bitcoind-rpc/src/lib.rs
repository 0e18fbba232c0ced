//! Async JSON-RPC to bitcoind through `corepc-client`'s async client.
//!
//! Why `corepc-client` (and not the `bitcoind`/`corepc-node` crate): the harness owns the
//! process (its supervisor spawns, restarts and kills it, and copies pre-mined chains in), so
//! only a client is wanted. `corepc-client` is async (fits the tokio harness and the pool),
//! keeps the typed models of rust-bitcoin's maintainers where we want them, and its `call`
//! reaches every RPC of the development-snapshot bitcoind that `ci/bootstrap` builds.

use std::time::Duration;

use corepc_client::{Auth, Client};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A failed RPC call.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// bitcoind answered with an error object.
    #[error("bitcoind RPC {method} failed: {message} (code {code})")]
    Node {
        /// The method.
        method: String,
        /// Core's error code.
        code: i32,
        /// Core's message.
        message: String,
    },
    /// Connection refused, timeout, bad HTTP status, unparsable answer.
    #[error("bitcoind RPC {method} at {url} failed: {detail}")]
    Transport {
        /// The method.
        method: String,
        /// The endpoint.
        url: String,
        /// What went wrong.
        detail: String,
    },
}

impl RpcError {
    /// Core's error code, if bitcoind answered.
    pub fn code(&self) -> Option<i32> {
        match self {
            RpcError::Node { code, .. } => Some(*code),
            RpcError::Transport { .. } => None,
        }
    }

    /// bitcoind cannot be reached, did not answer in time, or is warming up (code -28): an
    /// outage (starting, restarting, paused), which waiting may mend. Wrong credentials or a
    /// wrong path (HTTP 401/403/404) are not.
    pub fn is_unreachable(&self) -> bool {
        match self {
            // RPC_IN_WARMUP: a node that is starting (loading its block index) answers this.
            RpcError::Node { code, .. } => *code == -28,
            RpcError::Transport { detail, .. } => ![
                "401",
                "403",
                "404",
                "Unauthorized",
                "Forbidden",
                "Not Found",
            ]
            .iter()
            .any(|p| detail.contains(p)),
        }
    }
}

/// Longest pause between two attempts in [`BitcoinRpc::wait_answering`].
const MAX_WAIT_BACKOFF: Duration = Duration::from_secs(2);
/// Deadline of each attempt in [`BitcoinRpc::wait_answering`] (a paused node never answers).
const WAIT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// An RPC connection to one bitcoind.
pub struct BitcoinRpc {
    client: Client,
    url: String,
}

impl std::fmt::Debug for BitcoinRpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitcoinRpc")
            .field("url", &self.url)
            .finish()
    }
}

impl BitcoinRpc {
    /// Connect (lazily) to `url` with user/password authentication.
    pub fn new(url: &str, user: &str, password: &str) -> Result<Self, RpcError> {
        let client = Client::new_with_auth(url, Auth::UserPass(user.into(), password.into()))
            .map_err(|e| RpcError::Transport {
                method: "-".into(),
                url: url.into(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            client,
            url: url.to_string(),
        })
    }

    /// The endpoint.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Call `method` and deserialize its result.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        params: &[Value],
    ) -> Result<T, RpcError> {
        self.client.call(method, params).await.map_err(|e| match e {
            corepc_client::Error::JsonRpc(jsonrpc::error::Error::Rpc(r)) => RpcError::Node {
                method: method.to_string(),
                code: r.code,
                message: r.message,
            },
            other => RpcError::Transport {
                method: method.to_string(),
                url: self.url.clone(),
                detail: other.to_string(),
            },
        })
    }

    /// Wait until bitcoind answers `getblockcount`, for a role starting while its node is
    /// down or restarting (a supervisor may start them in any order). Outages are retried
    /// with a backoff up to 2 s and logged at the first attempt and every 30th; any other
    /// error (wrong credentials, a node error) is returned at once. `Ok(None)` if `shutdown`
    /// came first, else the block count.
    pub async fn wait_answering(
        &self,
        shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
    ) -> Result<Option<u64>, RpcError> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = &mut *shutdown => return Ok(None),
                r = self.call_timeout::<u64>("getblockcount", &[], WAIT_ATTEMPT_TIMEOUT) => match r {
                    Ok(height) => {
                        if attempt > 1 {
                            tracing::info!("bitcoind at {} answers (attempt {attempt})", self.url);
                        }
                        return Ok(Some(height));
                    }
                    Err(e) if !e.is_unreachable() => return Err(e),
                    Err(e) if attempt == 1 || attempt.is_multiple_of(30) => tracing::warn!(
                        "waiting for bitcoind at {} (attempt {attempt}): {e}",
                        self.url
                    ),
                    Err(_) => {}
                },
            }
            tokio::select! {
                _ = &mut *shutdown => return Ok(None),
                // Backoff between attempts to reach bitcoind.
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_WAIT_BACKOFF);
        }
    }

    /// Call with a deadline (bitcoind paused by a fault step never answers).
    pub async fn call_timeout<T: DeserializeOwned>(
        &self,
        method: &str,
        params: &[Value],
        timeout: Duration,
    ) -> Result<T, RpcError> {
        tokio::time::timeout(timeout, self.call(method, params))
            .await
            .unwrap_or_else(|_| {
                Err(RpcError::Transport {
                    method: method.into(),
                    url: self.url.clone(),
                    detail: format!("no answer within {timeout:?}"),
                })
            })
    }
}
