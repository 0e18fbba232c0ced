//! Harness settings: defaults, then an optional TOML file, then `HASHPOOL_HARNESS__*`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment prefix for harness settings, e.g. `HASHPOOL_HARNESS__START_TIMEOUT_SECS=60`.
pub const ENV_PREFIX: &str = "HASHPOOL_HARNESS";
/// Default lowest port handed to a stack (below Linux's ephemeral range, 32768-60999).
pub const DEFAULT_PORT_MIN: u16 = 20000;
/// Default highest port handed to a stack.
pub const DEFAULT_PORT_MAX: u16 = 32000;
/// Default time a process gets to answer its readiness probe.
pub const DEFAULT_START_TIMEOUT_SECS: u64 = 60;
/// Default time between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 15;

/// Settings shared by every stack of one harness process.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `run_dir` | `<workspace>/target/hashpool` | where stack data directories go |
/// | `cache_dir` | `$HASHPOOL_CACHE_DIR` or `~/.cache/hashpool-harness` | bitcoind build and pre-mined chains |
/// | `port_lock_dir` | `$TMPDIR/hashpool-harness-ports` | lock files that make port allocation safe across processes |
/// | `port_min`, `port_max` | 20000, 32000 | range ports are taken from |
/// | `start_timeout_secs` | 60 | readiness deadline per process |
/// | `stop_timeout_secs` | 15 | SIGTERM grace before SIGKILL |
/// | `keep_data` | false | keep stack directories even when the scenario passed |
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HarnessConfig {
    /// Where stack data directories go.
    pub run_dir: PathBuf,
    /// bitcoind build and pre-mined chains (shared with `ci/bootstrap`).
    pub cache_dir: PathBuf,
    /// Lock files for port allocation (machine-wide).
    pub port_lock_dir: PathBuf,
    /// Lowest port handed out.
    pub port_min: u16,
    /// Highest port handed out.
    pub port_max: u16,
    /// Readiness deadline per process, seconds.
    pub start_timeout_secs: u64,
    /// SIGTERM grace before SIGKILL, seconds.
    pub stop_timeout_secs: u64,
    /// Keep stack directories even on success.
    pub keep_data: bool,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let cache_dir = std::env::var_os("HASHPOOL_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".cache").join("hashpool-harness"));
        Self {
            run_dir: workspace_root().join("target").join("hashpool"),
            cache_dir,
            port_lock_dir: std::env::temp_dir().join("hashpool-harness-ports"),
            port_min: DEFAULT_PORT_MIN,
            port_max: DEFAULT_PORT_MAX,
            start_timeout_secs: DEFAULT_START_TIMEOUT_SECS,
            stop_timeout_secs: DEFAULT_STOP_TIMEOUT_SECS,
            keep_data: false,
        }
    }
}

impl HarnessConfig {
    /// Defaults, then `file` (if any), then `HASHPOOL_HARNESS__*` variables.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let config: Self = hashpool_config::Layers::new(ENV_PREFIX)
            .file(file)?
            .load()?;
        anyhow::ensure!(
            config.port_min < config.port_max,
            "port_min ({}) must be below port_max ({})",
            config.port_min,
            config.port_max
        );
        Ok(config)
    }

    /// Readiness deadline.
    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs(self.start_timeout_secs)
    }

    /// SIGTERM grace.
    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_secs)
    }
}

/// The checkout being worked in: the nearest directory holding a workspace `Cargo.toml`,
/// searched upwards from the runtime `CARGO_MANIFEST_DIR` (cargo sets it for tests, benches
/// and `cargo run`), else from the current directory. Resolved at run time because one target
/// directory is shared by several checkouts (CI clones reuse it), so a compile-time path can
/// name another checkout.
pub fn workspace_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_else(|| PathBuf::from("."));
    start
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]"))
        })
        .map(Path::to_path_buf)
        .unwrap_or(start)
}
