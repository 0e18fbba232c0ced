//! Memory of a process tree, read from `/proc`: the harness's own children (roles, bitcoind,
//! Redis, lightningd and its subdaemons and plugins).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeMemory {
    /// Processes counted.
    pub processes: usize,
    /// Summed resident set sizes, bytes (shared pages counted once per process).
    pub rss: u64,
    /// Summed proportional set sizes, bytes (shared pages split between their users).
    pub pss: u64,
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn kb_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// CPU time process `pid` has used so far (user + system, from `/proc/<pid>/stat`), seconds;
/// 0 if it is gone.
#[allow(unsafe_code)]
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    // After "pid (comm) ": state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf reads a constant of the system and has no other effect.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / per_sec
}

/// Peak resident set size of process `pid` (`VmHWM`), bytes; 0 if it is gone.
pub fn peak_rss(pid: u32) -> u64 {
    kb_field(&format!("/proc/{pid}/status"), "VmHWM:")
}

/// The descendants of `root` (not `root` itself) and their memory now.
pub fn descendants(root: u32) -> TreeMemory {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut seen = HashSet::new();
    let mut todo = children.get(&root).cloned().unwrap_or_default();
    let mut out = TreeMemory::default();
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) {
            continue;
        }
        out.processes += 1;
        out.rss += kb_field(&format!("/proc/{pid}/status"), "VmRSS:");
        out.pss += kb_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:");
        todo.extend(children.get(&pid).cloned().unwrap_or_default());
    }
    out
}

/// Samples this process's descendants every `every` until dropped; keeps the peaks.
pub struct PeakSampler {
    peak: Arc<Mutex<TreeMemory>>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakSampler {
    /// Start sampling.
    pub fn start(every: Duration) -> Self {
        let peak = Arc::new(Mutex::new(TreeMemory::default()));
        let p = peak.clone();
        let me = std::process::id();
        let task = tokio::spawn(async move {
            loop {
                let now = tokio::task::spawn_blocking(move || descendants(me))
                    .await
                    .unwrap_or_default();
                if let Ok(mut peak) = p.lock() {
                    peak.processes = peak.processes.max(now.processes);
                    peak.rss = peak.rss.max(now.rss);
                    peak.pss = peak.pss.max(now.pss);
                }
                tokio::time::sleep(every).await;
            }
        });
        Self { peak, task }
    }

    /// The peaks so far (each field's own maximum).
    pub fn peak(&self) -> TreeMemory {
        self.peak.lock().map(|p| *p).unwrap_or_default()
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_process_is_counted_with_its_memory() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let m = descendants(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(m.processes >= 1, "{m:?}");
        assert!(m.rss > 0, "{m:?}");
    }
}
