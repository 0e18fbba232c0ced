//! One audit: is this template's block (proof of work aside) one Bitcoin Core would accept,
//! and does its coinbase pay the pool what the pool requires?
//!
//! 1. `getblocktemplate {"mode":"proposal"}` on the task's block, on the audit node's tip when
//!    the template's parent is that tip, else on the audit node rewound to the parent
//!    ([`crate::node`]): whether the template is audited at once or after its tip is gone
//!    (auditor stopped, slow or backlogged, or a reorganisation), its verdict is Core's on its
//!    content. `null` is valid (reason `proposal`, or `proposal after rewinding N block(s)`);
//!    a reject string is `invalid` with that string (followed by ` (after rewinding N
//!    block(s))` when the node was rewound).
//! 2. A parent the audit node does not have yet: no verdict (the task stays pending and is
//!    retried: the node may lag the pool's); once the node has waited `unknown_parent_wait_ms`
//!    for it in this process, `invalid` with reason `unknown-parent: ...` (a made-up prev hash
//!    is never paid, and never blocks the stream).
//! 3. Policy (after a valid consensus check): the coinbase outputs paying the task's
//!    `payout_script` sum to at least `payout_sats`, else `invalid` with reason
//!    `policy: coinbase pays the pool X sat, it requires Y`.
//!
//! A block that does not decode is `invalid` (`undecodable-block`, or bitcoind's -22). Any
//! other failure to get an answer (bitcoind down, slow, warming up) is no verdict at all: the
//! task stays pending and is retried.

use bitcoin::consensus::encode::deserialize;
use bitcoin::{Block, ScriptBuf};
use bitcoind_rpc::RpcError;
use ehash::{AuditTask, Verdict};
use serde_json::Value;

use crate::node::{AuditNode, NotYet};

/// Bitcoin Core's answer for a template whose parent is no longer the tip.
pub const INCONCLUSIVE: &str = "inconclusive-not-best-prevblk";
/// The reason of a template whose parent the audit node never learned.
pub const UNKNOWN_PARENT: &str = "unknown-parent";
/// JSON-RPC code of a block bitcoind cannot decode (a verdict on the block itself).
const RPC_DESERIALIZATION_ERROR: i32 = -22;

/// The verdict on a task, or why none could be reached now.
pub async fn audit(node: &AuditNode, task: &AuditTask) -> Result<(Verdict, String), NotYet> {
    let block: Block = match hex::decode(&task.block)
        .ok()
        .and_then(|b| deserialize(&b).ok())
    {
        Some(b) => b,
        None => return Ok((Verdict::Invalid, "undecodable-block".into())),
    };
    let proposal = match node.propose(&task.prev_hash, &task.block).await {
        Ok(p) => p,
        // Only bitcoind's "cannot decode this block" is an answer about the block itself.
        Err(NotYet::Rpc(RpcError::Node { code, message, .. }))
            if code == RPC_DESERIALIZATION_ERROR =>
        {
            return Ok((Verdict::Invalid, format!("rpc error {code}: {message}")))
        }
        Err(e @ NotYet::MissingParent(_)) => {
            return match node.gives_up_on(&task.prev_hash).await {
                Some(waited) => Ok((
                    Verdict::Invalid,
                    format!(
                        "{UNKNOWN_PARENT}: the audit node did not get block {} in {} s ({e})",
                        task.prev_hash,
                        waited.as_secs()
                    ),
                )),
                None => Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let how = match proposal.rewound {
        0 => String::new(),
        n => format!("after rewinding {n} block{}", if n == 1 { "" } else { "s" }),
    };
    let (verdict, reason) = match proposal.answer {
        Value::Null if how.is_empty() => (Verdict::Valid, "proposal".to_string()),
        Value::Null => (Verdict::Valid, format!("proposal {how}")),
        // Answers about the node, not the block: the tip moved under the proposal, or the
        // block's hash stayed known however its nonce was changed.
        Value::String(s) if s.starts_with("inconclusive") || s.starts_with("duplicate") => {
            return Err(NotYet::Lagging(format!(
                "Bitcoin Core answered {s:?}{}: no verdict on the content, audited again",
                if how.is_empty() { String::new() } else { format!(" {how}") }
            )))
        }
        Value::String(s) if how.is_empty() => (Verdict::Invalid, s),
        Value::String(s) => (Verdict::Invalid, format!("{s} ({how})")),
        other => {
            return Err(NotYet::Lagging(format!(
                "Bitcoin Core answered the proposal with {other}, neither null nor a reject reason: audited again"
            )))
        }
    };
    if verdict == Verdict::Invalid {
        return Ok((verdict, reason));
    }
    let payout = ScriptBuf::from_bytes(hex::decode(&task.payout_script).unwrap_or_default());
    let paid: u64 = block
        .txdata
        .first()
        .map(|cb| {
            cb.output
                .iter()
                .filter(|o| o.script_pubkey == payout)
                .map(|o| o.value.to_sat())
                .sum()
        })
        .unwrap_or(0);
    if paid < task.payout_sats {
        return Ok((
            Verdict::Invalid,
            format!(
                "policy: coinbase pays the pool {paid} sat, it requires {}",
                task.payout_sats
            ),
        ));
    }
    Ok((verdict, reason))
}
