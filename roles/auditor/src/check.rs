//! One audit: is this template's block (proof of work aside) one Bitcoin Core would accept,
//! and does its coinbase pay the pool what the pool requires?
//!
//! 1. `getblocktemplate {"mode":"proposal"}` on the task's block: `null` is valid; a reject
//!    string is `invalid` with that string.
//! 2. `inconclusive-not-best-prevblk` (the tip moved before the audit): the template is
//!    `valid` (reason `in-chain`) only if the active chain holds a block at its height on its
//!    parent with exactly its transactions and its coinbase outputs (so Bitcoin Core
//!    validated that content when it connected the block); otherwise it is `invalid` with
//!    reason `inconclusive-not-best-prevblk`. A template nobody verified is never paid.
//! 3. Policy (after a valid consensus check): the coinbase outputs paying the task's
//!    `payout_script` sum to at least `payout_sats`, else `invalid` with reason
//!    `policy: coinbase pays the pool X sat, it requires Y`.
//!
//! A block that does not decode is `invalid` (`undecodable-block`); bitcoind not answering is
//! no verdict at all (the task stays pending and is retried).

use bitcoin::consensus::encode::deserialize;
use bitcoin::{Block, ScriptBuf};
use bitcoind_rpc::{BitcoinRpc, RpcError};
use ehash::{AuditTask, Verdict};
use serde_json::{json, Value};

/// Bitcoin Core's answer for a template whose parent is no longer the tip.
pub const INCONCLUSIVE: &str = "inconclusive-not-best-prevblk";

/// The verdict on a task, or why none could be reached now.
pub async fn audit(rpc: &BitcoinRpc, task: &AuditTask) -> Result<(Verdict, String), RpcError> {
    let block: Block = match hex::decode(&task.block)
        .ok()
        .and_then(|b| deserialize(&b).ok())
    {
        Some(b) => b,
        None => return Ok((Verdict::Invalid, "undecodable-block".into())),
    };
    let answer: Result<Value, RpcError> = rpc
        .call(
            "getblocktemplate",
            &[json!({"mode": "proposal", "data": task.block})],
        )
        .await;
    let (verdict, reason) = match answer {
        Ok(Value::Null) => (Verdict::Valid, "proposal".to_string()),
        Ok(Value::String(s)) if s == INCONCLUSIVE => match in_chain(rpc, task, &block).await? {
            true => (Verdict::Valid, "in-chain".to_string()),
            false => (Verdict::Invalid, INCONCLUSIVE.to_string()),
        },
        Ok(Value::String(s)) => (Verdict::Invalid, s),
        Ok(other) => (
            Verdict::Invalid,
            format!("unexpected proposal answer {other}"),
        ),
        // A JSON-RPC error is bitcoind's answer about this block (for instance -22, block
        // decode failed); a transport error is no answer.
        Err(RpcError::Node { code, message, .. }) => {
            (Verdict::Invalid, format!("rpc error {code}: {message}"))
        }
        Err(e) => return Err(e),
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

/// Whether the active chain holds a block at the task's height on its parent with the same
/// transactions (by wtxid, coinbase aside) and the same coinbase outputs.
async fn in_chain(rpc: &BitcoinRpc, task: &AuditTask, block: &Block) -> Result<bool, RpcError> {
    let hash: String = match rpc.call("getblockhash", &[json!(task.height)]).await {
        Ok(h) => h,
        Err(RpcError::Node { .. }) => return Ok(false), // not that high (yet)
        Err(e) => return Err(e),
    };
    let hex_block: String = rpc.call("getblock", &[json!(hash), json!(0)]).await?;
    let Some(chain) = hex::decode(&hex_block)
        .ok()
        .and_then(|b| deserialize::<Block>(&b).ok())
    else {
        return Ok(false);
    };
    if chain.header.prev_blockhash.to_string() != task.prev_hash
        || chain.txdata.len() != block.txdata.len()
    {
        return Ok(false);
    }
    let same_txs = chain
        .txdata
        .iter()
        .skip(1)
        .zip(block.txdata.iter().skip(1))
        .all(|(a, b)| a.compute_wtxid() == b.compute_wtxid());
    let same_coinbase_outputs = match (chain.txdata.first(), block.txdata.first()) {
        (Some(a), Some(b)) => a.output == b.output,
        _ => false,
    };
    Ok(same_txs && same_coinbase_outputs)
}
