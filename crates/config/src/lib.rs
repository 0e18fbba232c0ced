//! Layered configuration for hashpool-harness roles and tools.
//!
//! A configuration is built in three layers, each overriding the one before:
//!
//! 1. the type's [`Default`] (every default is a named constant in the owning crate),
//! 2. an optional TOML file,
//! 3. environment variables `PREFIX__SECTION__KEY=value` (double underscore between levels,
//!    keys case-insensitive; the value is read as a TOML scalar or array, else as a string).
//!
//! Unknown keys are refused (a typo never silently falls back to a default), and a value of
//! the wrong type names the key and the layer it came from, file or environment variable.
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Conf { port: u16, name: String }
//! impl Default for Conf { fn default() -> Self { Conf { port: 1, name: "a".into() } } }
//!
//! let env = vec![("DEMO__PORT".to_string(), "7".to_string())];
//! let conf: Conf = hashpool_config::Layers::new("DEMO")
//!     .toml("example.toml", "name = \"b\"")
//!     .env(env)
//!     .load()
//!     .unwrap();
//! assert_eq!((conf.port, conf.name.as_str()), (7, "b"));
//! ```

pub mod miner_side;
pub mod pool_side;
pub mod role_main;
mod secret;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use toml::{Table, Value};

pub use secret::Secret;

/// Why a configuration could not be loaded. Every message names the key or file to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {origin} is not valid TOML: {message}")]
    Syntax {
        /// Where the text came from.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Keys that no field of the configuration accepts.
    #[error("unknown config key(s): {}; remove them or fix their spelling", .keys.join(", "))]
    UnknownKeys {
        /// Each unknown key as `path (origin)`.
        keys: Vec<String>,
    },
    /// A key has a value of the wrong type or range.
    #[error("invalid value for config key `{key}` (from {origin}): {message}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// The file or environment variable that set it.
        origin: String,
        /// What was wrong.
        message: String,
    },
    /// The defaults themselves could not be represented (a bug in the config type).
    #[error("config defaults cannot be serialized: {0}")]
    Defaults(String),
}

/// Builder for one configuration load: defaults, then TOML, then environment.
#[derive(Debug, Clone)]
pub struct Layers {
    env_prefix: String,
    toml: Option<(String, String)>,
    env: Option<Vec<(String, String)>>,
}

impl Layers {
    /// Start a load whose environment variables start with `env_prefix` followed by `__`.
    pub fn new(env_prefix: &str) -> Self {
        Self {
            env_prefix: env_prefix.to_string(),
            toml: None,
            env: None,
        }
    }

    /// Add a TOML document, named `origin` in error messages.
    pub fn toml(mut self, origin: &str, text: &str) -> Self {
        self.toml = Some((origin.to_string(), text.to_string()));
        self
    }

    /// Add a TOML file; `None` adds nothing.
    pub fn file(self, path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Ok(self),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(self.toml(&path.display().to_string(), &text))
            }
        }
    }

    /// Use these variables instead of the process environment (tests, embedding).
    pub fn env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env = Some(vars.into_iter().collect());
        self
    }

    /// Merge the layers over `T::default()` and deserialize, refusing unknown keys.
    pub fn load<T: Serialize + DeserializeOwned + Default>(self) -> Result<T, ConfigError> {
        let defaults =
            Value::try_from(T::default()).map_err(|e| ConfigError::Defaults(e.to_string()))?;
        let Value::Table(mut merged) = defaults else {
            return Err(ConfigError::Defaults(
                "the config type is not a table".into(),
            ));
        };
        let defaults = merged.clone();
        let mut origins = Origins::default();

        if let Some((origin, text)) = &self.toml {
            let file: Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
            origins.file = Some(origin.clone());
            merge(&mut merged, file);
        }

        let vars = self.env.unwrap_or_else(|| std::env::vars().collect());
        let prefix = format!("{}__", self.env_prefix);
        for (var, raw) in vars {
            let Some(rest) = var.strip_prefix(&prefix) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::Invalid {
                    key: rest.to_string(),
                    origin: format!("environment variable {var}"),
                    message: "empty path segment (use one `__` between levels)".into(),
                });
            }
            let value = env_value(&raw, lookup(&defaults, &path));
            set_path(&mut merged, &path, value).map_err(|message| ConfigError::Invalid {
                key: path.join("."),
                origin: format!("environment variable {var}"),
                message,
            })?;
            origins.env.push((path.join("."), var));
        }

        let mut unknown = BTreeSet::new();
        let mut record = |p: serde_ignored::Path<'_>| {
            unknown.insert(p.to_string());
        };
        let de = serde_ignored::Deserializer::new(Value::Table(merged), &mut record);
        let result: Result<T, _> = serde_path_to_error::deserialize(de);
        if !unknown.is_empty() {
            let keys = unknown
                .iter()
                .map(|k| format!("{k} ({})", origins.of(k)))
                .collect();
            return Err(ConfigError::UnknownKeys { keys });
        }
        result.map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                origin: origins.of(&key),
                message: e.into_inner().to_string(),
                key,
            }
        })
    }
}

/// Which layer set which key, for error messages.
#[derive(Default)]
struct Origins {
    file: Option<String>,
    env: Vec<(String, String)>,
}

impl Origins {
    fn of(&self, key: &str) -> String {
        if let Some((_, var)) = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| key == k || key.starts_with(&format!("{k}.")))
        {
            return format!("environment variable {var}");
        }
        match &self.file {
            Some(file) => format!("file {file}"),
            None => "defaults".into(),
        }
    }
}

impl fmt::Debug for Origins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origins").field("file", &self.file).finish()
    }
}

fn merge(into: &mut Table, from: Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(existing)), Value::Table(new)) => merge(existing, new),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

fn lookup<'a>(table: &'a Table, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(first)?;
    match (rest.is_empty(), value) {
        (true, v) => Some(v),
        (false, Value::Table(t)) => lookup(t, rest),
        _ => None,
    }
}

/// Read an environment value as TOML, unless the default at that key is a string.
fn env_value(raw: &str, default: Option<&Value>) -> Value {
    if matches!(default, Some(Value::String(_))) {
        return Value::String(raw.to_string());
    }
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        return Err("empty key".into());
    };
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| Value::Table(Table::new()));
    match entry {
        Value::Table(t) => set_path(t, rest, value),
        _ => Err(format!("`{first}` is a value, not a section")),
    }
}

#[cfg(test)]
mod tests;
