//! Simulated CPU miners, and what their logs say.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{log_ready, role_exe};
use crate::process::ProcessSpec;
use crate::supervisor::{RestartPolicy, Supervised, SupervisorOptions};

/// How a miner is started.
#[derive(Debug, Clone)]
pub struct MinerOptions {
    /// `honest`, `below-target`, `duplicate`, `stale`, `malformed`, `string-ids`.
    pub behaviour: String,
    /// Simulated miners in the process (SV1 connections, `--connections`).
    pub connections: usize,
    /// Hashing threads, shared by all its connections.
    pub threads: usize,
    /// Total hashrate cap (None: uncapped).
    pub hashrate: Option<f64>,
    /// Log every share (needed to match shares with records).
    pub log_shares: bool,
    /// Connect again a second after a connection ends (`--reconnect`), as real miners do.
    pub reconnect: bool,
    /// Suggest this difficulty before subscribing (`--suggest-difficulty`).
    pub suggest_difficulty: Option<f64>,
}

impl Default for MinerOptions {
    fn default() -> Self {
        Self {
            behaviour: "honest".into(),
            connections: 1,
            threads: 1,
            hashrate: Some(500_000.0),
            log_shares: true,
            reconnect: false,
            suggest_difficulty: None,
        }
    }
}

/// A running miner.
#[derive(Debug)]
pub struct MinerRole {
    process: Supervised,
    /// Its name in the scenario.
    pub name: String,
    /// Behaviour it was started with.
    pub behaviour: String,
}

impl MinerRole {
    /// Start a miner against a proxy's SV1 address; ready once subscribed.
    pub async fn start(
        name: &str,
        dir: &Path,
        proxy_addr: &str,
        opts: &MinerOptions,
        timeouts: (Duration, Duration),
    ) -> anyhow::Result<Self> {
        let exe = role_exe("hashpool-miner", "HASHPOOL_MINER_EXE")?;
        let mut spec = ProcessSpec::new(name, &exe, dir)
            .arg("--proxy")
            .arg(proxy_addr)
            .arg("--user")
            .arg(name)
            .arg("--threads")
            .arg(opts.threads.to_string())
            .arg("--behaviour")
            .arg(&opts.behaviour);
        if let Some(h) = opts.hashrate {
            spec = spec.arg("--hashrate").arg(h.to_string());
        }
        if opts.connections != 1 {
            spec = spec.arg("--connections").arg(opts.connections.to_string());
        }
        if opts.reconnect {
            spec = spec.arg("--reconnect");
        }
        if let Some(d) = opts.suggest_difficulty {
            spec = spec.arg("--suggest-difficulty").arg(d.to_string());
        }
        if !opts.log_shares {
            spec = spec.arg("--quiet");
        }
        let ready = log_ready(
            "miner subscribed",
            &spec.stdout_log(),
            "subscribed extranonce1=",
        );
        let options = SupervisorOptions::new(RestartPolicy::Never, timeouts);
        let process = Supervised::start(spec, ready, options).await?;
        Ok(Self {
            process,
            name: name.into(),
            behaviour: opts.behaviour.clone(),
        })
    }

    /// The process.
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// The miner's log (stdout).
    pub fn log_path(&self) -> PathBuf {
        self.process.spec().stdout_log()
    }

    /// Parse its log now.
    pub fn log(&self) -> MinerLog {
        MinerLog::parse(&std::fs::read_to_string(self.log_path()).unwrap_or_default())
    }
}

/// What a miner's log says.
#[derive(Debug, Clone, Default)]
pub struct MinerLog {
    /// Hashes (display order) of accepted shares, in order.
    pub accepted: Vec<String>,
    /// (hash, reason) of rejected shares.
    pub rejected: Vec<(String, String)>,
    /// Previous-block hashes of clean jobs received.
    pub tips: Vec<String>,
    /// The final summary line, once it exited.
    pub finished: Option<String>,
    /// Connections (`conn=N`, 0 for a one-connection miner) whose subscribe was answered.
    pub subscribed: BTreeSet<usize>,
    /// Connections that received a job.
    pub with_work: BTreeSet<usize>,
    /// Connections with at least one accepted share.
    pub with_accepted: BTreeSet<usize>,
    /// The connection each accepted share (hash) came from.
    pub accepted_on: BTreeMap<String, usize>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl MinerLog {
    /// Parse log text.
    pub fn parse(text: &str) -> Self {
        let mut log = Self::default();
        for line in text.lines() {
            let conn = || {
                field(line, "conn")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("subscribed ") {
                log.subscribed.insert(conn());
            } else if line.starts_with("new tip work ") || line.starts_with("first work ") {
                log.with_work.insert(conn());
            }
            if line.starts_with("share accepted ") {
                log.with_accepted.insert(conn());
                if let Some(h) = field(line, "hash") {
                    log.accepted.push(h.to_string());
                    log.accepted_on.insert(h.to_string(), conn());
                }
            } else if line.starts_with("share rejected ") {
                if let (Some(h), Some(r)) = (field(line, "hash"), field(line, "reason")) {
                    log.rejected.push((h.to_string(), r.to_string()));
                }
            } else if line.starts_with("new tip work ") {
                if let Some(p) = field(line, "prevhash") {
                    log.tips.push(p.to_string());
                }
            } else if line.starts_with("miner finished") {
                log.finished = Some(line.to_string());
            }
        }
        log
    }

    /// Rejections counted by reason.
    pub fn rejected_by_reason(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, r) in &self.rejected {
            *m.entry(r.clone()).or_default() += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_share_lines() {
        let log = MinerLog::parse(
            "subscribed extranonce1=00 extranonce2_size=16\n\
             new tip work job=1 prevhash=00ab\n\
             share accepted hash=0001 job=1\n\
             share rejected hash=0002 job=1 reason=duplicate-share\n\
             miner finished (shutdown): accepted=1\n",
        );
        assert_eq!(log.with_accepted, BTreeSet::from([0]));
        assert_eq!(log.accepted, vec!["0001"]);
        assert_eq!(
            log.rejected,
            vec![("0002".to_string(), "duplicate-share".to_string())]
        );
        assert_eq!(log.tips, vec!["00ab"]);
        assert!(log.finished.is_some());
        assert_eq!(log.rejected_by_reason()["duplicate-share"], 1);
    }

    #[test]
    fn counts_connections_of_a_many_miner_process() {
        let log = MinerLog::parse(
            "subscribed extranonce1=00 extranonce2_size=8 conn=0\n\
             subscribed extranonce1=01 extranonce2_size=8 conn=7\n\
             new tip work job=1 prevhash=00ab conn=7\n\
             share accepted hash=0001 job=1 conn=7\n",
        );
        assert_eq!(log.subscribed, BTreeSet::from([0, 7]));
        assert_eq!(log.with_work, BTreeSet::from([7]));
        assert_eq!(log.with_accepted, BTreeSet::from([7]));
        assert_eq!(log.accepted_on["0001"], 7);
    }
}
