//! The soak's schedule: every fault the nemesis applies and every redemption the workload
//! makes, each at an offset from the start, generated from one seed and written out before
//! the run so a failing run can be replayed and shrunk from the file.
//!
//! Generation uses ChaCha8 (its output for a seed is fixed across platforms and versions):
//! the same seed, profile and duration give the same schedule.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::profile::Profile;

/// One fault of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL the process, leave it down for the fault's duration, start it again.
    Kill {
        /// Process name as in `stack.json` (`pool`, `auditor-a`, `lightning-pool`, ...).
        process: String,
    },
    /// SIGTERM the process (a clean stop), leave it down, start it again.
    Terminate {
        /// Process name.
        process: String,
    },
    /// SIGSTOP the process for the fault's duration, then SIGCONT.
    Pause {
        /// Process name.
        process: String,
    },
    /// Replace the pool node's last `depth` blocks with a longer branch an operator's node
    /// mined while cut off.
    Reorg {
        /// Blocks replaced.
        depth: u64,
    },
    /// Melt-quote lookups (NUT-20 style, signed) from this many fresh keys at once.
    LookupBurst {
        /// Fresh keys.
        keys: u32,
    },
    /// Another process holds the mint database's write lock for the fault's duration.
    MintDbLock,
    /// Every SV2 frame between the proxies and the pool (the harness's sniffer relays them)
    /// leaves this much later, for the fault's duration.
    LinkDelay {
        /// Delay of each frame, ms.
        ms: u64,
    },
    /// Every SV2 frame between the proxies and the pool is dropped, both ways, for the
    /// fault's duration, then every such connection is cut (as a real blackhole ends: TCP
    /// does not lose frames of a connection that goes on).
    LinkBlackhole,
    /// Every SV2 connection between the proxies and the pool is cut at once.
    LinkCut,
    /// A miner behind `alice` that replays its shares runs for the fault's duration.
    Replay {
        /// How it replays.
        behaviour: Replay,
    },
}

/// How a replaying miner replays (the `hashpool-miner --behaviour` of that name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replay {
    /// Submits every share twice.
    Duplicate,
    /// Holds a share back and submits it once a new block replaced its job.
    Stale,
}

impl Replay {
    /// The miner's behaviour name.
    pub fn behaviour(self) -> &'static str {
        match self {
            Replay::Duplicate => "duplicate",
            Replay::Stale => "stale",
        }
    }

    /// The replaying miner's name in the stack (its process is `miner-<name>`).
    pub fn miner(self) -> String {
        format!("{REPLAY_MINER_PREFIX}{}", self.behaviour())
    }
}

/// Names of the replaying miners: they run only while a replay fault is in effect.
pub const REPLAY_MINER_PREFIX: &str = "replay-";

impl Fault {
    /// The process this fault takes down or pauses, if any.
    pub fn process(&self) -> Option<&str> {
        match self {
            Fault::Kill { process } | Fault::Terminate { process } | Fault::Pause { process } => {
                Some(process)
            }
            _ => None,
        }
    }

    /// What the fault touches: two faults on the same resource never overlap.
    pub fn resource(&self) -> String {
        match self {
            Fault::Reorg { .. } => "bitcoind".into(),
            Fault::LookupBurst { .. } | Fault::MintDbLock => "mint".into(),
            // A replaying miner gets ready only through the pool's links: never both at once.
            Fault::LinkDelay { .. }
            | Fault::LinkBlackhole
            | Fault::LinkCut
            | Fault::Replay { .. } => "pool-links".into(),
            f => f.process().unwrap_or_default().to_string(),
        }
    }

    /// One line for logs and the report.
    pub fn describe(&self) -> String {
        match self {
            Fault::Kill { process } => format!("SIGKILL {process}"),
            Fault::Terminate { process } => format!("SIGTERM {process}"),
            Fault::Pause { process } => format!("SIGSTOP {process}"),
            Fault::Reorg { depth } => format!("reorganise {depth} block(s)"),
            Fault::LookupBurst { keys } => format!("{keys} lookups from fresh keys"),
            Fault::MintDbLock => "lock the mint's database".into(),
            Fault::LinkDelay { ms } => format!("delay the pool's SV2 links by {ms} ms"),
            Fault::LinkBlackhole => "blackhole the pool's SV2 links".into(),
            Fault::LinkCut => "cut the pool's SV2 links".into(),
            Fault::Replay { behaviour } => {
                format!("a {} replaying miner behind alice", behaviour.behaviour())
            }
        }
    }
}

/// A fault at its offset, for its duration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledFault {
    /// From the start of the schedule, ms.
    pub at_ms: u64,
    /// How long the process stays down, paused or locked, ms (0 for instant faults).
    pub for_ms: u64,
    /// The fault.
    #[serde(flatten)]
    pub fault: Fault,
}

