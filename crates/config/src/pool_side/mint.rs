//! The mint role's configuration (pool side: it holds the mint seed and the Redis URL).

use serde::{Deserialize, Serialize};

use super::{BitcoindSection, RedisSection, StreamsSection};
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
/// | `[streams]` | | trimming `ehash:shares` and `audit:results`, the bound on `mint:dead`: see [`StreamsSection`] |
/// | `[redemption]` | off | NUT-05 melts of ehash for sats over Lightning, see [`RedemptionSection`] |
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
    /// Trimming the streams the mint reads; the bound on `mint:dead`.
    pub streams: StreamsSection,
    /// Lightning redemption (off unless `lightning_rpc` is set).
    pub redemption: RedemptionSection,
}

/// `[redemption]`: ehash melted (NUT-05, `bolt11`) for sats paid by the pool's Lightning node.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `lightning_rpc` | (empty: off) | the pool node's `lightningd` RPC socket |
/// | `payout_address` | (required when on) | the pool's payout address: its coinbases 100 blocks deep are the rewards |
/// | `pool_fee_ppm` | 20000 | the pool's share of the matured rewards, parts per million |
/// | `routing_fee_reserve_ppm` | 10000 | Lightning fee reserve per melt, parts per million of the invoice |
/// | `min_routing_fee_reserve_sat` | 10 | the smallest fee reserve, sats |
/// | `payment_timeout_secs` | 90 | longest the mint waits on one payment call; past it the payment's outcome is found from Core Lightning later |
/// | `hold_check_secs` | 10 | how often held payments are checked with Core Lightning (and at start) |
/// | `orphan_payment_grace_secs` | 60 | a payment Core Lightning lists as pending with no HTLC on any channel, seen so this long, can never complete: released |
/// | `final_status_grace_secs` | 120 | a payment Core Lightning lists as failed, or has no record of, seen so this long, is released (at least 75: xpay routes and retries for up to 60 s) |
/// | `[redemption.bitcoind]` | | `rpc_url`, `rpc_user`, `rpc_password` of a node that sees the pool's blocks |
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RedemptionSection {
    /// The pool node's RPC socket; empty turns redemption off.
    pub lightning_rpc: String,
    /// The pool's payout address.
    pub payout_address: String,
    /// The pool's fee, parts per million of the matured rewards.
    pub pool_fee_ppm: u64,
    /// Fee reserve per melt, parts per million of the invoice.
    pub routing_fee_reserve_ppm: u64,
    /// Smallest fee reserve, sats.
    pub min_routing_fee_reserve_sat: u64,
    /// Longest wait on one payment call, seconds.
    pub payment_timeout_secs: u64,
    /// How often held payments are checked with Core Lightning, seconds.
    pub hold_check_secs: u64,
    /// Pending with no HTLC on any channel this long: released, seconds.
    pub orphan_payment_grace_secs: u64,
    /// Failed or unknown to Core Lightning, seen so this long: released, seconds.
    pub final_status_grace_secs: u64,
    /// Where matured rewards are counted.
    pub bitcoind: BitcoindSection,
}

impl Default for RedemptionSection {
    fn default() -> Self {
        Self {
            lightning_rpc: String::new(),
            payout_address: String::new(),
            pool_fee_ppm: 20_000,
            routing_fee_reserve_ppm: 10_000,
            min_routing_fee_reserve_sat: 10,
            payment_timeout_secs: 90,
            hold_check_secs: 10,
            orphan_payment_grace_secs: 60,
            final_status_grace_secs: 120,
            bitcoind: BitcoindSection::default(),
        }
    }
}

impl RedemptionSection {
    /// Whether redemption is on.
    pub fn enabled(&self) -> bool {
        !self.lightning_rpc.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if self.payout_address.is_empty() {
            return Err("`redemption.payout_address` is required when `redemption.lightning_rpc` is set: the rewards it counts are that address's matured coinbases".into());
        }
        if self.pool_fee_ppm >= 1_000_000 {
            return Err("`redemption.pool_fee_ppm` must be below 1000000 (100 %)".into());
        }
        if self.routing_fee_reserve_ppm >= 1_000_000 {
            return Err(
                "`redemption.routing_fee_reserve_ppm` must be below 1000000 (100 %)".into(),
            );
        }
        if self.bitcoind.rpc_url.is_empty() {
            return Err("`redemption.bitcoind.rpc_url` is required when redemption is on".into());
        }
        if self.payment_timeout_secs == 0 || self.hold_check_secs == 0 {
            return Err(
                "`redemption.payment_timeout_secs` and `redemption.hold_check_secs` must be at least 1"
                    .into(),
            );
        }
        // Core Lightning fails an HTLC it could not add within 30 s while it runs; and a
        // payment call still running may create its record until it times out.
        if self.orphan_payment_grace_secs < 35 {
            return Err(format!(
                "`redemption.orphan_payment_grace_secs` must be at least 35 (Core Lightning gives an HTLC 30 s to be added), got {}",
                self.orphan_payment_grace_secs
            ));
        }
        // xpay routes and retries a payment for up to 60 s (its retry_for): meanwhile every
        // recorded attempt may be failed, or none recorded yet, even after the mint that asked
        // is gone.
        if self.final_status_grace_secs < 75 {
            return Err(format!(
                "`redemption.final_status_grace_secs` must be at least 75 (Core Lightning's xpay routes and retries a payment for 60 s), got {}",
                self.final_status_grace_secs
            ));
        }
        Ok(())
    }
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
            streams: StreamsSection::default(),
            redemption: RedemptionSection::default(),
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
        self.streams.validate()?;
        self.redemption.validate()
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
