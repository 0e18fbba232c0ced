//! `harness soak`: a seeded fault schedule over a whole stack, with money conservation and
//! the other invariants checked once everything is healed; every failure replayable and
//! shrinkable from its schedule file. Jepsen's split: the nemesis ([`nemesis`]) applies
//! faults, the workload (miners, [`workload`]'s redemptions) runs, the checker ([`checks`])
//! judges what clients and independent oracles saw. Processes are real, so a replay applies
//! the same faults at the same offsets; it cannot replay thread timing.
//!
//! Each run writes `target/soak/<seed>/`: `schedule.json` (before the run starts),
//! `history.json`, `checks.json` and `report.html`; a failing run keeps its stack's data
//! directory, and shrinking writes `shrunk.json`.

pub mod actions;
pub mod checks;
pub mod cli;
pub mod history;
pub mod nemesis;
pub mod profile;
pub mod report;
pub mod schedule;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

pub use profile::Profile;
pub use schedule::Schedule;

use crate::stack_sweep::Check;
use crate::HarnessConfig;

/// Longest the heal waits for redemptions still running.
const REDEMPTIONS_GRACE: Duration = Duration::from_secs(360);

/// What one run measured and concluded.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Every check passed.
    pub passed: bool,
    /// The checks.
    pub checks: Vec<Check>,
    /// The run's directory.
    pub dir: PathBuf,
    /// Faults applied without error.
    pub faults_applied: usize,
    /// Shares the pool accepted (last sample of its counter; a restart resets it).
    pub shares: f64,
    /// Redemptions attempted, and how many were paid.
    pub redemptions: (usize, usize),
    /// Peak proportional memory of every process of the stack, bytes.
    pub peak_pss: u64,
    /// From the nemesis stopping (the last fault undone) to every check done.
    pub heal_to_checked: Duration,
}

/// Where run files go: `<workspace>/target/soak/<seed>`.
pub fn run_dir(seed: u64) -> PathBuf {
    crate::config::workspace_root()
        .join("target")
        .join("soak")
        .join(seed.to_string())
}

/// The command that replays `schedule_file`.
pub fn replay_command(schedule_file: &Path) -> String {
    format!("just soak-replay {}", schedule_file.display())
}

/// Run `schedule` on a fresh stack, writing its files into `dir`.
pub async fn run_schedule(
    config: &HarnessConfig,
    schedule: &Schedule,
    dir: &Path,
) -> anyhow::Result<RunResult> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let schedule_file = dir.join("schedule.json");
    std::fs::write(&schedule_file, serde_json::to_string_pretty(schedule)?)?;
    println!(
        "[soak] seed {}: {} fault(s) and {} redemption(s) over {} s on the {:?} stack; schedule in {}",
        schedule.seed,
        schedule.faults.len(),
        schedule.redemptions.len(),
        schedule.duration_ms / 1000,
        schedule.profile,
        schedule_file.display()
    );
    let sampler = crate::memory::PeakSampler::start(Duration::from_secs(1));
    let mut stack = schedule
        .profile
        .start(config, &format!("soak-{}", schedule.seed))
        .await
        .context("starting the soak's stack")?;
    println!("[soak] stack up; the nemesis starts");
    let started = Instant::now();
    let mut out = nemesis::run(&stack, schedule, started).await;
    let healed_from = Instant::now();
    let heal_problems = nemesis::heal(&stack, out.lock.take()).await;
    out.history
        .note(started, "nemesis stopped; everything healed".into());
    let mut records = Vec::new();
    let deadline = crate::wait::scaled(REDEMPTIONS_GRACE);
    for task in out.redemptions.drain(..) {
        let left = deadline.saturating_sub(healed_from.elapsed());
        match tokio::time::timeout(left, task).await {
            Ok(Ok(r)) => records.push(r),
            Ok(Err(e)) => out
                .history
                .note(started, format!("a redemption task died: {e}")),
            Err(_) => out.history.note(
                started,
                format!("a redemption was still running {deadline:?} after the heal"),
            ),
        }
    }
    let mut held_at_heal = Vec::new();
    for who in schedule.profile.honest() {
        if let Ok(proxy) = stack.proxy(who) {
            if let Ok(s) = proxy.fresh_wallet_status().await {
                held_at_heal.push((who.to_string(), s.held + s.melted));
            }
        }
    }
    let resumed = checks::resumed(&stack, schedule.profile, &held_at_heal).await;
    // The record sweep compares streams with quotes: no new share may land in between.
    for m in stack.miners() {
        let _ = m.process().stop().await;
    }
    let after_heal = checks::redemption_after_heal(&stack, schedule.profile).await;
    out.history.sample(&stack, started).await;
    let mut checks = vec![resumed, after_heal];
    checks.extend(
        checks::run(
            &stack,
            schedule.profile,
            &out.history,
            heal_problems,
            &records,
        )
        .await,
    );
    let heal_to_checked = healed_from.elapsed();
    let passed = checks.iter().all(|c| c.passed);
    let shares = out
        .history
        .samples
        .iter()
        .rev()
        .find_map(|s| s.shares_accepted)
        .unwrap_or(0.0);
    let result = RunResult {
        passed,
        faults_applied: out
            .history
            .faults
            .iter()
            .filter(|f| {
                f.what == "apply" && f.result.as_ref().is_ok_and(|r| !r.starts_with("skipped"))
            })
            .count(),
        shares,
        redemptions: (records.len(), records.iter().filter(|r| r.paid > 0).count()),
        peak_pss: sampler.peak().pss,
        heal_to_checked,
        checks,
        dir: dir.to_path_buf(),
    };
    std::fs::write(
        dir.join("history.json"),
        serde_json::to_string_pretty(&out.history)?,
    )?;
    std::fs::write(
        dir.join("checks.json"),
        serde_json::to_string_pretty(&result.checks)?,
    )?;
    let html = report::render(
        schedule,
        &out.history,
        &result.checks,
        &records,
        &replay_command(&schedule_file),
    )?;
    std::fs::write(dir.join("report.html"), html)?;
    let stops = stack.stop_all().await;
    match stack.shutdown(!passed).await {
        Ok(Some(kept)) => println!("[soak] stack data kept in {}", kept.display()),
        Ok(None) => {}
        Err(e) => eprintln!("[soak] stopping the stack failed: {e:#}"),
    }
    if let Ok(bad) = stops {
        for (p, how) in bad {
            println!("[soak] {p} did not exit cleanly when stopped: {how}");
        }
    }
    Ok(result)
}

