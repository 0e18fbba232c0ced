//! Processes and data left by earlier runs. A stack belongs to a live run when its harness
//! process is alive and still the parent of its roles (a role whose harness died is
//! re-parented, so a reused harness pid does not keep a dead run's strays alive).

use std::path::{Path, PathBuf};

use super::{StackSummary, SUMMARY_FILE};

use crate::memory::parent_of;

/// Whether the harness that wrote `summary` still runs it: one of its roles is alive and the
/// harness's child, or (no role alive) the harness process exists.
pub fn harness_alive(summary: &StackSummary) -> bool {
    if summary.harness_pid == std::process::id() {
        return true;
    }
    let live_roles: Vec<u32> = summary
        .roles
        .iter()
        .filter_map(|r| r.pid)
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    if live_roles.is_empty() {
        return Path::new(&format!("/proc/{}", summary.harness_pid)).exists();
    }
    live_roles
        .iter()
        .any(|pid| parent_of(*pid) == Some(summary.harness_pid))
}

/// The stacks under `run_dir`: (directory, summary).
pub(crate) fn stacks_under(run_dir: &Path) -> Vec<(PathBuf, StackSummary)> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read(e.path().join(SUMMARY_FILE)).ok()?;
            let summary = serde_json::from_slice::<StackSummary>(&text).ok()?;
            Some((e.path(), summary))
        })
        .collect()
}

/// Processes of earlier runs whose harness is gone: (pid, command line, stack dir). A
/// process counts if a `stack.json` under `run_dir` lists it and its command line names that
/// stack's directory. Stacks of another live run (a `just scenario` beside a `just bench`)
/// are not touched.
pub fn stray_processes(run_dir: &Path) -> Vec<(u32, String, PathBuf)> {
    let mut strays = Vec::new();
    for (_, summary) in stacks_under(run_dir) {
        if harness_alive(&summary) {
            continue;
        }
        for pid in summary.roles.iter().filter_map(|r| r.pid) {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&summary.dir.display().to_string()) {
                strays.push((pid, cmdline.trim().to_string(), summary.dir.clone()));
            }
        }
    }
    strays
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::RoleSummary;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// A `stack.json` in `dir` naming `harness_pid` and one role with `role_pid`.
    fn write_summary(name: &str, dir: &Path, harness_pid: u32, role_pid: u32) {
        let summary = StackSummary {
            name: name.into(),
            dir: dir.to_path_buf(),
            harness_pid,
            chain: None,
            roles: vec![RoleSummary {
                name: "role".into(),
                endpoint: String::new(),
                credentials: None,
                pid: Some(role_pid),
                logs: Vec::new(),
            }],
            backends: Vec::new(),
            faucet_address: None,
            start_ms: 0,
        };
        std::fs::write(
            dir.join(SUMMARY_FILE),
            serde_json::to_vec(&summary).unwrap(),
        )
        .unwrap();
    }

    /// Wait until `pid`'s command line names `dir`. Right after a spawn returns, the child can
    /// still be inside execve with an empty `/proc/<pid>/cmdline` (the parent is released before
    /// the new image's arguments are set up): these tests failed about 1 run in 30 on that.
    fn wait_for_cmdline_naming(pid: u32, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let dir = dir.display().to_string();
        loop {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir) {
                return;
            }
            assert!(Instant::now() < deadline, "process {pid} never named {dir}");
            std::thread::yield_now();
        }
    }

    fn children_of(pid: u32) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| parent_of(*p) == Some(pid))
            .collect()
    }

    #[test]
    fn another_live_runs_processes_are_not_strays_until_its_harness_dies() {
        let run_dir = std::env::temp_dir().join(format!("hh-strays-{}", std::process::id()));
        let stack_dir = run_dir.join("other-stack");
        std::fs::create_dir_all(&stack_dir).unwrap();
        // "harness": a shell whose child (the "role") names the stack dir on its command line.
        let role_cmd = format!("sleep 30; : {}", stack_dir.display());
        let mut harness = Command::new("sh")
            .arg("-c")
            .arg(format!("sh -c '{role_cmd}' & wait"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let harness_pid = harness.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        let role_pid = loop {
            if let Some(p) = children_of(harness_pid).into_iter().next() {
                break p;
            }
            assert!(Instant::now() < deadline, "the role never started");
            std::thread::yield_now();
        };
        wait_for_cmdline_naming(role_pid, &stack_dir);
        write_summary("other", &stack_dir, harness_pid, role_pid);
        assert!(
            stray_processes(&run_dir).is_empty(),
            "a live run's role was taken for a stray"
        );
        harness.kill().unwrap();
        harness.wait().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(role_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        std::fs::remove_dir_all(&run_dir).ok();
    }

    #[test]
    fn a_role_whose_harness_is_gone_is_a_stray() {
        let run_dir = std::env::temp_dir().join(format!("hh-strays-gone-{}", std::process::id()));
        let stack_dir = run_dir.join("dead-stack");
        std::fs::create_dir_all(&stack_dir).unwrap();
        // A harness pid that no longer runs, and a role (our child) naming the stack dir (the
        // shell stays the process: `; true` keeps dash from exec'ing sleep in its place).
        let mut gone = Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let mut role = Command::new("sh")
            .arg("-c")
            .arg("sleep 30; true")
            .arg(stack_dir.display().to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        write_summary("dead", &stack_dir, gone_pid, role.id());
        wait_for_cmdline_naming(role.id(), &stack_dir);
        let strays = stray_processes(&run_dir);
        let role_pid = role.id();
        let _ = role.kill();
        let _ = role.wait();
        std::fs::remove_dir_all(&run_dir).ok();
        assert!(strays.iter().any(|(p, _, _)| *p == role_pid), "{strays:?}");
    }
}
