//! One audit: is this template's block (proof of work aside) one Bitcoin Core would accept,
//! and does its coinbase pay the pool what the pool requires?
//!
//! 1. `getblocktemplate {"mode":"proposal"}` on the task's block: `null` is valid; a reject
//!    string is `invalid` with that string. A block the node already has (`duplicate*`: the
//!    template's first share was a block) is proposed again with another nonce, so that its
//!    content is checked rather than its hash looked up.
//! 2. `inconclusive-not-best-prevblk` (the template's parent is not the auditor node's tip):
//!    if that node does not know the parent yet, or the parent is its tip again, there is no
//!    verdict yet (the task stays pending and is retried: the node may lag the pool's).
//!    Otherwise the tip moved on: the template is `valid` (reason `in-chain`) only if the
//!    active chain holds a block at its height on its parent with exactly its transactions,
//!    a coinbase that differs from its own at most in the extranonce (same version, lock
//!    time, sequence, witness, BIP34 height, script_sig length and outputs) and the same
//!    header version outside the BIP320 bits (so Bitcoin Core validated that content when it
//!    connected the block); else it is `invalid` with reason `inconclusive-not-best-prevblk`.
//!    A template nobody verified is never paid.
//! 3. Policy (after a valid consensus check): the coinbase outputs paying the task's
//!    `payout_script` sum to at least `payout_sats`, else `invalid` with reason
//!    `policy: coinbase pays the pool X sat, it requires Y`.
//!
//! A block that does not decode is `invalid` (`undecodable-block`, or bitcoind's -22). Any
//! other failure to get an answer (bitcoind down, slow, warming up) is no verdict at all: the
//! task stays pending and is retried.

use std::time::Duration;

use bitcoin::consensus::encode::deserialize;
use bitcoin::{Block, ScriptBuf};
use bitcoind_rpc::{BitcoinRpc, RpcError};
use ehash::{AuditTask, Verdict};
use serde_json::{json, Value};

/// Bitcoin Core's answer for a template whose parent is no longer the tip.
pub const INCONCLUSIVE: &str = "inconclusive-not-best-prevblk";
/// JSON-RPC code of a block bitcoind cannot decode (a verdict on the block itself).
const RPC_DESERIALIZATION_ERROR: i32 = -22;
/// Longest wait for one bitcoind answer (a 4 MB block takes well under a second).
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Why there is no verdict yet: retry the task later.
#[derive(Debug, thiserror::Error)]
pub enum NotYet {
    /// bitcoind did not answer usefully.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The auditor's node cannot decide yet (its chain lags the pool's).
    #[error("no verdict yet: {0}")]
    Lagging(String),
}

