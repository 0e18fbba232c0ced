//! The auditor's audit node against a real bitcoind (regtest, instant blocks): templates on
//! an older parent and on a parent a reorganisation left on a stale branch are judged on their
//! content after rewinding the node, which is left exactly as it was; a made-up parent is
//! given up on after the wait. The oracle is Bitcoin Core itself: the same template proposed
//! while its parent was the tip.

use std::time::Duration;

use auditor::{AuditNode, NotYet, Rewind};
use bitcoin::consensus::encode::serialize;
use bitcoin::{Amount, BlockHash};
use harness::blocks::block_on_tip;
use harness::{Chain, HarnessConfig, Stack};
use serde_json::{json, Value};

async fn propose_on_tip(rpc: &harness::bitcoind::BitcoinRpc, hex: &str) -> anyhow::Result<Value> {
    Ok(rpc
        .call(
            "getblocktemplate",
            &[json!({"mode": "proposal", "data": hex})],
        )
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_of_a_gone_tip_are_judged_on_their_content_and_the_node_is_restored() {
    let config = HarnessConfig::load(None).unwrap();
    let mut stack = Stack::builder("audit-rewind", &config)
        .chain(Chain::Regtest)
        .start()
        .await
        .unwrap();
    stack.start_operator_node("audit").await.unwrap();
    stack.start_operator_node("olga").await.unwrap();
    let pool = stack.bitcoind().unwrap().rpc();
    let audit_rpc = stack.operator_node("audit").unwrap().rpc();
    let payout = stack.faucet().unwrap().address().script_pubkey();
    let rules = Chain::Regtest.gbt_rules();

    // Two templates on today's tip: an honest one and one whose coinbase claims 1 sat too many.
    let honest = block_on_tip(pool, rules, &payout, vec![], Amount::ZERO)
        .await
        .unwrap();
    let greedy = block_on_tip(pool, rules, &payout, vec![], Amount::from_sat(1))
        .await
        .unwrap();
    let (honest_hex, greedy_hex) = (
        hex::encode(serialize(&honest)),
        hex::encode(serialize(&greedy)),
    );
    let parent = honest.header.prev_blockhash.to_string();
    // Bitcoin Core's verdicts while the parent is the tip: the oracle.
    assert_eq!(
        propose_on_tip(pool, &honest_hex).await.unwrap(),
        Value::Null
    );
    assert_eq!(
        propose_on_tip(pool, &greedy_hex).await.unwrap(),
        json!("bad-cb-amount")
    );

    // The tip moves on by two blocks; the audit node follows.
    let to = stack.faucet().unwrap().address().clone();
    let mined = stack
        .bitcoind()
        .unwrap()
        .generate_to_address(2, &to)
        .await
        .unwrap();
    stack.wait_all_nodes_at(&mined[1]).await.unwrap();
    assert_eq!(
        propose_on_tip(pool, &honest_hex).await.unwrap(),
        json!("inconclusive-not-best-prevblk")
    );

    let audit = stack.operator_node("audit").unwrap();
    let own_rpc = harness::bitcoind::BitcoinRpc::new(
        &audit.rpc_url(),
        harness::bitcoind::RPC_USER,
        audit.rpc_password(),
    )
    .unwrap();
    let node = AuditNode::new(own_rpc, Rewind::Allowed, Duration::from_secs(2));
    let p = node.propose(&parent, &honest_hex).await.unwrap();
    assert_eq!((p.answer, p.rewound), (Value::Null, 2));
    let p = node.propose(&parent, &greedy_hex).await.unwrap();
    assert_eq!((p.answer, p.rewound), (json!("bad-cb-amount"), 2));
    assert_restored(audit_rpc, &mined[1]).await.unwrap();

    // A reorganisation leaves the newest tip on a stale branch; its templates still audit.
    let on_stale = block_on_tip(pool, rules, &payout, vec![], Amount::ZERO)
        .await
        .unwrap();
    let stale_parent = on_stale.header.prev_blockhash;
    assert_eq!(stale_parent, mined[1]);
    let reorg = stack.reorganise("olga", 1).await.unwrap();
    let new_tip = *reorg.branch.last().unwrap();
    stack.wait_all_nodes_at(&new_tip).await.unwrap();
    let header: Value = audit_rpc
        .call("getblockheader", &[json!(stale_parent.to_string())])
        .await
        .unwrap();
    assert_eq!(header["confirmations"], json!(-1), "the parent is stale");
    let p = node
        .propose(
            &stale_parent.to_string(),
            &hex::encode(serialize(&on_stale)),
        )
        .await
        .unwrap();
    assert_eq!(p.answer, Value::Null);
    assert_eq!(p.rewound, reorg.branch.len() as u64);
    assert_restored(audit_rpc, &new_tip).await.unwrap();

    // A parent nobody has: no verdict, then given up on once the wait is over.
    let mut made_up = honest.clone();
    made_up.header.prev_blockhash = BlockHash::from_raw_hash(
        <bitcoin::hashes::sha256d::Hash as bitcoin::hashes::Hash>::hash(b"x"),
    );
    let made_up_parent = made_up.header.prev_blockhash.to_string();
    let made_up_hex = hex::encode(serialize(&made_up));
    let e = node
        .propose(&made_up_parent, &made_up_hex)
        .await
        .unwrap_err();
    assert!(matches!(e, NotYet::MissingParent(_)), "{e}");
    assert!(node.gives_up_on(&made_up_parent).await.is_none());
    harness::wait::wait_until(
        "the wait for the made-up parent to end",
        Duration::from_secs(10),
        || async {
            let _ = node.propose(&made_up_parent, &made_up_hex).await;
            node.gives_up_on(&made_up_parent)
                .await
                .map(|_| ())
                .ok_or_else(|| "still waiting".to_string())
        },
    )
    .await
    .unwrap();

    // A rewind left half done (a crash between invalidate and reconsider) is undone.
    audit_rpc
        .call::<Value>("setnetworkactive", &[json!(false)])
        .await
        .unwrap();
    audit_rpc
        .call::<Value>("invalidateblock", &[json!(new_tip.to_string())])
        .await
        .unwrap();
    assert_eq!(node.recover().await.unwrap(), 1);
    assert_restored(audit_rpc, &new_tip).await.unwrap();

    stack.shutdown(false).await.unwrap();
}

/// The node is back on `tip`, networking, with nothing marked invalid.
async fn assert_restored(
    rpc: &harness::bitcoind::BitcoinRpc,
    tip: &BlockHash,
) -> anyhow::Result<()> {
    let best: BlockHash = rpc.call("getbestblockhash", &[]).await?;
    anyhow::ensure!(
        &best == tip,
        "the audit node's tip is {best}, expected {tip}"
    );
    let net: Value = rpc.call("getnetworkinfo", &[]).await?;
    anyhow::ensure!(
        net["networkactive"] == json!(true),
        "the audit node's network is off"
    );
    let tips: Vec<Value> = rpc.call("getchaintips", &[]).await?;
    anyhow::ensure!(
        tips.iter().all(|t| t["status"] != "invalid"),
        "tips left invalid: {tips:?}"
    );
    Ok(())
}
