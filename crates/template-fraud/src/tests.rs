use super::*;

fn template(txs: &[Transaction]) -> BlockTemplate {
    let mut gbt = BlockTemplate {
        version: 0x2000_0000,
        previousblockhash: "00".repeat(32),
        transactions: Vec::new(),
        coinbasevalue: 5_000_000_000,
        curtime: 1_700_000_000,
        mintime: 1_699_999_000,
        bits: "1e0377ae".into(),
        height: 500,
        default_witness_commitment: None,
        target: "00".repeat(32),
    };
    set_transactions(&mut gbt, txs);
    gbt
}

fn spend(n: u8) -> Transaction {
    tx(
        OutPoint {
            txid: Txid::from_byte_array([n; 32]),
            vout: 1,
        },
        Sequence::MAX,
        LockTime::ZERO,
        Witness::new(),
    )
}

#[test]
fn names_round_trip_and_unknown_names_list_the_kinds() {
    for k in FraudKind::ALL {
        assert_eq!(k.as_str().parse::<FraudKind>(), Ok(k));
    }
    let err = "nope".parse::<FraudKind>().unwrap_err();
    assert!(
        err.contains("double-spend") && err.contains("nope"),
        "{err}"
    );
}

#[test]
fn empty_block_commitment_is_the_well_known_one() {
    // Every block with only a coinbase (and a zero reserved value) commits to this.
    assert_eq!(
        hex::encode(witness_commitment(&[]).as_bytes()),
        "6a24aa21a9ede2f61c3f71d1defd3fa999dfa36953755c690689799962b48bebd836974e8cf9"
    );
}

#[test]
fn each_kind_changes_exactly_what_it_names() {
    let base = template(&[spend(7)]);
    let inputs = FraudInputs {
        tip_coinbase: Some(Txid::from_byte_array([9; 32])),
    };
    for kind in FraudKind::ALL {
        let mut gbt = base.clone();
        apply(kind, &mut gbt, &inputs).unwrap();
        let txs = transactions(&gbt).unwrap();
        match kind {
            FraudKind::MissingInput | FraudKind::NonFinal | FraudKind::ImmatureCoinbaseSpend => {
                assert_eq!(txs.len(), 2, "{kind}");
                assert_eq!(
                    gbt.default_witness_commitment,
                    template(&txs).default_witness_commitment
                );
            }
            FraudKind::DoubleSpend => {
                assert_eq!(txs.len(), 2);
                assert_eq!(
                    txs[0].input[0].previous_output,
                    txs[1].input[0].previous_output
                );
                assert_ne!(txs[0].compute_txid(), txs[1].compute_txid());
            }
            FraudKind::OverWeight => {
                let weight: u64 = txs.iter().map(|t| t.weight().to_wu()).sum();
                assert!(weight > 4_000_000, "{weight}");
                let stripped: usize = txs.iter().map(|t| t.base_size()).sum();
                assert!(stripped * 4 < 4_000_000, "stripped size must stay legal");
            }
            FraudKind::CoinbaseOverclaim => assert_eq!(gbt.coinbasevalue, base.coinbasevalue + 1),
            FraudKind::WrongWitnessCommitment => {
                assert_eq!(txs.len(), 1);
                assert_ne!(
                    gbt.default_witness_commitment,
                    base.default_witness_commitment
                );
            }
            FraudKind::StaleTip => assert_eq!(gbt.height, base.height - 1),
            FraudKind::NoPoolPayout | FraudKind::ReusedToken | FraudKind::UndeclaredCoinbase => {
                assert_eq!(gbt.transactions.len(), 1);
                assert_eq!(gbt.height, base.height);
            }
        }
        if matches!(kind, FraudKind::NonFinal) {
            assert_eq!(txs[1].lock_time, LockTime::from_consensus(510));
            assert_eq!(txs[1].input[0].sequence, Sequence::ZERO);
        }
        if matches!(kind, FraudKind::ImmatureCoinbaseSpend) {
            assert_eq!(
                txs[1].input[0].previous_output.txid,
                Txid::from_byte_array([9; 32])
            );
        }
    }
}

#[test]
fn double_spend_without_a_transaction_says_why() {
    let mut gbt = template(&[]);
    let err = apply(FraudKind::DoubleSpend, &mut gbt, &FraudInputs::default()).unwrap_err();
    assert!(err.to_string().contains("mempool is empty"), "{err}");
}
