//! The mint role: a Cashu mint fed by the pool's share records.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hashpool_config::pool_side::{MintConfig, RedisSection};
use hashpool_config::Secret;

use super::{group_exists, role_exe, write_config};
use crate::http;
use crate::process::ProcessSpec;
use crate::supervisor::{Readiness, RestartPolicy, Supervised, SupervisorOptions};

/// Knobs scenarios turn.
#[derive(Debug, Clone, Default)]
pub struct MintOptions {
    /// Time between a valid verdict and paying its quotes.
    pub settlement_delay_secs: u64,
    /// Lightning redemption through the pool's node (off when None).
    pub redemption: Option<hashpool_config::pool_side::RedemptionSection>,
    /// How the redemption processor times payments and held sats (the role's defaults when
    /// None): payment timeout, hold check period, orphan grace, final-status grace (seconds).
    pub hold_timing: Option<(u64, u64, u64, u64)>,
    /// How the mint trims its streams (None: [`super::archived_streams`]).
    pub streams: Option<hashpool_config::pool_side::StreamsSection>,
}

/// Invoice sizes [`invoice_sats_worth`] weighs, at most.
const MAX_INVOICE_CANDIDATES: u128 = 10_000;

/// `held` ehash, or fewer: at most what `cap_sat` is worth at the rate of `reserve`, so an
/// invoice sized from it by [`invoice_sats_worth`] stays within what a channel can carry (on a
/// chain where the pool finds many blocks, a wallet's ehash comes to be worth far more).
pub fn held_within(reserve: &serde_json::Value, held: u64, cap_sat: u64) -> u64 {
    let (Some(msat), Some(ehash)) = (
        reserve["redeemable_msat"].as_u64(),
        reserve["outstanding_ehash"].as_u64(),
    ) else {
        return held;
    };
    if msat == 0 {
        return held;
    }
    let cap = u128::from(cap_sat) * 1000 * u128::from(ehash.max(1)) / u128::from(msat);
    held.min(u64::try_from(cap).unwrap_or(u64::MAX))
}

/// Sats of an invoice worth between `lo` and `hi` thousandths of `held` ehash at the rate of
/// `reserve` (`GET /v1/ehash/redemption`), picked among the largest sizes (at least the top
/// 10,000, and at least one ehash's worth) where rounding to whole ehash loses least;
/// None if even the largest is under one sat, or if every choice loses more than 1 % (the
/// proxy's wallet refuses that unless told to accept it).
pub fn invoice_sats_worth(
    reserve: &serde_json::Value,
    held: u64,
    (lo, hi): (u64, u64),
) -> anyhow::Result<Option<u64>> {
    let field = |k: &str| {
        reserve[k]
            .as_u64()
            .map(u128::from)
            .ok_or_else(|| anyhow::anyhow!("no {k} in {reserve}"))
    };
    let (msat, ehash) = (
        field("redeemable_msat")?,
        field("outstanding_ehash")?.max(1),
    );
    if msat == 0 {
        return Ok(None);
    }
    let held = u128::from(held);
    // Sats worth `lo` to `hi` thousandths of what is held (a range bounded by the reserve).
    let worth_sat = |permille: u64| held * u128::from(permille) * msat / 1000 / ehash / 1000;
    // The largest candidates only: a big wallet's range holds millions of sats, and walking
    // them all is seconds of CPU on an async worker (it stalled a soak's whole runtime). Past
    // 100 whole ehash the loss is under 1 % anyway, so the top of the range decides.
    let (from, to) = (worth_sat(lo).max(1), worth_sat(hi));
    // A window at least one ehash wide in sats, so a size that is a whole number of ehash is
    // always in it.
    let window = MAX_INVOICE_CANDIDATES.max(msat.div_ceil(ehash * 1000) + 1);
    let best = (from.max(to.saturating_sub(window))..=to)
        .map(|sats| {
            // What the mint asks for `sats`: whole ehash, rounded up, at msat/ehash each.
            let cost = (sats * 1000 * ehash).div_ceil(msat);
            let loss_ppm = (cost * msat - sats * 1000 * ehash) * 1_000_000 / (cost * msat).max(1);
            (loss_ppm, std::cmp::Reverse(sats))
        })
        .min();
    Ok(best
        .filter(|(loss_ppm, _)| *loss_ppm <= 10_000)
        .map(|(_, std::cmp::Reverse(sats))| sats as u64))
}

/// A running mint.
#[derive(Debug)]
pub struct MintRole {
    process: Supervised,
    /// `host:port` of its HTTP API.
    pub addr: String,
    /// `http://host:port`.
    pub url: String,
    /// The config it runs with.
    pub config: MintConfig,
}

