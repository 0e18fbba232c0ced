//! `[streams]` of the roles that read Redis streams (mint, auditor): trimming what every
//! reader has acknowledged, and a bound on the role's dead letters.

use serde::{Deserialize, Serialize};

/// Most dead letters a role may be told to keep.
pub const MAX_DEAD_LETTERS: u64 = 1_000_000_000;
const DAY_SECS: u64 = 24 * 3600;

/// `[streams]`: keeping the Redis streams a role reads, and its dead letters, bounded.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `readers` | `[]` | other consumer groups that must also acknowledge an entry before it is trimmed (the role's own group always must); a listed group that does not exist holds trimming |
/// | `trim_interval_secs` | 10 | how often acknowledged entries are trimmed; 0: never |
/// | `trim_min_age_secs` | 60 | entries younger than this are kept even when acknowledged |
/// | `dead_letters_max` | 10000 (auditor 1000) | most entries kept in the role's dead-letter stream; the oldest go first, counted in `hashpool_<role>_dead_letters_dropped_total` |
///
/// An entry a listed group has not acknowledged is never trimmed: a share record the mint
/// has not read is unpaid work. So a stopped reader holds its stream, which grows until the
/// reader comes back or Redis reaches `maxmemory` (then the pool refuses shares with
/// `ehash-record-unavailable`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct StreamsSection {
    /// Groups besides the role's own that must acknowledge an entry before it is trimmed.
    pub readers: Vec<String>,
    /// Trim period, seconds; 0 turns trimming off.
    pub trim_interval_secs: u64,
    /// Acknowledged entries younger than this are kept, seconds.
    pub trim_min_age_secs: u64,
    /// Most entries kept in the role's dead-letter stream.
    pub dead_letters_max: u64,
}

impl Default for StreamsSection {
    fn default() -> Self {
        Self {
            readers: Vec::new(),
            trim_interval_secs: 10,
            trim_min_age_secs: 60,
            dead_letters_max: 10_000,
        }
    }
}

impl StreamsSection {
    /// Refuse values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(bad) = self
            .readers
            .iter()
            .find(|g| g.is_empty() || g.chars().any(char::is_whitespace))
        {
            return Err(format!(
                "`streams.readers` holds {bad:?}: a group name is not empty and has no spaces"
            ));
        }
        if !(1..=MAX_DEAD_LETTERS).contains(&self.dead_letters_max) {
            return Err(format!(
                "`streams.dead_letters_max` must be 1..={MAX_DEAD_LETTERS}, got {}",
                self.dead_letters_max
            ));
        }
        if self.trim_interval_secs > DAY_SECS || self.trim_min_age_secs > 30 * DAY_SECS {
            return Err(
                "`streams.trim_interval_secs` must be at most a day and `streams.trim_min_age_secs` at most 30 days"
                    .into(),
            );
        }
        Ok(())
    }

    /// The groups that must acknowledge an entry before it goes: `own`, then the readers.
    pub fn groups(&self, own: &str) -> Vec<String> {
        let mut groups = vec![own.to_string()];
        groups.extend(self.readers.iter().filter(|g| *g != own).cloned());
        groups
    }
}
