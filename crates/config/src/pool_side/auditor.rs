//! The auditor role's configuration (pool side: Redis and bitcoind credentials).

use serde::{Deserialize, Serialize};

use super::{BitcoindSection, RedisSection, StreamsSection};

/// Environment prefix: `HASHPOOL_AUDITOR__WORKERS=...`.
pub const AUDITOR_ENV_PREFIX: &str = "HASHPOOL_AUDITOR";

/// The auditor role.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `listen` | 127.0.0.1:9185 | `/metrics` and `/health` |
/// | `consumer` | `auditor-1` | this auditor's name in the `auditors` group (workers add `-<n>`) |
/// | `workers` | 2 | concurrent audits |
/// | `reclaim_idle_ms` | 5000 | tasks pending this long with a dead consumer are claimed |
/// | `unknown_parent_wait_ms` | 60000 | a template whose parent the audit node has not got after this long (in this process) is `invalid` (`unknown-parent`) |
/// | `[bitcoind]` | | the audit node, the auditor's own (it is rewound to audit templates on older parents): `rpc_url`, `rpc_user`, `rpc_password`, `chain` |
/// | `[redis]` | | `url`, `append_timeout_ms` (used as the Redis command timeout) |
/// | `[streams]` | | trimming `audit:tasks`, the bound on `audit:dead` (1000 here: a dead task holds its whole block): see [`StreamsSection`] |
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditorConfig {
    /// Metrics and health listen address.
    pub listen: String,
    /// Consumer name prefix in the `auditors` group.
    pub consumer: String,
    /// Concurrent workers.
    pub workers: usize,
    /// Idle time after which another consumer's pending tasks are claimed, milliseconds.
    pub reclaim_idle_ms: u64,
    /// How long a template's parent may stay unknown to the audit node, milliseconds.
    pub unknown_parent_wait_ms: u64,
    /// The audit node: a bitcoind of the auditor's own, following the pool's chain over P2P
    /// (proposal checks; rewound to audit templates whose parent is no longer its tip).
    pub bitcoind: BitcoindSection,
    /// Redis.
    pub redis: RedisSection,
    /// Trimming `audit:tasks`; the bound on `audit:dead`.
    pub streams: StreamsSection,
}

impl Default for AuditorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9185".into(),
            consumer: "auditor-1".into(),
            workers: 2,
            reclaim_idle_ms: 5_000,
            unknown_parent_wait_ms: 60_000,
            bitcoind: BitcoindSection::default(),
            redis: RedisSection::default(),
            streams: StreamsSection {
                dead_letters_max: 1_000,
                ..StreamsSection::default()
            },
        }
    }
}

impl AuditorConfig {
    /// Refuse values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.consumer.is_empty() {
            return Err("`consumer` must not be empty".into());
        }
        if !(1..=64).contains(&self.workers) {
            return Err(format!("`workers` must be 1..=64, got {}", self.workers));
        }
        if self.reclaim_idle_ms == 0 {
            return Err("`reclaim_idle_ms` must be at least 1".into());
        }
        if self.unknown_parent_wait_ms < 1_000 {
            return Err(format!(
                "`unknown_parent_wait_ms` must be at least 1000 (the audit node needs time to get a new block), got {}",
                self.unknown_parent_wait_ms
            ));
        }
        self.streams.validate()
    }
}
