//! Identifiers that stay unique for the life of a pool, across restarts, and the Redis keys
//! that keep share hashes unique.
//!
//! - **Template ids** are `epoch << 32 | sequence`. The pool takes a new epoch from Redis at
//!   every start (`INCR` on [`EPOCH_KEY`], raised to the Unix time in seconds if that is
//!   larger, so a wiped Redis still gives a larger epoch than any earlier start), and numbers
//!   its templates 1, 2, ... within that start. Two starts never share an epoch, so no
//!   template id is ever reused.
//! - **Share hashes** are recorded at most once: the pool appends a share record only if the
//!   hash is absent from the hash [`seen_key`] of the share's tip, in one Redis function with
//!   the `XADD`. The field's value is `<stream entry id> <append token>`, or [`REFUSED_MARK`]
//!   when the pool fenced off an append whose outcome it did not learn. A record is written
//!   only once its template's audit task is in ([`audit_marker_key`]).

/// Redis key holding the last pool epoch.
pub const EPOCH_KEY: &str = "ehash:pool:epoch";

/// Prefix of the per-tip hashes of seen share hashes.
pub const SEEN_KEY_PREFIX: &str = "ehash:seen:";

/// Prefix of the per-template markers that say the template's audit task is in.
pub const AUDIT_MARKER_PREFIX: &str = "ehash:audited:";

/// Prefix of the per-template markers that say the template's verdict was written.
pub const VERDICT_MARKER_PREFIX: &str = "audit:verdict:";

/// Value of a share hash that was fenced off (refused) rather than recorded.
pub const REFUSED_MARK: &str = "refused";

/// The template id of the `sequence`-th template of pool epoch `epoch`.
pub fn template_id(epoch: u32, sequence: u32) -> u64 {
    (u64::from(epoch) << 32) | u64::from(sequence)
}

/// The pool epoch a template id was issued in.
pub fn template_epoch(template_id: u64) -> u32 {
    (template_id >> 32) as u32
}

/// Redis key of the share hashes seen on the tip `prev_hash` (display order hex).
pub fn seen_key(prev_hash: &str) -> String {
    format!("{SEEN_KEY_PREFIX}{prev_hash}")
}

/// Redis key marking that template `template_id`'s audit task was appended.
pub fn audit_marker_key(template_id: u64) -> String {
    format!("{AUDIT_MARKER_PREFIX}{template_id}")
}

/// Redis key marking that template `template_id`'s verdict was written (once).
pub fn verdict_marker_key(template_id: u64) -> String {
    format!("{VERDICT_MARKER_PREFIX}{template_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_ids_of_different_epochs_never_collide() {
        // Known values, not the function applied twice.
        assert_eq!(template_id(1, 1), 0x0000_0001_0000_0001);
        assert_eq!(template_id(1_795_000_000, 7), 7_709_466_296_320_000_007);
        assert_eq!(template_epoch(7_709_466_296_320_000_007), 1_795_000_000);
        assert_ne!(template_id(2, 1), template_id(1, u32::MAX));
    }
}
