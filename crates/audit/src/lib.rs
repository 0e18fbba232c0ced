//! The audit contract: what makes a template's verdict `valid` or `invalid`
//! ([`check`]), and the audit node it is checked on ([`node`]). The auditor role runs it on
//! every template that got a share; the harness replays recorded fraud through it. Neither
//! reaches into the other: both depend on this crate.

mod check;
pub mod node;

pub use check::{audit, INCONCLUSIVE, UNKNOWN_PARENT};
pub use node::{AuditNode, NotYet, Proposal, Rewind};
