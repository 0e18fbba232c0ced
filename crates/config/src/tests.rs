use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Redis {
    url: String,
    timeout_ms: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Conf {
    port: u16,
    tag: String,
    redis: Redis,
    password: Secret<String>,
}

impl Default for Conf {
    fn default() -> Self {
        Conf {
            port: 1000,
            tag: "pool".into(),
            redis: Redis {
                url: "redis://127.0.0.1:6379".into(),
                timeout_ms: 500,
            },
            password: Secret::new("hunter2".into()),
        }
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_then_file_then_env() {
    let conf: Conf = Layers::new("T")
        .toml("a.toml", "port = 2000\n[redis]\ntimeout_ms = 9\n")
        .env(env(&[
            ("T__PORT", "3000"),
            ("T__REDIS__URL", "redis://x"),
            ("OTHER__PORT", "1"),
        ]))
        .load()
        .unwrap();
    assert_eq!(conf.port, 3000);
    assert_eq!(conf.redis.timeout_ms, 9);
    assert_eq!(conf.redis.url, "redis://x");
    assert_eq!(conf.tag, "pool");
}

#[test]
fn string_keys_keep_numeric_looking_env_values_as_strings() {
    let conf: Conf = Layers::new("T")
        .env(env(&[("T__TAG", "1234")]))
        .load()
        .unwrap();
    assert_eq!(conf.tag, "1234");
}

#[test]
fn unknown_keys_are_refused_with_their_origin() {
    let err = Layers::new("T")
        .toml("a.toml", "prot = 1\n[redis]\nurl2 = \"x\"\n")
        .env(env(&[("T__NOPE", "1")]))
        .load::<Conf>()
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("prot (file a.toml)"), "{msg}");
    assert!(msg.contains("redis.url2 (file a.toml)"), "{msg}");
    assert!(msg.contains("nope (environment variable T__NOPE)"), "{msg}");
}

#[test]
fn a_bad_env_value_is_an_error_naming_the_variable() {
    let err = Layers::new("T")
        .env(env(&[("T__PORT", "lots")]))
        .load::<Conf>()
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("`port`") && msg.contains("T__PORT"), "{msg}");
    let err = Layers::new("T")
        .env(env(&[("T__PORT", "70000")]))
        .load::<Conf>()
        .unwrap_err();
    assert!(err.to_string().contains("T__PORT"), "{err}");
}

#[test]
fn a_bad_file_value_names_the_file_and_key() {
    let err = Layers::new("T")
        .toml("a.toml", "[redis]\ntimeout_ms = \"x\"")
        .load::<Conf>();
    let msg = err.unwrap_err().to_string();
    assert!(
        msg.contains("redis.timeout_ms") && msg.contains("a.toml"),
        "{msg}"
    );
}

#[test]
fn syntax_errors_name_the_file() {
    let err = Layers::new("T")
        .toml("a.toml", "port = = 1")
        .load::<Conf>()
        .unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }));
    assert!(err.to_string().contains("a.toml"));
}

#[test]
fn a_missing_file_is_an_error() {
    let err = Layers::new("T")
        .file(Some(Path::new("/nonexistent/x.toml")))
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.toml"));
}

#[test]
fn secrets_are_redacted_in_debug() {
    let conf = Conf::default();
    let shown = format!("{conf:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("[redacted]"));
    assert_eq!(conf.password.expose(), "hunter2");
}

/// The example configs in `fixtures/configs/` load (every key known) as their role's config.
#[test]
fn example_configs_load_with_only_known_keys() {
    use crate::miner_side::ProxyConfig;
    use crate::pool_side::{AuditorConfig, MintConfig, PoolConfig};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/configs");
    fn load<T: serde::Serialize + serde::de::DeserializeOwned + Default>(
        path: &std::path::Path,
    ) -> T {
        crate::Layers::new("HASHPOOL_EXAMPLE_UNUSED")
            .file(Some(path))
            .and_then(|l| l.load::<T>())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
    let pool: PoolConfig = load(&dir.join("pool.toml"));
    assert_eq!(pool.min_bits, 20);
    let _: MintConfig = load(&dir.join("mint.toml"));
    let _: AuditorConfig = load(&dir.join("auditor.toml"));
    let proxy: ProxyConfig = load(&dir.join("proxy.toml"));
    assert_eq!(proxy.pool_address, pool.listen);
}
