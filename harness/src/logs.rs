//! Process log files: tails for error messages, and cursors that wait for a line to appear
//! (each wait sees only lines written after the previous match, as in pyln-testing).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::wait::{wait_until, Timeout};

/// The last `lines` lines of a file, or a note that it cannot be read. bitcoind's trace of
/// each RPC call (`-debug=rpc`, an oracle for some steps) is left out: it would fill the tail.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("({}: {e})", path.display()),
    };
    let all: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("ThreadRPCServer method="))
        .collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// Reads a growing log file from a remembered position.
#[derive(Debug, Clone)]
pub struct LogCursor {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogCursor {
    /// A cursor at the current end of `path` (only lines written from now on are seen).
    pub fn at_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Self {
            path: path.to_path_buf(),
            offset,
            partial: String::new(),
        }
    }

    /// A cursor at the start of `path`.
    pub fn at_start(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
        }
    }

    /// Complete lines written since the last call.
    pub fn new_lines(&mut self) -> std::io::Result<Vec<String>> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            self.offset = 0; // truncated or replaced
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_string).collect();
        self.partial = lines.pop().unwrap_or_default();
        Ok(lines)
    }

    /// Wait until a new line contains `needle`; returns that line.
    pub async fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, Timeout> {
        let what = format!("a line containing {needle:?} in {}", self.path.display());
        let mut seen = 0usize;
        wait_until(&what, timeout, || {
            let result = match self.new_lines() {
                Ok(lines) => {
                    seen += lines.len();
                    lines
                        .into_iter()
                        .find(|l| l.contains(needle))
                        .ok_or_else(|| format!("{seen} new lines, none matching"))
                }
                Err(e) => Err(e.to_string()),
            };
            async move { result }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn cursor_sees_only_new_complete_lines() {
        let path = std::env::temp_dir().join(format!("hh-log-{}.log", std::process::id()));
        std::fs::write(&path, "old line\n").unwrap();
        let mut cursor = LogCursor::at_end(&path);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        write!(f, "first\nsecond half").unwrap();
        assert_eq!(cursor.new_lines().unwrap(), vec!["first".to_string()]);
        writeln!(f, " done").unwrap();
        let line = cursor
            .wait_for("half", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(line, "second half done");
        assert!(cursor
            .wait_for("old", Duration::from_millis(20))
            .await
            .is_err());
        assert_eq!(tail(&path, 1), "second half done");
        std::fs::remove_file(&path).unwrap();
    }
}
