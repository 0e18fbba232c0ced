//! The pool's inline job declaration checks in process, one core: `check_declaration` (the
//! coinbase decoded, its height and payout checked, every transaction decoded and matched to
//! its declared wtxid, the merkle path built) for declarations of 1, 100 and 1,000
//! transactions, beside `channels_sv2`'s `validate_share` measured in the same run. A
//! declaration is checked once per template, a share once per share; the table prints both.
//! `just bench` (or `cargo bench -p pool --bench declaration`).

use std::time::Instant;

use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::serialize;
use bitcoin::hashes::Hash;
use bitcoin::transaction::Version;
use bitcoin::{
    Amount, OutPoint, ScriptBuf, Sequence, Target, Transaction, TxIn, TxOut, Txid, Witness,
};
use pool::gbt::{self, BlockTemplate, GbtTransaction};
use pool::jd::{check_declaration, DECLARED_EXTRANONCE_LEN};
use stratum_apps::stratum_core::binary_sv2::{B032Owned, Seq064KOwned, U256Owned};
use stratum_apps::stratum_core::channels_sv2::extranonce_manager::ExtranonceAllocator;
use stratum_apps::stratum_core::channels_sv2::server::extended::ExtendedChannel;
use stratum_apps::stratum_core::channels_sv2::server::jobs::factory::JobFactory;
use stratum_apps::stratum_core::job_declaration_sv2::DeclareMiningJobOwned;
use stratum_apps::stratum_core::mining_sv2::SubmitSharesExtendedOwned;

/// A P2WPKH-sized spend (one input with a 2-element witness, two outputs).
fn spend(i: u32) -> Transaction {
    let mut txid = [0u8; 32];
    txid[..4].copy_from_slice(&i.to_le_bytes());
    Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint {
                txid: Txid::from_byte_array(txid),
                vout: 0,
            },
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[vec![0x30; 72], vec![0x02; 33]]),
        }],
        output: vec![
            TxOut {
                value: Amount::from_sat(10_000),
                script_pubkey: ScriptBuf::new_op_return([i as u8; 20]),
            },
            TxOut {
                value: Amount::from_sat(20_000),
                script_pubkey: ScriptBuf::new_op_return([1u8; 20]),
            },
        ],
    }
}

fn template(txs: &[Transaction]) -> BlockTemplate {
    BlockTemplate {
        version: 0x2000_0000,
        previousblockhash: "00000208a18f1a65f23807115caf2d45086db96cc2d0205fff55d75b12d0d84f"
            .into(),
        transactions: txs
            .iter()
            .map(|t| GbtTransaction {
                data: hex::encode(serialize(t)),
                txid: t.compute_txid().to_string(),
            })
            .collect(),
        coinbasevalue: 50_0000_0000,
        curtime: 1_795_000_000,
        mintime: 1_794_999_000,
        bits: "1e0377ae".into(),
        height: 111,
        default_witness_commitment: Some(format!("6a24aa21a9ed{}", "00".repeat(32))),
        target: format!("00000377ae{}", "00".repeat(27)),
    }
}

/// A declaration of `n` transactions as a declaring proxy builds it (`JobFactory`).
fn declaration(n: u32, payout: &ScriptBuf) -> (DeclareMiningJobOwned, Vec<Vec<u8>>) {
    let txs: Vec<Transaction> = (0..n).map(spend).collect();
    let converted = gbt::convert(&template(&txs), 1).expect("converts");
    let outputs = vec![TxOut {
        value: Amount::from_sat(50_0000_0000),
        script_pubkey: payout.clone(),
    }];
    let (prefix, suffix) = JobFactory::new(true, None, None)
        .new_coinbase_tx_prefix_and_suffix(converted.template, outputs, DECLARED_EXTRANONCE_LEN)
        .expect("coinbase");
    let m = DeclareMiningJobOwned {
        request_id: 1,
        mining_job_token: vec![1u8; 16].try_into().expect("token"),
        version: 0x2000_0000,
        coinbase_tx_prefix: prefix.try_into().expect("prefix"),
        coinbase_tx_suffix: suffix.try_into().expect("suffix"),
        wtxid_list: Seq064KOwned::new(
            txs.iter()
                .map(|t| U256Owned::from(t.compute_wtxid().to_byte_array()))
                .collect(),
        )
        .expect("wtxids"),
        excess_data: Vec::new().try_into().expect("empty"),
    };
    (m, txs.iter().map(serialize).collect())
}

/// `validate_share` per second on a template without transactions.
fn shares_per_sec() -> f64 {
    const SHARES: u32 = 100_000;
    let converted = gbt::convert(&template(&[]), 1).expect("converts");
    let mut alloc = ExtranonceAllocator::new(vec![0x48, 0x50], 20, 16).expect("allocator");
    let prefix = alloc.allocate_extended(8).expect("prefix");
    let rollable = u16::from(alloc.rollable_extranonce_size());
    let mut channel = ExtendedChannel::new_for_pool(
        1,
        "bench".into(),
        prefix,
        Target::from_le_bytes([0xff; 32]),
        0.0,
        true,
        rollable,
        1,
        1.0e9,
        "hashpool".into(),
        None,
    )
    .expect("channel");
    let outputs = vec![TxOut {
        value: Amount::from_sat(50_0000_0000),
        script_pubkey: ScriptBuf::new_op_return([1u8; 20]),
    }];
    channel
        .on_new_template(converted.template, outputs)
        .expect("template");
    let job_id = channel.get_future_job_id_from_template_id(1).expect("job");
    channel
        .on_set_new_prev_hash(converted.prev_hash.clone())
        .expect("tip");
    let extranonce = B032Owned::try_from(vec![0u8; usize::from(rollable)]).expect("extranonce");
    let start = Instant::now();
    for nonce in 0..SHARES {
        channel
            .validate_share(SubmitSharesExtendedOwned {
                channel_id: 1,
                sequence_number: nonce,
                job_id,
                nonce,
                ntime: converted.prev_hash.header_timestamp,
                version: 0x2000_0000,
                extranonce: extranonce.clone(),
            })
            .expect("valid");
    }
    f64::from(SHARES) / start.elapsed().as_secs_f64()
}

fn main() {
    let payout = ScriptBuf::new_op_return([7u8; 20]);
    let shares = shares_per_sec();
    println!("| declared transactions | declarations checked | check_declaration/s | validate_share/s, same run | shares per declaration check |");
    println!("|---|---|---|---|---|");
    for (n, rounds) in [(1u32, 20_000u32), (100, 1_000), (1_000, 100)] {
        let (m, raw) = declaration(n, &payout);
        let start = Instant::now();
        for _ in 0..rounds {
            let t = check_declaration(&m, &raw, 110, &payout).expect("accepted");
            assert_eq!(t.transactions.len(), n as usize);
        }
        let rate = f64::from(rounds) / start.elapsed().as_secs_f64();
        println!(
            "| {n} | {rounds} | {rate:.0} | {shares:.0} | {:.1} |",
            shares / rate
        );
    }
}
