//! Templates through the auditor, printed as tables (release auditor from $HASHPOOL_BIN_DIR;
//! `just bench` builds it): templates per second for blocks of 1, 100 and 1,000 real, signed
//! transactions, as the pool's own (`kind = pool`) beside miner-declared (`kind = declared`)
//! tasks. The auditor judges both the same way (Bitcoin Core's proposal mode, then the payout
//! policy), so the columns should agree; the cost grows with the block. A second table: the
//! same templates audited after the chain moved on 1 and 3 blocks, so that every audit rewinds
//! the auditor's node to the template's parent (and restores it), beside audits on the tip.

use std::time::{Duration, Instant};

use bitcoin::consensus::encode::serialize;
use harness::blocks::{block_on_tip, fan_out};
use harness::{Chain, HarnessConfig, Stack};

/// Templates of `kind` the auditor validates per second for blocks of `txs` real, signed
/// transactions (`tasks` of them, queued before the auditor starts).
async fn auditor_rate(
    config: &HarnessConfig,
    txs: usize,
    kind: ehash::TemplateKind,
    tasks: u32,
    behind: u64,
) -> anyhow::Result<f64> {
    let mut s = Stack::builder(&format!("bench-audit-{txs}-{}", kind.as_str()), config)
        .chain(Chain::Signet)
        .redis()
        .start()
        .await?;
    let rpc = s.bitcoind()?.rpc();
    let payout = s.faucet()?.address().script_pubkey();
    let (extra, fees) = if txs > 1 {
        fan_out(rpc, s.faucet()?, txs - 1).await?
    } else {
        (Vec::new(), bitcoin::Amount::ZERO)
    };
    let block = block_on_tip(rpc, &["segwit", "signet"], &payout, extra, fees).await?;
    anyhow::ensure!(
        block.txdata.len() == txs,
        "{} transactions",
        block.txdata.len()
    );
    let info: serde_json::Value = rpc.call("getblockchaininfo", &[]).await?;
    let task = |i: u32| ehash::AuditTask {
        template_id: ehash::template_id(7, i),
        kind,
        prev_hash: block.header.prev_blockhash.to_string(),
        height: info["blocks"].as_u64().unwrap_or(0) + 1,
        block: hex::encode(serialize(&block)),
        payout_script: hex::encode(payout.as_bytes()),
        payout_sats: 0,
    };
    let mut conn = s.redis()?.connect().await?;
    let mut pipe = redis::pipe();
    for i in 0..tasks {
        let cmd = pipe.cmd("XADD").arg(ehash::AUDIT_TASKS_STREAM).arg("*");
        for (k, v) in task(i).to_fields() {
            cmd.arg(k).arg(v);
        }
        cmd.ignore();
    }
    pipe.query_async::<()>(&mut conn).await?;
    if behind > 0 {
        // The tip moves on: every template's parent is `behind` blocks below the audit node's
        // tip when it is audited.
        let to = s.faucet()?.address().clone();
        s.bitcoind()?.generate_to_address(behind, &to).await?;
    }
    let start = Instant::now();
    s.start_auditor("bench", 2).await?;
    harness::wait::wait_until("every template audited", Duration::from_secs(600), || {
        let mut conn = conn.clone();
        async move {
            let n: u64 = redis::cmd("XLEN")
                .arg(ehash::AUDIT_RESULTS_STREAM)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if n >= u64::from(tasks) {
                Ok(())
            } else {
                Err(format!("{n} verdicts"))
            }
        }
    })
    .await?;
    let rate = f64::from(tasks) / start.elapsed().as_secs_f64();
    if behind > 0 {
        let m = s.auditor("bench")?.metrics().await?;
        let rewound = m.get("hashpool_auditor_rewound_audits_total");
        anyhow::ensure!(
            rewound >= f64::from(tasks),
            "{rewound} of {tasks} audits rewound the node: the bench measured the tip"
        );
    }
    let dead: u64 = redis::cmd("XLEN")
        .arg(ehash::AUDIT_DEAD_STREAM)
        .query_async(&mut conn)
        .await?;
    anyhow::ensure!(
        dead == 0,
        "{dead} templates found invalid: the bench block is broken"
    );
    s.shutdown(false).await?;
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = HarnessConfig::load(None)?;
    println!("| transactions per block | tasks | pool templates/s | declared templates/s |");
    println!("|---|---|---|---|");
    for (txs, tasks) in [(1usize, 200u32), (100, 100), (1000, 30)] {
        let pool = auditor_rate(&config, txs, ehash::TemplateKind::Pool, tasks, 0).await?;
        let declared = auditor_rate(&config, txs, ehash::TemplateKind::Declared, tasks, 0).await?;
        println!("| {txs} | {tasks} | {pool:.0} | {declared:.0} |");
    }
    println!();
    println!("| transactions per block | tasks | on the tip /s | parent 1 block back (rewound) /s | parent 3 blocks back (rewound) /s |");
    println!("|---|---|---|---|---|");
    for (txs, tasks) in [(1usize, 60u32), (100, 30)] {
        let kind = ehash::TemplateKind::Pool;
        let tip = auditor_rate(&config, txs, kind, tasks, 0).await?;
        let one = auditor_rate(&config, txs, kind, tasks, 1).await?;
        let three = auditor_rate(&config, txs, kind, tasks, 3).await?;
        println!("| {txs} | {tasks} | {tip:.0} | {one:.1} | {three:.1} |");
    }
    Ok(())
}
