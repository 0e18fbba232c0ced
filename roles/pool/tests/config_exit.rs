//! A config the pool refuses exits with the documented code 2 and says why once.

use std::process::Command;

#[test]
fn an_invalid_config_exits_2_and_says_why_once() {
    let dir = std::env::temp_dir().join(format!("pool-config-exit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pool.toml");
    // Loads (known keys), but cannot work: no payout address, no authority keys.
    std::fs::write(&file, "min_bits = 20\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hashpool-pool"))
        .arg("--config")
        .arg(&file)
        .env_clear()
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout {stdout} stderr {stderr}"
    );
    let all = format!("{stdout}{stderr}");
    assert_eq!(
        all.matches("is required").count(),
        1,
        "the reason is printed once: stdout {stdout} stderr {stderr}"
    );
}
