//! Fraud by hand: `harness fraud KIND` builds a fraudulent template on a node's tip (as the
//! declaring proxy's `fraud` option does) and writes it as an audit task; `harness audit FILE`
//! prints the auditor's verdict on a saved task (one the fraud scenarios save, an `audit:dead`
//! entry, or one `harness fraud` wrote). Tasks are JSON objects of the `audit:tasks` fields.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context};
use bitcoin::absolute::LockTime;
use bitcoin::block::{Header, Version};
use bitcoin::consensus::encode::serialize;
use bitcoin::hashes::Hash;
use bitcoin::script::Builder;
use bitcoin::{
    Amount, Block, BlockHash, CompactTarget, OutPoint, ScriptBuf, Sequence, Transaction, TxIn,
    TxMerkleNode, TxOut, Witness,
};
use bitcoind_rpc::BitcoinRpc;
use ehash::{AuditTask, TemplateKind, Verdict};
use serde_json::json;
use sv2_templates::BlockTemplate;
use template_fraud::{FraudInputs, FraudKind};

/// Read a task saved as JSON (the record's fields; extra fields such as `reason` are ignored).
pub fn read_task(path: &Path) -> anyhow::Result<AuditTask> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the task file {}", path.display()))?;
    let fields: HashMap<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON object of task fields", path.display()))?;
    let fields: HashMap<String, String> = fields
        .into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, s)
        })
        .collect();
    AuditTask::from_fields(&fields).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Write a task as JSON (its record's fields).
pub fn write_task(path: &Path, task: &AuditTask) -> anyhow::Result<()> {
    let fields: HashMap<&str, String> = task.to_fields().into_iter().collect();
    std::fs::write(path, serde_json::to_vec_pretty(&fields)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The auditor's verdict on `task` from the node behind `rpc`, which is never rewound (it is
/// a stack's own node): a task whose parent is not that node's tip gets no verdict, an error
/// that says why.
pub async fn audit(rpc: BitcoinRpc, task: &AuditTask) -> anyhow::Result<(Verdict, String)> {
    let node = auditor::AuditNode::new(
        rpc,
        auditor::Rewind::Never,
        std::time::Duration::from_secs(60),
    );
    auditor::audit(&node, task)
        .await
        .map_err(|e| anyhow!("no verdict: {e}"))
}

/// The coinbase of a template paying `to` its whole value, with the BIP34 height, an
/// extranonce of zeros and the template's witness commitment.
fn coinbase(gbt: &BlockTemplate, to: ScriptBuf) -> anyhow::Result<Transaction> {
    let height = i64::try_from(gbt.height).context("height out of range")?;
    let mut script_sig = Builder::new().push_int(height).into_script().into_bytes();
    script_sig.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut output = vec![TxOut {
        value: Amount::from_sat(gbt.coinbasevalue),
        script_pubkey: to,
    }];
    if let Some(c) = &gbt.default_witness_commitment {
        output.push(TxOut {
            value: Amount::ZERO,
            script_pubkey: ScriptBuf::from_bytes(hex::decode(c)?),
        });
    }
    Ok(Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: ScriptBuf::from_bytes(script_sig),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[vec![0u8; 32]]),
        }],
        output,
    })
}

/// A `kind` template on the tip of the node behind `rpc`, paying `payout` (the pool's script)
/// as a declared audit task with id `template_id`. Kinds the pool refuses inline are built
/// too (their task never reaches the auditor in a running pool).
pub async fn fraud_task(
    rpc: &BitcoinRpc,
    signet: bool,
    kind: FraudKind,
    payout: ScriptBuf,
    template_id: u64,
) -> anyhow::Result<AuditTask> {
    let rules = if signet {
        json!(["segwit", "signet"])
    } else {
        json!(["segwit"])
    };
    let mut gbt: BlockTemplate = rpc
        .call("getblocktemplate", &[json!({ "rules": rules })])
        .await?;
    let tip: serde_json::Value = rpc
        .call("getblock", &[json!(gbt.previousblockhash), json!(1)])
        .await?;
    let inputs = FraudInputs {
        tip_coinbase: tip["tx"][0].as_str().and_then(|s| s.parse().ok()),
    };
    let height = gbt.height;
    template_fraud::apply(kind, &mut gbt, &inputs)?;
    let to = if kind == FraudKind::NoPoolPayout {
        template_fraud::anyone_script()
    } else {
        payout.clone()
    };
    let mut txdata = vec![coinbase(&gbt, to)?];
    txdata.extend(template_fraud::transactions(&gbt)?);
    let mut block = Block {
        header: Header {
            version: Version::from_consensus(gbt.version as i32),
            prev_blockhash: gbt.previousblockhash.parse::<BlockHash>()?,
            merkle_root: TxMerkleNode::all_zeros(),
            time: gbt.curtime,
            bits: CompactTarget::from_consensus(u32::from_str_radix(&gbt.bits, 16)?),
            nonce: 0,
        },
        txdata,
    };
    block.header.merkle_root = block.compute_merkle_root().context("merkle root")?;
    Ok(AuditTask {
        template_id,
        kind: TemplateKind::Declared,
        prev_hash: gbt.previousblockhash.clone(),
        height,
        block: hex::encode(serialize(&block)),
        payout_script: hex::encode(payout.as_bytes()),
        payout_sats: block_subsidy(height),
    })
}

/// The block subsidy at `height` (halving every 210,000 blocks).
fn block_subsidy(height: u64) -> u64 {
    let halvings = height / 210_000;
    if halvings >= 64 {
        0
    } else {
        5_000_000_000u64 >> halvings
    }
}
