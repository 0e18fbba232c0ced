//! The inline checks of a declaration: the cheap ones. The coinbase decodes around the
//! extranonce (which ends its script_sig), is at the height after the pool's tip
//! (`stale-chain-tip`) and pays the pool's payout script at least the block subsidy
//! (`invalid-coinbase-tx`); the transactions decode and are the declared wtxids
//! (`invalid-job`). Everything else is the auditor's.

use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::Transaction;
use stratum_apps::stratum_core::job_declaration_sv2::DeclareMiningJobOwned;

use super::{DeclaredTemplate, DECLARED_EXTRANONCE_LEN};

/// A declared job's checks, in order; `Err` is the SV2 error code and a detail.
pub fn check_declaration(
    m: &DeclareMiningJobOwned,
    txs: &[Vec<u8>],
    tip_height: u64,
    payout: &bitcoin::ScriptBuf,
) -> Result<DeclaredTemplate, (&'static str, String)> {
    let mut coinbase = m.coinbase_tx_prefix.as_bytes().to_vec();
    coinbase.extend(std::iter::repeat_n(0u8, DECLARED_EXTRANONCE_LEN));
    coinbase.extend_from_slice(m.coinbase_tx_suffix.as_bytes());
    let cb: Transaction = deserialize(&coinbase).map_err(|e| {
        (
            "invalid-coinbase-tx",
            format!("the coinbase around a {DECLARED_EXTRANONCE_LEN}-byte extranonce does not decode: {e}"),
        )
    })?;
    // The mined coinbase (channels_sv2's, from `SetCustomMiningJob`) has one input whose
    // script_sig ends with the extranonce: so must the declared one.
    let script_len = cb.input.first().map(|i| i.script_sig.len()).unwrap_or(0);
    let script_end =
        4 + 2 + 1 + 36 + bitcoin::consensus::encode::VarInt(script_len as u64).size() + script_len;
    if cb.input.len() != 1
        || serialize(&cb) != coinbase
        || m.coinbase_tx_prefix.as_bytes().len() + DECLARED_EXTRANONCE_LEN != script_end
    {
        return Err((
            "invalid-coinbase-tx",
            format!("the coinbase must be one segwit input whose script_sig ends with the {DECLARED_EXTRANONCE_LEN}-byte extranonce"),
        ));
    }
    let height = cb
        .input
        .first()
        .and_then(|i| bip34_height(i.script_sig.as_bytes()))
        .ok_or((
            "invalid-coinbase-tx",
            "the coinbase's script_sig does not start with a BIP34 height".to_string(),
        ))?;
    if height != tip_height + 1 {
        return Err((
            "stale-chain-tip",
            format!(
                "coinbase height {height}, the pool's next block is {}",
                tip_height + 1
            ),
        ));
    }
    let required = block_subsidy(height);
    let paid = cb
        .output
        .iter()
        .filter(|o| o.script_pubkey == *payout)
        .try_fold(0u64, |sum, o| sum.checked_add(o.value.to_sat()))
        .ok_or((
            "invalid-coinbase-tx",
            "the coinbase's outputs overflow".to_string(),
        ))?;
    if paid < required {
        return Err((
            "invalid-coinbase-tx",
            format!(
                "the coinbase pays the pool {paid} sat, it requires the block subsidy {required}"
            ),
        ));
    }
    let wtxids = m.wtxid_list.clone().into_inner();
    if wtxids.len() != txs.len() {
        return Err((
            "invalid-job",
            format!(
                "{} transactions for {} declared wtxids",
                txs.len(),
                wtxids.len()
            ),
        ));
    }
    let mut txids = Vec::with_capacity(txs.len());
    for (i, (raw, wtxid)) in txs.iter().zip(&wtxids).enumerate() {
        let tx: Transaction = deserialize(raw).map_err(|e| {
            (
                "invalid-job",
                format!("transaction {i} does not decode: {e}"),
            )
        })?;
        if tx.compute_wtxid().to_byte_array() != wtxid.to_array() {
            return Err((
                "invalid-job",
                format!("transaction {i} is not the declared wtxid"),
            ));
        }
        txids.push(tx.compute_txid().to_byte_array());
    }
    Ok(DeclaredTemplate {
        height,
        version: m.version,
        coinbase_outputs: serialize(&cb.output),
        coinbase: cb,
        transactions: txs.to_vec(),
        merkle_path: sv2_templates::coinbase_merkle_path(&txids),
        payout_sats: required,
    })
}

/// The block subsidy at `height` (mainnet, signet and regtest by default halve every 210,000
/// blocks).
pub fn block_subsidy(height: u64) -> u64 {
    let halvings = height / u64::from(bitcoin::blockdata::constants::SUBSIDY_HALVING_INTERVAL);
    if halvings >= 64 {
        0
    } else {
        (50 * 100_000_000u64) >> halvings
    }
}

/// The height a coinbase script_sig starts with (BIP34: a minimal push of the height, or
/// `OP_1`..`OP_16` for heights 1 to 16).
pub fn bip34_height(script_sig: &[u8]) -> Option<u64> {
    let (&first, rest) = script_sig.split_first()?;
    match first {
        0x51..=0x60 => Some(u64::from(first - 0x50)),
        1..=8 => {
            let bytes = rest.get(..usize::from(first))?;
            if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                return None; // negative
            }
            let mut v = [0u8; 8];
            v[..bytes.len()].copy_from_slice(bytes);
            Some(u64::from_le_bytes(v))
        }
        _ => None,
    }
}
