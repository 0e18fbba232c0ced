//! Blocks the harness builds itself with rust-bitcoin, on bitcoind's current tip: a
//! coinbase (BIP34 height, the given payout, the witness commitment) plus the transactions the
//! caller brings, and a fan-out of signed faucet spends to fill a block with real
//! transactions. Used for audit tasks the harness writes (benchmarks, forged templates).

use anyhow::Context;
use bitcoin::absolute::LockTime;
use bitcoin::block::{Header, Version as BlockVersion};
use bitcoin::hashes::Hash;
use bitcoin::script::Builder;
use bitcoin::transaction::Version;
use bitcoin::{
    Amount, Block, BlockHash, CompactTarget, OutPoint, ScriptBuf, Sequence, Transaction, TxIn,
    TxMerkleNode, TxOut, Witness,
};
use serde_json::{json, Value};

use crate::bitcoind::BitcoinRpc;
use crate::faucet::Faucet;

/// Fee each fan-out spend pays.
const SPEND_FEE: Amount = Amount::from_sat(1_000);

/// A block on the current tip with `txs` after the coinbase, which pays `payout` the subsidy
/// plus `fees`. Proof of work is not solved (proposal mode does not check it).
pub async fn block_on_tip(
    rpc: &BitcoinRpc,
    rules: &[&str],
    payout: &ScriptBuf,
    txs: Vec<Transaction>,
    fees: Amount,
) -> anyhow::Result<Block> {
    let gbt: Value = rpc
        .call("getblocktemplate", &[json!({"rules": rules})])
        .await?;
    let height = gbt["height"].as_i64().context("height")?;
    let value = Amount::from_sat(gbt["coinbasevalue"].as_u64().context("coinbasevalue")?) + fees;
    let prev: BlockHash = gbt["previousblockhash"]
        .as_str()
        .context("previousblockhash")?
        .parse()?;
    let bits = u32::from_str_radix(gbt["bits"].as_str().context("bits")?, 16)?;
    let time = gbt["curtime"].as_u64().context("curtime")? as u32;
    let version = gbt["version"].as_i64().context("version")? as i32;
    let coinbase = Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: Builder::new()
                .push_int(height)
                .push_slice(b"harness")
                .into_script(),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[[0u8; 32]]),
        }],
        output: vec![TxOut {
            value,
            script_pubkey: payout.clone(),
        }],
    };
    let mut block = Block {
        header: Header {
            version: BlockVersion::from_consensus(version),
            prev_blockhash: prev,
            merkle_root: TxMerkleNode::all_zeros(),
            time,
            bits: CompactTarget::from_consensus(bits),
            nonce: 0,
        },
        txdata: std::iter::once(coinbase).chain(txs).collect(),
    };
    let witness_root = block.witness_root().context("witness root")?;
    let commitment = Block::compute_witness_commitment(&witness_root, &[0u8; 32]);
    let mut script = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    script.extend_from_slice(commitment.as_byte_array());
    block.txdata[0].output.push(TxOut {
        value: Amount::ZERO,
        script_pubkey: ScriptBuf::from_bytes(script),
    });
    block.header.merkle_root = block.compute_merkle_root().context("merkle root")?;
    Ok(block)
}

/// `n` real transactions for one block: a faucet coin fanned out to `n - 1` outputs, then one
/// spend of each, all signed by the faucet. Returns them (parent first) and their fees.
pub async fn fan_out(
    rpc: &BitcoinRpc,
    faucet: &Faucet,
    n: usize,
) -> anyhow::Result<(Vec<Transaction>, Amount)> {
    anyhow::ensure!(n >= 1, "at least one transaction");
    let children = n - 1;
    let each = Amount::from_sat(100_000);
    let need = each * children as u64 + SPEND_FEE;
    let (coin, value) = faucet.take_coin(rpc, need).await?;
    let own = faucet.address().script_pubkey();
    let mut outputs: Vec<TxOut> = (0..children)
        .map(|_| TxOut {
            value: each,
            script_pubkey: own.clone(),
        })
        .collect();
    outputs.push(TxOut {
        value: value - need,
        script_pubkey: own.clone(),
    });
    let mut parent = Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: coin,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: Witness::new(),
        }],
        output: outputs,
    };
    faucet.sign_input(&mut parent, 0, &own, value)?;
    let txid = parent.compute_txid();
    let mut txs = vec![parent];
    for vout in 0..children {
        let mut child = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint {
                    txid,
                    vout: vout as u32,
                },
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            output: vec![TxOut {
                value: each - SPEND_FEE,
                script_pubkey: own.clone(),
            }],
        };
        faucet.sign_input(&mut child, 0, &own, each)?;
        txs.push(child);
    }
    Ok((txs, SPEND_FEE * (children as u64 + 1)))
}
