//! The soak report renders in a real browser: headless Chromium loads `report.html` from disk
//! (no network) and the DOM it builds holds the timeline's chart with a row per process and
//! the failing check at the top. Skipped, saying so, where Chromium is absent.

use std::collections::BTreeMap;
use std::process::Command;

use harness::soak::history::{FaultEvent, History, Sample, WalletSample};
use harness::soak::schedule::Fault;
use harness::soak::{report, Profile, Schedule};
use harness::stack_sweep::Check;

fn history(schedule: &Schedule) -> History {
    let mut h = History::new(schedule);
    for i in 0..30u64 {
        let mut phases = BTreeMap::new();
        phases.insert(
            "pool".to_string(),
            if (10..14).contains(&i) { "down" } else { "up" }.to_string(),
        );
        phases.insert(
            "mint".to_string(),
            if (20..23).contains(&i) {
                "paused"
            } else {
                "up"
            }
            .to_string(),
        );
        let mut wallets = BTreeMap::new();
        wallets.insert(
            "alice".to_string(),
            WalletSample {
                held: 100 * i,
                minted: 100 * i,
                ..Default::default()
            },
        );
        h.samples.push(Sample {
            t_ms: i * 2000,
            phases,
            shares_accepted: Some((i * 7) as f64),
            wallets,
            redeemed_sat: Some(i * 10),
            available_sat: Some(50_000 - i * 10),
        });
    }
    let kill = Fault::Kill {
        process: "pool".into(),
    };
    h.faults.push(FaultEvent::new(
        0,
        "apply",
        &kill,
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(20_400),
        Ok("killed by SIGKILL".into()),
    ));
    h
}

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(String::from)
}

#[test]
fn report_renders_in_headless_chromium() -> anyhow::Result<()> {
    let schedule = Schedule::generate(42, Profile::Small, 60_000, 2);
    let h = history(&schedule);
    let checks = vec![
        Check {
            name: "money: held + melted = minted".into(),
            passed: false,
            detail: "wallet alice: 5 ehash missing".into(),
        },
        Check {
            name: "no panic in any log".into(),
            passed: true,
            detail: "none".into(),
        },
    ];
    let html = report::render(&schedule, &h, &checks, &[], "just soak-replay x.json")?;
    for fetch in ["<script", "<link", "src=\"http", "url(http", "@import"] {
        assert!(
            !html.contains(fetch),
            "the report fetches something: {fetch}"
        );
    }
    let Some(browser) = chromium() else {
        eprintln!("chromium not found (apt-get install chromium): the headless render is skipped");
        return Ok(());
    };
    let dir = std::env::temp_dir().join(format!("soak-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("report.html");
    std::fs::write(&file, &html)?;
    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            &format!("file://{}", file.display()),
        ])
        .output()?;
    let dom = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && !dom.is_empty(),
        "{browser} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let timeline = dom
        .split("id=\"timeline\"")
        .nth(1)
        .and_then(|rest| rest.split("</svg>").next())
        .ok_or_else(|| anyhow::anyhow!("no timeline in the DOM Chromium built"))?;
    assert!(timeline.contains("<svg"), "the timeline is no chart");
    for row in ["pool", "mint", "nemesis"] {
        assert!(timeline.contains(row), "the timeline has no row {row}");
    }
    assert!(
        timeline.matches("<rect").count() > 50,
        "the timeline's bars are missing"
    );
    let top = dom.split("id=\"timeline\"").next().unwrap_or_default();
    assert!(
        top.contains("CHECKS FAILED") && top.contains("5 ehash missing"),
        "the failing check is not at the top"
    );
    Ok(())
}
