//! Core Lightning nodes on a stack's chain: real `lightningd` processes, supervised like every
//! other role, each behind its own [`FeeProxy`] to bitcoind, driven with `cln-rpc` over the
//! node's socket. Developer options keep tests fast (`--developer`, bitcoind polled every
//! second, one confirmation for channels).

mod fee_proxy;
mod rewards_cache;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde_json::{json, Value};

pub use fee_proxy::{FeeProxy, FIXED_FEERATE_BTC_PER_KVB};
pub use rewards_cache::{
    ensure_rewards_chain, pool_hsm_secret, RewardsChain, LIQUIDITY_SATS, MATURITY,
    POOL_NODE_ADDRESS, POOL_NODE_LIQUIDITY_ADDRESS, REDEMPTION_MIN_BITS, REWARD_BLOCKS,
    REWARD_SATS,
};

use crate::bitcoind::{Bitcoind, RPC_USER};
use crate::process::ProcessSpec;
use crate::supervisor::{Readiness, RestartPolicy, Supervised, SupervisorOptions};
use crate::wait::wait_until;

/// How to start one node.
#[derive(Debug, Clone)]
pub struct LightningOptions {
    /// Process name in the stack (`lightning-<name>`).
    pub name: String,
    /// Process directory (logs; the lightning dir is `ln/` inside).
    pub dir: PathBuf,
    /// `lightningd`.
    pub exe: PathBuf,
    /// `bitcoin-cli` (lightningd's bitcoin backend runs it).
    pub bitcoin_cli: PathBuf,
    /// Peer port on 127.0.0.1.
    pub p2p_port: u16,
    /// Port of its fee proxy in front of bitcoind.
    pub proxy_port: u16,
    /// A fixed wallet seed (`hsm_secret`), so addresses are known in advance.
    pub hsm_secret: Option<[u8; 32]>,
    /// A lightning directory to start from (copied in before the first start).
    pub seed_dir: Option<PathBuf>,
    /// Readiness deadline and SIGTERM grace.
    pub timeouts: (Duration, Duration),
}

/// A running node.
#[derive(Debug)]
pub struct LightningNode {
    process: Supervised,
    options: LightningOptions,
    rpc_path: PathBuf,
    proxy: FeeProxy,
    /// Node id (hex public key).
    pub id: String,
    /// Peer address (`127.0.0.1:port`).
    pub p2p_addr: String,
}

/// lightningd's name for a chain.
fn network(chain: crate::Chain) -> &'static str {
    match chain {
        crate::Chain::Signet => "signet",
        crate::Chain::Regtest => "regtest",
    }
}

/// Longest a call may take (a payment retries for up to 60 s; a paused node never answers).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// One JSON-RPC call over the node's socket.
pub async fn call(rpc_path: &Path, method: &str, params: Value) -> anyhow::Result<Value> {
    let timeout = crate::wait::scaled(CALL_TIMEOUT);
    let call = async {
        let mut rpc = cln_rpc::ClnRpc::new(rpc_path)
            .await
            .with_context(|| format!("cannot open {}", rpc_path.display()))?;
        rpc.call_raw::<Value, Value>(method, &params)
            .await
            .map_err(|e| anyhow!("lightningd {method}: {e}"))
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| {
        anyhow!(
            "lightningd {method}: no answer within {timeout:?} on {}",
            rpc_path.display()
        )
    })?
}

