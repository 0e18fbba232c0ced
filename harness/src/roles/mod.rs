//! The hashpool roles as supervised processes: pool, proxy, simulated miners. The harness
//! only starts their binaries and talks to them over their wire interfaces (SV2, SV1, HTTP,
//! Redis), so any implementation with the same binaries and configs can be swapped in.

mod auditor;
mod miner;
mod mint;
mod pool;
mod proxy;
mod translator;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;

pub use auditor::{AuditorOptions, AuditorRole};
pub use miner::{MinerLog, MinerOptions, MinerRole};
pub use mint::{held_within, invoice_sats_worth, MintOptions, MintRole};
pub use pool::{PoolOptions, PoolRole};
pub use proxy::{
    DeclarationStatus, DeclareOptions, ProxyLaunch, ProxyRole, ShareCounts, WalletClient,
    WalletOptions, WalletStatus,
};
pub use translator::TranslatorRole;

use crate::supervisor::Readiness;
use hashpool_config::pool_side::StreamsSection;

/// How a stack's mint and auditors keep their streams unless a scenario says otherwise:
/// trimmed every 2 s of what is 10 s old and acknowledged by their own group and by the
/// harness's ([`crate::stream_archive`]), so the checks still read every entry.
pub fn archived_streams() -> StreamsSection {
    StreamsSection {
        readers: vec![crate::stream_archive::GROUP.into()],
        trim_interval_secs: 2,
        trim_min_age_secs: 10,
        ..StreamsSection::default()
    }
}

/// Create the harness's groups on the archived streams before a role that waits for them
/// starts (it trims nothing while one is missing).
async fn join_archive(streams: &StreamsSection, redis_url: &str) -> anyhow::Result<()> {
    if streams
        .readers
        .iter()
        .any(|g| g == crate::stream_archive::GROUP)
    {
        let mut conn = crate::redis::connect(redis_url).await?;
        crate::stream_archive::join(&mut conn).await?;
    }
    Ok(())
}

/// A role binary: `<ENV>` if set, else `$HASHPOOL_BIN_DIR/<name>`, else next to the running
/// test binary's profile directory (`target/<profile>/<name>`).
pub fn role_exe(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("HASHPOOL_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test> or target/<profile>/<bin>
        for dir in exe.ancestors().skip(1).take(2) {
            dirs.push(dir.to_path_buf());
        }
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "role binary {name} not found (looked at ${env_var}, $HASHPOOL_BIN_DIR, {}): build it with \
                 `cargo build -p pool -p mint -p auditor -p proxy -p miner` (`just roles`; `just test` does)",
                dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
}

/// Ready when a TCP connection to `addr` succeeds.
pub fn tcp_ready(what: &str, addr: String) -> Readiness {
    Readiness {
        what: format!("{what} accepting TCP on {addr}"),
        probe: Arc::new(move || {
            let addr = addr.clone();
            Box::pin(async move {
                tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(&addr),
                )
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
        }),
    }
}

/// Ready when `log` has a line containing `needle`.
pub fn log_ready(what: &str, log: &Path, needle: &'static str) -> Readiness {
    let log = log.to_path_buf();
    Readiness {
        what: format!("{what}: a line containing {needle:?} in {}", log.display()),
        probe: Arc::new(move || {
            let log = log.clone();
            Box::pin(async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains(needle) {
                    Ok(())
                } else {
                    Err(format!("{} lines so far", text.lines().count()))
                }
            })
        }),
    }
}

/// Write a role's TOML config.
pub(crate) fn write_config<T: serde::Serialize>(
    dir: &Path,
    file: &str,
    config: &T,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(file);
    std::fs::write(&path, toml::to_string_pretty(config)?)?;
    Ok(path)
}

/// Whether consumer group `group` exists on `stream` (for readiness probes).
pub(crate) async fn group_exists(redis_url: &str, stream: &str, group: &str) -> Result<(), String> {
    let mut conn = crate::redis::connect(redis_url)
        .await
        .map_err(|e| e.to_string())?;
    let groups: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("XINFO GROUPS {stream}: {e}"))?;
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    let named = |g: &redis::Value| match g {
        redis::Value::Array(kv) => kv
            .chunks(2)
            .any(|c| c.len() == 2 && text(&c[0]) == "name" && text(&c[1]) == group),
        _ => false,
    };
    match groups {
        redis::Value::Array(gs) if gs.iter().any(named) => Ok(()),
        _ => Err(format!("no group {group} on {stream} yet")),
    }
}
