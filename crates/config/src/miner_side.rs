//! Miner-side configuration: the proxy an operator runs. It knows the pool's address and
//! authority public key and the operator's locking key, never the Redis URL or pool secrets.

use serde::{Deserialize, Serialize};

use crate::Secret;

/// Environment prefix: `HASHPOOL_PROXY__LISTEN=...`.
pub const PROXY_ENV_PREFIX: &str = "HASHPOOL_PROXY";

/// The proxy role.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `listen` | 127.0.0.1:34255 | SV1 for miners |
/// | `pool_address` | (required) | the pool's SV2 address |
/// | `pool_authority_public_key` | (required) | pool's Noise authority key, SRI base58 |
/// | `locking_pubkey` | (empty) | operator's Cashu locking key, 33-byte hex (derived from `locking_secret_key` if that is set) |
/// | `locking_secret_key` | (empty) | its secret (hex, 32 bytes): the wallet needs it to sign lookups and mints |
/// | `mint_url` | (empty: no wallet) | the mint the wallet mints ehash at |
/// | `data_dir` | `proxy-data` | the wallet's SQLite database |
/// | `http_listen` | (empty: none) | wallet status endpoint `GET /wallet` |
/// | `wallet_poll_ms` | 1000 | lookup interval when no NUT-17 notification comes |
/// | `nominal_hashrate` | 5e6 | hashrate announced per miner, H/s |
/// | `min_extranonce_size` | 8 | rollable extranonce bytes requested per channel |
/// | `reconnect_min_ms`, `reconnect_max_ms` | 100, 5000 | upstream reconnect backoff |
/// | `upstream_wait_secs` | 30 | how long a miner waits for the pool before it is disconnected |
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxyConfig {
    /// SV1 listen address.
    pub listen: String,
    /// Pool SV2 address.
    pub pool_address: String,
    /// Pool's authority public key.
    pub pool_authority_public_key: String,
    /// Operator's locking key (hex); empty means the channels earn no ehash.
    pub locking_pubkey: String,
    /// Announced hashrate per miner channel.
    pub nominal_hashrate: f32,
    /// Rollable extranonce bytes per channel.
    pub min_extranonce_size: u16,
    /// First reconnect delay.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_max_ms: u64,
    /// Time a miner waits for an upstream channel.
    pub upstream_wait_secs: u64,
    /// The locking key's secret (hex); needed by the wallet.
    pub locking_secret_key: Secret<String>,
    /// Mint URL; empty means no wallet.
    pub mint_url: String,
    /// Wallet database directory.
    pub data_dir: String,
    /// Wallet status HTTP endpoint; empty means none.
    pub http_listen: String,
    /// Lookup interval of the wallet, milliseconds.
    pub wallet_poll_ms: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:34255".into(),
            pool_address: String::new(),
            pool_authority_public_key: String::new(),
            locking_pubkey: String::new(),
            nominal_hashrate: 5.0e6,
            min_extranonce_size: 8,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5000,
            upstream_wait_secs: 30,
            locking_secret_key: Secret::new(String::new()),
            mint_url: String::new(),
            data_dir: "proxy-data".into(),
            http_listen: String::new(),
            wallet_poll_ms: 1000,
        }
    }
}

impl ProxyConfig {
    /// Refuse values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.pool_address.is_empty() {
            return Err("`pool_address` is required".into());
        }
        if self.pool_authority_public_key.is_empty() {
            return Err("`pool_authority_public_key` is required".into());
        }
        if !(self.nominal_hashrate >= 0.0 && self.nominal_hashrate.is_finite()) {
            return Err("`nominal_hashrate` must be a non-negative number".into());
        }
        if !(1..=16).contains(&self.min_extranonce_size) {
            return Err(format!(
                "`min_extranonce_size` must be 1..=16, got {}",
                self.min_extranonce_size
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err("`reconnect_min_ms` must be > 0 and <= `reconnect_max_ms`".into());
        }
        let secret = self.locking_secret_key.expose();
        if !secret.is_empty() && (secret.len() != 64 || hex::decode(secret).is_err()) {
            return Err("`locking_secret_key` must be 32 bytes of hex (64 characters)".into());
        }
        if !self.mint_url.is_empty() && secret.is_empty() {
            return Err(
                "`mint_url` needs `locking_secret_key`: the wallet signs lookups and mints with it"
                    .into(),
            );
        }
        if self.wallet_poll_ms == 0 {
            return Err("`wallet_poll_ms` must be at least 1".into());
        }
        Ok(())
    }
}