/// The verdict on a task, or why none could be reached now.
pub async fn audit(rpc: &BitcoinRpc, task: &AuditTask) -> Result<(Verdict, String), NotYet> {
    let block: Block = match hex::decode(&task.block)
        .ok()
        .and_then(|b| deserialize(&b).ok())
    {
        Some(b) => b,
        None => return Ok((Verdict::Invalid, "undecodable-block".into())),
    };
    let answer = propose(rpc, &task.block, &block).await;
    let (verdict, reason) = match answer {
        Ok(Value::Null) => (Verdict::Valid, "proposal".to_string()),
        Ok(Value::String(s)) if s == INCONCLUSIVE => match inconclusive(rpc, task, &block).await? {
            true => (Verdict::Valid, "in-chain".to_string()),
            false => (Verdict::Invalid, INCONCLUSIVE.to_string()),
        },
        Ok(Value::String(s)) => (Verdict::Invalid, s),
        Ok(other) => {
            return Err(NotYet::Lagging(format!(
                "unexpected proposal answer {other}"
            )))
        }
        // Only bitcoind's "cannot decode this block" is an answer about the block itself.
        Err(RpcError::Node { code, message, .. }) if code == RPC_DESERIALIZATION_ERROR => {
            (Verdict::Invalid, format!("rpc error {code}: {message}"))
        }
        Err(e) => return Err(e.into()),
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

/// `getblocktemplate` proposal mode on `hex_block`. A block the node already has (the
/// template's first share was itself a block) answers `duplicate*` without checking
/// anything: such a block is proposed again with another nonce (proof of work is not checked,
/// so only its hash changes) to get the node's verdict on its content.
async fn propose(rpc: &BitcoinRpc, hex_block: &str, block: &Block) -> Result<Value, RpcError> {
    let mut data = hex_block.to_string();
    let mut header = block.header;
    for _ in 0..3 {
        let answer: Value = rpc
            .call_timeout(
                "getblocktemplate",
                &[json!({"mode": "proposal", "data": data})],
                RPC_TIMEOUT,
            )
            .await?;
        match &answer {
            Value::String(s) if s.starts_with("duplicate") => {
                header.nonce = header.nonce.wrapping_add(1);
                let header_hex = hex::encode(bitcoin::consensus::encode::serialize(&header));
                data = format!("{header_hex}{}", &hex_block[header_hex.len()..]);
            }
            _ => return Ok(answer),
        }
    }
    Ok(Value::String("duplicate".into()))
}

/// After `inconclusive-not-best-prevblk`: `Err(Lagging)` while the node does not know the
/// parent or has it as its tip again, else whether the active chain holds a block at the
/// task's height on its parent with the same transactions (by wtxid, coinbase aside) and the
/// same coinbase outputs.
async fn inconclusive(rpc: &BitcoinRpc, task: &AuditTask, block: &Block) -> Result<bool, NotYet> {
    let parent: Value = match rpc
        .call_timeout("getblockheader", &[json!(task.prev_hash)], RPC_TIMEOUT)
        .await
    {
        Ok(h) => h,
        Err(RpcError::Node { .. }) => {
            return Err(NotYet::Lagging(format!(
                "the auditor's bitcoind does not know block {} yet",
                task.prev_hash
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let best: String = rpc
        .call_timeout("getbestblockhash", &[], RPC_TIMEOUT)
        .await?;
    if best == task.prev_hash {
        return Err(NotYet::Lagging(
            "the parent became the tip: audit again".into(),
        ));
    }
    if parent["confirmations"].as_i64().unwrap_or(-1) < 0 {
        return Ok(false); // the parent is on a stale branch
    }
    let hash: String = match rpc
        .call_timeout("getblockhash", &[json!(task.height)], RPC_TIMEOUT)
        .await
    {
        Ok(h) => h,
        // The parent is in the active chain and is not the tip, so its child exists; an
        // error here is the node moving under us.
        Err(RpcError::Node { message, .. }) => return Err(NotYet::Lagging(message)),
        Err(e) => return Err(e.into()),
    };
    let hex_block: String = rpc
        .call_timeout("getblock", &[json!(hash), json!(0)], RPC_TIMEOUT)
        .await?;
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
    let same_coinbase = match (chain.txdata.first(), block.txdata.first()) {
        (Some(a), Some(b)) => same_coinbase_but_extranonce(a, b),
        _ => false,
    };
    // Header version bits a miner may roll (BIP320) aside, the same version.
    let rolled = 0x1fff_e000u32 as i32;
    let same_version = chain.header.version.to_consensus() & !rolled
        == block.header.version.to_consensus() & !rolled;
    Ok(same_txs && same_coinbase && same_version)
}

/// Two coinbases that differ at most in the rest of their script_sig after its first push
/// (the BIP34 height): same version, lock time, sequence, witness, outputs and height. What
/// Bitcoin Core checked of one then holds for the other, whatever its extranonce.
fn same_coinbase_but_extranonce(a: &bitcoin::Transaction, b: &bitcoin::Transaction) -> bool {
    let (Some(ia), Some(ib)) = (a.input.first(), b.input.first()) else {
        return false;
    };
    let height = |i: &bitcoin::TxIn| {
        i.script_sig
            .instructions()
            .next()
            .and_then(|x| x.ok())
            .map(|x| format!("{x:?}"))
    };
    a.version == b.version
        && a.lock_time == b.lock_time
        && a.input.len() == 1
        && b.input.len() == 1
        && ia.sequence == ib.sequence
        && ia.witness == ib.witness
        && ia.script_sig.len() == ib.script_sig.len()
        && height(ia).is_some()
        && height(ia) == height(ib)
        && a.output == b.output
}

#[cfg(test)]
mod tests {
    use bitcoin::absolute::LockTime;
    use bitcoin::script::Builder;
    use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness};

    use super::same_coinbase_but_extranonce;

    fn coinbase(height: i64, extranonce: [u8; 4]) -> Transaction {
        let mut script = Builder::new().push_int(height).into_script().into_bytes();
        script.push(4);
        script.extend_from_slice(&extranonce);
        Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: ScriptBuf::from_bytes(script),
                sequence: Sequence::MAX,
                witness: Witness::from_slice(&[vec![0u8; 32]]),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(50),
                script_pubkey: ScriptBuf::new_op_return([1u8; 4]),
            }],
        }
    }

    #[test]
    fn only_the_extranonce_may_differ() {
        let a = coinbase(111, [1, 2, 3, 4]);
        assert!(same_coinbase_but_extranonce(
            &a,
            &coinbase(111, [9, 9, 9, 9])
        ));
        assert!(
            !same_coinbase_but_extranonce(&a, &coinbase(112, [1, 2, 3, 4])),
            "height"
        );
        let mut b = a.clone();
        b.lock_time = LockTime::from_consensus(500);
        assert!(!same_coinbase_but_extranonce(&a, &b), "lock time");
        let mut b = a.clone();
        b.input[0].sequence = Sequence::ZERO;
        assert!(!same_coinbase_but_extranonce(&a, &b), "sequence");
        let mut b = a.clone();
        b.version = bitcoin::transaction::Version::ONE;
        assert!(!same_coinbase_but_extranonce(&a, &b), "version");
        let mut b = a.clone();
        b.input[0].witness = Witness::from_slice(&[vec![1u8; 32]]);
        assert!(!same_coinbase_but_extranonce(&a, &b), "witness");
        let mut b = a.clone();
        b.output[0].value = Amount::from_sat(51);
        assert!(!same_coinbase_but_extranonce(&a, &b), "outputs");
    }
}
