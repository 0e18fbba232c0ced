//! `harness soak`'s arguments and what it does with them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::{print_result, replay_command, run_dir, run_schedule, shrink, Profile, Schedule};
use crate::HarnessConfig;

/// Run a seeded fault schedule over a whole stack, then check money conservation and the
/// other invariants; replay or shrink a schedule file.
#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Seed of the schedule (default: a fresh one, printed first).
    #[arg(long, conflicts_with = "replay")]
    pub seed: Option<u64>,
    /// How long the nemesis runs: `90s`, `3m`, `1h` or seconds.
    #[arg(long, default_value = "3m", value_parser = parse_duration, conflicts_with = "replay")]
    pub duration: Duration,
    /// Which stack.
    #[arg(long, value_enum, default_value = "full", conflicts_with = "replay")]
    pub profile: Profile,
    /// Faults in effect at once, at most (default: 2 on the small stack, 3 on the full one,
    /// which has more processes to fault).
    #[arg(long, conflicts_with = "replay")]
    pub max_faults: Option<usize>,
    /// Replay this schedule file (`target/soak/<seed>/schedule.json`) instead of generating.
    #[arg(long)]
    pub replay: Option<PathBuf>,
    /// Apply only the first N faults of the schedule.
    #[arg(long)]
    pub until: Option<usize>,
    /// On failure, try up to this many smaller schedules and write the smallest that still
    /// fails to `target/soak/<seed>/shrunk.json` (0: do not shrink).
    #[arg(long, default_value_t = 0)]
    pub shrink: usize,
    /// Print the schedule (JSON) and exit without running it.
    #[arg(long)]
    pub print_schedule: bool,
}

/// `90s`, `3m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is no duration: write 90s, 3m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit is s, m or h")),
    };
    if secs == 0 {
        return Err("a soak lasts at least one second".into());
    }
    Ok(Duration::from_secs(secs))
}

/// Run the soak the arguments describe; Ok(false) when a check failed.
pub async fn run(config: &HarnessConfig, args: &SoakArgs) -> anyhow::Result<bool> {
    let mut schedule = match &args.replay {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the schedule {}", file.display()))?;
            serde_json::from_str::<Schedule>(&text).with_context(|| {
                format!(
                    "{} is not a soak schedule (written by `harness soak` as schedule.json)",
                    file.display()
                )
            })?
        }
        None => {
            let seed = args.seed.unwrap_or_else(rand::random);
            println!("[soak] seed {seed}");
            Schedule::generate(
                seed,
                args.profile,
                args.duration.as_millis() as u64,
                args.max_faults
                    .unwrap_or(args.profile.default_max_faults())
                    .max(1),
            )
        }
    };
    if let Some(n) = args.until {
        schedule = schedule.until(n);
    }
    if args.print_schedule {
        println!("{}", serde_json::to_string_pretty(&schedule)?);
        return Ok(true);
    }
    let dir = match &args.replay {
        Some(_) => run_dir(schedule.seed).join(format!(
            "replay-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        )),
        None => run_dir(schedule.seed),
    };
    let result = run_schedule(config, &schedule, &dir).await?;
    print_result(&result, &schedule);
    if result.passed {
        return Ok(true);
    }
    let failed: Vec<&str> = result
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    println!(
        "[soak] FAILED: seed {}; check(s): {}; replay: {}",
        schedule.seed,
        failed.join("; "),
        replay_command(&dir.join("schedule.json"))
    );
    if args.shrink > 0 {
        let names: Vec<String> = failed.iter().map(|n| n.to_string()).collect();
        let smallest = shrink(config, &schedule, &names, args.shrink).await?;
        let file = run_dir(schedule.seed).join("shrunk.json");
        if smallest.faults.len() == schedule.faults.len() {
            std::fs::write(&file, serde_json::to_string_pretty(&smallest)?)?;
        }
        println!(
            "[soak] smallest failing schedule: {} of {} fault(s) in {}; replay: {}",
            smallest.faults.len(),
            schedule.faults.len(),
            file.display(),
            replay_command(&file)
        );
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
