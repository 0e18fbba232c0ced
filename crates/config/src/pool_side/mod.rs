//! Pool-side configuration: the only place that holds pool secrets (the Noise authority key)
//! and the Redis URL. The miner side never sees these.

use serde::{Deserialize, Serialize};

use crate::Secret;

/// Environment prefix: `HASHPOOL_POOL__LISTEN=...`.
pub const POOL_ENV_PREFIX: &str = "HASHPOOL_POOL";

/// Default SV2 listen address.
pub const DEFAULT_POOL_LISTEN: &str = "127.0.0.1:34254";
/// Default metrics/health listen address.
pub const DEFAULT_POOL_METRICS_LISTEN: &str = "127.0.0.1:9184";
/// Default minimum leading zero bits of a share (hashpool's `min_bits`): the easiest share
/// target is `2^(256 - min_bits)`, and such a share is worth 1 ehash. 16 (65,536 hashes) lets a
/// CPU miner on the private signet find shares many times a second; vardiff then raises each
/// channel's target towards `shares_per_minute`. A pool of ASICs raises it (hashpool uses 32).
pub const DEFAULT_MIN_BITS: u32 = 16;
/// Default vardiff aim per channel: one share a second. Shares per block follow from it: the
/// private signet needs about 4.8 million hashes per block, so a miner of `h` H/s gets about
/// `4.8e6 * shares_per_minute / (60 * h)` shares per block (10 at 500 kH/s, 2.4 at 2 MH/s).
pub const DEFAULT_SHARES_PER_MINUTE: f32 = 60.0;

/// The pool role.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `listen` | 127.0.0.1:34254 | SV2 (Noise NX over TCP) |
/// | `metrics_listen` | 127.0.0.1:9184 | `/metrics` (Prometheus) and `/health` |
/// | `jd_listen` | (empty: no job declaration) | job declaration (Noise, same authority key); set it to let operators declare their own templates |
/// | `authority_public_key`, `authority_secret_key` | (required) | Noise authority key pair, SRI base58 |
/// | `cert_validity_secs` | 3600 | validity of the Noise certificate |
/// | `pool_tag` | "hashpool" | coinbase tag `Sv2/<tag>//` |
/// | `payout_address` | (required) | address the coinbase pays |
/// | `min_bits` | 16 | see [`DEFAULT_MIN_BITS`] |
/// | `shares_per_minute` | 60 | vardiff aim per channel, see [`DEFAULT_SHARES_PER_MINUTE`] |
/// | `vardiff_interval_secs` | 10 | how often vardiff runs |
/// | `[bitcoind]` | | `rpc_url`, `rpc_user`, `rpc_password`, `chain` (`signet`/`regtest`), `poll_interval_ms`, `refresh_secs` |
/// | `[redis]` | | `url`, `append_timeout_ms` (2000), `batch_max` (256), `seen_idle_secs` (7 days), `seen_after_new_tip_secs` (600) |
/// | `[limits]` | | see [`PoolLimits`] |
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolConfig {
    /// SV2 listen address.
    pub listen: String,
    /// Prometheus and health endpoint.
    pub metrics_listen: String,
    /// Job declaration listen address; empty: operators cannot declare templates.
    pub jd_listen: String,
    /// Noise authority public key (SRI base58).
    pub authority_public_key: String,
    /// Noise authority secret key (SRI base58).
    pub authority_secret_key: Secret<String>,
    /// Noise certificate validity, seconds.
    pub cert_validity_secs: u64,
    /// Coinbase tag.
    pub pool_tag: String,
    /// Address the coinbase pays.
    pub payout_address: String,
    /// Minimum leading zero bits of a share.
    pub min_bits: u32,
    /// Vardiff aim, shares per minute per channel.
    pub shares_per_minute: f32,
    /// Vardiff period, seconds.
    pub vardiff_interval_secs: u64,
    /// Template source.
    pub bitcoind: BitcoindSection,
    /// Share records.
    pub redis: RedisSection,
    /// Protection against misbehaving clients.
    pub limits: PoolLimits,
}

