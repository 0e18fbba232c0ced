//! Supervisor tests on real child processes.

use super::*;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hh-sup-{name}-{}", std::process::id()))
}

/// Ready once the child has written its pid file.
fn pidfile_ready(dir: &Path) -> Readiness {
    let file = dir.join("pid");
    Readiness {
        what: "pid file".into(),
        probe: Arc::new(move || {
            let file = file.clone();
            Box::pin(async move {
                std::fs::read_to_string(&file)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        }),
    }
}

fn options(policy: RestartPolicy) -> SupervisorOptions {
    SupervisorOptions {
        policy,
        start_timeout: Duration::from_secs(10),
        stop_timeout: Duration::from_secs(2),
        recovery_args: vec!["recovered".into()],
    }
}

fn sleeper(dir: &Path) -> ProcessSpec {
    ProcessSpec::new("sleeper", Path::new("/bin/sh"), dir)
        .arg("-c")
        .arg("echo \"$$ $0\" > pid.tmp && mv pid.tmp pid && exec sleep 600")
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_is_restarted_by_policy() {
    let d = dir("restart");
    let sup = Supervised::start(
        sleeper(&d),
        pidfile_ready(&d),
        options(RestartPolicy::OnCrash { max_restarts: 3 }),
    )
    .await
    .unwrap();
    let first = sup.pid().unwrap();
    std::fs::remove_file(d.join("pid")).unwrap();
    let gen = sup.kill9().await.unwrap();
    let status = sup
        .wait_ready_after(gen, Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(status.pid, Some(first));
    assert_eq!(status.restarts, 1);
    assert_eq!(status.last_exit.as_deref(), Some("killed by SIGKILL"));
    // The restart after a crash got the recovery arguments ($0 of `sh -c`).
    let pidfile = std::fs::read_to_string(d.join("pid")).unwrap();
    assert!(pidfile.trim().ends_with("recovered"), "{pidfile}");
    assert_eq!(sup.stop().await.unwrap(), "killed by SIGTERM");
    assert_eq!(sup.status().phase, Phase::Stopped);
    std::fs::remove_dir_all(&d).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn early_exit_fails_start_with_the_log_tail() {
    let d = dir("early");
    let spec = ProcessSpec::new("broken", Path::new("/bin/sh"), &d)
        .arg("-c")
        .arg("echo 'Error: bad option -frobnicate' >&2; exit 1");
    let err = Supervised::start(spec, pidfile_ready(&d), options(RestartPolicy::Never))
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("exit code 1"), "{msg}");
    assert!(msg.contains("bad option -frobnicate"), "{msg}");
    std::fs::remove_dir_all(&d).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn never_policy_reports_the_crash() {
    let d = dir("never");
    let sup = Supervised::start(
        sleeper(&d),
        pidfile_ready(&d),
        options(RestartPolicy::Never),
    )
    .await
    .unwrap();
    sup.kill9().await.unwrap();
    let mut rx = sup.inner.status.subscribe();
    let failed = wait_until("failed phase", Duration::from_secs(5), || {
        let s = rx.borrow_and_update().clone();
        async move {
            match s.phase {
                Phase::Failed(why) => Ok(why),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    assert!(failed.contains("SIGKILL"), "{failed}");
    std::fs::remove_dir_all(&d).ok();
}
