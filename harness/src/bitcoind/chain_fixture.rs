//! The pre-mined chains as deterministic fixtures: `fixtures/chains/<chain>.blocks` holds the
//! blocks above genesis as hex, one per line. They are built here with rust-bitcoin from fixed
//! inputs only (the faucet's key, a fixed start time, 600 s between blocks, the lowest nonce
//! that meets the target) and loaded into a fresh bitcoind with `submitblock` when a machine's
//! chain cache is built, so every machine, CI runner and demo starts from the same chain, in
//! seconds. Bitcoin Core is the oracle: it validates every block (proof of work included) as it
//! loads them, and a cache is written only once bitcoind's tip is the fixture's. Cache
//! directories are named with a hash of the fixture text, so a changed fixture builds a new one.
//!
//! Regenerate with `just chain-fixtures` (signet needs about 4.8 million hashes per block: a
//! minute or two here); a regenerated fixture changes the cache key, so caches rebuild.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{anyhow, Context};
use bitcoin::absolute::LockTime;
use bitcoin::block::{Header, Version};
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::hashes::{sha256, sha256d, Hash, HashEngine};
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::transaction::{self, OutPoint, Sequence, TxIn, TxOut};
use bitcoin::{Amount, Block, BlockHash, Transaction, TxMerkleNode, Witness};

use super::Chain;

/// Time of the first block above genesis: 2026-01-01T00:00:00Z.
pub const START_TIME: u32 = 1_767_225_600;
/// Seconds between fixture blocks.
pub const SPACING: u32 = 600;
/// Tag in every fixture coinbase.
const COINBASE_TAG: &[u8] = b"hashpool-harness fixture";

/// The fixture text of `chain`, as committed.
pub fn fixture_text(chain: Chain) -> &'static str {
    match chain {
        Chain::Signet => include_str!("../../../fixtures/chains/signet.blocks"),
        Chain::Regtest => include_str!("../../../fixtures/chains/regtest.blocks"),
    }
}

/// The rewards chain's fixture: the blocks above the signet fixture that pay the pool's
/// Lightning node and mature its coinbases (see `crate::lightning::rewards_cache`).
pub const REWARDS_FIXTURE: &str = include_str!("../../../fixtures/chains/signet-rewards.blocks");

/// A competing branch of the rewards chain: it leaves it just before the last reward coinbase
/// and is long enough to mature its own blocks past the rewards chain's tip and the blocks a
/// scenario adds, so a reorganisation onto it removes a matured reward (see
/// `crate::stack::reorg`).
pub const REWARDS_FORK_FIXTURE: &str =
    include_str!("../../../fixtures/chains/signet-rewards-fork.blocks");

/// The committed fixture's blocks, in height order from 1.
pub fn fixture_blocks(chain: Chain) -> anyhow::Result<Vec<Block>> {
    parse(fixture_text(chain), &format!("{chain}.blocks"))
}

/// Blocks of a fixture text, in order.
pub fn parse(text: &str, name: &str) -> anyhow::Result<Vec<Block>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(i, l)| {
            deserialize_hex::<Block>(l.trim())
                .with_context(|| format!("fixtures/chains/{name}: block {}", i + 1))
        })
        .collect()
}

/// A short hash of a fixture text (part of the chain cache keys): any change to a fixture
/// names a new cache.
pub fn text_id(text: &str) -> String {
    let digest = sha256::Hash::hash(text.as_bytes()).to_string();
    digest[..12].to_string()
}

/// [`text_id`] of `chain`'s committed fixture; fails if it holds no blocks.
pub fn fixture_id(chain: Chain) -> anyhow::Result<String> {
    anyhow::ensure!(
        !fixture_blocks(chain)?.is_empty(),
        "fixtures/chains/{chain}.blocks holds no blocks: run `just chain-fixtures`"
    );
    Ok(text_id(fixture_text(chain)))
}

/// Build `count` blocks above `chain`'s genesis, each paying 50 BTC to `payout`.
pub fn build(chain: Chain, count: u32, payout: &bitcoin::ScriptBuf) -> anyhow::Result<Vec<Block>> {
    let genesis = bitcoin::constants::genesis_block(chain.network()).block_hash();
    let subsidy = Amount::from_btc(50.0)?;
    build_above(
        chain,
        genesis,
        1,
        &vec![(payout.clone(), subsidy); count as usize],
    )
}

/// Build one block per entry of `payouts` above block `parent` (at `first_height - 1`), block
/// `i`'s coinbase paying `payouts[i].1` (the subsidy or less: a coinbase may claim less) to
/// `payouts[i].0`. Every fixture block has the genesis difficulty (the chains stay far below
/// the first retarget at 2016) and time `START_TIME + SPACING * (height - 1)`.
pub fn build_above(
    chain: Chain,
    parent: BlockHash,
    first_height: u32,
    payouts: &[(bitcoin::ScriptBuf, Amount)],
) -> anyhow::Result<Vec<Block>> {
    let bits = bitcoin::constants::genesis_block(chain.network())
        .header
        .bits;
    let target = bits.into();
    let mut prev = parent;
    let mut out = Vec::with_capacity(payouts.len());
    for (height, (payout, value)) in (first_height..).zip(payouts) {
        let coinbase = coinbase(height, payout, *value)?;
        let merkle_root = TxMerkleNode::from_raw_hash(coinbase.compute_txid().to_raw_hash());
        let mut header = Header {
            version: Version::from_consensus(0x2000_0000),
            prev_blockhash: prev,
            merkle_root,
            time: START_TIME + SPACING * (height - 1),
            bits,
            nonce: 0,
        };
        header.nonce = lowest_nonce(&header, &target)
            .ok_or_else(|| anyhow!("no nonce meets the target at height {height}"))?;
        prev = header.block_hash();
        out.push(Block {
            header,
            txdata: vec![coinbase],
        });
    }
    Ok(out)
}

