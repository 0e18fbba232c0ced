//! SRI's SV1-to-SV2 translator (`translator_sv2` 0.6 from crates.io) in front of the pool: a
//! standard SV2 client the pool must serve. It sends no locking key, so its channels earn no
//! ehash. `just translator` (run by `just test`) installs it into the harness cache.

use std::path::Path;
use std::time::Duration;

use crate::binaries::{find, Program};
use crate::process::ProcessSpec;
use crate::supervisor::{RestartPolicy, Supervised, SupervisorOptions};

use super::tcp_ready;

/// A running translator.
#[derive(Debug)]
pub struct TranslatorRole {
    process: Supervised,
    /// SV1 address miners connect to.
    pub sv1_addr: String,
}

impl TranslatorRole {
    /// Start a translator on SV1 `port` in front of `pool`; with `aggregate`, all its miners
    /// share one upstream channel.
    pub async fn start(
        dir: &Path,
        port: u16,
        pool: &super::PoolRole,
        aggregate: bool,
        cache_dir: &Path,
        timeouts: (Duration, Duration),
    ) -> anyhow::Result<Self> {
        let exe = find(Program::TranslatorSv2, cache_dir)?;
        let (host, pool_port) = pool
            .sv2_addr
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("pool address {} has no port", pool.sv2_addr))?;
        // Its config format is SRI's (`config-examples/` in the crate); the keys without a
        // default there are all set here.
        let config = format!(
            r#"downstream_address = "127.0.0.1"
downstream_port = {port}
max_supported_version = 2
min_supported_version = 2
downstream_extranonce2_size = 4
aggregate_channels = {aggregate}
supported_extensions = []

[downstream_difficulty_config]
min_individual_miner_hashrate = 500000.0
shares_per_minute = 60.0
enable_vardiff = false
job_keepalive_interval_secs = 60

[[upstreams]]
address = "{host}"
port = {pool_port}
authority_pubkey = "{authority}"
user_identity = "sri-translator"
"#,
            authority = pool.authority.public,
        );
        std::fs::create_dir_all(dir)?;
        let file = dir.join("translator.toml");
        std::fs::write(&file, config)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "translator".into());
        let sv1_addr = format!("127.0.0.1:{port}");
        let spec = ProcessSpec::new(&name, &exe, dir)
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "info")
            .foreign();
        // A translator that exits is a failure the scenario must see, not one to paper over.
        let options = SupervisorOptions::new(RestartPolicy::Never, timeouts);
        let process =
            Supervised::start(spec, tcp_ready("translator SV1", sv1_addr.clone()), options).await?;
        Ok(Self { process, sv1_addr })
    }

    /// The process.
    pub fn process(&self) -> &Supervised {
        &self.process
    }
}
