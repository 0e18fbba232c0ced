//! Support for the cucumber scenarios in `tests/scenarios`: where reports go and the
//! per-scenario duration table printed at the end of a run.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `<workspace>/target/scenarios`: JUnit XML and the duration table go here, whatever
/// `CARGO_TARGET_DIR` says, so CI finds them at a fixed path.
pub fn report_dir() -> PathBuf {
    harness::config::workspace_root()
        .join("target")
        .join("scenarios")
}

/// Outcome of one scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every step passed.
    Passed,
    /// A step or hook failed.
    Failed,
    /// A step was skipped (a backend is absent, or a step is undefined).
    Skipped,
}

/// Start and end times of scenarios, keyed by feature, scenario name and line.
#[derive(Debug, Default)]
pub struct Durations {
    running: Mutex<Vec<(String, Instant)>>,
    done: Mutex<Vec<(String, Duration, Outcome)>>,
}

impl Durations {
    /// A scenario started.
    pub fn start(&self, key: String) {
        if let Ok(mut r) = self.running.lock() {
            r.push((key, Instant::now()));
        }
    }

    /// A scenario ended.
    pub fn finish(&self, key: &str, outcome: Outcome) {
        let started = self.running.lock().ok().and_then(|mut r| {
            let i = r.iter().position(|(k, _)| k == key)?;
            Some(r.remove(i).1)
        });
        if let (Some(started), Ok(mut done)) = (started, self.done.lock()) {
            done.push((key.to_string(), started.elapsed(), outcome));
        }
    }

    /// The table, slowest first, with the total.
    pub fn table(&self) -> String {
        let mut rows = self.done.lock().map(|d| d.clone()).unwrap_or_default();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(8).max(8);
        let mut out = format!("{:<width$}  {:>9}  outcome\n", "scenario", "seconds");
        out.push_str(&format!(
            "{}  {}  -------\n",
            "-".repeat(width),
            "-".repeat(9)
        ));
        let mut total = Duration::ZERO;
        for (key, d, outcome) in &rows {
            total += *d;
            out.push_str(&format!(
                "{key:<width$}  {:>9.2}  {outcome:?}\n",
                d.as_secs_f64()
            ));
        }
        out.push_str(&format!(
            "{:<width$}  {:>9.2}  ({} scenarios; they overlap)\n",
            "sum",
            total.as_secs_f64(),
            rows.len()
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_slowest_first() {
        let d = Durations::default();
        d.start("a".into());
        d.start("b".into());
        d.finish("a", Outcome::Passed);
        d.finish("b", Outcome::Failed);
        let t = d.table();
        assert!(t.contains("Passed") && t.contains("Failed"), "{t}");
        assert!(t.contains("2 scenarios"), "{t}");
    }
}
