//! Real `redis-server` with the append-only file on, one per stack.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::process::ProcessSpec;
use crate::supervisor::{Readiness, RestartPolicy, Supervised, SupervisorOptions};

/// How to start one redis-server.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// The executable.
    pub exe: PathBuf,
    /// Process directory: logs here, AOF in `data/`.
    pub dir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Readiness deadline.
    pub start_timeout: Duration,
    /// SIGTERM grace.
    pub stop_timeout: Duration,
}

/// A running, supervised redis-server.
#[derive(Debug)]
pub struct Redis {
    process: Supervised,
    port: u16,
    datadir: PathBuf,
}

impl Redis {
    /// Spawn redis-server (`appendonly yes`, `appendfsync always`: a write Redis answered is
    /// on disk, so an acknowledged share's record survives even a machine crash; no RDB
    /// snapshots; `maxmemory-policy noeviction`, which the pool requires) and
    /// wait until it answers PING.
    pub async fn start(opts: RedisOptions) -> anyhow::Result<Self> {
        let datadir = opts.dir.join("data");
        std::fs::create_dir_all(&datadir)
            .with_context(|| format!("cannot create {}", datadir.display()))?;
        let spec = ProcessSpec::new("redis", &opts.exe, &opts.dir)
            .arg("--port")
            .arg(opts.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&datadir)
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg("always")
            .arg("--maxmemory-policy")
            .arg("noeviction")
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--protected-mode")
            .arg("no")
            .arg("--logfile")
            .arg("");
        let url = url(opts.port);
        let probe_url = url.clone();
        let readiness = Readiness {
            what: format!("redis PING on {url}"),
            probe: Arc::new(move || {
                let url = probe_url.clone();
                Box::pin(async move { ping(&url).await.map_err(|e| e.to_string()) })
            }),
        };
        let options = SupervisorOptions::new(
            RestartPolicy::OnCrash { max_restarts: 5 },
            (opts.start_timeout, opts.stop_timeout),
        );
        let process = Supervised::start(spec, readiness, options).await?;
        Ok(Self {
            process,
            port: opts.port,
            datadir,
        })
    }

    /// The supervised process.
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        url(self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the append-only files.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// A new multiplexed connection.
    pub async fn connect(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        connect(&self.url()).await
    }

    /// A connection for blocking commands (`XREADGROUP ... BLOCK`): no response timeout
    /// (redis-rs gives up on an answer after 500 ms by default, and dropping the connection
    /// unblocks the read on the server).
    pub async fn connect_blocking(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let url = self.url();
        let client =
            redis::Client::open(url.as_str()).with_context(|| format!("bad redis url {url}"))?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .with_context(|| format!("no connection to {url} within 2 s"))?
        .with_context(|| format!("cannot connect to {url}"))
    }
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// Connect to `url` with a deadline.
pub async fn connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).with_context(|| format!("bad redis url {url}"))?;
    tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .with_context(|| format!("no connection to {url} within 2 s"))?
    .with_context(|| format!("cannot connect to {url}"))
}

async fn ping(url: &str) -> anyhow::Result<()> {
    let mut conn = connect(url).await?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
    anyhow::ensure!(pong == "PONG", "PING answered {pong:?}");
    Ok(())
}

/// Append a `valid` verdict for `template_id` to `audit:results`, as an auditor would
/// (benchmarks build histories through the mint's real path with it).
pub async fn append_valid_verdict(
    conn: &mut redis::aio::MultiplexedConnection,
    template_id: u64,
) -> anyhow::Result<()> {
    let v = ehash::AuditResult {
        template_id,
        verdict: ehash::Verdict::Valid,
        reason: "proposal".into(),
        audited_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    let mut pipe = redis::pipe();
    pipe.cmd("XADD").arg(ehash::AUDIT_RESULTS_STREAM).arg("*");
    for (k, v) in v.to_fields() {
        pipe.arg(k).arg(v);
    }
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// Append `n` share records of `template_id`, worth 1 ehash each, locked to `key`, with
/// random share hashes, to `ehash:shares` in pipelines of 10,000 (as the pool would).
pub async fn append_share_records(
    conn: &mut redis::aio::MultiplexedConnection,
    template_id: u64,
    key: ehash::LockingPubkey,
    n: usize,
) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let take = left.min(10_000);
        let mut pipe = redis::pipe();
        for _ in 0..take {
            let hash: [u8; 32] = std::array::from_fn(|_| rand::random());
            let r = ehash::ShareRecord {
                share_hash: hex::encode(hash),
                template_id,
                channel_id: 1,
                locking_pubkey: key,
                amount: 1,
                ntime: 0,
                version: 0x2000_0000,
                nonce: rand::random(),
                extranonce: "00".into(),
            };
            let cmd = pipe.cmd("XADD").arg(ehash::SHARES_STREAM).arg("*");
            for (k, v) in r.to_fields() {
                cmd.arg(k).arg(v);
            }
            cmd.ignore();
        }
        pipe.query_async::<()>(conn).await?;
        left -= take;
    }
    Ok(())
}
