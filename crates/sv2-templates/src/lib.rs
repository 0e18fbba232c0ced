//! `getblocktemplate` -> Stratum V2 `NewTemplate` + `SetNewPrevHash` (no crate does this).
//!
//! - `coinbase_prefix` is only the BIP34 height push; the pool's tag and the extranonces are
//!   added by `channels_sv2`.
//! - `coinbase_tx_outputs` is the witness commitment output (serialized, no count prefix);
//!   the pool's payout output is passed separately as the reward output.
//! - `merkle_path` is the branch of index 0 built from GBT `txid`s (not `hash`), internal
//!   byte order, deepest level first.

use anyhow::{anyhow, Context};
use bitcoin::consensus::encode::serialize;
use bitcoin::hashes::{sha256d, Hash};
use bitcoin::script::{Builder, ScriptBuf};
use bitcoin::{Amount, TxOut};
use serde::Deserialize;
use stratum_apps::stratum_core::binary_sv2::{B0255Owned, B064KOwned, Seq0255Owned, U256Owned};
use stratum_apps::stratum_core::template_distribution_sv2::{
    NewTemplateOwned, SetNewPrevHashOwned,
};

/// The `getblocktemplate` fields the pool uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockTemplate {
    /// Block version.
    pub version: u32,
    /// Tip the template builds on (display order hex).
    pub previousblockhash: String,
    /// Transactions in block order.
    pub transactions: Vec<GbtTransaction>,
    /// Subsidy plus fees, satoshis.
    pub coinbasevalue: u64,
    /// Current time (used as the minimum header time).
    pub curtime: u32,
    /// Smallest valid header time (median time past + 1).
    #[serde(default)]
    pub mintime: u32,
    /// Compact target, hex.
    pub bits: String,
    /// Height of the block.
    pub height: u64,
    /// Witness commitment output script, hex.
    pub default_witness_commitment: Option<String>,
    /// Block target, hex (display order).
    pub target: String,
}

/// One transaction of a template.
#[derive(Debug, Clone, Deserialize)]
pub struct GbtTransaction {
    /// Serialized transaction, hex.
    pub data: String,
    /// Transaction id (display order).
    pub txid: String,
}

/// Internal-order bytes of a display-order 32-byte hex string.
pub fn hash_from_display(hex_str: &str) -> anyhow::Result<[u8; 32]> {
    let mut bytes: [u8; 32] = hex::decode(hex_str)
        .with_context(|| format!("{hex_str:?} is not hex"))?
        .try_into()
        .map_err(|_| anyhow!("{hex_str:?} is not 32 bytes"))?;
    bytes.reverse();
    Ok(bytes)
}

/// Merkle branch of index 0 (the coinbase) over `txids` (internal order, without the coinbase).
pub fn coinbase_merkle_path(txids: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let mut path = Vec::new();
    let mut level: Vec<Option<[u8; 32]>> = std::iter::once(None)
        .chain(txids.iter().copied().map(Some))
        .collect();
    while level.len() > 1 {
        if level.len() % 2 == 1 {
            let last = *level.last().unwrap_or(&None);
            level.push(last);
        }
        if let Some(sibling) = level[1] {
            path.push(sibling);
        }
        level = level
            .chunks(2)
            .map(|pair| match (pair[0], pair[1]) {
                (Some(a), Some(b)) => {
                    let mut buf = [0u8; 64];
                    buf[..32].copy_from_slice(&a);
                    buf[32..].copy_from_slice(&b);
                    Some(sha256d::Hash::hash(&buf).to_byte_array())
                }
                _ => None,
            })
            .collect();
    }
    path
}

/// Fold a coinbase txid (internal order) up a merkle path to the root.
pub fn merkle_root(coinbase_txid: [u8; 32], path: &[[u8; 32]]) -> [u8; 32] {
    path.iter().fold(coinbase_txid, |acc, sibling| {
        let mut buf = [0u8; 64];
        buf[..32].copy_from_slice(&acc);
        buf[32..].copy_from_slice(sibling);
        sha256d::Hash::hash(&buf).to_byte_array()
    })
}

/// A converted template.
#[derive(Debug, Clone)]
pub struct Converted {
    /// `NewTemplate` with `future_template = true`.
    pub template: NewTemplateOwned,
    /// Its `SetNewPrevHash`.
    pub prev_hash: SetNewPrevHashOwned,
    /// Merkle path (internal order).
    pub merkle_path: Vec<[u8; 32]>,
    /// Compact target.
    pub nbits: u32,
}

