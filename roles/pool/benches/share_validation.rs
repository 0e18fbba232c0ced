//! Pool share validation in process, one core: `channels_sv2`'s `validate_share` alone (the
//! limit) beside the pool's whole per-share path before the Redis append (validation, amount,
//! record, stream fields) on the same template. Prints a table with the ratio.
//! `just bench` (or `cargo bench -p pool --bench share_validation`).

use std::time::Instant;

use bitcoin::{Amount, ScriptBuf, Target, TxOut};
use ehash::LockingPubkey;
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
        mintime: 1_794_999_000,
        bits: "1e0377ae".into(),
        height: 111,
        default_witness_commitment: Some(format!("6a24aa21a9ed{}", "00".repeat(32))),
        target: format!("00000377ae{}", "00".repeat(27)),
    }
}

/// A channel on a converted template of `transactions` transactions, its job id, rollable
/// extranonce size and merkle path length.
fn channel(transactions: usize) -> (ExtendedChannel, u32, u16, usize, u32) {
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
    (
        channel,
        job_id,
        rollable,
        converted.merkle_path.len(),
        converted.prev_hash.header_timestamp,
    )
}

/// Shares per second through `channels_sv2` alone (`pool_path` false) or through the pool's
/// whole per-share path (`pool_path` true: validation, the record, its stream fields and the
/// packed Redis command).
fn run(transactions: usize, pool_path: bool) -> (usize, f64) {
    let (mut channel, job_id, rollable, levels, ntime) = channel(transactions);
    let key: LockingPubkey = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
        .parse()
        .expect("key");
    let prefix = channel.get_extranonce_prefix().to_vec();
    let tip: std::sync::Arc<str> =
        "00000208a18f1a65f23807115caf2d45086db96cc2d0205fff55d75b12d0d84f".into();
    let extranonce = B032Owned::try_from(vec![0u8; usize::from(rollable)]).expect("extranonce");
    let sink = pool::SinkConfig {
        url: String::new(),
        batch_max: 256,
        timeout: std::time::Duration::from_secs(1),
        seen_idle_secs: 604_800,
        seen_after_new_tip_secs: 600,
    };
    let mut pipe = redis::pipe();
    let start = Instant::now();
    let mut fields = 0usize;
    for nonce in 0..SHARES {
        let share = SubmitSharesExtendedOwned {
            channel_id: 1,
            sequence_number: nonce,
            job_id,
            nonce,
            ntime,
            version: 0x2000_0000,
            extranonce: extranonce.clone(),
        };
        let result = channel.validate_share(share.clone());
        let hash = match result {
            Ok(ShareValidationResult::Valid(h))
            | Ok(ShareValidationResult::BlockFound(h, _, _)) => h,
            Err(e) => panic!("share {nonce} refused: {e:?}"),
        };
        if pool_path {
            // What the pool does per accepted share after validation: the record and the
            // Redis command bytes (one pipeline per 256 shares).
            let record = pool::share_record(&hash, 1, key, 0, &share, &prefix).expect("min_bits 0");
            let append = pool::ShareAppend {
                seen_key: tip.clone(),
                record,
                audit: (1, None),
            };
            pool::append_cmd(&mut pipe, &append, 1, &sink);
            if nonce % 256 == 255 {
                fields += pipe.get_packed_pipeline().len();
                pipe = redis::pipe();
            }
        } else {
            fields += 1;
        }
    }
    assert!(fields > 0);
    (levels, f64::from(SHARES) / start.elapsed().as_secs_f64())
}

fn main() {
    println!("| template transactions | merkle path levels | shares | channels_sv2 validate_share/s (the limit) | pool share path/s | ratio (aim >= 0.8) |");
    println!("|---|---|---|---|---|---|");
    for txs in [0usize, 100, 3000] {
        // Interleaved so both see the same machine state.
        let (levels, raw) = run(txs, false);
        let (_, path) = run(txs, true);
        println!(
            "| {txs} | {levels} | {SHARES} | {raw:.0} | {path:.0} | {:.2} |",
            path / raw
        );
    }
}
