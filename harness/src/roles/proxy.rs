//! The proxy role (one per miner operator).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ehash::LockingPubkey;
use hashpool_config::miner_side::ProxyConfig;

use super::{role_exe, tcp_ready, write_config};
use crate::keys::locking_keys;
use crate::process::ProcessSpec;
use crate::supervisor::{RestartPolicy, Supervised, SupervisorOptions};

/// A running proxy.
#[derive(Debug)]
pub struct ProxyRole {
    process: Supervised,
    /// SV1 address for miners.
    pub sv1_addr: String,
    /// Operator's locking key (None: no ehash).
    pub locking_pubkey: Option<LockingPubkey>,
    /// Its secret (hex): the proxy's wallet signs lookups and mints with it.
    pub locking_secret: Option<String>,
    /// The wallet status endpoint (`host:port`), when the proxy has a wallet.
    pub wallet_addr: Option<String>,
    /// Its status endpoint (`host:port`: `/wallet`, `/declarations`), if any.
    pub http_addr: Option<String>,
    /// Whether it declares its own templates.
    pub declaring: bool,
}

/// How to start a proxy.
#[derive(Debug, Clone)]
pub struct ProxyLaunch<'a> {
    /// Its directory.
    pub dir: &'a Path,
    /// Its SV1 port.
    pub port: u16,
    /// The pool (its job declaration address).
    pub pool: &'a super::PoolRole,
    /// Where it reaches the pool and the authority key it expects there: the pool's own, or a
    /// sniffer's address in front of it.
    pub upstream: (&'a str, &'a str),
    /// Give it an operator's locking key (its channels earn ehash).
    pub with_locking_key: bool,
    /// Hashrate announced per miner.
    pub nominal_hashrate: f32,
    /// Its status endpoint, and its wallet's mint (empty: no wallet).
    pub wallet: Option<WalletOptions>,
    /// Declare its own templates.
    pub declare: Option<DeclareOptions>,
    /// Its `max_shares_in_flight` (None: the default).
    pub max_shares_in_flight: Option<usize>,
    /// Start and stop timeouts.
    pub timeouts: (Duration, Duration),
}

/// What a proxy did with its miners' shares (`GET /shares`).
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShareCounts {
    /// Shares sent to the pool and not answered yet.
    pub in_flight: usize,
    /// Most that may be (`max_shares_in_flight`).
    pub max_in_flight: usize,
    /// Accepted by the pool.
    pub accepted: u64,
    /// Refused by the pool.
    pub rejected_by_pool: u64,
    /// Refused by the proxy: its window of shares waiting for the pool was full.
    pub refused_upstream_busy: u64,
    /// Answered `upstream-disconnected` by the proxy.
    pub refused_upstream_disconnected: u64,
}

/// Where a proxy's wallet mints, and the port of its status endpoint.
#[derive(Debug, Clone)]
pub struct WalletOptions {
    /// The mint's URL.
    pub mint_url: String,
    /// Port of `GET /wallet`.
    pub http_port: u16,
    /// Lookup interval when no NUT-17 notification comes.
    pub poll_ms: u64,
}

/// A proxy that declares its own templates (`template_source = "miner"`).
#[derive(Debug, Clone)]
pub struct DeclareOptions {
    /// The operator's node.
    pub node_rpc_url: String,
    /// Its RPC password (user [`crate::bitcoind::RPC_USER`]).
    pub node_rpc_password: String,
    /// Its chain.
    pub chain: String,
    /// A fraud kind for every declared template.
    pub fraud: Option<String>,
}

/// What a declaring proxy reports (`GET /declarations`).
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
pub struct DeclarationStatus {
    /// Declarations the pool accepted.
    pub declared: u64,
    /// Declarations refused, by SV2 error code.
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Custom jobs the pool accepted.
    pub custom_jobs: u64,
    /// Custom jobs refused, by SV2 error code.
    pub custom_jobs_refused: std::collections::BTreeMap<String, u64>,
    /// Templates that could not be built.
    pub not_built: u64,
    /// The last refusal or failure.
    pub last_error: Option<String>,
}

/// What a proxy's wallet reports (`GET /wallet`).
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
pub struct WalletStatus {
    /// ehash held in unspent proofs.
    pub held: u64,
    /// ehash minted so far.
    pub minted: u64,
    /// ehash in proofs a melt holds.
    #[serde(default)]
    pub melting: u64,
    /// ehash completed melts took.
    #[serde(default)]
    pub melted: u64,
    /// ehash of PENDING quotes.
    pub pending: u64,
    /// ehash of PAID quotes not minted yet.
    pub paid_unminted: u64,
    /// ehash of FAILED quotes.
    pub failed: u64,
    /// Quotes the last lookup returned.
    pub quotes: usize,
    /// Lookups done.
    pub lookups: u64,
    /// Why the last round failed.
    pub last_error: Option<String>,
}

/// A proxy wallet's HTTP API (`GET /wallet`, `POST /wallet/...`), owned.
#[derive(Debug, Clone)]
pub struct WalletClient {
    /// `host:port` of the wallet's HTTP API.
    pub addr: String,
}

