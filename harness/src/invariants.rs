//! The invariant sweep over what a stack wrote, with oracles that stand apart from the code
//! under test:
//!
//! - amounts from the share hash's hex digits ([`expected_amount`], checked against known
//!   block hashes), not from `ehash::share_amount`;
//! - every share record's header rebuilt with rust-bitcoin from its template's audit task
//!   (coinbase extranonce, version, time and nonce substituted) must hash to the recorded
//!   share hash: this checks `template_id`, `ntime`, `version`, `nonce` and `extranonce`;
//! - time and proposal checks by Bitcoin Core: every record's time is above its parent's
//!   median time past, and a sample of shares on the current tip passes
//!   `getblocktemplate {"mode":"proposal"}` (everything but proof of work);
//! - one record per share hash, the tip's seen-hash naming that record's entry, one audit
//!   task per template id, and each record's channel id
//!   and extranonce prefix as the pool announced them to a client (proxy logs, harness
//!   clients).

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, Context};
use bitcoin::block::Version;
use bitcoin::consensus::encode::{deserialize, serialize};
use bitcoin::{Block, ScriptBuf};
use ehash::{AuditTask, ShareRecord, AUDIT_TASKS_STREAM, SHARES_STREAM};
use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::Stack;

/// Shares on the current tip sent to `getblocktemplate` proposal mode per sweep.
pub const PROPOSAL_SAMPLE: usize = 3;

/// Leading zero bits of a block hash written in display order (as explorers print it),
/// counted from its hex digits.
pub fn leading_zero_bits_hex(hash: &str) -> Option<u32> {
    let mut bits = 0;
    for c in hash.chars() {
        let v = c.to_digit(16)?;
        if v == 0 {
            bits += 4;
        } else {
            // A digit 1..=15 has 3, 2, 1 or 0 leading zero bits in its nibble.
            bits += match v {
                1 => 3,
                2..=3 => 2,
                4..=7 => 1,
                _ => 0,
            };
            return Some(bits);
        }
    }
    Some(bits)
}

/// What a share with this hash is worth under hashpool's rule
/// (`2^(zeros - min_bits)`, capped at `2^63`), from the hex digits.
pub fn expected_amount(hash: &str, min_bits: u32) -> Option<u64> {
    let extra = leading_zero_bits_hex(hash)?.checked_sub(min_bits)?;
    Some(1u64 << extra.min(63))
}

/// Every entry of a stream as field maps, in order. The streams the roles trim are read
/// through the harness's copy ([`crate::stream_archive`]): every entry they ever had.
pub async fn stream_entries(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<Vec<(String, HashMap<String, String>)>> {
    if crate::stream_archive::ARCHIVED.contains(&stream) {
        return crate::stream_archive::entries(conn, stream).await;
    }
    crate::stream_archive::in_redis(conn, stream).await
}

/// Every share record of `ehash:shares` with its entry id, in order. A record that does not
/// read is an error unless the mint set it aside: its dead letter in `mint:dead` names the
/// entry (such a record never becomes a quote and is left out).
pub async fn share_records(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<Vec<(String, ShareRecord)>> {
    // The records first: one the mint sets aside meanwhile is in mint:dead when read next.
    let records = stream_entries(conn, SHARES_STREAM).await?;
    let dead: std::collections::HashSet<String> = stream_entries(conn, ehash::MINT_DEAD_STREAM)
        .await?
        .into_iter()
        .filter(|(_, f)| f.get("dead_stream").map(String::as_str) == Some(SHARES_STREAM))
        .filter_map(|(_, mut f)| f.remove("dead_entry"))
        .collect();
    let mut out = Vec::new();
    for (id, fields) in records {
        match ShareRecord::from_fields(&fields) {
            Ok(r) => out.push((id, r)),
            Err(_) if dead.contains(&id) => {}
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "share record {id} does not read, and the mint did not set it aside"
                )))
            }
        }
    }
    Ok(out)
}

/// The block of `record`: its template's audit-task block with the share's extranonce,
/// version, time and nonce.
pub fn share_block(task: &AuditTask, record: &ShareRecord) -> anyhow::Result<Block> {
    share_block_on(&task_block(task)?, record)
}

/// The block of an audit task, decoded.
pub fn task_block(task: &AuditTask) -> anyhow::Result<Block> {
    deserialize(&hex::decode(&task.block)?).context("audit task block")
}

/// [`share_block`] from an already decoded task block.
pub fn share_block_on(block: &Block, record: &ShareRecord) -> anyhow::Result<Block> {
    let mut block = block.clone();
    let extranonce = hex::decode(&record.extranonce)?;
    let coinbase = block.txdata.first_mut().context("block without coinbase")?;
    let input = coinbase
        .input
        .first_mut()
        .context("coinbase without input")?;
    let script = input.script_sig.as_bytes();
    let keep = script
        .len()
        .checked_sub(extranonce.len())
        .context("coinbase scriptSig shorter than the extranonce")?;
    let mut script = script[..keep].to_vec();
    script.extend_from_slice(&extranonce);
    input.script_sig = ScriptBuf::from_bytes(script);
    block.header.version = Version::from_consensus(record.version as i32);
    block.header.time = record.ntime;
    block.header.nonce = record.nonce;
    block.header.merkle_root = block
        .compute_merkle_root()
        .context("merkle root of the share's block")?;
    Ok(block)
}

