//! A forged template for the auditor: a real template of the pool, taken from one of the
//! harness client's accepted shares, with one more transaction that spends an output that
//! does not exist, its witness commitment and merkle root recomputed, and a share on it
//! ground to the pool's minimum. Both are appended through the pool's own Redis function, so
//! the records are exactly what a pool that accepted such a template would write.

use std::time::Duration;

use anyhow::Context;
use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::serialize;
use bitcoin::hashes::Hash;
use bitcoin::transaction::Version;
use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness};
use cucumber::{then, when};
use ehash::{AuditTask, ShareRecord, AUDIT_DEAD_STREAM, AUDIT_TASKS_STREAM, SHARES_STREAM};
use harness::ehash_api;
use harness::invariants::{expected_amount, share_block, stream_entries};
use harness::wait::wait_until;

use super::mining::share_records;
use crate::world::HarnessWorld;

/// The witness commitment output's script prefix (OP_RETURN, push 36, 0xaa21a9ed).
const COMMITMENT_PREFIX: [u8; 6] = [0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];

/// What is wrong with a forged template.
enum Forgery {
    /// One more transaction, spending an output that does not exist.
    MissingInput,
    /// A parent no node has (a made-up previous block hash).
    MadeUpParent,
}

#[when(
    expr = "a template spending a missing output is forged from a share of {string} and appended with the pool's function"
)]
async fn forge_missing_input(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    forge(w, &who, Forgery::MissingInput).await
}

#[when(
    expr = "a template on a made-up parent is forged from a share of {string} and appended with the pool's function"
)]
async fn forge_made_up_parent(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    forge(w, &who, Forgery::MadeUpParent).await
}

async fn forge(w: &mut HarnessWorld, who: &str, forgery: Forgery) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let min_bits = stack.pool()?.config.min_bits;
    let client = w.clients.get(who).context("no such client")?;
    let share = client
        .accepted
        .last()
        .context("the client has no accepted share")?;
    let records = share_records(w).await?;
    let record = records
        .get(&share.hash)
        .context("the share has no record")?
        .clone();
    let mut conn = stack.redis()?.connect().await?;
    let task = stream_entries(&mut conn, AUDIT_TASKS_STREAM)
        .await?
        .into_iter()
        .filter_map(|(_, f)| AuditTask::from_fields(&f).ok())
        .find(|t| t.template_id == record.template_id)
        .context("the share's template has no audit task")?;
    let mut block = share_block(&task, &record)?;
    let mut task = task;
    if let Forgery::MadeUpParent = forgery {
        let made_up = bitcoin::BlockHash::from_byte_array(
            bitcoin::hashes::sha256d::Hash::hash(format!("made up {}", record.nonce).as_bytes())
                .to_byte_array(),
        );
        block.header.prev_blockhash = made_up;
        task.prev_hash = made_up.to_string();
    }
    if let Forgery::MissingInput = forgery {
        block.txdata.push(Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint {
                    txid: Txid::from_byte_array([0x42; 32]),
                    vout: 0,
                },
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(10_000),
                script_pubkey: ScriptBuf::new_op_return([0u8; 4]),
            }],
        });
    }
    let witness_root = block.witness_root().context("witness root")?;
    let commitment = bitcoin::Block::compute_witness_commitment(&witness_root, &[0u8; 32]);
    let coinbase = block.txdata.first_mut().context("no coinbase")?;
    let out = coinbase
        .output
        .iter_mut()
        .find(|o| o.script_pubkey.as_bytes().starts_with(&COMMITMENT_PREFIX))
        .context("the coinbase has no witness commitment")?;
    let mut script = COMMITMENT_PREFIX.to_vec();
    script.extend_from_slice(commitment.as_byte_array());
    out.script_pubkey = ScriptBuf::from_bytes(script);
    block.header.merkle_root = block.compute_merkle_root().context("merkle root")?;
    // A share on it: grind the nonce to the pool's minimum.
    while expected_amount(&block.block_hash().to_string(), min_bits).is_none() {
        block.header.nonce = block.header.nonce.wrapping_add(1);
    }
    let hash = block.block_hash().to_string();
    // An epoch no pool takes (the pool's epochs follow the clock).
    let template_id = ehash::template_id(u32::MAX, std::process::id() ^ record.nonce);
    let forged_task = AuditTask {
        template_id,
        block: hex::encode(serialize(&block)),
        ..task
    };
    let forged = ShareRecord {
        share_hash: hash.clone(),
        template_id,
        amount: expected_amount(&hash, min_bits).context("below min_bits")?,
        nonce: block.header.nonce,
        ..record
    };
    let mut cmd = redis::cmd("FCALL");
    let fields = forged.to_fields();
    cmd.arg("hashpool_append")
        .arg(4)
        .arg(ehash::seen_key(&forged_task.prev_hash))
        .arg(SHARES_STREAM)
        .arg(AUDIT_TASKS_STREAM)
        .arg(ehash::ids::audit_marker_key(template_id))
        .arg(&hash)
        .arg(1)
        .arg(604_800)
        .arg(600)
        .arg(fields.len() * 2);
    for (k, v) in fields.iter().chain(forged_task.to_fields().iter()) {
        cmd.arg(*k).arg(v);
    }
    let answer: redis::Value = cmd.query_async(&mut conn).await?;
    anyhow::ensure!(
        format!("{answer:?}").contains("recorded"),
        "the pool's function answered {answer:?}"
    );
    w.forged = Some((hash, template_id));
    Ok(())
}