/// Print a run's verdict.
pub fn print_result(r: &RunResult, schedule: &Schedule) {
    for c in &r.checks {
        let mark = if c.passed { "ok  " } else { "FAIL" };
        println!(
            "[soak] {mark} {}: {}",
            c.name,
            c.detail.replace('\n', "\n             ")
        );
    }
    println!(
        "[soak] seed {}: {} fault(s) applied, {} shares, {} redemption(s) ({} paid), peak PSS {} MiB, {:.1} s from the last fault to every check done; report {}",
        schedule.seed,
        r.faults_applied,
        r.shares,
        r.redemptions.0,
        r.redemptions.1,
        r.peak_pss / (1024 * 1024),
        r.heal_to_checked.as_secs_f64(),
        r.dir.join("report.html").display()
    );
}

/// Shrink a failing `schedule`: try its candidates (halves, then one fault out), adopting
/// each that fails one of the same checks `failed` names, within `runs` runs; each adoption is
/// written to `shrunk.json` at once. Returns the smallest failing schedule found.
pub async fn shrink(
    config: &HarnessConfig,
    schedule: &Schedule,
    failed: &[String],
    runs: usize,
) -> anyhow::Result<Schedule> {
    let file = run_dir(schedule.seed).join("shrunk.json");
    let mut smallest = schedule.clone();
    let mut done = 0;
    let mut tried: Vec<Vec<schedule::ScheduledFault>> = Vec::new();
    'outer: while done < runs {
        for candidate in smallest.shrink_candidates() {
            if done >= runs {
                break 'outer;
            }
            if tried.contains(&candidate.faults) {
                continue;
            }
            tried.push(candidate.faults.clone());
            done += 1;
            let dir = run_dir(schedule.seed).join(format!("shrink-{done}"));
            println!(
                "[soak] shrink run {done}/{runs}: {} of {} fault(s)",
                candidate.faults.len(),
                smallest.faults.len()
            );
            let same = match run_schedule(config, &candidate, &dir).await {
                Ok(r) => r
                    .checks
                    .iter()
                    .any(|c| !c.passed && failed.contains(&c.name)),
                Err(e) => {
                    println!("[soak] shrink run {done} did not run: {e:#}");
                    false
                }
            };
            if same {
                smallest = candidate;
                std::fs::write(&file, serde_json::to_string_pretty(&smallest)?)?;
                continue 'outer;
            }
        }
        break;
    }
    Ok(smallest)
}
