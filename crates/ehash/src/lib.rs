//! Hashpool's shared protocol: what a share is worth, how the ehash extension carries the
//! operator's locking key on Stratum V2, and the records the pool side writes to Redis.
//!
//! Roles and the harness both use this crate, so the pool and the scenarios that check it
//! agree on one definition of every format (pinned by insta snapshots in `fixtures/`).

pub mod amount;
pub mod ids;
pub mod lookup;
pub mod records;
pub mod tlv;

pub use amount::{leading_zero_bits, share_amount, MAX_AMOUNT_EXPONENT};
pub use ids::{seen_key, template_epoch, template_id};
pub use records::{
    AuditResult, AuditTask, FieldRef, RecordError, ShareRecord, TemplateKind, Verdict,
};
pub use tlv::{LockingPubkey, EHASH_EXTENSION_TYPE, LOCKING_PUBKEY_FIELD};

/// Redis stream of accepted shares (pool writes, mint reads).
pub const SHARES_STREAM: &str = "ehash:shares";
/// Redis stream of templates to audit (pool writes, auditor reads).
pub const AUDIT_TASKS_STREAM: &str = "audit:tasks";
/// Redis stream of audit verdicts (auditor writes, mint reads).
pub const AUDIT_RESULTS_STREAM: &str = "audit:results";
/// Redis stream of failed audits kept for people to analyse.
pub const AUDIT_DEAD_STREAM: &str = "audit:dead";
/// Entries the mint can never process (an unreadable share record or verdict), each with its
/// stream, entry id and reason; kept for people, never read by a role.
pub const MINT_DEAD_STREAM: &str = "mint:dead";
