use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::serialize;
use bitcoin::script::Builder;
use bitcoin::transaction::Version;
use bitcoin::{OutPoint, ScriptBuf, Sequence, TxIn, Txid, Witness};
use stratum_apps::stratum_core::binary_sv2::U256Owned;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, Transaction, TxOut};

use super::*;

fn payout() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&ScriptBuf::from_bytes(vec![0x51]).wscript_hash())
}

fn spend(n: u8) -> Transaction {
    Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint {
                txid: Txid::from_byte_array([n; 32]),
                vout: 0,
            },
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[vec![n; 3]]),
        }],
        output: vec![TxOut {
            value: Amount::from_sat(1000),
            script_pubkey: payout(),
        }],
    }
}

/// A declaration: coinbase at `height` paying `to` `sats`, with `txs` (declared wtxids
/// taken from `declared`).
fn declaration(
    height: i64,
    to: ScriptBuf,
    sats: u64,
    declared: &[Transaction],
) -> DeclareMiningJobOwned {
    let mut script_sig = Builder::new().push_int(height).into_script().into_bytes();
    script_sig.push(DECLARED_EXTRANONCE_LEN as u8);
    script_sig.extend(std::iter::repeat_n(0u8, DECLARED_EXTRANONCE_LEN));
    let cb = Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: ScriptBuf::from_bytes(script_sig),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[vec![0u8; 32]]),
        }],
        output: vec![TxOut {
            value: Amount::from_sat(sats),
            script_pubkey: to,
        }],
    };
    let raw = serialize(&cb);
    // The extranonce is the 20 zero bytes ending the script_sig, before the sequence.
    let script_end = 4 + 2 + 1 + 36 + 1 + cb.input[0].script_sig.len();
    let (prefix, rest) = raw.split_at(script_end - DECLARED_EXTRANONCE_LEN);
    let suffix = &rest[DECLARED_EXTRANONCE_LEN..];
    DeclareMiningJobOwned {
        request_id: 1,
        mining_job_token: vec![1u8; 16].try_into().unwrap(),
        version: 0x2000_0000,
        coinbase_tx_prefix: prefix.to_vec().try_into().unwrap(),
        coinbase_tx_suffix: suffix.to_vec().try_into().unwrap(),
        wtxid_list: Seq064KOwned::new(
            declared
                .iter()
                .map(|t| U256Owned::from(t.compute_wtxid().to_byte_array()))
                .collect(),
        )
        .unwrap(),
        excess_data: Vec::new().try_into().unwrap(),
    }
}

fn raw(txs: &[Transaction]) -> Vec<Vec<u8>> {
    txs.iter().map(serialize).collect()
}

const SUBSIDY: u64 = 5_000_000_000;

#[test]
fn bip34_heights_decode_like_script_numbers() {
    assert_eq!(bip34_height(&[0x51]), Some(1));
    assert_eq!(bip34_height(&[0x60]), Some(16));
    assert_eq!(bip34_height(&[0x01, 0x6f]), Some(111));
    assert_eq!(bip34_height(&[0x02, 0x80, 0x00]), Some(128));
    assert_eq!(bip34_height(&[0x03, 0x40, 0x0d, 0x03]), Some(200_000));
    assert_eq!(bip34_height(&[0x01, 0x80]), None, "negative");
    assert_eq!(
        bip34_height(&[0x02, 0x01]),
        None,
        "push longer than the script"
    );
    assert_eq!(bip34_height(&[]), None);
    for h in [17i64, 127, 255, 256, 65_535, 840_000] {
        let script = Builder::new().push_int(h).into_script();
        assert_eq!(bip34_height(script.as_bytes()), Some(h as u64), "{h}");
    }
}

#[test]
fn an_honest_declaration_gives_its_merkle_path_and_the_required_payout() {
    let txs = [spend(1), spend(2)];
    let m = declaration(111, payout(), SUBSIDY + 500, &txs);
    let t = check_declaration(&m, &raw(&txs), 110, &payout()).unwrap();
    assert_eq!(t.height, 111);
    assert_eq!(t.payout_sats, SUBSIDY);
    let txids: Vec<[u8; 32]> = txs
        .iter()
        .map(|t| t.compute_txid().to_byte_array())
        .collect();
    assert_eq!(t.merkle_path, sv2_templates::coinbase_merkle_path(&txids));
    assert_eq!(t.transactions, raw(&txs));
}

