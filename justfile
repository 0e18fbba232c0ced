# hashpool-harness: `just --list` shows every recipe.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Cargo output goes outside the checkout unless the caller chose otherwise.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", env_var("HOME") + "/.cache/hashpool-harness/target")

# insta finds the snapshots of this checkout even when a test binary in the shared target dir
# was built (and judged fresh by cargo) from another checkout of the same sources.
export INSTA_WORKSPACE_ROOT := justfile_directory()

# Not --quiet: the first run compiles for minutes, and its progress shows.
harness := "cargo run -p harness --bin harness --"

# List the recipes.
default:
    @just --list

# Install Debian packages and build bitcoind and lightningd once (machines without Nix).
[group('set up')]
bootstrap:
    ci/bootstrap

# Unit tests, every scenario (JUnit XML in target/scenarios/junit.xml), then a 90 s soak of the small stack seeded from the commit.
[group('test')]
test: roles translator
    cargo test --workspace
    cargo test -p scenarios --test scenarios
    just soak-commit

# A seeded fault soak over the whole stack, then every money check (DURATION like 90s, 3m, 1h; SEED empty: a fresh one, printed first; a failure is shrunk in up to SHRINK more runs; FLAGS e.g. --profile small); report in target/soak/SEED/report.html.
[group('test')]
soak DURATION="3m" SEED="" SHRINK="6" *FLAGS: roles
    {{harness}} soak --duration {{DURATION}} {{ if SEED == "" { "" } else { "--seed " + SEED } }} --shrink {{SHRINK}} {{FLAGS}}

# Replay a soak's schedule file (target/soak/SEED/schedule.json or shrunk.json): the same faults at the same offsets (FLAGS e.g. --until 5).
[group('test')]
soak-replay FILE *FLAGS: roles
    {{harness}} soak --replay {{FILE}} {{FLAGS}}

# The soak `just test` ends with: 90 s of the small stack, the seed derived from the commit (printed).
[group('test')]
soak-commit: roles
    #!/usr/bin/env bash
    set -euo pipefail
    seed=$((16#$(git rev-parse --short=12 HEAD 2>/dev/null || echo 1)))
    echo "soak seed $seed (from commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo none))"
    {{harness}} soak --duration 90s --profile small --seed "$seed"

# Run the scenarios matching a cucumber tag expression, e.g. just scenario '@mining and not @limits'.
[group('test')]
scenario TAGS: roles translator
    cargo test -p scenarios --test scenarios -- --tags '{{TAGS}}'

# Run shard INDEX of COUNT (from 1): every COUNT-th scenario by feature file and line (JUnit: target/scenarios/junit-shard-INDEX-of-COUNT.xml).
[group('test')]
scenario-shard INDEX COUNT: roles translator
    HASHPOOL_SCENARIO_SHARD='{{INDEX}}/{{COUNT}}' cargo test -p scenarios --test scenarios

# Merge the shards' JUnit files into target/scenarios/junit.xml.
[group('test')]
junit-merge:
    cargo run -p scenarios --bin junit-merge -- target/scenarios/junit.xml target/scenarios/junit-shard-*.xml

# Install SRI's translator_sv2 0.6 from crates.io (no default features) into the harness cache, for @interop (a no-op once installed).
[group('test')]
translator:
    cargo install translator_sv2 --version 0.6.0 --no-default-features --locked --quiet --root "$HOME/.cache/hashpool-harness/translator-0.6.0" --target-dir "$CARGO_TARGET_DIR/translator-build"

# Build the role binaries the scenarios start (pool, mint, auditor, proxy, miner).
[group('test')]
roles:
    cargo build -p pool -p mint -p auditor -p proxy -p miner

# The whole story on a fresh signet stack, narrated, ending with a summary table (--keep: leave it running).
[group('run')]
demo *FLAGS: roles
    {{harness}} demo {{FLAGS}}

# Start the full stack on CHAIN, print its endpoints, keep it until Ctrl-C (FLAGS: --bare for bitcoind and Redis only, --keep).
[group('run')]
up CHAIN="signet" *FLAGS: roles
    {{harness}} up --chain {{CHAIN}} {{FLAGS}}

# Mine N blocks on the running `just up` stack (to the harness faucet).
[group('run')]
generate-blocks N:
    {{harness}} generate-blocks {{N}}

# Follow the logs of the running `just up` stack (or one role: just logs pool); Ctrl-C stops.
[group('run')]
logs ROLE="":
    {{harness}} logs --follow {{ROLE}}

# Print fresh keys for running the roles by hand: pool authority, Cashu locking key, payout address.
[group('run')]
keys:
    {{harness}} keys

# Write a template with one kind of fraud on the running `just up` stack's tip as an audit task.
[group('run')]
fraud KIND OUT="fraud-task.json":
    {{harness}} fraud {{KIND}} --out {{OUT}}

# Print the auditor's verdict on a saved audit task (e.g. target/scenarios/fraud/KIND.json).
[group('run')]
audit FILE:
    {{harness}} audit {{FILE}}

# Remove stack data dirs and stop processes left over by earlier runs.
[group('set up')]
clean:
    {{harness}} clean

# Rebuild the pre-mined chains as deterministic fixtures in fixtures/chains (commit them; caches rebuild from them).
[group('set up')]
chain-fixtures:
    cargo run -p harness --release -- chain-fixtures

# Load both chain fixtures, and the signet rewards chain when lightningd is found, into the machine's chain cache (the first run does it anyway).
[group('set up')]
premine:
    {{harness}} premine

# Print which program backs each part.
[group('set up')]
backends:
    {{harness}} backends

# Benchmarks, printed as tables: share path, stack start, end-to-end mining, 1,000 miners and handshakes/s, settlement, declarations, template audits (on the tip and on a rewound parent), 100,000 fresh-key lookups, growth (lookups, minting, settling and memory at 10^3 to 10^5 quotes of history), time to a redemption and the stack's memory (release roles), the SV2 sniffer's latency.
[group('test')]
bench:
    cargo bench -p pool --bench share_validation
    cargo bench -p harness --bench stack_start
    cargo build --release -p pool -p mint -p auditor -p proxy -p miner
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench mining_e2e
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench network
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench settlement
    cargo bench -p pool --bench declaration
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench template_audit
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench lookups
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench growth
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench redemption
    cargo bench -p harness --bench sniffer

# cargo fmt --check and clippy with warnings denied.
[group('test')]
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    # The scenario runner is `test = false`, which --all-targets leaves out.
    cargo clippy -p scenarios --test scenarios -- -D warnings