impl MintRole {
    /// The Lightning redemption reserve and rate (`GET /v1/ehash/redemption`).
    pub async fn redemption_reserve(&self) -> anyhow::Result<serde_json::Value> {
        let (code, body) =
            http::get(&self.addr, "/v1/ehash/redemption", Duration::from_secs(5)).await?;
        anyhow::ensure!(code == 200, "/v1/ehash/redemption answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Write the config and start the mint on Redis `redis_url`; ready when `/v1/info`
    /// answers and its consumer groups exist on both streams.
    pub async fn start(
        dir: &Path,
        port: u16,
        redis_url: &str,
        opts: &MintOptions,
        timeouts: (Duration, Duration),
    ) -> anyhow::Result<Self> {
        let exe = role_exe("hashpool-mint", "HASHPOOL_MINT_EXE")?;
        let seed: [u8; 64] = std::array::from_fn(|_| rand::random());
        let streams = opts.streams.clone().unwrap_or_else(super::archived_streams);
        super::join_archive(&streams, redis_url).await?;
        let config = MintConfig {
            listen: format!("127.0.0.1:{port}"),
            data_dir: dir.join("data").display().to_string(),
            seed: Secret::new(hex::encode(seed)),
            settlement_delay_secs: opts.settlement_delay_secs,
            redemption: opts.redemption.clone().unwrap_or_default(),
            streams,
            redis: RedisSection {
                url: redis_url.into(),
                ..Default::default()
            },
            ..MintConfig::default()
        };
        let file = write_config(dir, "mint.toml", &config)?;
        let spec = ProcessSpec::new("mint", &exe, dir)
            .arg("--config")
            .arg(&file)
            // cdk-axum logs a websocket client that went away (a wallet restarting its
            // NUT-17 subscription) at ERROR; nothing is wrong then.
            .env("RUST_LOG", "info,mint=debug,cdk_axum::ws=off");
        let addr = config.listen.clone();
        let (probe_addr, probe_redis) = (addr.clone(), redis_url.to_string());
        let readiness = Readiness {
            what: format!("mint /v1/info on {addr} and its consumer groups in Redis"),
            probe: Arc::new(move || {
                let (addr, redis) = (probe_addr.clone(), probe_redis.clone());
                Box::pin(async move {
                    match http::get(&addr, "/v1/info", Duration::from_secs(1)).await {
                        Ok((200, _)) => {}
                        Ok((code, body)) => return Err(format!("/v1/info: {code} {body}")),
                        Err(e) => return Err(e.to_string()),
                    }
                    for stream in [ehash::SHARES_STREAM, ehash::AUDIT_RESULTS_STREAM] {
                        group_exists(&redis, stream, "mint").await?;
                    }
                    Ok(())
                })
            }),
        };
        let options = SupervisorOptions::new(RestartPolicy::OnCrash { max_restarts: 3 }, timeouts);
        let process = Supervised::start(spec, readiness, options).await?;
        Ok(Self {
            process,
            url: format!("http://{addr}"),
            addr,
            config,
        })
    }

    /// The process.
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// The mint's SQLite database (cdk's tables and the ehash and redemption ledgers).
    pub fn db_path(&self) -> PathBuf {
        Path::new(&self.config.data_dir).join("mint.sqlite")
    }

    /// The mint's log (stdout).
    pub fn log(&self) -> PathBuf {
        self.process.spec().stdout_log()
    }

    /// Scrape `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<http::Metrics> {
        let (code, body) = http::get(&self.addr, "/metrics", Duration::from_secs(2)).await?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(http::Metrics::parse(&body))
    }
}

#[cfg(test)]
mod tests {
    use super::invoice_sats_worth;

    #[test]
    fn invoice_sizing_is_bounded_and_loses_at_most_one_percent() {
        // A rate of 7 msat per ehash and a wallet of 10^12 ehash: the old walk over every sat
        // in range took minutes; this answers at once, near the top of the range.
        let reserve = serde_json::json!({"redeemable_msat": 7_000_000_000_000u64, "outstanding_ehash": 1_000_000_000_000u64});
        let t = std::time::Instant::now();
        let sats = invoice_sats_worth(&reserve, 1_000_000_000_000, (10, 100))
            .unwrap_or_default()
            .unwrap_or_default();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        assert!(sats > 690_000_000 && sats <= 700_000_000, "{sats}");
        // A small wallet: no invoice under one sat.
        let none = invoice_sats_worth(&reserve, 10, (10, 100)).unwrap_or_default();
        assert_eq!(none, None);
    }
}