impl WalletClient {
    /// What the wallet reports now.
    pub async fn status(&self) -> anyhow::Result<WalletStatus> {
        // A proxy serving a farm on two busy cores has answered in more than 2 s.
        let (code, body) = crate::http::get(&self.addr, "/wallet", Duration::from_secs(10)).await?;
        anyhow::ensure!(code == 200, "/wallet answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Redeem against `invoice`: Ok(the redemption) or Err(the proxy's error text).
    pub async fn redeem(
        &self,
        invoice: &str,
        timeout: Duration,
    ) -> anyhow::Result<Result<serde_json::Value, String>> {
        self.post(
            "/wallet/redeem",
            serde_json::json!({ "invoice": invoice }),
            timeout,
        )
        .await
    }

    /// POST `body` to `path`: Ok(the answer) on 200, else Err(the proxy's error text).
    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<Result<serde_json::Value, String>> {
        let (code, body) =
            crate::http::post_json(&self.addr, path, &body.to_string(), timeout).await?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| anyhow::anyhow!("{path} answered {code} {body}: {e}"))?;
        Ok(match code {
            200 => Ok(v),
            _ => Err(v["error"].as_str().unwrap_or(&body).to_string()),
        })
    }
}

impl ProxyRole {
    /// Start a proxy as `launch` says.
    pub async fn start(launch: ProxyLaunch<'_>) -> anyhow::Result<Self> {
        let ProxyLaunch {
            dir,
            port,
            pool,
            upstream,
            with_locking_key,
            nominal_hashrate,
            wallet,
            declare,
            max_shares_in_flight,
            timeouts,
        } = launch;
        let exe = role_exe("hashpool-proxy", "HASHPOOL_PROXY_EXE")?;
        let (secret, public) = if with_locking_key {
            let (s, p) = locking_keys();
            (Some(s), Some(p))
        } else {
            (None, None)
        };
        let config = ProxyConfig {
            listen: format!("127.0.0.1:{port}"),
            pool_address: upstream.0.to_string(),
            pool_authority_public_key: upstream.1.to_string(),
            locking_pubkey: public.map(|p| p.to_string()).unwrap_or_default(),
            locking_secret_key: hashpool_config::Secret::new(secret.clone().unwrap_or_default()),
            nominal_hashrate,
            data_dir: dir.join("data").display().to_string(),
            mint_url: wallet
                .as_ref()
                .map(|w| w.mint_url.clone())
                .unwrap_or_default(),
            http_listen: wallet
                .as_ref()
                .map(|w| format!("127.0.0.1:{}", w.http_port))
                .unwrap_or_default(),
            wallet_poll_ms: wallet.as_ref().map(|w| w.poll_ms).unwrap_or(1000),
            // Stretched on a slow machine like every other wait.
            open_timeout_ms: crate::wait::scaled(Duration::from_secs(10)).as_millis() as u64,
            // Harness miners subscribe at once; a silent socket is let go sooner than in
            // production so the scenario that opens hundreds of them stays short.
            subscribe_timeout_ms: crate::wait::scaled(Duration::from_secs(3)).as_millis() as u64,
            template_source: if declare.is_some() { "miner" } else { "pool" }.into(),
            jd_address: if declare.is_some() {
                pool.jd_addr.clone()
            } else {
                String::new()
            },
            node: match &declare {
                Some(d) => hashpool_config::miner_side::NodeSection {
                    rpc_url: d.node_rpc_url.clone(),
                    rpc_user: crate::bitcoind::RPC_USER.into(),
                    rpc_password: hashpool_config::Secret::new(d.node_rpc_password.clone()),
                    chain: d.chain.clone(),
                    ..Default::default()
                },
                None => Default::default(),
            },
            fraud: declare
                .as_ref()
                .and_then(|d| d.fraud.clone())
                .unwrap_or_default(),
            max_shares_in_flight: max_shares_in_flight
                .unwrap_or(ProxyConfig::default().max_shares_in_flight),
            ..ProxyConfig::default()
        };
        let file = write_config(dir, "proxy.toml", &config)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proxy".into());
        let spec = ProcessSpec::new(&name, &exe, dir)
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "info");
        let options = SupervisorOptions::new(RestartPolicy::OnCrash { max_restarts: 3 }, timeouts);
        let process =
            Supervised::start(spec, tcp_ready("proxy SV1", config.listen.clone()), options).await?;
        let http_addr = (!config.http_listen.is_empty()).then(|| config.http_listen.clone());
        let wallet_addr = http_addr.clone().filter(|_| !config.mint_url.is_empty());
        Ok(Self {
            process,
            sv1_addr: config.listen,
            locking_pubkey: public,
            locking_secret: secret,
            wallet_addr,
            http_addr,
            declaring: declare.is_some(),
        })
    }

    /// The process.
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// The proxy's log (stdout).
    pub fn log(&self) -> PathBuf {
        self.process.spec().stdout_log()
    }