/// `[bitcoind]`: where templates come from and blocks go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BitcoindSection {
    /// `http://127.0.0.1:38332`.
    pub rpc_url: String,
    /// RPC user.
    pub rpc_user: String,
    /// RPC password.
    pub rpc_password: Secret<String>,
    /// `signet` or `regtest` (selects the `getblocktemplate` rules and address network).
    pub chain: String,
    /// How often the tip is checked, milliseconds (a new tip reaches miners within this).
    pub poll_interval_ms: u64,
    /// How often a template is rebuilt on the same tip (new transactions), seconds.
    pub refresh_secs: u64,
}

/// `[redis]`: the pool's record stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisSection {
    /// `redis://127.0.0.1:6379`.
    pub url: String,
    /// Time to wait for Redis to confirm a batch of records, milliseconds. Past it the pool
    /// resolves each record's outcome (fencing off any that did not land) before answering
    /// the shares; a share is never answered from a timeout alone.
    pub append_timeout_ms: u64,
    /// Most records per pipelined batch.
    pub batch_max: usize,
    /// A tip's seen share hashes expire this long after its last share, seconds.
    pub seen_idle_secs: u64,
    /// A tip's seen share hashes expire this long after the pool moved to another tip,
    /// seconds (shares of an old tip are stale).
    pub seen_after_new_tip_secs: u64,
}

/// `[limits]`: one bad client must not hurt the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolLimits {
    /// Largest SV2 message payload accepted, bytes; a bigger one closes the connection.
    pub max_message_bytes: usize,
    /// Open connections, all sources together; lowered at start to the descriptor limit (the
    /// soft limit raised to the hard one) minus 128 kept for job declaration, bitcoind, Redis
    /// and `/health`.
    pub max_connections: usize,
    /// Open connections per source (an IPv4 address, or an IPv6 /64).
    pub max_connections_per_ip: usize,
    /// New connections per second per source (sustained); IPv6 counted per /64.
    pub max_new_connections_per_sec: f64,
    /// New connections a source may open at once above that rate.
    pub new_connection_burst: f64,
    /// Share submissions per second per channel (sustained).
    pub max_shares_per_sec: f64,
    /// Share submissions allowed in a burst above the sustained rate.
    pub share_burst: f64,
    /// Time from TCP accept to a finished Noise handshake and `SetupConnection`, milliseconds.
    /// A set-up connection is not cut for having no channel (an SV2 proxy waits for its first
    /// miner, or keeps its connection after its last one left).
    pub handshake_deadline_ms: u64,
    /// A connection that sends nothing for this long is closed, seconds; 0 (the default):
    /// never, since a set-up client with a quiet channel is healthy. Dead peers are found by
    /// TCP keepalive (probes after 60 s idle, every 10 s, 3 unanswered close the socket).
    pub idle_timeout_secs: u64,
    /// Channels one connection may hold open; one more is refused with
    /// `too-many-channels`. A proxy puts all of its miners on one connection, so this is the
    /// most miners one proxy serves.
    pub max_channels_per_connection: usize,
    /// Channels one source (IPv4 address or IPv6 /64) may hold open over all its
    /// connections; one more is refused with `too-many-channels`.
    pub max_channels_per_ip: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_POOL_LISTEN.into(),
            metrics_listen: DEFAULT_POOL_METRICS_LISTEN.into(),
            jd_listen: String::new(),
            authority_public_key: String::new(),
            authority_secret_key: Secret::new(String::new()),
            cert_validity_secs: 3600,
            pool_tag: "hashpool".into(),
            payout_address: String::new(),
            min_bits: DEFAULT_MIN_BITS,
            shares_per_minute: DEFAULT_SHARES_PER_MINUTE,
            vardiff_interval_secs: 10,
            bitcoind: BitcoindSection::default(),
            redis: RedisSection::default(),
            limits: PoolLimits::default(),
        }
    }
}