impl LightningNode {
    /// Start a node on `bitcoind`'s chain; ready when `getinfo` answers at bitcoind's height.
    pub async fn start(opts: LightningOptions, bitcoind: &Bitcoind) -> anyhow::Result<Self> {
        let net = network(bitcoind.chain());
        let ln_dir = opts.dir.join("ln");
        let net_dir = ln_dir.join(net);
        if let (Some(seed), false) = (&opts.seed_dir, ln_dir.exists()) {
            crate::bitcoind::copy_dir(seed, &ln_dir).with_context(|| {
                format!("cannot copy {} into {}", seed.display(), ln_dir.display())
            })?;
        }
        std::fs::create_dir_all(&net_dir)
            .with_context(|| format!("cannot create {}", net_dir.display()))?;
        if let Some(secret) = opts.hsm_secret {
            let path = net_dir.join("hsm_secret");
            if !path.exists() {
                std::fs::write(&path, secret)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
            }
        }
        // bitcoin-cli reads <datadir>/bitcoin.conf: an empty one keeps the user's out.
        let cli_dir = opts.dir.join("bitcoin-cli");
        std::fs::create_dir_all(&cli_dir)?;
        std::fs::write(cli_dir.join("bitcoin.conf"), "")?;
        let proxy = FeeProxy::start(
            &format!("127.0.0.1:{}", opts.proxy_port),
            &format!("127.0.0.1:{}", bitcoind.rpc_port()),
        )
        .await?;
        let p2p_addr = format!("127.0.0.1:{}", opts.p2p_port);
        // A Unix socket path holds at most 107 bytes: the socket lives in the temp dir under
        // the node's port (unique among running harnesses), not in a deep data dir.
        let rpc_path = std::env::temp_dir().join(format!("hashpool-ln-{}.rpc", opts.p2p_port));
        let _ = std::fs::remove_file(&rpc_path);
        let spec = ProcessSpec::new(&opts.name, &opts.exe, &opts.dir)
            .arg(format!("--lightning-dir={}", ln_dir.display()))
            .arg(format!("--network={net}"))
            .arg(format!("--bitcoin-cli={}", opts.bitcoin_cli.display()))
            .arg(format!("--bitcoin-datadir={}", cli_dir.display()))
            .arg("--bitcoin-rpcconnect=127.0.0.1")
            .arg(format!("--bitcoin-rpcport={}", proxy.port()))
            .arg(format!("--bitcoin-rpcuser={RPC_USER}"))
            .arg(format!("--bitcoin-rpcpassword={}", bitcoind.rpc_password()))
            .arg(format!("--addr={p2p_addr}"))
            .arg("--developer")
            .arg("--dev-bitcoind-poll=1")
            .arg("--dev-fast-gossip")
            .arg("--funding-confirms=1")
            // Scan from height 100 (every stack's chain is taller): Core Lightning stops with
            // "Initial block ... reorganized out" on a reorganisation below the block it
            // started from, and scenarios reorganise the rewards chain below its maturity.
            .arg("--rescan=-100")
            .arg(format!("--rpc-file={}", rpc_path.display()))
            .arg("--log-level=info")
            .arg("--log-file=-");
        let probe_rpc = Arc::new(bitcoind_rpc::BitcoinRpc::new(
            &bitcoind.rpc_url(),
            RPC_USER,
            bitcoind.rpc_password(),
        )?);
        let probe_path = rpc_path.clone();
        let readiness = Readiness {
            what: format!(
                "lightningd {} answering getinfo at bitcoind's height",
                opts.name
            ),
            probe: Arc::new(move || {
                let (path, rpc) = (probe_path.clone(), probe_rpc.clone());
                Box::pin(async move {
                    let info = call(&path, "getinfo", json!({}))
                        .await
                        .map_err(|e| e.to_string())?;
                    let height: u64 = rpc
                        .call("getblockcount", &[])
                        .await
                        .map_err(|e| e.to_string())?;
                    match info["blockheight"].as_u64() {
                        Some(h) if h >= height => Ok(()),
                        other => Err(format!("at height {other:?}, bitcoind at {height}")),
                    }
                })
            }),
        };
        let options = SupervisorOptions::new(RestartPolicy::Never, opts.timeouts);
        let process = Supervised::start(spec, readiness, options).await?;
        let info = call(&rpc_path, "getinfo", json!({})).await?;
        let id = info["id"]
            .as_str()
            .context("getinfo without an id")?
            .to_string();
        Ok(Self {
            process,
            options: opts,
            rpc_path,
            proxy,
            id,
            p2p_addr,
        })
    }

    /// The process.
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// Stop through its `stop` command (lightningd does not exit cleanly on SIGTERM); returns
    /// how it exited.
    pub async fn stop(&self) -> anyhow::Result<String> {
        let path = self.rpc_path.clone();
        self.process
            .stop_with(async move {
                if let Err(e) = call(&path, "stop", json!({})).await {
                    tracing::debug!("lightningd stop: {e:#}");
                }
            })
            .await
    }

    /// Its RPC socket (`<temp dir>/hashpool-ln-<p2p port>.rpc`).
    pub fn rpc_path(&self) -> &Path {
        &self.rpc_path
    }

    /// Close its fee proxy (after the node stopped), freeing the port for a restart.
    pub async fn close_fee_proxy(&mut self) {
        self.proxy.close().await;
    }

    /// How it was started (to start it again on the same directory and ports).
    pub fn options(&self) -> &LightningOptions {
        &self.options
    }

    /// The fee proxy in front of bitcoind.
    pub fn fee_proxy(&self) -> &FeeProxy {
        &self.proxy
    }

