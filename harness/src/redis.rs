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
