//! Whole blocks from a template and one share: for `submitblock` when the share meets the
//! network target, and for audit tasks (the same block without valid proof of work).

use anyhow::Context;
use bitcoin::block::{Header, Version};
use bitcoin::consensus::encode::{deserialize, serialize, VarInt};
use bitcoin::hashes::Hash;
use bitcoin::{BlockHash, CompactTarget, Transaction, TxMerkleNode};
use bitcoind_rpc::BitcoinRpc;
use serde_json::{json, Value};

use crate::gbt;
use crate::template::TemplateRecord;

/// Header fields a share supplies.
#[derive(Debug, Clone, Copy)]
pub struct ShareHeader {
    /// Block version (after rolling).
    pub version: u32,
    /// Header time.
    pub ntime: u32,
    /// Nonce.
    pub nonce: u32,
}

/// What a block holds besides its coinbase and the share's header fields: a pool template's
/// or a declared job's.
#[derive(Debug, Clone, Copy)]
pub struct BlockBody<'a> {
    /// Parent block hash (internal order).
    pub prev_hash: [u8; 32],
    /// Compact target.
    pub nbits: u32,
    /// Coinbase merkle path (internal order).
    pub merkle_path: &'a [[u8; 32]],
    /// Raw transactions after the coinbase, in block order.
    pub transactions: &'a [Vec<u8>],
}

impl TemplateRecord {
    /// This template's block body.
    pub fn body(&self) -> BlockBody<'_> {
        BlockBody {
            prev_hash: self.prev_hash.prev_hash.to_array(),
            nbits: self.nbits,
            merkle_path: &self.merkle_path,
            transactions: &self.transactions,
        }
    }
}

/// Serialize the block of `body` with this coinbase (full segwit serialization) and header
/// fields. Returns the block bytes and its hash.
pub fn assemble(
    body: BlockBody<'_>,
    share: ShareHeader,
    coinbase: &[u8],
) -> anyhow::Result<(Vec<u8>, BlockHash)> {
    let tx: Transaction = deserialize(coinbase).context("the coinbase does not deserialize")?;
    let txid = tx.compute_txid().to_byte_array();
    let root = gbt::merkle_root(txid, body.merkle_path);
    let header = Header {
        version: Version::from_consensus(share.version as i32),
        prev_blockhash: BlockHash::from_byte_array(body.prev_hash),
        merkle_root: TxMerkleNode::from_byte_array(root),
        time: share.ntime,
        bits: CompactTarget::from_consensus(body.nbits),
        nonce: share.nonce,
    };
    let mut block = serialize(&header);
    block.extend(serialize(&VarInt(1 + body.transactions.len() as u64)));
    block.extend_from_slice(coinbase);
    for t in body.transactions {
        block.extend_from_slice(t);
    }
    Ok((block, header.block_hash()))
}

/// How long a found block bitcoind could not take yet is offered again.
pub const RESUBMIT_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a refusal by [`submit`] may pass: bitcoind did not answer, or answered
/// `inconclusive` without keeping the block (Core's answer for a block whose parent it does
/// not have; a block that lost a race is kept, on a side branch).
pub async fn worth_resubmitting(rpc: &BitcoinRpc, reason: &str, hash: &BlockHash) -> bool {
    if reason.starts_with("rpc: ") {
        return true;
    }
    if reason != "inconclusive" {
        return false;
    }
    match rpc
        .call::<Value>("getblockheader", &[json!(hash.to_string())])
        .await
    {
        Ok(_) => false,
        Err(e) => e.code().is_none_or(|c| c == -5),
    }
}

/// `submitblock`; `Ok` when bitcoind accepted it (or already had it), else the reject reason.
pub async fn submit(rpc: &BitcoinRpc, block: &[u8]) -> Result<(), String> {
    let result: Result<Value, _> = rpc.call("submitblock", &[json!(hex::encode(block))]).await;
    match result {
        Ok(Value::Null) => Ok(()),
        Ok(Value::String(s)) if s == "duplicate" => Ok(()),
        Ok(other) => Err(other
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| other.to_string())),
        Err(e) => Err(format!("rpc: {e}")),
    }
}
