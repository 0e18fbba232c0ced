//! The mint role's configuration (pool side: it holds the mint seed and the Redis URL).

use serde::{Deserialize, Serialize};

use super::RedisSection;
use crate::Secret;

/// Environment prefix: `HASHPOOL_MINT__LISTEN=...`.
pub const MINT_ENV_PREFIX: &str = "HASHPOOL_MINT";

/// Default HTTP listen address (Cashu NUTs, ehash endpoints, `/metrics`, `/health`).
pub const DEFAULT_MINT_LISTEN: &str = "127.0.0.1:3338";

/// The mint role.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `listen` | 127.0.0.1:3338 | HTTP: Cashu NUTs, `/v1/ehash/*`, `/metrics`, `/health` |
/// | `url` | `http://<listen>` | the URL the mint announces |
/// | `data_dir` | `mint-data` | SQLite database (`mint.sqlite`) |
/// | `seed` | (required) | 64-byte hex seed of the mint's keys |
/// | `consumer` | `mint-1` | this mint's name in the Redis consumer groups |
/// | `settlement_delay_secs` | 0 | time between a `valid` verdict and paying its quotes |
/// | `lookup_max_skew_ms` | 60000 | how far a signed lookup's timestamp may be from the clock |
/// | `batch_max` | 512 | records read and written per database transaction |
/// | `reclaim_idle_ms` | 5000 | entries pending this long with a dead consumer are claimed |
/// | `[redis]` | | `url`, `append_timeout_ms` (used as the Redis command timeout) |
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MintConfig {
    /// HTTP listen address.
    pub listen: String,
    /// Public URL (empty: `http://<listen>`).
    pub url: String,
    /// Directory of the database.
    pub data_dir: String,
    /// Seed of the mint's keys (hex, 64 bytes).
    pub seed: Secret<String>,
    /// Consumer name in the groups.
    pub consumer: String,
    /// Delay before a valid template's quotes are paid, seconds.
    pub settlement_delay_secs: u64,
    /// Allowed clock skew of signed lookups, milliseconds.
    pub lookup_max_skew_ms: u64,
    /// Records per read and per database transaction.
    pub batch_max: usize,
    /// Idle time after which another consumer's pending entries are claimed, milliseconds.
    pub reclaim_idle_ms: u64,
    /// Redis.
    pub redis: RedisSection,
}

impl Default for MintConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_MINT_LISTEN.into(),
            url: String::new(),
            data_dir: "mint-data".into(),
            seed: Secret::new(String::new()),
            consumer: "mint-1".into(),
            settlement_delay_secs: 0,
            lookup_max_skew_ms: 60_000,
            batch_max: 512,
            reclaim_idle_ms: 5_000,
            redis: RedisSection::default(),
        }
    }
}

impl MintConfig {
    /// Refuse values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let seed = self.seed.expose();
        if seed.len() != 128 || hex::decode(seed).is_err() {
            return Err("`seed` must be 64 bytes of hex (128 characters)".into());
        }
        if self.consumer.is_empty() {
            return Err("`consumer` must not be empty".into());
        }
        if self.batch_max == 0 {
            return Err("`batch_max` must be at least 1".into());
        }
        if self.lookup_max_skew_ms == 0 {
            return Err("`lookup_max_skew_ms` must be at least 1".into());
        }
        Ok(())
    }

    /// The URL the mint announces.
    pub fn public_url(&self) -> String {
        if self.url.is_empty() {
            format!("http://{}", self.listen)
        } else {
            self.url.clone()
        }
    }
}