    /// What the proxy's declarer reports now.
    pub async fn declarations(&self) -> anyhow::Result<DeclarationStatus> {
        let addr = self
            .http_addr
            .as_deref()
            .filter(|_| self.declaring)
            .ok_or_else(|| anyhow::anyhow!("this proxy does not declare templates"))?;
        let (code, body) = crate::http::get(addr, "/declarations", Duration::from_secs(2)).await?;
        anyhow::ensure!(code == 200, "/declarations answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// What the proxy did with its miners' shares so far (`GET /shares`).
    pub async fn shares(&self) -> anyhow::Result<ShareCounts> {
        let addr = self
            .http_addr
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("this proxy has no status endpoint"))?;
        let (code, body) = crate::http::get(addr, "/shares", Duration::from_secs(10)).await?;
        anyhow::ensure!(code == 200, "/shares answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// What the wallet reports now.
    pub async fn wallet_status(&self) -> anyhow::Result<WalletStatus> {
        self.wallet()?.status().await
    }

    /// The wallet's HTTP API as a handle a task can own.
    pub fn wallet(&self) -> anyhow::Result<WalletClient> {
        let addr = self
            .wallet_addr
            .clone()
            .ok_or_else(|| anyhow::anyhow!("this proxy has no wallet"))?;
        Ok(WalletClient { addr })
    }

    /// What the wallet reports once a whole round of it has run after this call: `GET
    /// /wallet` is the snapshot of the last round, which may predate a melt that just ended.
    pub async fn fresh_wallet_status(&self) -> anyhow::Result<WalletStatus> {
        let first = self.wallet_status().await?.lookups;
        Ok(crate::wait::wait_until(
            "the wallet to finish a round that started after this call (lookups counter +2)",
            // A round of a wallet that minted for a farm takes seconds on a loaded machine.
            Duration::from_secs(90),
            || async {
                let st = self.wallet_status().await.map_err(|e| e.to_string())?;
                if st.lookups >= first + 2 {
                    Ok(st)
                } else {
                    Err(format!("{} lookups, waiting for {}", st.lookups, first + 2))
                }
            },
        )
        .await?)
    }

    /// Redeem ehash against `invoice` through the proxy's `POST /wallet/redeem`: Ok(the
    /// redemption it reports) or Err(the proxy's error text), within `timeout`.
    pub async fn redeem(
        &self,
        invoice: &str,
        timeout: Duration,
    ) -> anyhow::Result<Result<serde_json::Value, String>> {
        self.wallet_post(
            "/wallet/redeem",
            serde_json::json!({ "invoice": invoice }),
            timeout,
        )
        .await
    }

    /// Redeem with the options the proxy's `POST /wallet/redeem` takes (`invoice` or `quote`,
    /// `accept_loss`): the redemption, or the proxy's error text.
    pub async fn redeem_with(
        &self,
        options: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<Result<serde_json::Value, String>> {
        self.wallet_post("/wallet/redeem", options, timeout).await
    }

    /// A melt quote for `invoice` and what it costs (`POST /wallet/quote`), or the proxy's
    /// error text.
    pub async fn melt_quote(
        &self,
        invoice: &str,
    ) -> anyhow::Result<Result<serde_json::Value, String>> {
        self.wallet_post(
            "/wallet/quote",
            serde_json::json!({ "invoice": invoice }),
            Duration::from_secs(30),
        )
        .await
    }

    /// The wallet's melts (`GET /wallet/melts`).
    pub async fn wallet_melts(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let addr = self
            .wallet_addr
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("this proxy has no wallet"))?;
        let (code, body) = crate::http::get(addr, "/wallet/melts", Duration::from_secs(10)).await?;
        anyhow::ensure!(code == 200, "/wallet/melts answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    async fn wallet_post(
        &self,
        path: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<Result<serde_json::Value, String>> {
        self.wallet()?.post(path, body, timeout).await
    }

    /// Every channel the pool opened for this proxy, as its log reports them:
    /// (channel id, extranonce prefix hex).
    pub fn announced_channels(&self) -> Vec<(u32, String)> {
        announced_channels(&std::fs::read_to_string(self.log()).unwrap_or_default())
    }
}

/// (channel id, extranonce prefix) of each "upstream channel open" line of a proxy log.
pub fn announced_channels(log: &str) -> Vec<(u32, String)> {
    log.lines()
        .filter_map(|line| {
            let prefix = line
                .split_once("upstream channel open (extranonce1 ")?
                .1
                .split(',')
                .next()?;
            let channel = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("channel="))?
                .parse()
                .ok()?;
            Some((channel, prefix.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_channel_announcements_from_the_log_format() {
        let log = "2026-11-29T10:00:00Z  INFO proxy::session: upstream channel open \
                   (extranonce1 48500001, extranonce2 size 16) miner=1 channel=2 ehash=true\n\
                   2026-11-29T10:00:01Z  INFO proxy::session: miner connected miner=2\n";
        assert_eq!(announced_channels(log), vec![(2, "48500001".to_string())]);
    }
}
