# hashpool-harness: `just --list` shows every recipe.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Cargo output goes outside the checkout unless the caller chose otherwise.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", env_var("HOME") + "/.cache/hashpool-harness/target")

# insta finds the snapshots of this checkout even when a test binary in the shared target dir
# was built (and judged fresh by cargo) from another checkout of the same sources.
export INSTA_WORKSPACE_ROOT := justfile_directory()

harness := "cargo run --quiet -p harness --bin harness --"

# List the recipes.
default:
    @just --list

# Install Debian packages and build bitcoind once (machines without Nix).
bootstrap:
    ci/bootstrap

# Unit tests, then every scenario (JUnit XML in target/scenarios/junit.xml).
test: roles
    cargo test --workspace --exclude scenarios
    cargo test -p scenarios --test scenarios

# Run the scenarios matching a cucumber tag expression, e.g. just scenario '@mining and not @limits'.
scenario TAGS: roles
    cargo test -p scenarios --test scenarios -- --tags '{{TAGS}}'

# Build the role binaries the scenarios start (pool, mint, auditor, proxy, miner).
roles:
    cargo build -p pool -p mint -p auditor -p proxy -p miner

# The whole story on a fresh signet stack, narrated, ending with a summary table (--keep: leave it running).
demo *FLAGS: roles
    {{harness}} demo {{FLAGS}}

# Start the full stack on CHAIN, print its endpoints, keep it until Ctrl-C (FLAGS: --bare for bitcoind and Redis only, --keep).
up CHAIN="signet" *FLAGS:
    {{harness}} up --chain {{CHAIN}} {{FLAGS}}

# Mine N blocks on the running `just up` stack (to the harness faucet).
generate-blocks N:
    {{harness}} generate-blocks {{N}}

# Show the logs of the running `just up` stack (or: just logs bitcoind).
logs ROLE="":
    {{harness}} logs {{ROLE}}

# Write a template with one kind of fraud on the running `just up` stack's tip as an audit task.
fraud KIND OUT="fraud-task.json":
    {{harness}} fraud {{KIND}} --out {{OUT}}

# Print the auditor's verdict on a saved audit task (e.g. target/scenarios/fraud/KIND.json).
audit FILE:
    {{harness}} audit {{FILE}}

# Remove stack data dirs and stop processes left over by earlier runs.
clean:
    {{harness}} clean

# Pre-mine and cache both chains now (the first run does it anyway).
premine:
    {{harness}} premine

# Print which program backs each part.
backends:
    {{harness}} backends

# Benchmarks, printed as tables: share path, stack start, end-to-end mining, settlement, declarations, template audits, time to a redemption and the stack's memory (release roles).
bench:
    cargo bench -p pool --bench share_validation
    cargo bench -p harness --bench stack_start
    cargo build --release -p pool -p mint -p auditor -p proxy -p miner
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench mining_e2e
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench settlement
    cargo bench -p pool --bench declaration
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench template_audit
    HASHPOOL_BIN_DIR="$CARGO_TARGET_DIR/release" cargo bench -p harness --bench redemption

# cargo fmt --check and clippy with warnings denied.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
