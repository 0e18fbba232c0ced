//! Template fraud: one kind of invalid content at a time, put into an otherwise real
//! `getblocktemplate` answer with rust-bitcoin, so that everything but the one fault is what
//! an honest node would build. The declaring proxy applies a kind before it declares (its
//! `fraud` option); `harness fraud KIND` does the same for a replay by hand.
//!
//! Kinds the pool's inline checks must refuse (no share is ever accepted on them) are marked
//! by [`FraudKind::refused_inline`]; the others reach the auditor, whose Bitcoin Core rejects
//! them with a reason pinned in `fixtures/snapshots`.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context};
use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::transaction::Version;
use bitcoin::{
    Amount, Block, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness,
    WitnessMerkleNode,
};
use sv2_templates::{BlockTemplate, GbtTransaction};

/// One way to make a template invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FraudKind {
    /// A transaction spending an output that does not exist.
    MissingInput,
    /// Two transactions spending the same output (a copy of a template transaction with a
    /// different lock time; needs a transaction in the template).
    DoubleSpend,
    /// The coinbase claims one satoshi more than subsidy plus fees.
    CoinbaseOverclaim,
    /// A transaction whose witness takes the block over the 4,000,000 weight limit.
    OverWeight,
    /// The coinbase's witness commitment does not commit to the transactions.
    WrongWitnessCommitment,
    /// A transaction spending the coinbase of the tip (100 confirmations required).
    ImmatureCoinbaseSpend,
    /// A transaction whose lock time is a future height.
    NonFinal,
    /// The coinbase pays someone else, not the pool (refused by the pool inline).
    NoPoolPayout,
    /// The declaration builds on the block before the tip (refused inline).
    StaleTip,
    /// A job token used for a second declaration (refused inline).
    ReusedToken,
    /// An honest declaration, then a `SetCustomMiningJob` whose coinbase differs from the
    /// declared one (refused inline).
    UndeclaredCoinbase,
}

impl FraudKind {
    /// Every kind.
    pub const ALL: [FraudKind; 11] = [
        FraudKind::MissingInput,
        FraudKind::DoubleSpend,
        FraudKind::CoinbaseOverclaim,
        FraudKind::OverWeight,
        FraudKind::WrongWitnessCommitment,
        FraudKind::ImmatureCoinbaseSpend,
        FraudKind::NonFinal,
        FraudKind::NoPoolPayout,
        FraudKind::StaleTip,
        FraudKind::ReusedToken,
        FraudKind::UndeclaredCoinbase,
    ];

    /// Its name in configs, scenarios and fixtures.
    pub fn as_str(&self) -> &'static str {
        match self {
            FraudKind::MissingInput => "missing-input",
            FraudKind::DoubleSpend => "double-spend",
            FraudKind::CoinbaseOverclaim => "coinbase-overclaim",
            FraudKind::OverWeight => "over-weight",
            FraudKind::WrongWitnessCommitment => "wrong-witness-commitment",
            FraudKind::ImmatureCoinbaseSpend => "immature-coinbase-spend",
            FraudKind::NonFinal => "non-final",
            FraudKind::NoPoolPayout => "no-pool-payout",
            FraudKind::StaleTip => "stale-tip",
            FraudKind::ReusedToken => "reused-token",
            FraudKind::UndeclaredCoinbase => "undeclared-coinbase",
        }
    }

    /// Whether the pool must refuse it when it is declared (before any share).
    pub fn refused_inline(&self) -> bool {
        matches!(
            self,
            FraudKind::NoPoolPayout
                | FraudKind::StaleTip
                | FraudKind::ReusedToken
                | FraudKind::UndeclaredCoinbase
        )
    }

    /// Whether [`apply`] needs [`FraudInputs::tip_coinbase`].
    pub fn needs_tip_coinbase(&self) -> bool {
        matches!(self, FraudKind::ImmatureCoinbaseSpend)
    }
}

impl fmt::Display for FraudKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FraudKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FraudKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FraudKind::ALL.iter().map(FraudKind::as_str).collect();
                format!("unknown fraud kind {s:?}; one of {}", names.join(", "))
            })
    }
}

/// What some kinds need from the node besides the template.
#[derive(Debug, Clone, Default)]
pub struct FraudInputs {
    /// The txid of the tip block's coinbase ([`FraudKind::ImmatureCoinbaseSpend`]).
    pub tip_coinbase: Option<Txid>,
}

/// Script every fraudulent output pays (and the coinbase pays under
/// [`FraudKind::NoPoolPayout`]): P2WSH of `OP_TRUE`.
pub fn anyone_script() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&ScriptBuf::from_bytes(vec![0x51]).wscript_hash())
}

/// A transaction with one input and one output, both given.
fn tx(
    previous_output: OutPoint,
    sequence: Sequence,
    lock_time: LockTime,
    witness: Witness,
) -> Transaction {
    Transaction {
        version: Version::TWO,
        lock_time,
        input: vec![TxIn {
            previous_output,
            script_sig: ScriptBuf::new(),
            sequence,
            witness,
        }],
        output: vec![TxOut {
            value: Amount::from_sat(10_000),
            script_pubkey: anyone_script(),
        }],
    }
}

