//! Cucumber runner: `cargo test -p scenarios --test scenarios -- [--tags EXPR] [cucumber options]`.
//!
//! Prints cucumber's output, writes JUnit XML to `target/scenarios/junit.xml` (a shard, with
//! `HASHPOOL_SCENARIO_SHARD=INDEX/COUNT`: `junit-shard-INDEX-of-COUNT.xml`), ends with a table
//! of scenario durations, keeps the data directory of every failed scenario.

mod steps;
mod world;

use std::sync::{Arc, OnceLock};

use cucumber::{event, writer, World as _, WriterExt as _};
use harness::binaries::{find, Program};
use harness::bitcoind::{ensure_chain_cache, Chain};
use harness::stack::stray_processes;
use harness::HarnessConfig;
use scenarios::{report_dir, Durations, Outcome};

use world::HarnessWorld;

/// Scenarios run at once unless `--concurrency` says otherwise (two cores: most time is
/// spent waiting on processes; CPU-heavy scenarios are tagged `@serial`).
const DEFAULT_CONCURRENCY: usize = 4;

fn durations() -> &'static Arc<Durations> {
    static D: OnceLock<Arc<Durations>> = OnceLock::new();
    D.get_or_init(Default::default)
}

fn key(feature: &cucumber::gherkin::Feature, scenario: &cucumber::gherkin::Scenario) -> String {
    format!(
        "{}: {} (line {})",
        feature.name, scenario.name, scenario.position.line
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    harness::process::install_interrupt_handler(std::time::Duration::from_secs(10))?;
    let config = HarnessConfig::load(None)?;
    prepare(&config).await?;

    let reports = report_dir();
    std::fs::create_dir_all(&reports)?;
    let shard = scenarios::Shard::from_env().map_err(anyhow::Error::msg)?;
    // cucumber skips a custom filter when --tags or --name is given: a shard would run all.
    if shard.is_some()
        && std::env::args().any(|a| {
            ["--tags", "-t", "--name", "-n"]
                .iter()
                .any(|f| a == *f || a.starts_with(&format!("{f}=")))
        })
    {
        anyhow::bail!(
            "{} cannot be combined with --tags or --name: a shard is a slice of all scenarios",
            scenarios::Shard::ENV
        );
    }
    let junit_path =
        reports.join(shard.map_or_else(|| "junit.xml".to_string(), |s| s.junit_name()));
    let slice = match shard {
        Some(s) => {
            let kept = shard_slice(s).await?;
            println!(
                "[shard] {}/{}: {} scenario(s) of this slice ({}={}/{})",
                s.index,
                s.count,
                kept.len(),
                scenarios::Shard::ENV,
                s.index,
                s.count
            );
            Some(kept)
        }
        None => None,
    };
    let junit = std::fs::File::create(&junit_path)?;

    let result = HarnessWorld::cucumber()
        .max_concurrent_scenarios(DEFAULT_CONCURRENCY)
        .before(|feature, _rule, scenario, _world| {
            durations().start(key(feature, scenario));
            Box::pin(async {})
        })
        .after(|feature, _rule, scenario, finished, world| {
            let mut outcome = match finished {
                event::ScenarioFinished::StepPassed => Outcome::Passed,
                event::ScenarioFinished::StepSkipped => Outcome::Skipped,
                _ => Outcome::Failed,
            };
            let key = key(feature, scenario);
            let allow_errors = scenario
                .tags
                .iter()
                .chain(&feature.tags)
                .any(|t| t == "allow.errors");
            Box::pin(async move {
                let mut problems = Vec::new();
                if let Some(world) = world {
                    let found = world.sweep(allow_errors).await;
                    problems = world.finish(&key, outcome == Outcome::Failed, found).await;
                    if !problems.is_empty() {
                        outcome = Outcome::Failed;
                    }
                }
                durations().finish(&key, outcome);
                // The invariant sweep: a panic here fails the run as a hook error.
                assert!(
                    problems.is_empty(),
                    "{key}: the invariant sweep failed:\n{}",
                    problems.join("\n")
                );
            })
        })
        .with_writer(
            writer::Basic::stdout()
                .summarized()
                .tee::<HarnessWorld, _>(writer::JUnit::for_tee(junit, 0))
                .normalized(),
        )
        .fail_on_skipped_with(|_, _, s| !s.tags.iter().any(|t| t == "allow.skipped"))
        .filter_run(features_dir(), move |feature, _rule, scenario| {
            slice
                .as_ref()
                .is_none_or(|kept| kept.contains(&(feature_file(feature), scenario.position.line)))
        })
        .await;

    println!("\nScenario durations:\n{}", durations().table());
    println!("JUnit XML: {}", junit_path.display());
    use cucumber::writer::Stats as _;
    if result.execution_has_failed() {
        anyhow::bail!(
            "{} step(s) failed, {} parsing error(s), {} hook error(s); kept data directories are listed above",
            result.failed_steps(),
            result.parsing_errors(),
            result.hook_errors()
        );
    }
    Ok(())
}

/// A feature's file, relative to the features directory (the shard order's first key).
fn feature_file(feature: &cucumber::gherkin::Feature) -> String {
    let dir = features_dir();
    feature
        .path
        .as_ref()
        .map(|p| {
            p.strip_prefix(&dir)
                .or_else(|_| p.strip_prefix(dir.canonicalize().unwrap_or_default()))
                .unwrap_or(p)
                .display()
                .to_string()
        })
        .unwrap_or_default()
}

/// The scenarios of shard `shard`: (feature file name, line), from every feature file ordered
/// by file name then line, as cucumber's own parser reads them (each example of an outline is
/// a scenario at its example row's line; rules' scenarios included).
async fn shard_slice(
    shard: scenarios::Shard,
) -> anyhow::Result<std::collections::HashSet<(String, usize)>> {
    use cucumber::Parser as _;
    use futures::StreamExt as _;
    let features: Vec<_> = cucumber::parser::Basic::new()
        .parse(features_dir(), Default::default())
        .collect()
        .await;
    let mut all = Vec::new();
    for feature in features {
        let feature = feature.map_err(|e| anyhow::anyhow!("parsing the features: {e}"))?;
        let name = feature_file(&feature);
        all.extend(
            feature
                .scenarios
                .iter()
                .chain(feature.rules.iter().flat_map(|r| &r.scenarios))
                .map(|s| (name.clone(), s.position.line)),
        );
    }
    all.sort();
    anyhow::ensure!(
        !all.is_empty(),
        "no scenarios in {}",
        features_dir().display()
    );
    Ok(all
        .into_iter()
        .enumerate()
        .filter(|(p, _)| shard.keeps(*p))
        .map(|(_, k)| k)
        .collect())
}

/// `scenarios/features` of the checkout being tested (runtime `CARGO_MANIFEST_DIR`; the
/// compile-time one can name another checkout sharing the target directory).
fn features_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .join("features")
}