/// The fixture file for `blocks`, described by `what`.
pub fn render(what: &str, blocks: &[Block]) -> String {
    let tip = blocks
        .last()
        .map(Block::block_hash)
        .unwrap_or(BlockHash::all_zeros());
    let mut text = format!(
        "# {what}; {} blocks, tip {tip}\n\
         # generated by `just chain-fixtures` (harness/src/bitcoind/chain_fixture.rs): do not edit\n",
        blocks.len()
    );
    for b in blocks {
        text.push_str(&serialize_hex(b));
        text.push('\n');
    }
    text
}

/// The coinbase: BIP34 height, `value` to `payout`, and the BIP141 witness commitment (signet
/// refuses a block without one; with only a coinbase the witness root is all zeros, and the
/// reserved value in the coinbase witness is 32 zero bytes).
fn coinbase(
    height: u32,
    payout: &bitcoin::ScriptBuf,
    value: Amount,
) -> anyhow::Result<Transaction> {
    let tag = PushBytesBuf::try_from(COINBASE_TAG.to_vec()).map_err(|e| anyhow!("{e}"))?;
    let mut committed = [0u8; 64];
    committed[..32].copy_from_slice(&[0u8; 32]); // witness root
    let commitment = sha256d::Hash::hash(&committed); // ... and the reserved value
    let mut script = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    script.extend_from_slice(commitment.as_byte_array());
    Ok(Transaction {
        version: transaction::Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            // BIP34: the height first.
            script_sig: Builder::new()
                .push_int(i64::from(height))
                .push_slice(tag)
                .into_script(),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[[0u8; 32]]),
        }],
        output: vec![
            TxOut {
                value,
                script_pubkey: payout.clone(),
            },
            TxOut {
                value: Amount::ZERO,
                script_pubkey: bitcoin::ScriptBuf::from_bytes(script),
            },
        ],
    })
}

/// The lowest nonce whose header hash meets `target`, searched on every core; the same on any
/// machine because it is the lowest.
fn lowest_nonce(header: &Header, target: &bitcoin::Target) -> Option<u32> {
    const CHUNK: u64 = 1 << 20;
    let bytes = bitcoin::consensus::serialize(header);
    let mut midstate = sha256::HashEngine::default();
    midstate.input(&bytes[..64]);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let best = AtomicU32::new(u32::MAX);
    let found_any = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (best, found_any, midstate, bytes) = (&best, &found_any, &midstate, &bytes);
            s.spawn(move || {
                let mut tail = [0u8; 16];
                tail.copy_from_slice(&bytes[64..80]);
                let mut chunk = t;
                while chunk * CHUNK <= u64::from(u32::MAX) {
                    let start = chunk * CHUNK;
                    if found_any.load(Ordering::Relaxed)
                        && start > u64::from(best.load(Ordering::Relaxed))
                    {
                        return;
                    }
                    let end = (start + CHUNK).min(u64::from(u32::MAX) + 1);
                    for nonce in start..end {
                        let nonce = nonce as u32;
                        tail[12..].copy_from_slice(&nonce.to_le_bytes());
                        let mut e = midstate.clone();
                        e.input(&tail);
                        let first = sha256::Hash::from_engine(e);
                        let hash = sha256d::Hash::from_byte_array(
                            sha256::Hash::hash(first.as_byte_array()).to_byte_array(),
                        );
                        if target.is_met_by(BlockHash::from_raw_hash(hash)) {
                            best.fetch_min(nonce, Ordering::SeqCst);
                            found_any.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                    chunk += threads;
                }
            });
        }
    });
    found_any
        .load(Ordering::SeqCst)
        .then(|| best.load(Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faucet_script(chain: Chain) -> bitcoin::ScriptBuf {
        crate::faucet::p2wpkh_address(&super::super::faucet_secret_key(), chain.network())
            .script_pubkey()
    }

    #[test]
    fn regtest_blocks_rebuild_exactly_as_committed() {
        let committed = fixture_blocks(Chain::Regtest).unwrap();
        assert_eq!(committed.len() as u64, Chain::Regtest.premine_blocks());
        let rebuilt = build(Chain::Regtest, 5, &faucet_script(Chain::Regtest)).unwrap();
        assert_eq!(rebuilt[..], committed[..5]);
    }

    #[test]
    fn fixtures_chain_from_genesis_with_proof_of_work() {
        for chain in [Chain::Regtest, Chain::Signet] {
            let blocks = fixture_blocks(chain).unwrap();
            assert_eq!(blocks.len() as u64, chain.premine_blocks(), "{chain}");
            let mut prev = bitcoin::constants::genesis_block(chain.network()).block_hash();
            for b in &blocks {
                assert_eq!(b.header.prev_blockhash, prev, "{chain}");
                b.header
                    .validate_pow(b.header.target())
                    .expect("proof of work");
                assert!(b.check_merkle_root(), "{chain}");
                assert!(b.check_witness_commitment(), "{chain}");
                assert_eq!(b.txdata[0].output[0].script_pubkey, faucet_script(chain));
                prev = b.block_hash();
            }
        }
    }
}