    /// One call.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        call(&self.rpc_path, method, params).await
    }

    /// A fresh on-chain address (bech32).
    pub async fn new_address(&self) -> anyhow::Result<String> {
        let r = self
            .call("newaddr", json!({"addresstype": "bech32"}))
            .await?;
        Ok(r["bech32"]
            .as_str()
            .context("newaddr without bech32")?
            .to_string())
    }

    /// Confirmed on-chain sats the wallet can spend, and sats it holds in normal channels
    /// (`to_us_msat`, rounded down).
    pub async fn balances(&self) -> anyhow::Result<(u64, u64)> {
        let f = self.call("listfunds", json!({})).await?;
        let onchain = f["outputs"]
            .as_array()
            .map(|o| {
                o.iter()
                    .filter(|o| o["status"] == "confirmed" && o["reserved"] != true)
                    .filter_map(|o| o["amount_msat"].as_u64())
                    .sum::<u64>()
                    / 1000
            })
            .unwrap_or(0);
        let c = self.call("listpeerchannels", json!({})).await?;
        let channels = c["channels"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter(|c| c["state"] == "CHANNELD_NORMAL")
                    .filter_map(|c| c["to_us_msat"].as_u64())
                    .sum::<u64>()
                    / 1000
            })
            .unwrap_or(0);
        Ok((onchain, channels))
    }

    /// What this node can receive over its channels now (sat): the most an invoice of it can
    /// be paid.
    pub async fn receivable_sat(&self) -> anyhow::Result<u64> {
        receivable_sat(&self.rpc_path).await
    }

    /// Connect to `other` over P2P.
    pub async fn connect(&self, other: &LightningNode) -> anyhow::Result<()> {
        let (host, port) = other
            .p2p_addr
            .rsplit_once(':')
            .context("peer address without a port")?;
        self.call(
            "connect",
            json!({"id": other.id, "host": host, "port": port.parse::<u16>()?}),
        )
        .await?;
        Ok(())
    }

    /// Open a channel of `sats` to `other` (connected); returns the funding txid.
    pub async fn fund_channel(&self, other: &LightningNode, sats: u64) -> anyhow::Result<String> {
        let r = self
            .call(
                "fundchannel",
                json!({"id": other.id, "amount": sats, "announce": false}),
            )
            .await?;
        Ok(r["txid"]
            .as_str()
            .context("fundchannel without txid")?
            .to_string())
    }

    /// Wait until the channel with `peer` is `CHANNELD_NORMAL`.
    pub async fn wait_channel_normal(&self, peer: &str, timeout: Duration) -> anyhow::Result<()> {
        wait_until(
            &format!("a CHANNELD_NORMAL channel with {peer}"),
            timeout,
            || async {
                let r = self
                    .call("listpeerchannels", json!({"id": peer}))
                    .await
                    .map_err(|e| e.to_string())?;
                let states: Vec<String> = r["channels"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .filter_map(|c| c["state"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                if states.iter().any(|s| s == "CHANNELD_NORMAL") {
                    Ok(())
                } else {
                    Err(format!("channel states {states:?}"))
                }
            },
        )
        .await?;
        Ok(())
    }

    /// A BOLT11 invoice for `sats`.
    pub async fn invoice(&self, sats: u64, label: &str) -> anyhow::Result<String> {
        let r = self
            .call(
                "invoice",
                json!({"amount_msat": sats * 1000, "label": label, "description": label}),
            )
            .await?;
        Ok(r["bolt11"]
            .as_str()
            .context("invoice without bolt11")?
            .to_string())
    }

    /// Pay a BOLT11 invoice; returns the msat sent including fees.
    pub async fn pay(&self, bolt11: &str) -> anyhow::Result<u64> {
        let r = self.call("pay", json!({"bolt11": bolt11})).await?;
        anyhow::ensure!(r["status"] == "complete", "pay answered {r}");
        r["amount_sent_msat"]
            .as_u64()
            .context("pay without amount_sent_msat")
    }

    /// Status of the invoice `label`: `unpaid`, `paid` or `expired`.
    pub async fn invoice_status(&self, label: &str) -> anyhow::Result<String> {
        let r = self.call("listinvoices", json!({"label": label})).await?;
        Ok(r["invoices"][0]["status"]
            .as_str()
            .unwrap_or("missing")
            .to_string())
    }
}

/// What the node behind `rpc` can receive over its normal channels now (sat).
pub async fn receivable_sat(rpc: &std::path::Path) -> anyhow::Result<u64> {
    let c = call(rpc, "listpeerchannels", json!({})).await?;
    Ok(c["channels"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|c| c["state"] == "CHANNELD_NORMAL")
                .filter_map(|c| c["receivable_msat"].as_u64())
                .sum::<u64>()
                / 1000
        })
        .unwrap_or(0))
}