/// An outpoint nobody created: its txid is a hash of the template's height and `salt`.
fn missing_outpoint(height: u64, salt: u8) -> OutPoint {
    let mut seed = height.to_le_bytes().to_vec();
    seed.extend_from_slice(b"hashpool-harness missing output");
    seed.push(salt);
    OutPoint {
        txid: Txid::from_byte_array(bitcoin::hashes::sha256d::Hash::hash(&seed).to_byte_array()),
        vout: 0,
    }
}

/// The template's transactions, decoded.
pub fn transactions(gbt: &BlockTemplate) -> anyhow::Result<Vec<Transaction>> {
    gbt.transactions
        .iter()
        .map(|t| {
            let raw = hex::decode(&t.data).context("template transaction is not hex")?;
            deserialize(&raw).context("template transaction does not decode")
        })
        .collect()
}

/// Replace the template's transactions, and its witness commitment with theirs.
pub fn set_transactions(gbt: &mut BlockTemplate, txs: &[Transaction]) {
    gbt.transactions = txs
        .iter()
        .map(|t| GbtTransaction {
            data: hex::encode(serialize(t)),
            txid: t.compute_txid().to_string(),
        })
        .collect();
    gbt.default_witness_commitment = Some(hex::encode(witness_commitment(txs).as_bytes()));
}

/// The coinbase witness commitment output script for these transactions (after the
/// coinbase), with the all-zero witness reserved value every template here uses.
pub fn witness_commitment(txs: &[Transaction]) -> ScriptBuf {
    let leaves = std::iter::once(WitnessMerkleNode::all_zeros().to_raw_hash())
        .chain(txs.iter().map(|t| t.compute_wtxid().to_raw_hash()));
    let root = bitcoin::merkle_tree::calculate_root(leaves)
        .map(WitnessMerkleNode::from_raw_hash)
        .unwrap_or_else(WitnessMerkleNode::all_zeros);
    let commitment = Block::compute_witness_commitment(&root, &[0u8; 32]);
    let mut script = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    script.extend_from_slice(commitment.as_byte_array());
    ScriptBuf::from_bytes(script)
}

/// Witness bytes of each of the two transactions that take a block over the weight limit
/// (two, because no decoder takes a single element above 4,000,000 bytes).
const OVERWEIGHT_WITNESS_BYTES: usize = 2_000_100;

/// Put `kind` into `gbt`. Kinds that concern the declaration or the custom job rather than
/// the template ([`FraudKind::NoPoolPayout`], [`FraudKind::ReusedToken`],
/// [`FraudKind::UndeclaredCoinbase`]) leave it unchanged: the declaring side applies them.
pub fn apply(kind: FraudKind, gbt: &mut BlockTemplate, inputs: &FraudInputs) -> anyhow::Result<()> {
    let mut txs = transactions(gbt)?;
    let height = gbt.height;
    match kind {
        FraudKind::MissingInput => txs.push(tx(
            missing_outpoint(height, 0),
            Sequence::MAX,
            LockTime::ZERO,
            Witness::new(),
        )),
        FraudKind::DoubleSpend => {
            let Some(first) = txs.first().cloned() else {
                bail!("double-spend needs a transaction in the template to spend again (the mempool is empty)");
            };
            let mut copy = first;
            // Same inputs, another txid: a lock time in the past keeps it final.
            copy.lock_time = if copy.lock_time == LockTime::ZERO {
                LockTime::from_consensus(1)
            } else {
                LockTime::ZERO
            };
            txs.push(copy);
        }
        FraudKind::CoinbaseOverclaim => gbt.coinbasevalue += 1,
        FraudKind::OverWeight => {
            for salt in [1, 3] {
                txs.push(tx(
                    missing_outpoint(height, salt),
                    Sequence::MAX,
                    LockTime::ZERO,
                    Witness::from_slice(&[vec![0u8; OVERWEIGHT_WITNESS_BYTES]]),
                ));
            }
        }
        FraudKind::WrongWitnessCommitment => {
            set_transactions(gbt, &txs);
            let mut script = witness_commitment(&txs).into_bytes();
            if let Some(last) = script.last_mut() {
                *last ^= 0x01;
            }
            gbt.default_witness_commitment = Some(hex::encode(script));
            return Ok(());
        }
        FraudKind::ImmatureCoinbaseSpend => {
            let txid = inputs
                .tip_coinbase
                .context("immature-coinbase-spend needs the tip's coinbase txid")?;
            txs.push(tx(
                OutPoint { txid, vout: 0 },
                Sequence::MAX,
                LockTime::ZERO,
                Witness::new(),
            ));
        }
        FraudKind::NonFinal => {
            let lock = u32::try_from(height + 10).context("height out of range")?;
            txs.push(tx(
                missing_outpoint(height, 2),
                Sequence::ZERO,
                LockTime::from_consensus(lock),
                Witness::new(),
            ));
        }
        FraudKind::StaleTip => {
            gbt.height = height.checked_sub(1).context("no block before genesis")?;
            return Ok(());
        }
        FraudKind::NoPoolPayout | FraudKind::ReusedToken | FraudKind::UndeclaredCoinbase => {
            return Ok(())
        }
    }
    set_transactions(gbt, &txs);
    Ok(())
}

#[cfg(test)]
mod tests;