/// A redemption the workload attempts, honest or hostile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Redemption {
    /// An invoice of the operator's own node worth `permille` of what its ehash is worth.
    Honest {
        /// Thousandths of the wallet's worth (10 to 100).
        permille: u32,
    },
    /// An invoice that expired before the wallet asked for it.
    Expired,
    /// An invoice for more than the mint can pay.
    AboveReserve,
    /// The same invoice redeemed twice at once.
    SameTwice,
    /// An invoice of a node no channel reaches.
    Unreachable,
}

/// A redemption at its offset, by one operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledRedemption {
    /// From the start of the schedule, ms.
    pub at_ms: u64,
    /// The operator (proxy and Lightning node name).
    pub by: String,
    /// What kind.
    pub kind: Redemption,
}

/// The whole schedule of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// The seed it was generated from.
    pub seed: u64,
    /// The stack it runs against.
    pub profile: Profile,
    /// How long the nemesis and workload run, ms.
    pub duration_ms: u64,
    /// Faults active at once, at most.
    pub max_concurrent: usize,
    /// Faults, by offset.
    pub faults: Vec<ScheduledFault>,
    /// Redemptions, by offset.
    pub redemptions: Vec<ScheduledRedemption>,
}

/// Weighted fault kinds of the catalogue.
#[derive(Clone, Copy)]
enum Kind {
    Kill,
    Terminate,
    Pause,
    Reorg,
    LookupBurst,
    MintDbLock,
    LinkDelay,
    LinkBlackhole,
    LinkCut,
    Replay,
}

const CATALOGUE: [(Kind, u32); 10] = [
    (Kind::Kill, 30),
    (Kind::Terminate, 15),
    (Kind::Pause, 30),
    (Kind::Reorg, 8),
    (Kind::LookupBurst, 8),
    (Kind::MintDbLock, 9),
    (Kind::LinkDelay, 5),
    (Kind::LinkBlackhole, 4),
    (Kind::LinkCut, 4),
    (Kind::Replay, 6),
];

/// Mean gap between two faults' offsets, ms.
const MEAN_GAP_MS: u64 = 4_000;
/// Mean gap between two redemptions, ms.
const MEAN_REDEMPTION_GAP_MS: u64 = 12_000;

impl Schedule {
    /// The schedule of `seed` for `profile` over `duration_ms`, at most `max_concurrent`
    /// faults at once.
    pub fn generate(seed: u64, profile: Profile, duration_ms: u64, max_concurrent: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let processes = profile.fault_targets();
        let total: u32 = CATALOGUE.iter().map(|(_, w)| w).sum();
        let mut faults: Vec<ScheduledFault> = Vec::new();
        let mut at = rng.gen_range(1_000..MEAN_GAP_MS);
        while at < duration_ms {
            let mut pick = rng.gen_range(0..total);
            let kind = CATALOGUE
                .iter()
                .find(|(_, w)| {
                    let hit = pick < *w;
                    pick = pick.saturating_sub(*w);
                    hit
                })
                .map(|(k, _)| *k)
                .unwrap_or(Kind::Pause);
            let process = processes[rng.gen_range(0..processes.len())].to_string();
            let (fault, for_ms) = match kind {
                Kind::Kill => (Fault::Kill { process }, rng.gen_range(500..8_000)),
                Kind::Terminate => (Fault::Terminate { process }, rng.gen_range(500..8_000)),
                Kind::Pause => (Fault::Pause { process }, rng.gen_range(500..12_000)),
                Kind::Reorg => (
                    Fault::Reorg {
                        depth: if rng.gen_bool(0.7) { 1 } else { 3 },
                    },
                    0,
                ),
                Kind::LookupBurst => (
                    Fault::LookupBurst {
                        keys: rng.gen_range(50..500),
                    },
                    0,
                ),
                Kind::MintDbLock => (Fault::MintDbLock, rng.gen_range(1_000..20_000)),
                Kind::LinkDelay => (
                    Fault::LinkDelay {
                        ms: rng.gen_range(50..2_000),
                    },
                    rng.gen_range(1_000..15_000),
                ),
                Kind::LinkBlackhole => (Fault::LinkBlackhole, rng.gen_range(500..8_000)),
                Kind::LinkCut => (Fault::LinkCut, 0),
                Kind::Replay => (
                    Fault::Replay {
                        behaviour: if rng.gen_bool(0.7) {
                            Replay::Duplicate
                        } else {
                            Replay::Stale
                        },
                    },
                    rng.gen_range(5_000..20_000),
                ),
            };
            let candidate = ScheduledFault {
                at_ms: at,
                for_ms: for_ms.min(duration_ms - at),
                fault,
            };
            if fits(&faults, &candidate, max_concurrent) {
                faults.push(candidate);
            }
            at += rng.gen_range(MEAN_GAP_MS / 4..MEAN_GAP_MS * 7 / 4);
        }
        let mut redemptions = Vec::new();
        let operators = profile.redeemers();
        let mut at = rng.gen_range(5_000..MEAN_REDEMPTION_GAP_MS);
        while at < duration_ms && !operators.is_empty() {
            let by = operators[rng.gen_range(0..operators.len())].to_string();
            let kind = match rng.gen_range(0..10) {
                0 => Redemption::Expired,
                1 => Redemption::AboveReserve,
                2 => Redemption::SameTwice,
                3 => Redemption::Unreachable,
                _ => Redemption::Honest {
                    permille: rng.gen_range(10..=100),
                },
            };
            redemptions.push(ScheduledRedemption {
                at_ms: at,
                by,
                kind,
            });
            at += rng.gen_range(MEAN_REDEMPTION_GAP_MS / 2..MEAN_REDEMPTION_GAP_MS * 3 / 2);
        }
        Schedule {
            seed,
            profile,
            duration_ms,
            max_concurrent,
            faults,
            redemptions,
        }
    }