/// What the sweep found.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Broken invariants, one line each.
    pub problems: Vec<String>,
    /// Share records checked.
    pub records: usize,
    /// Shares Bitcoin Core checked in proposal mode.
    pub proposals: usize,
}

/// Check every `ehash:shares` and `audit:tasks` record of `stack` (see the module docs).
/// `channels` are the (channel id, extranonce prefix hex) pairs the pool announced to the
/// stack's clients, `keys` the locking keys those clients sent.
pub async fn sweep_records(
    stack: &Stack,
    min_bits: u32,
    channels: &[(u32, String)],
    keys: &[ehash::LockingPubkey],
) -> anyhow::Result<SweepReport> {
    let mut report = SweepReport::default();
    let mut conn = stack.redis()?.connect().await?;
    let rpc = stack.bitcoind()?.rpc();

    let mut tasks: BTreeMap<u64, AuditTask> = BTreeMap::new();
    for (id, fields) in stream_entries(&mut conn, AUDIT_TASKS_STREAM).await? {
        let task = AuditTask::from_fields(&fields).with_context(|| format!("audit task {id}"))?;
        if tasks.contains_key(&task.template_id) {
            report.problems.push(format!(
                "template id {} has more than one audit task (entry {id})",
                task.template_id
            ));
        }
        tasks.insert(task.template_id, task);
    }
    let best: String = rpc.call("getbestblockhash", &[]).await?;
    // Templates an auditor found invalid are expected to fail Bitcoin Core's checks.
    let mut invalid = std::collections::HashSet::new();
    for (_, f) in stream_entries(&mut conn, ehash::AUDIT_RESULTS_STREAM).await? {
        if let Ok(r) = ehash::AuditResult::from_fields(&f) {
            if r.verdict == ehash::Verdict::Invalid {
                invalid.insert(r.template_id);
            }
        }
    }
    let mut mtp: HashMap<String, u64> = HashMap::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    // Each task's block decoded once (a declared template's can be megabytes).
    let mut blocks: HashMap<u64, Block> = HashMap::new();
    for (id, r) in share_records(&mut conn).await? {
        report.records += 1;
        if let Some(first) = seen.insert(r.share_hash.clone(), id.clone()) {
            report.problems.push(format!(
                "share {} has two records ({first} and {id})",
                r.share_hash
            ));
        }
        match expected_amount(&r.share_hash, min_bits) {
            Some(a) if a == r.amount => {}
            other => report.problems.push(format!(
                "record {id}: amount {} but hash {} is worth {other:?} at min_bits {min_bits}",
                r.amount, r.share_hash
            )),
        }
        if !keys.contains(&r.locking_pubkey) {
            report.problems.push(format!(
                "record {id}: locking key {} is no client's key",
                r.locking_pubkey
            ));
        }
        if !channels
            .iter()
            .any(|(c, p)| *c == r.channel_id && r.extranonce.starts_with(p.as_str()))
        {
            report.problems.push(format!(
                "record {id}: channel {} with extranonce {} was never announced to a client",
                r.channel_id, r.extranonce
            ));
        }
        let Some(task) = tasks.get(&r.template_id) else {
            report.problems.push(format!(
                "record {id}: template {} has no audit task",
                r.template_id
            ));
            continue;
        };
        let seen_key = ehash::seen_key(&task.prev_hash);
        let seen: Option<String> = conn.hget(&seen_key, &r.share_hash).await?;
        match seen.as_deref().and_then(|v| v.split_once(' ')) {
            Some((entry, _)) if entry == id => {}
            // The whole hash of an old tip expires by design (`seen_after_new_tip_secs` after
            // a new tip, 600 s by default): nothing left to compare for a record that old.
            None if record_age_ms(&id) > SEEN_EXPIRY_MS
                && !conn.exists::<_, bool>(&seen_key).await? => {}
            _ => report.problems.push(format!(
                "record {id}: the seen-hash of its tip says {seen:?} for share {}, not this entry",
                r.share_hash
            )),
        }
        let task_block = match blocks.entry(r.template_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match task_block(task) {
                Ok(b) => e.insert(b),
                Err(err) => {
                    report.problems.push(format!("record {id}: {err:#}"));
                    continue;
                }
            },
        };
        let block = match share_block_on(task_block, &r) {
            Ok(b) => b,
            Err(e) => {
                report.problems.push(format!("record {id}: {e:#}"));
                continue;
            }
        };
        let hash = block.block_hash().to_string();
        if hash != r.share_hash {
            report.problems.push(format!(
                "record {id}: its fields on template {} give block hash {hash}, not the recorded {}",
                r.template_id, r.share_hash
            ));
            continue;
        }
        let parent_mtp = match mtp.get(&task.prev_hash) {
            Some(t) => *t,
            None => {
                let h: Value = match header_on_any_node(stack, &task.prev_hash).await {
                    Ok(Some(h)) => h,
                    // A parent no node of the stack has (a made-up one): its template must
                    // not be paid, so it must have been found invalid. (A parent only the
                    // pool's node forgot, killed before it flushed, is still a real block.)
                    Ok(None) => {
                        if !invalid.contains(&r.template_id) {
                            report.problems.push(format!(
                                "record {id}: template {} builds on {}, a block Bitcoin Core does not know, and has no invalid verdict",
                                r.template_id, task.prev_hash
                            ));
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let t = h["mediantime"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("no mediantime for {}", task.prev_hash))?;
                mtp.insert(task.prev_hash.clone(), t);
                t
            }
        };
        if u64::from(r.ntime) <= parent_mtp {
            report.problems.push(format!(
                "record {id}: ntime {} is not above the parent's median time past {parent_mtp}",
                r.ntime
            ));
        }
        if task.prev_hash == best
            && report.proposals < PROPOSAL_SAMPLE
            && !invalid.contains(&r.template_id)
        {
            let verdict: Value = rpc
                .call(
                    "getblocktemplate",
                    &[json!({"mode": "proposal", "data": hex::encode(serialize(&block))})],
                )
                .await?;
            match verdict {
                Value::Null => report.proposals += 1,
                Value::String(s) if s == "inconclusive-not-best-prevblk" => {}
                other => report.problems.push(format!(
                    "record {id}: Bitcoin Core refuses the share's block: {other}"
                )),
            }
        }
    }
    Ok(report)
}

/// The header of block `hash` from the pool's node, else from an audit node (they follow the
/// pool's node over P2P; a block the pool's node forgot when it was killed before flushing is
/// still there); None if none has it. Operators' nodes are not asked: a fraudulent operator's
/// own block is no proof that the pool's chain had it.
async fn header_on_any_node(stack: &Stack, hash: &str) -> anyhow::Result<Option<Value>> {
    let mut nodes = vec![stack.bitcoind()?];
    for name in stack.auditor_names() {
        nodes.extend(stack.audit_node(&name).ok());
    }
    for node in nodes {
        match node.rpc().call("getblockheader", &[json!(hash)]).await {
            Ok(h) => return Ok(Some(h)),
            Err(bitcoind_rpc::RpcError::Node { code: -5, .. }) => continue,
            Err(e) if node.process().pid().is_none() => {
                tracing::debug!("node down while looking up {hash}: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// The pool's default `seen_after_new_tip_secs`, in ms: a tip's seen-hash may be gone this
/// long after its records were written.
const SEEN_EXPIRY_MS: u64 = 600_000;

/// How old a stream entry is, from its id (`<ms>-<seq>`); 0 if the id does not say.
fn record_age_ms(id: &str) -> u64 {
    let written = id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.saturating_sub(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_bits_of_known_block_hashes() {
        // Bitcoin's genesis block: 00000000 0019d668...: 8 zero digits, then 0 (4) and 1 (3).
        let genesis = "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f";
        assert_eq!(leading_zero_bits_hex(genesis), Some(43));
        // Block 1: 00000000839a8e68...: 8 zero digits then 8 (no zero bit).
        let one = "00000000839a8e6886ab5951d76f411475428afc90947ee320161bbf18eb6048";
        assert_eq!(leading_zero_bits_hex(one), Some(32));
        assert_eq!(expected_amount(genesis, 32), Some(2048));
        assert_eq!(expected_amount(one, 32), Some(1));
        assert_eq!(expected_amount(one, 33), None);
        assert_eq!(expected_amount(&"0".repeat(64), 0), Some(1 << 63));
        assert_eq!(leading_zero_bits_hex("4f"), Some(1));
        assert_eq!(leading_zero_bits_hex("zz"), None);
    }

    #[test]
    fn the_pool_rule_agrees_with_the_hex_oracle_on_known_hashes() {
        for hash in [
            "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f",
            "00000000839a8e6886ab5951d76f411475428afc90947ee320161bbf18eb6048",
            "0000000000000000000130ff4a4ee39a0c78d03e7baf5c5bde5d99e6c0c33b4f",
        ] {
            let mut internal: [u8; 32] = hex::decode(hash).unwrap().try_into().unwrap();
            internal.reverse();
            for min_bits in [16, 32, 40] {
                assert_eq!(
                    ehash::share_amount(&internal, min_bits),
                    expected_amount(hash, min_bits),
                    "{hash} at {min_bits}"
                );
            }
        }
    }
}