impl Default for BitcoindSection {
    fn default() -> Self {
        Self {
            rpc_url: "http://127.0.0.1:38332".into(),
            rpc_user: String::new(),
            rpc_password: Secret::new(String::new()),
            chain: "signet".into(),
            poll_interval_ms: 200,
            refresh_secs: 30,
        }
    }
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            append_timeout_ms: 2000,
            batch_max: 256,
            seen_idle_secs: 7 * 24 * 3600,
            seen_after_new_tip_secs: 600,
        }
    }
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024,
            max_connections: 4096,
            max_connections_per_ip: 64,
            max_new_connections_per_sec: 10.0,
            new_connection_burst: 20.0,
            max_shares_per_sec: 200.0,
            share_burst: 400.0,
            handshake_deadline_ms: 10_000,
            idle_timeout_secs: 0,
            max_channels_per_connection: 2048,
            max_channels_per_ip: 4096,
        }
    }
}

impl PoolConfig {
    /// Refuse values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let required = [
            ("authority_public_key", self.authority_public_key.is_empty()),
            (
                "authority_secret_key",
                self.authority_secret_key.expose().is_empty(),
            ),
            ("payout_address", self.payout_address.is_empty()),
        ];
        for (key, missing) in required {
            if missing {
                return Err(format!("`{key}` is required"));
            }
        }
        if !(1..=200).contains(&self.min_bits) {
            return Err(format!("`min_bits` must be 1..=200, got {}", self.min_bits));
        }
        if !(self.shares_per_minute > 0.0 && self.shares_per_minute.is_finite()) {
            return Err("`shares_per_minute` must be positive".into());
        }
        if !matches!(self.bitcoind.chain.as_str(), "signet" | "regtest") {
            return Err(format!(
                "`bitcoind.chain` must be signet or regtest, got {:?}",
                self.bitcoind.chain
            ));
        }
        if self.limits.max_shares_per_sec <= 0.0 || self.limits.share_burst < 1.0 {
            return Err(
                "`limits.max_shares_per_sec` must be > 0 and `limits.share_burst` >= 1".into(),
            );
        }
        if self.limits.max_connections == 0 || self.limits.max_connections_per_ip == 0 {
            return Err(
                "`limits.max_connections` and `limits.max_connections_per_ip` must be at least 1"
                    .into(),
            );
        }
        let rate = self.limits.max_new_connections_per_sec;
        let burst = self.limits.new_connection_burst;
        if rate.is_nan() || rate <= 0.0 || burst.is_nan() || burst < 1.0 {
            return Err("`limits.max_new_connections_per_sec` must be > 0 and `limits.new_connection_burst` >= 1".into());
        }
        if self.limits.max_channels_per_connection == 0 || self.limits.max_channels_per_ip == 0 {
            return Err(
                "`limits.max_channels_per_connection` and `limits.max_channels_per_ip` must be at least 1"
                    .into(),
            );
        }
        if self.redis.batch_max == 0 {
            return Err("`redis.batch_max` must be at least 1".into());
        }
        if self.redis.append_timeout_ms == 0 {
            return Err("`redis.append_timeout_ms` must be at least 1".into());
        }
        if !(0 < self.redis.seen_after_new_tip_secs
            && self.redis.seen_after_new_tip_secs < self.redis.seen_idle_secs)
        {
            return Err(
                "`redis.seen_after_new_tip_secs` must be > 0 and below `redis.seen_idle_secs`"
                    .into(),
            );
        }
        Ok(())
    }
}

mod auditor;
mod mint;
mod streams;

pub use auditor::{AuditorConfig, AUDITOR_ENV_PREFIX};
pub use mint::{MintConfig, RedemptionSection, MINT_ENV_PREFIX};
pub use streams::StreamsSection;
