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
/// | `http_listen` | (empty: none) | status endpoints: `GET /wallet` (with a wallet), `GET /declarations` (when declaring), `GET /health` |
/// | `wallet_poll_ms` | 1000 | lookup interval when no NUT-17 notification comes |
/// | `max_rounding_loss_ppm` | 10000 | a redemption that would lose more of its value to rounding to whole ehash (parts per million) is refused unless accepted |
/// | `nominal_hashrate` | 5e6 | hashrate announced per miner, H/s |
/// | `min_extranonce_size` | 8 | rollable extranonce bytes requested per channel |
/// | `reconnect_min_ms`, `reconnect_max_ms` | 100, 5000 | upstream reconnect backoff |
/// | `max_shares_in_flight` | 4096 | shares sent to the pool and not answered yet, all miners together; a share past it is refused at once with `upstream-busy` (an overloaded pool is not sent shares it would refuse after reading them; it also bounds one proxy to this many shares per answer latency; enforced only with a pool that speaks ehash) |
/// | `upstream_wait_secs` | 30 | how long a miner waits for the pool before it is disconnected |
/// | `open_timeout_ms` | 10000 | TCP connect and Noise handshake with the pool; then, again, opening a channel on the connection |
/// | `subscribe_timeout_ms` | 10000 | a miner that sends no `mining.subscribe` this long after connecting is closed (its pool channel is opened only once it subscribes) |
/// | `template_source` | `pool` | `pool`: mine the pool's templates; `miner`: build templates from `[node]`, declare them at `jd_address` and mine them as custom jobs |
/// | `jd_address` | (empty) | the pool's job declaration address (`template_source = "miner"`) |
/// | `[node]` | | the operator's own bitcoind (`template_source = "miner"`): `rpc_url`, `rpc_user`, `rpc_password`, `chain` (`signet`/`regtest`), `poll_interval_ms` (200) |
/// | `fraud` | (empty) | for tests: make every declared template invalid (a `template-fraud` kind, e.g. `double-spend`; several separated by commas are used in turn, one per declared template) |
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
    /// Shares sent to the pool and not answered yet, all miners together.
    pub max_shares_in_flight: usize,
    /// Time a miner waits for an upstream channel.
    pub upstream_wait_secs: u64,
    /// Time for TCP connect, Noise handshake and channel opening together, milliseconds.
    pub open_timeout_ms: u64,
    /// Time from a miner's connect to its `mining.subscribe`, milliseconds.
    pub subscribe_timeout_ms: u64,
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
    /// Largest share of a redemption's value rounding may lose without being accepted, ppm.
    pub max_rounding_loss_ppm: u64,
    /// `pool` or `miner` (declare templates built from `node`).
    pub template_source: String,
    /// The pool's job declaration address.
    pub jd_address: String,
    /// The operator's own bitcoind.
    pub node: NodeSection,
    /// Fraud kinds to put into the declared templates, in turn (tests); empty: none.
    pub fraud: String,
}

/// `[node]`: the operator's own bitcoind, which its declared templates come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeSection {
    /// JSON-RPC URL.
    pub rpc_url: String,
    /// RPC user.
    pub rpc_user: String,
    /// RPC password.
    pub rpc_password: Secret<String>,
    /// `signet` or `regtest`.
    pub chain: String,
    /// How often the tip is polled, milliseconds.
    pub poll_interval_ms: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            rpc_url: String::new(),
            rpc_user: String::new(),
            rpc_password: Secret::new(String::new()),
            chain: "signet".into(),
            poll_interval_ms: 200,
        }
    }
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
            max_shares_in_flight: 4096,
            upstream_wait_secs: 30,
            open_timeout_ms: 10_000,
            subscribe_timeout_ms: 10_000,
            locking_secret_key: Secret::new(String::new()),
            mint_url: String::new(),
            data_dir: "proxy-data".into(),
            http_listen: String::new(),
            wallet_poll_ms: 1000,
            max_rounding_loss_ppm: 10_000,
            template_source: "pool".into(),
            jd_address: String::new(),
            node: NodeSection::default(),
            fraud: String::new(),
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
        if self.open_timeout_ms == 0 {
            return Err("`open_timeout_ms` must be at least 1".into());
        }
        if self.subscribe_timeout_ms == 0 {
            return Err("`subscribe_timeout_ms` must be at least 1".into());
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
        if self.max_shares_in_flight == 0 {
            return Err("`max_shares_in_flight` must be at least 1".into());
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
        if self.max_rounding_loss_ppm > 1_000_000 {
            return Err(format!(
                "`max_rounding_loss_ppm` is parts per million, at most 1000000 (100 %), got {}",
                self.max_rounding_loss_ppm
            ));
        }
        match self.template_source.as_str() {
            "pool" => {
                if !self.fraud.is_empty() {
                    return Err("`fraud` needs `template_source = \"miner\"`: only declared templates can be made invalid".into());
                }
            }
            "miner" => {
                if self.jd_address.is_empty() {
                    return Err("`template_source = \"miner\"` needs `jd_address`, the pool's job declaration port".into());
                }
                if self.node.rpc_url.is_empty() {
                    return Err("`template_source = \"miner\"` needs `node.rpc_url`, the operator's own bitcoind".into());
                }
                if !matches!(self.node.chain.as_str(), "signet" | "regtest") {
                    return Err(format!(
                        "`node.chain` must be signet or regtest, got {:?}",
                        self.node.chain
                    ));
                }
                if self.node.poll_interval_ms == 0 {
                    return Err("`node.poll_interval_ms` must be at least 1".into());
                }
            }
            other => {
                return Err(format!(
                    "`template_source` must be \"pool\" or \"miner\", got {other:?}"
                ))
            }
        }
        Ok(())
    }
}
