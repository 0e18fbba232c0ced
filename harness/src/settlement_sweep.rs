//! The settlement part of the invariant sweep, for stacks with a mint. Its oracles are the
//! streams the pool and the auditor wrote (records, verdicts) and what the mint answers to
//! each operator's signed lookup:
//!
//! - every `ehash:shares` record locked to a known key has exactly one quote, with its amount;
//! - nothing is PAID (or minted) for a template without a `valid` verdict;
//! - once settlement has caught up, the PAID amounts equal the amounts of the shares on
//!   templates with a `valid` verdict, key by key;
//! - a quote is FAILED exactly when its template's verdict is `invalid`, with its reason;
//! - no wallet holds more than was paid to its key;
//! - every quote names a recorded share of its key;
//! - a verdict on a template of the current tip agrees with Bitcoin Core's proposal check
//!   (the harness asks again).

use std::collections::HashMap;
use std::time::Duration;

use ehash::{AuditResult, ShareRecord, Verdict, AUDIT_RESULTS_STREAM};

use crate::ehash_api::{lookup, QuoteInfo};
use crate::invariants::stream_entries;
use crate::wait::wait_until;
use crate::Stack;

/// One operator key the sweep knows: its name, public key (hex) and secret (hex).
#[derive(Debug, Clone)]
pub struct KnownKey {
    /// Who holds it (for messages).
    pub name: String,
    /// Public key, hex.
    pub public: String,
    /// Secret key, hex.
    pub secret: String,
    /// Its wallet's held ehash, if it runs one.
    pub wallet_held: Option<u64>,
}

/// Check the settlement invariants of `stack` for `keys`; waits (bounded) for settlement to
/// catch up first. Returns problems, one line each.
pub async fn sweep_settlement(stack: &Stack, keys: &[KnownKey]) -> anyhow::Result<Vec<String>> {
    let mint = stack.mint()?;
    let mut conn = stack.redis()?.connect().await?;
    let mut verdicts: HashMap<u64, AuditResult> = HashMap::new();
    let mut problems = Vec::new();
    for (id, f) in stream_entries(&mut conn, AUDIT_RESULTS_STREAM).await? {
        let r = AuditResult::from_fields(&f).map_err(|e| anyhow::anyhow!("result {id}: {e}"))?;
        if verdicts.insert(r.template_id, r.clone()).is_some() {
            problems.push(format!("template {} has two verdicts", r.template_id));
        }
    }
    problems.extend(recheck_verdicts(stack, &mut conn, &verdicts).await?);
    let delay = Duration::from_secs(mint.config.settlement_delay_secs);
    for key in keys {
        // Settlement catches up: no quote of a valid template left PENDING, a quote for every
        // record. Quotes are read first, then the records: a share recorded just after the
        // miners stopped then has its record in view along with its quote.
        let settled = wait_until(
            &format!("the mint to settle every valid template's quotes of {}", key.name),
            Duration::from_secs(30) + delay,
            || async {
                let quotes = lookup(&mint.addr, &key.secret)
                    .await
                    .map_err(|e| e.to_string())?;
                let mine = records_of(stack, &key.public)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let verdicts = read_verdicts(stack).await.map_err(|e| format!("{e:#}"))?;
                let behind = quotes
                    .iter()
                    .filter(|q| {
                        q.audit_status == "PENDING"
                            && verdicts.get(&q.template_id).map(|v| v.verdict) == Some(Verdict::Valid)
                    })
                    .count();
                let missing = mine.len().saturating_sub(quotes.len());
                if behind == 0 && missing == 0 {
                    Ok((quotes, mine, verdicts))
                } else {
                    Err(format!("{behind} quote(s) of valid templates still PENDING, {missing} record(s) without a quote"))
                }
            },
        )
        .await;
        let (quotes, mine, later) = match settled {
            Ok(q) => q,
            Err(e) => {
                problems.push(format!("{}: {e}", key.name));
                continue;
            }
        };
        problems.extend(check_key(key, &mine, &quotes, &later));
    }
    Ok(problems)
}

/// Every verdict, by template id.
async fn read_verdicts(stack: &Stack) -> anyhow::Result<HashMap<u64, AuditResult>> {
    let mut conn = stack.redis()?.connect().await?;
    let mut out = HashMap::new();
    for (id, f) in stream_entries(&mut conn, AUDIT_RESULTS_STREAM).await? {
        let r = AuditResult::from_fields(&f).map_err(|e| anyhow::anyhow!("result {id}: {e}"))?;
        out.insert(r.template_id, r);
    }
    Ok(out)
}

