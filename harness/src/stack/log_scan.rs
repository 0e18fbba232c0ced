//! What a stack's logs say broke: panics and ERROR records of the roles, errors of bitcoind,
//! Core Lightning's `**BROKEN**` lines, Redis refusing or losing data.

use super::Stack;

impl Stack {
    /// Lines in the logs that say something broke: panics and ERROR records of the roles,
    /// errors of bitcoind (`Error:`/`ERROR:`/`***` lines) and Redis (refused or corrupt
    /// append-only files, failed writes). Scenarios that provoke errors on purpose are tagged
    /// `@allow.errors`.
    pub fn log_problems(&self) -> Vec<String> {
        self.log_lines(false)
    }

    /// Lines of any log that say a process panicked.
    pub fn log_panics(&self) -> Vec<String> {
        self.log_lines(true)
    }

    fn log_lines(&self, panics_only: bool) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, p) in self.processes() {
            let bad: fn(&str) -> bool = match name.as_str() {
                _ if panics_only => panic_line,
                n if n.starts_with("bitcoind") => bitcoind_error,
                n if n.starts_with("lightning") => lightning_error,
                "redis" => redis_error,
                // SRI's translator logs every miner disconnect at ERROR; only a panic counts.
                _ if p.spec().foreign => panic_line,
                _ => role_error,
            };
            for log in [p.spec().stdout_log(), p.spec().stderr_log()] {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                for line in text.lines().filter(|l| bad(l)) {
                    problems.push(format!("{}: {line}", log.display()));
                }
            }
        }
        problems
    }
}

/// lightningd marks what must not happen `**BROKEN**`.
fn lightning_error(line: &str) -> bool {
    line.contains("**BROKEN**")
}

fn role_error(line: &str) -> bool {
    panic_line(line) || line.contains(" ERROR ")
}

fn panic_line(line: &str) -> bool {
    line.contains("panicked at")
}

/// bitcoind writes `Error:`/`ERROR:` for failures and `***` for fatal ones.
fn bitcoind_error(line: &str) -> bool {
    line.contains("ERROR:") || line.contains("Error:") || line.contains("*** ")
}

/// Redis lines that mean lost or refused data (its `#` warnings at start-up are routine).
fn redis_error(line: &str) -> bool {
    [
        "Bad file format",
        "Unrecoverable",
        "Short read",
        "MISCONF",
        "Error ",
        "Can't",
        "Failed",
        "Fatal",
        "Background AOF rewrite terminated with error",
    ]
    .iter()
    .any(|p| line.contains(p))
}
