//! Pool share validation in process, one core: the work the pool does per share before the
//! Redis append (`channels_sv2` validation, amount, record fields). Prints a table.
//! `just bench` (or `cargo bench -p pool --bench share_validation`).

use std::time::Instant;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, ScriptBuf, Target, TxOut};
use ehash::{share_amount, LockingPubkey, ShareRecord};
use pool::gbt::{self, BlockTemplate, GbtTransaction};
use stratum_apps::stratum_core::binary_sv2::B032Owned;
use stratum_apps::stratum_core::channels_sv2::extranonce_manager::ExtranonceAllocator;
use stratum_apps::stratum_core::channels_sv2::server::extended::ExtendedChannel;
use stratum_apps::stratum_core::channels_sv2::server::share_accounting::ShareValidationResult;
use stratum_apps::stratum_core::mining_sv2::SubmitSharesExtendedOwned;

const SHARES: u32 = 200_000;

fn template(transactions: usize) -> BlockTemplate {
    BlockTemplate {
        version: 0x2000_0000,
        previousblockhash: "00000208a18f1a65f23807115caf2d45086db96cc2d0205fff55d75b12d0d84f"
            .into(),
        transactions: (0..transactions)
            .map(|i| GbtTransaction {
                data: String::new(),
                txid: format!("{:064x}", i + 1),
            })
            .collect(),
        coinbasevalue: 50_0000_0000,
        curtime: 1_795_000_000,
        bits: "1e0377ae".into(),
        height: 111,
        default_witness_commitment: Some(format!("6a24aa21a9ed{}", "00".repeat(32))),
        target: format!("00000377ae{}", "00".repeat(27)),
    }
}

fn run(transactions: usize) -> (usize, f64) {
    let converted = gbt::convert(&template(transactions), 1).expect("template converts");
    let mut alloc = ExtranonceAllocator::new(vec![0x48, 0x50], 20, 16).expect("allocator");
    let prefix = alloc.allocate_extended(8).expect("prefix");
    let rollable = u16::from(alloc.rollable_extranonce_size());
    let mut channel = ExtendedChannel::new_for_pool(
        1,
        "bench".into(),
        prefix,
        // The easiest target (and hashrate 0 keeps it): every share is valid.
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
    let payout = ScriptBuf::new_op_return([1u8; 20]);
    let outputs = vec![TxOut {
        value: Amount::from_sat(50_0000_0000),
        script_pubkey: payout,
    }];
    channel
        .on_new_template(converted.template.clone(), outputs)
        .expect("template");
    let job_id = channel
        .get_future_job_id_from_template_id(1)
        .expect("future job");
    channel
        .on_set_new_prev_hash(converted.prev_hash.clone())
        .expect("tip");
    let key: LockingPubkey = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
        .parse()
        .expect("key");
    let extranonce = B032Owned::try_from(vec![0u8; usize::from(rollable)]).expect("extranonce");
    let start = Instant::now();
    let mut fields = 0usize;
    for nonce in 0..SHARES {
        let share = SubmitSharesExtendedOwned {
            channel_id: 1,
            sequence_number: nonce,
            job_id,
            nonce,
            ntime: converted.prev_hash.header_timestamp,
            version: 0x2000_0000,
            extranonce: extranonce.clone(),
        };
        let hash = match channel.validate_share(share) {
            Ok(ShareValidationResult::Valid(h))
            | Ok(ShareValidationResult::BlockFound(h, _, _)) => h,
            Err(e) => panic!("share {nonce} refused: {e:?}"),
        };
        let amount = share_amount(&hash.to_byte_array(), 0).unwrap_or(0);
        let record = ShareRecord {
            share_hash: hash.to_string(),
            template_id: 1,
            channel_id: 1,
            locking_pubkey: key,
            amount,
            ntime: 0,
        };
        fields += record.to_fields().len();
    }
    assert!(fields > 0);
    (
        converted.merkle_path.len(),
        f64::from(SHARES) / start.elapsed().as_secs_f64(),
    )
}

fn main() {
    println!("| template transactions | merkle path levels | shares | shares/s (one core) |");
    println!("|---|---|---|---|");
    for txs in [0usize, 100, 3000] {
        let (levels, rate) = run(txs);
        println!("| {txs} | {levels} | {SHARES} | {rate:.0} |");
    }
}