#[then(expr = "the forged share's quote for {string} ends FAILED with {string}")]
async fn forged_failed(w: &mut HarnessWorld, who: String, reason: String) -> anyhow::Result<()> {
    forged_failed_with(w, &who, |r| r == reason).await
}

#[then(expr = "the forged share's quote for {string} ends FAILED with a reason starting {string}")]
async fn forged_failed_starting(
    w: &mut HarnessWorld,
    who: String,
    start: String,
) -> anyhow::Result<()> {
    forged_failed_with(w, &who, |r| r.starts_with(&start)).await
}

async fn forged_failed_with(
    w: &HarnessWorld,
    who: &str,
    reason_ok: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let (hash, _) = w.forged.clone().context("nothing forged")?;
    let stack = w.default_stack()?;
    let mint = stack.mint()?;
    let secret = w.clients.get(who).context("no such client")?.secret.clone();
    wait_until(
        "the forged share's quote to be FAILED",
        Duration::from_secs(90),
        || async {
            let quotes = ehash_api::lookup(&mint.addr, &secret)
                .await
                .map_err(|e| e.to_string())?;
            match quotes.iter().find(|q| q.share_hash == hash) {
                Some(q)
                    if q.audit_status == "FAILED"
                        && reason_ok(q.reason.as_deref().unwrap_or(""))
                        && q.state == "UNPAID" =>
                {
                    Ok(())
                }
                Some(q) => Err(format!("{q:?}")),
                None => Err("no quote yet".into()),
            }
        },
    )
    .await?;
    Ok(())
}

#[then(expr = "the forged template's task is in audit:dead with {string}")]
async fn in_dead(w: &mut HarnessWorld, reason: String) -> anyhow::Result<()> {
    let (_, template_id) = w.forged.clone().context("nothing forged")?;
    let mut conn = w.default_stack()?.redis()?.connect().await?;
    let dead = stream_entries(&mut conn, AUDIT_DEAD_STREAM).await?;
    let found = dead.iter().any(|(_, f)| {
        f.get("template_id").map(String::as_str) == Some(template_id.to_string().as_str())
            && f.get("reason") == Some(&reason)
            && f.contains_key("block")
    });
    anyhow::ensure!(
        found,
        "no audit:dead entry for template {template_id} with {reason}: {dead:?}"
    );
    Ok(())
}

#[then(expr = "{string}'s key cannot mint the forged share's quote")]
async fn forged_not_mintable(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let (hash, _) = w.forged.clone().context("nothing forged")?;
    let stack = w.default_stack()?;
    let mint = stack.mint()?;
    let secret = w
        .clients
        .get(&who)
        .context("no such client")?
        .secret
        .clone();
    let quotes = ehash_api::lookup(&mint.addr, &secret).await?;
    let q = quotes
        .into_iter()
        .find(|q| q.share_hash == hash)
        .context("no quote for the forged share")?;
    match ehash_api::try_mint(&mint.url, &q, &secret).await? {
        Err(_) => Ok(()),
        Ok(amount) => anyhow::bail!("the forged share's quote minted {amount} ehash"),
    }
}
