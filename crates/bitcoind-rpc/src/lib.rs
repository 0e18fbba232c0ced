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
}

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