/// The share records locked to `public`.
async fn records_of(stack: &Stack, public: &str) -> anyhow::Result<Vec<ShareRecord>> {
    let mut conn = stack.redis()?.connect().await?;
    let mut out = Vec::new();
    for (_, r) in crate::invariants::share_records(&mut conn).await? {
        if r.locking_pubkey.to_string() == public {
            out.push(r);
        }
    }
    Ok(out)
}

/// The invariants for one key's records and quotes.
fn check_key(
    key: &KnownKey,
    records: &[ShareRecord],
    quotes: &[QuoteInfo],
    verdicts: &HashMap<u64, AuditResult>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_hash: HashMap<&str, Vec<&QuoteInfo>> = HashMap::new();
    for q in quotes {
        by_hash.entry(q.share_hash.as_str()).or_default().push(q);
    }
    let (mut owed, mut paid) = (0u64, 0u64);
    for r in records {
        match by_hash.get(r.share_hash.as_str()).map(Vec::as_slice) {
            Some([q]) if q.amount == r.amount && q.template_id == r.template_id => {}
            Some([q]) => problems.push(format!(
                "{}: quote {} of share {} says amount {} template {}, the record {} {}",
                key.name, q.quote, r.share_hash, q.amount, q.template_id, r.amount, r.template_id
            )),
            other => problems.push(format!(
                "{}: share {} has {} quote(s), not one",
                key.name,
                r.share_hash,
                other.map(<[_]>::len).unwrap_or(0)
            )),
        }
        if verdicts.get(&r.template_id).map(|v| v.verdict) == Some(Verdict::Valid) {
            owed += r.amount;
        }
    }
    let recorded: std::collections::HashSet<&str> =
        records.iter().map(|r| r.share_hash.as_str()).collect();
    for q in quotes {
        if !recorded.contains(q.share_hash.as_str()) {
            problems.push(format!(
                "{}: quote {} names share {}, which has no record locked to this key",
                key.name, q.quote, q.share_hash
            ));
        }
        let verdict = verdicts.get(&q.template_id);
        let is_paid = q.audit_status == "PAID" || q.state == "PAID" || q.state == "ISSUED";
        match verdict.map(|v| v.verdict) {
            Some(Verdict::Valid) => {}
            Some(Verdict::Invalid) => {
                let reason = verdict.map(|v| v.reason.as_str());
                if q.audit_status != "FAILED" || q.reason.as_deref() != reason {
                    problems.push(format!(
                        "{}: quote {} of an invalid template is {} ({:?}), not FAILED ({reason:?})",
                        key.name, q.quote, q.audit_status, q.reason
                    ));
                }
            }
            None => {}
        }
        if is_paid {
            if verdict.map(|v| v.verdict) != Some(Verdict::Valid) {
                problems.push(format!(
                    "{}: quote {} is {} / {} but template {} has no valid verdict",
                    key.name, q.quote, q.audit_status, q.state, q.template_id
                ));
            }
            paid += q.amount;
        }
    }
    if paid != owed {
        problems.push(format!(
            "{}: {paid} ehash paid, but its shares on valid templates are worth {owed}",
            key.name
        ));
    }
    if let Some(held) = key.wallet_held {
        if held > paid {
            problems.push(format!(
                "{}: the wallet holds {held} ehash, more than the {paid} paid to its key",
                key.name
            ));
        }
    }
    problems
}

/// Ask Bitcoin Core again about every audited template of the current tip: a `valid` verdict
/// must be a block Core accepts in proposal mode, an `invalid` one a block it refuses.
async fn recheck_verdicts(
    stack: &Stack,
    conn: &mut redis::aio::MultiplexedConnection,
    verdicts: &HashMap<u64, AuditResult>,
) -> anyhow::Result<Vec<String>> {
    let rpc = stack.bitcoind()?.rpc();
    let best: String = rpc.call("getbestblockhash", &[]).await?;
    let mut problems = Vec::new();
    for (id, f) in stream_entries(conn, ehash::AUDIT_TASKS_STREAM).await? {
        let task =
            ehash::AuditTask::from_fields(&f).map_err(|e| anyhow::anyhow!("task {id}: {e}"))?;
        let Some(v) = verdicts.get(&task.template_id) else {
            continue;
        };
        if task.prev_hash != best {
            continue;
        }
        let answer: serde_json::Value = rpc
            .call(
                "getblocktemplate",
                &[serde_json::json!({"mode": "proposal", "data": task.block})],
            )
            .await?;
        let core_valid = answer.is_null();
        // The policy part of a verdict (the pool's payout) is not Core's to judge.
        let policy = v.reason.starts_with("policy:");
        if core_valid != (v.verdict == Verdict::Valid) && !policy {
            problems.push(format!(
                "template {}: the verdict is {} ({}) but Bitcoin Core says {answer}",
                task.template_id,
                v.verdict.as_str(),
                v.reason
            ));
        }
    }
    Ok(problems)
}
