//! Finding the real binaries: `*_EXE` variable, then PATH, then the `ci/bootstrap` cache.

use std::path::{Path, PathBuf};

/// A program the harness runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// Bitcoin Core's daemon.
    Bitcoind,
    /// Bitcoin Core's RPC client (Core Lightning's bitcoin backend runs it).
    BitcoinCli,
    /// Redis.
    RedisServer,
    /// Core Lightning's daemon.
    Lightningd,
    /// SRI's SV1-to-SV2 translator (`translator_sv2` from crates.io), for interoperability.
    TranslatorSv2,
}

impl Program {
    /// Every program, in the order `harness backends` lists them.
    pub const ALL: [Program; 5] = [
        Program::Bitcoind,
        Program::BitcoinCli,
        Program::RedisServer,
        Program::Lightningd,
        Program::TranslatorSv2,
    ];
}

impl Program {
    /// File name on PATH.
    pub fn file_name(self) -> &'static str {
        match self {
            Program::Bitcoind => "bitcoind",
            Program::BitcoinCli => "bitcoin-cli",
            Program::RedisServer => "redis-server",
            Program::Lightningd => "lightningd",
            Program::TranslatorSv2 => "translator_sv2",
        }
    }

    /// Variable that names the executable explicitly.
    pub fn env_var(self) -> &'static str {
        match self {
            Program::Bitcoind => "BITCOIND_EXE",
            Program::BitcoinCli => "BITCOIN_CLI_EXE",
            Program::RedisServer => "REDIS_SERVER_EXE",
            Program::Lightningd => "LIGHTNINGD_EXE",
            Program::TranslatorSv2 => "TRANSLATOR_SV2_EXE",
        }
    }
}

/// A program could not be found; the message says how to get it.
#[derive(Debug, thiserror::Error)]
pub enum MissingProgram {
    /// The `*_EXE` variable names something that is not an executable file.
    #[error("{var}={path} is not an executable file: fix the variable or unset it to search PATH")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        path: PathBuf,
    },
    /// Not in the variable, PATH or the bootstrap cache.
    #[error(
        "{name} not found (looked at ${var}, PATH{cache}): run `nix develop` (Nix provides it) \
         or `ci/bootstrap` (installs Debian packages and builds bitcoind, and lightningd from \
         CLN_SOURCE_TARBALL, into the cache), or set {var}=/path/to/{name}"
    )]
    NotFound {
        /// The program name.
        name: &'static str,
        /// The variable that would name it.
        var: &'static str,
        /// Description of the cache directory searched, if any.
        cache: String,
    },
}

/// Find `program`; `cache_dir` is the `ci/bootstrap` cache root.
pub fn find(program: Program, cache_dir: &Path) -> Result<PathBuf, MissingProgram> {
    let var = program.env_var();
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(MissingProgram::BadEnv { var, path })
        };
    }
    if let Some(found) = search_path(program.file_name()) {
        return Ok(found);
    }
    let mut cache = String::new();
    if matches!(program, Program::Bitcoind | Program::BitcoinCli) {
        cache = format!(", {}/bitcoin-core-*/bin", cache_dir.display());
        if let Some(found) = bootstrap_cache(cache_dir, program.file_name()) {
            return Ok(found);
        }
    }
    if program == Program::Lightningd {
        cache = format!(", {}/lightning-*/bin", cache_dir.display());
        if let Some(found) = lightning_cache(cache_dir) {
            return Ok(found);
        }
    }
    if program == Program::TranslatorSv2 {
        cache = format!(", {}/translator-*/bin", cache_dir.display());
        let mut builds: Vec<PathBuf> = std::fs::read_dir(cache_dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("translator-"))
            .map(|e| e.path().join("bin").join("translator_sv2"))
            .filter(|p| is_executable(p))
            .collect();
        builds.sort();
        if let Some(found) = builds.pop() {
            return Ok(found);
        }
    }
    Err(MissingProgram::NotFound {
        name: program.file_name(),
        var,
        cache,
    })
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// The newest `bitcoin-core-*/bin/<name>` under the cache (a complete build: bin/ is renamed
/// into place only after both binaries are there).
fn bootstrap_cache(cache_dir: &Path, name: &str) -> Option<PathBuf> {
    let mut builds: Vec<PathBuf> = std::fs::read_dir(cache_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("bitcoin-core-"))
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| is_executable(p))
        .collect();
    builds.sort();
    builds.pop()
}

/// The newest complete `lightning-*/bin/lightningd` under the cache (`ci/bootstrap` writes
/// `.complete` after `make install`).
fn lightning_cache(cache_dir: &Path) -> Option<PathBuf> {
    let mut builds: Vec<PathBuf> = std::fs::read_dir(cache_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("lightning-"))
        .filter(|e| e.path().join(".complete").is_file())
        .map(|e| e.path().join("bin").join("lightningd"))
        .filter(|p| is_executable(p))
        .collect();
    builds.sort();
    builds.pop()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_message_names_the_fix() {
        let err = MissingProgram::NotFound {
            name: "bitcoind",
            var: "BITCOIND_EXE",
            cache: ", /c/bitcoin-core-*/bin".into(),
        };
        let msg = err.to_string();
        assert!(
            msg.contains("nix develop") && msg.contains("ci/bootstrap"),
            "{msg}"
        );
        assert!(msg.contains("BITCOIND_EXE"), "{msg}");
    }

    #[test]
    fn bootstrap_cache_picks_a_complete_build() {
        let dir = std::env::temp_dir().join(format!("hh-bin-test-{}", std::process::id()));
        let bin = dir.join("bitcoin-core-kernel-sys-0.2.0").join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        assert_eq!(bootstrap_cache(&dir, "bitcoind"), None);
        let exe = bin.join("bitcoind");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(bootstrap_cache(&dir, "bitcoind"), Some(exe));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
