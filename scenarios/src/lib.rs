//! Support for the cucumber scenarios in `tests/scenarios`: where reports go and the
//! per-scenario duration table printed at the end of a run.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `<workspace>/target/scenarios`: JUnit XML and the duration table go here, whatever
/// `CARGO_TARGET_DIR` says, so CI finds them at a fixed path. The workspace is the parent of
/// this crate's directory (runtime `CARGO_MANIFEST_DIR` first: the compile-time one can name
/// another checkout sharing the target directory).
pub fn report_dir() -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    crate_dir
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or(crate_dir)
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

/// A deterministic slice of the scenarios (`HASHPOOL_SCENARIO_SHARD=INDEX/COUNT`, INDEX from 1):
/// scenarios are ordered by feature file name and line, and shard `i` of `n` runs those whose
/// position `p` (from 0) has `p % n == i - 1`. Every scenario runs in exactly one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which slice, from 1.
    pub index: usize,
    /// How many slices.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("shard {s:?} is not INDEX/COUNT with 1 <= INDEX <= COUNT (e.g. 2/3)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// The variable that selects a shard.
    pub const ENV: &'static str = "HASHPOOL_SCENARIO_SHARD";

    /// The shard `HASHPOOL_SCENARIO_SHARD` names, if set and not empty.
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.trim().is_empty() => v.parse().map(Some),
            _ => Ok(None),
        }
    }

    /// Whether the scenario at `position` (from 0, in file-name-then-line order) is in it.
    pub fn keeps(&self, position: usize) -> bool {
        position % self.count == self.index - 1
    }

    /// The JUnit file name for this shard (`junit-shard-2-of-3.xml`).
    pub fn junit_name(&self) -> String {
        format!("junit-shard-{}-of-{}.xml", self.index, self.count)
    }
}

/// Merge JUnit files (each one `<testsuites>` of `<testsuite>`s, as cucumber writes them) into
/// one `<testsuites>` holding every suite, in the order given.
pub fn merge_junit(files: &[String]) -> Result<String, String> {
    let mut suites = String::new();
    for (i, xml) in files.iter().enumerate() {
        let open = xml
            .find("<testsuites")
            .and_then(|s| xml[s..].find('>').map(|e| s + e + 1))
            .ok_or_else(|| format!("file {} has no <testsuites>", i + 1))?;
        let inner = if xml[..open].ends_with("/>") {
            ""
        } else {
            let close = xml
                .rfind("</testsuites>")
                .ok_or_else(|| format!("file {} has no </testsuites>", i + 1))?;
            &xml[open..close]
        };
        suites.push_str(inner);
    }
    Ok(format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><testsuites>{}</testsuites>",
        renumber_suites(&suites)
    ))
}

/// Give every `<testsuite id="...">` a fresh id in order (each shard numbers its own from 0).
fn renumber_suites(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    let mut next = 0;
    while let Some(at) = rest.find("<testsuite ") {
        let tag_end = rest[at..].find('>').map_or(rest.len(), |e| at + e);
        let tag = &rest[at..tag_end];
        out.push_str(&rest[..at]);
        match tag.find(" id=\"").and_then(|i| {
            let value = i + 5;
            tag[value..].find('"').map(|j| (value, value + j))
        }) {
            Some((from, to)) => {
                out.push_str(&tag[..from]);
                out.push_str(&next.to_string());
                out.push_str(&tag[to..]);
            }
            None => out.push_str(tag),
        }
        next += 1;
        rest = &rest[tag_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    #[test]
    fn shards_partition_the_scenarios() {
        let shards: Vec<Shard> = ["1/3", "2/3", "3/3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for p in 0..20 {
            assert_eq!(
                shards.iter().filter(|s| s.keeps(p)).count(),
                1,
                "position {p}"
            );
        }
        assert!(shards[1].keeps(1) && shards[1].keeps(4));
    }

    #[test]
    fn bad_shards_name_the_format() {
        for bad in ["0/2", "3/2", "1", "a/b", "1/0"] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert!(e.contains("INDEX/COUNT"), "{bad}: {e}");
        }
    }

    #[test]
    fn junit_files_merge_into_one_testsuites() {
        let a = r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite id="0" name="A"><testcase name="x"/></testsuite></testsuites>"#;
        let b = r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite id="0" name="B" tests="1"></testsuite></testsuites>"#;
        let empty = r#"<?xml version="1.0" encoding="utf-8"?><testsuites/>"#;
        let merged = merge_junit(&[a.into(), empty.into(), b.into()]).unwrap();
        assert_eq!(
            merged,
            r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite id="0" name="A"><testcase name="x"/></testsuite><testsuite id="1" name="B" tests="1"></testsuite></testsuites>"#
        );
        assert!(merge_junit(&["garbage".into()]).is_err());
    }
}