/// Convert `gbt` into SV2 template messages with id `template_id`.
pub fn convert(gbt: &BlockTemplate, template_id: u64) -> anyhow::Result<Converted> {
    let height = i64::try_from(gbt.height).context("height out of range")?;
    let coinbase_prefix = Builder::new().push_int(height).into_script().into_bytes();
    let mut outputs = Vec::new();
    let mut outputs_count = 0;
    if let Some(commitment) = &gbt.default_witness_commitment {
        let script = ScriptBuf::from_bytes(
            hex::decode(commitment).context("witness commitment is not hex")?,
        );
        outputs = serialize(&TxOut {
            value: Amount::ZERO,
            script_pubkey: script,
        });
        outputs_count = 1;
    }
    let txids = gbt
        .transactions
        .iter()
        .map(|t| hash_from_display(&t.txid))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let merkle_path = coinbase_merkle_path(&txids);
    let path_u256: Vec<U256Owned> = merkle_path.iter().map(|h| U256Owned::from(*h)).collect();
    let nbits =
        u32::from_str_radix(&gbt.bits, 16).with_context(|| format!("bits {:?}", gbt.bits))?;
    let template = NewTemplateOwned {
        template_id,
        future_template: true,
        version: gbt.version,
        coinbase_tx_version: 2,
        coinbase_prefix: B0255Owned::try_from(coinbase_prefix)
            .map_err(|e| anyhow!("coinbase prefix: {e:?}"))?,
        coinbase_tx_input_sequence: u32::MAX,
        coinbase_tx_value_remaining: gbt.coinbasevalue,
        coinbase_tx_outputs_count: outputs_count,
        coinbase_tx_outputs: B064KOwned::try_from(outputs)
            .map_err(|e| anyhow!("coinbase outputs: {e:?}"))?,
        coinbase_tx_locktime: 0,
        merkle_path: Seq0255Owned::new(path_u256).map_err(|e| anyhow!("merkle path: {e:?}"))?,
    };
    let prev_hash = SetNewPrevHashOwned {
        template_id,
        prev_hash: U256Owned::from(hash_from_display(&gbt.previousblockhash)?),
        header_timestamp: gbt.curtime,
        n_bits: nbits,
        target: U256Owned::from(hash_from_display(&gbt.target)?),
    };
    Ok(Converted {
        template,
        prev_hash,
        merkle_path,
        nbits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn merkle_path_matches_a_full_tree() {
        for n in 0..9u8 {
            let txids: Vec<[u8; 32]> = (1..=n).map(h).collect();
            let coinbase = [0xcc; 32];
            // Full tree root the rust-bitcoin way.
            let leaves: Vec<bitcoin::Txid> = std::iter::once(coinbase)
                .chain(txids.iter().copied())
                .map(bitcoin::Txid::from_byte_array)
                .collect();
            let expected = bitcoin::merkle_tree::calculate_root(leaves.into_iter())
                .map(|r: bitcoin::Txid| r.to_byte_array())
                .unwrap_or(coinbase);
            assert_eq!(
                merkle_root(coinbase, &coinbase_merkle_path(&txids)),
                expected,
                "{n} transactions"
            );
        }
    }

    #[test]
    fn bip34_prefix_is_the_height_push() {
        let gbt = BlockTemplate {
            version: 0x2000_0000,
            previousblockhash: "00".repeat(31) + "01",
            transactions: vec![],
            coinbasevalue: 50_0000_0000,
            curtime: 1_700_000_000,
            mintime: 1_699_999_000,
            bits: "1e0377ae".into(),
            height: 102,
            default_witness_commitment: Some(format!("6a24aa21a9ed{}", "00".repeat(32))),
            target: "00000377ae".to_string() + &"00".repeat(27),
        };
        let c = convert(&gbt, 5).unwrap();
        assert_eq!(c.template.coinbase_prefix.as_bytes(), &[0x01, 0x66]);
        assert_eq!(c.template.coinbase_tx_outputs_count, 1);
        assert_eq!(c.nbits, 0x1e0377ae);
        assert_eq!(c.prev_hash.prev_hash.to_array()[0], 1);
        assert!(c.merkle_path.is_empty());
    }
}