    /// This schedule with only the faults `keep` says, redemptions unchanged.
    pub fn with_faults(&self, keep: impl Fn(usize) -> bool) -> Self {
        let mut s = self.clone();
        s.faults = self
            .faults
            .iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, f)| f.clone())
            .collect();
        s
    }

    /// The first `n` faults only.
    pub fn until(&self, n: usize) -> Self {
        self.with_faults(|i| i < n)
    }

    /// Smaller schedules to try when this one fails, in order: each half of the faults, then
    /// the faults with one left out (proptest's order: big cuts first).
    pub fn shrink_candidates(&self) -> Vec<Schedule> {
        let n = self.faults.len();
        let mut out = Vec::new();
        if n >= 2 {
            out.push(self.with_faults(|i| i < n / 2));
            out.push(self.with_faults(|i| i >= n / 2));
        }
        if n >= 1 {
            for skip in 0..n {
                out.push(self.with_faults(|i| i != skip));
            }
        }
        out
    }

    /// Faults per kind, for the summary.
    pub fn kinds(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for f in &self.faults {
            let kind = serde_json::to_value(&f.fault)
                .ok()
                .and_then(|v| v["kind"].as_str().map(String::from))
                .unwrap_or_default();
            *out.entry(kind).or_default() += 1;
        }
        out
    }
}

/// Whether `c` can join `faults`: fewer than `max` active during it, and none on its resource.
fn fits(faults: &[ScheduledFault], c: &ScheduledFault, max: usize) -> bool {
    // Instant faults still take a few seconds to apply (a reorg mines blocks).
    let end = |f: &ScheduledFault| f.at_ms + f.for_ms.max(5_000);
    let overlapping: Vec<_> = faults
        .iter()
        .filter(|f| f.at_ms < end(c) && c.at_ms < end(f))
        .collect();
    overlapping.len() < max
        && !overlapping
            .iter()
            .any(|f| f.fault.resource() == c.fault.resource())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule_and_limits_kept() {
        let a = Schedule::generate(7, Profile::Small, 120_000, 2);
        let b = Schedule::generate(7, Profile::Small, 120_000, 2);
        assert_eq!(a, b);
        assert_ne!(a, Schedule::generate(8, Profile::Small, 120_000, 2));
        assert!(a.faults.len() >= 10, "{} faults", a.faults.len());
        let end = |f: &ScheduledFault| f.at_ms + f.for_ms.max(5_000);
        for f in &a.faults {
            assert!(f.at_ms + f.for_ms <= 120_000);
            // At each fault's start: at most 2 active, none other on its resource.
            let active: Vec<_> = a
                .faults
                .iter()
                .filter(|g| g.at_ms <= f.at_ms && f.at_ms < end(g))
                .collect();
            assert!(active.len() <= 2, "{active:?}");
            assert_eq!(
                active
                    .iter()
                    .filter(|g| g.fault.resource() == f.fault.resource())
                    .count(),
                1,
                "{active:?}"
            );
        }
        let json = serde_json::to_string(&a).unwrap_or_default();
        let back: Schedule = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, back);
    }

    #[test]
    fn shrinking_cuts_halves_first() {
        let s = Schedule::generate(3, Profile::Small, 60_000, 2);
        let n = s.faults.len();
        let c = s.shrink_candidates();
        assert_eq!(c.len(), 2 + n);
        assert_eq!(c[0].faults.len(), n / 2);
        assert_eq!(c[1].faults.len(), n - n / 2);
        assert!(c[2..].iter().all(|s| s.faults.len() == n - 1));
        assert_eq!(s.until(3).faults, s.faults[..3].to_vec());
    }
}