/// A raw `cargo test -p scenarios` builds the test, not the roles it starts: refuse a role
/// binary older than a source it was built from. The sources are those cargo lists in the
/// binary's dep-info (`<bin>.d`), read in this checkout (the list may name another checkout
/// sharing the target directory).
fn refuse_stale_roles() -> anyhow::Result<()> {
    let root = features_dir()
        .parent()
        .and_then(|p| p.parent())
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let mut stale = Vec::new();
    for (exe, env) in [
        ("hashpool-pool", "HASHPOOL_POOL_EXE"),
        ("hashpool-mint", "HASHPOOL_MINT_EXE"),
        ("hashpool-auditor", "HASHPOOL_AUDITOR_EXE"),
        ("hashpool-proxy", "HASHPOOL_PROXY_EXE"),
        ("hashpool-miner", "HASHPOOL_MINER_EXE"),
    ] {
        // A binary named by its variable is the caller's choice.
        if std::env::var_os(env).is_some_and(|v| !v.is_empty()) {
            continue;
        }
        let path = harness::roles::role_exe(exe, env)?;
        let built = std::fs::metadata(&path)?.modified()?;
        let Ok(depinfo) = std::fs::read_to_string(path.with_file_name(format!("{exe}.d"))) else {
            continue;
        };
        let deps = depinfo.replace("\\ ", "\u{0}");
        let newer = deps
            .split_whitespace()
            .skip(1)
            .map(|d| d.replace('\u{0}', " "))
            .filter_map(|d| {
                let at = d.find("/roles/").or_else(|| d.find("/crates/"))?;
                let here = root.join(&d[at + 1..]);
                let modified = std::fs::metadata(&here).ok()?.modified().ok()?;
                (modified > built).then_some(here)
            })
            .next();
        if let Some(source) = newer {
            stale.push(format!(
                "{} (older than {})",
                path.display(),
                source.display()
            ));
        }
    }
    anyhow::ensure!(
        stale.is_empty(),
        "stale role binaries: {}; build them with `just roles` (`just test` and `just scenario` do)",
        stale.join(", ")
    );
    Ok(())
}

/// Report backends and strays, and build the chain caches before any scenario starts, so
/// scenario durations do not include loading the chain fixtures once.
async fn prepare(config: &HarnessConfig) -> anyhow::Result<()> {
    refuse_stale_roles()?;
    for (pid, cmd, dir) in stray_processes(&config.run_dir) {
        eprintln!(
            "warning: stray process {pid} from an earlier run ({}): {cmd}; `just clean` stops it",
            dir.display()
        );
    }
    let bitcoind = find(Program::Bitcoind, &config.cache_dir)?;
    let redis = find(Program::RedisServer, &config.cache_dir)?;
    println!(
        "backends: bitcoin = {}; redis = {}",
        bitcoind.display(),
        redis.display()
    );
    for chain in [Chain::Regtest, Chain::Signet] {
        ensure_chain_cache(&bitcoind, chain, config).await?;
    }
    Ok(())
}