#[test]
fn declarations_are_refused_with_the_spec_codes() {
    let txs = [spend(1)];
    let code = |m: &DeclareMiningJobOwned, given: &[Vec<u8>], tip: u64| {
        check_declaration(m, given, tip, &payout()).unwrap_err().0
    };
    let honest = declaration(111, payout(), SUBSIDY, &txs);
    assert_eq!(
        code(&honest, &raw(&txs), 111),
        "stale-chain-tip",
        "declared on the previous tip"
    );
    assert_eq!(
        code(&honest, &raw(&txs), 109),
        "stale-chain-tip",
        "a height ahead"
    );
    let elsewhere = declaration(111, ScriptBuf::new_op_return([1u8; 4]), SUBSIDY, &txs);
    assert_eq!(code(&elsewhere, &raw(&txs), 110), "invalid-coinbase-tx");
    let short = declaration(111, payout(), SUBSIDY - 1, &txs);
    assert_eq!(code(&short, &raw(&txs), 110), "invalid-coinbase-tx");
    assert_eq!(
        code(&honest, &raw(&[spend(9)]), 110),
        "invalid-job",
        "another transaction"
    );
    assert_eq!(
        code(&honest, &[], 110),
        "invalid-job",
        "missing transaction"
    );
    assert_eq!(
        code(&honest, &[vec![0xde, 0xad]], 110),
        "invalid-job",
        "undecodable"
    );
    let mut garbled = honest.clone();
    garbled.coinbase_tx_suffix = vec![0u8; 3].try_into().unwrap();
    assert_eq!(code(&garbled, &raw(&txs), 110), "invalid-coinbase-tx");
}

#[test]
fn tokens_are_used_once() {
    let book = JobBook::default();
    let token = book.allocate(1);
    assert!(
        !book.take_allocated(&token, 2),
        "another connection's token"
    );
    assert!(book.take_allocated(&token, 1));
    assert!(!book.take_allocated(&token, 1), "a reused allocation token");
    let txs = [spend(1)];
    let m = declaration(111, payout(), SUBSIDY, &txs);
    let t = check_declaration(&m, &raw(&txs), 110, &payout()).unwrap();
    let declared = book.declare(t, 1).unwrap();
    assert!(book.take_declared(&declared).is_some());
    assert!(
        book.take_declared(&declared).is_none(),
        "a reused job token"
    );
    assert!(
        book.take_declared(&token).is_none(),
        "an allocation token is not a job token"
    );
}

#[test]
fn a_connection_cannot_crowd_out_others() {
    let book = JobBook::default();
    let txs = [spend(1)];
    let m = declaration(111, payout(), SUBSIDY, &txs);
    let one = || check_declaration(&m, &raw(&txs), 110, &payout()).unwrap();
    let other = book.declare(one(), 2).unwrap();
    let mine: Vec<_> = (0..book::MAX_DECLARED_PER_CONNECTION)
        .map(|_| book.declare(one(), 1).unwrap())
        .collect();
    // One more forgets the connection's own oldest, never another connection's.
    let newest = book
        .declare(one(), 1)
        .expect("a full connection still declares");
    assert!(
        book.take_declared(&mine[0]).is_none(),
        "its oldest was forgotten"
    );
    assert!(book.take_declared(&mine[1]).is_some());
    assert!(book.take_declared(&newest).is_some());
    assert!(
        book.take_declared(&other).is_some(),
        "another connection's is kept"
    );
    // Tokens: a connection's extra allocations forget only its own oldest.
    let theirs = book.allocate(3);
    for _ in 0..=book::MAX_TOKENS_PER_CONNECTION {
        book.allocate(1);
    }
    assert!(book.take_allocated(&theirs, 3));
}

#[test]
fn the_extranonce_must_end_the_script_sig() {
    let txs = [spend(1)];
    let mut m = declaration(111, payout(), SUBSIDY, &txs);
    // Move the split point one byte earlier: the zeros land inside the script_sig.
    let mut prefix = m.coinbase_tx_prefix.as_bytes().to_vec();
    let last = prefix.pop().unwrap();
    let mut suffix = vec![last];
    suffix.extend_from_slice(m.coinbase_tx_suffix.as_bytes());
    suffix.remove(1);
    m.coinbase_tx_prefix = prefix.try_into().unwrap();
    m.coinbase_tx_suffix = suffix.try_into().unwrap();
    let err = check_declaration(&m, &raw(&txs), 110, &payout()).unwrap_err();
    assert_eq!(err.0, "invalid-coinbase-tx", "{err:?}");
}
