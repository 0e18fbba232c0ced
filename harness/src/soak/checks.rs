//! The soak's checker: once the nemesis has stopped and everything is healed, judge what the
//! stack's clients saw (the wallets, the redemptions' answers) and its independent oracles
//! (Bitcoin Core, Core Lightning's `listpays`, the Redis streams) — never a role's own
//! tables read back.

use super::history::History;
use super::profile::Profile;
use super::schedule::{Fault, Replay};
use super::workload::RedemptionRecord;
use crate::stack_sweep::{proxy_keys, sweep_stack, Check, SweepInputs};
use crate::Stack;

fn check(name: &str, problems: Vec<String>, summary: String) -> Check {
    Check::from_problems(name, summary, problems)
}

/// The errors of fault events `what` (`apply` or `undo`) that `pick` selects, a line each.
fn fault_errors(history: &History, what: &str, pick: impl Fn(&str) -> bool) -> Vec<String> {
    history
        .faults
        .iter()
        .filter(|f| f.what == what && pick(&f.fault))
        .filter_map(|f| {
            f.result
                .as_ref()
                .err()
                .map(|e| format!("{} (fault {}): {e}", f.fault, f.index))
        })
        .collect()
}

/// Every check, in the order the report lists them.
pub async fn run(
    stack: &Stack,
    profile: Profile,
    history: &History,
    heal_problems: Vec<String>,
    redemptions: &[RedemptionRecord],
) -> Vec<Check> {
    let mut checks = Vec::new();
    // A start during the run may fail while a dependency is down (the fault table shows
    // it); what counts is that the heal brought every process back.
    let mut not_applied = fault_errors(history, "apply", |_| true);
    let applies: Vec<&str> = history
        .faults
        .iter()
        .filter(|f| f.what == "apply")
        .filter_map(|f| f.result.as_deref().ok())
        .collect();
    let worked = applies.iter().filter(|r| !r.starts_with("skipped")).count();
    let attempted = history.faults.iter().filter(|f| f.what == "apply").count();
    // Skips are legitimate one by one, but a run that skipped most of its schedule tested
    // little and must not pass as if it had.
    if worked * 2 < attempted {
        not_applied.push(format!(
            "only {worked} of {attempted} faults were applied: the rest were skipped"
        ));
    }
    let skipped = |why: &str| {
        applies
            .iter()
            .filter(|r| r.starts_with("skipped") && r.contains(why))
            .count()
    };
    checks.push(check(
        "the nemesis applied every fault",
        not_applied,
        format!(
            "{} applied; skipped: {} whose process was not up, {} over the limit in effect, {} on a resource in use, {} reorganisations the pool's chain outgrew",
            worked,
            skipped("is not up"),
            skipped("at once"),
            skipped("is still in effect"),
            skipped("outgrew"),
        ),
    ));
    let not_undone = fault_errors(history, "undo", |f| {
        !f.starts_with("SIGKILL") && !f.starts_with("SIGTERM")
    });
    checks.push(check(
        "every pause was resumed and every lock released",
        not_undone,
        "all".into(),
    ));
    let unclean: Vec<String> = history
        .faults
        .iter()
        .filter(|f| f.what == "apply" && f.fault.starts_with("SIGTERM"))
        .filter_map(|f| match &f.result {
            Ok(how) if how != "exit code 0" && !how.starts_with("skipped") => {
                Some(format!("{} (fault {}): {how}", f.fault, f.index))
            }
            _ => None,
        })
        .collect();
    checks.push(check(
        "every process stopped with SIGTERM exited cleanly (exit code 0)",
        unclean,
        "all".into(),
    ));
    let down: Vec<String> = stack
        .processes()
        .into_iter()
        .filter(|(n, p)| {
            let phase = p.status().phase;
            // Miners are stopped for the record sweep; replaying miners run only during
            // their faults.
            phase != crate::supervisor::Phase::Ready
                && !(n.starts_with("miner-") && phase == crate::supervisor::Phase::Stopped)
                && !n.starts_with(&format!("miner-{}", super::schedule::REPLAY_MINER_PREFIX))
        })
        .map(|(n, p)| format!("{n} is {:?}", p.status().phase))
        .chain(heal_problems)
        .collect();
    checks.push(check(
        "every process is up again after the heal",
        down,
        format!("{} processes", stack.processes().len()),
    ));
    // Miners connect again by themselves, so a fault on a proxy ends none of them.
    let exits: Vec<String> = stack
        .unexpected_exits()
        .into_iter()
        .map(|(p, how)| format!("{p} exited without the nemesis: {how}"))
        .collect();
    checks.push(check(
        "no exit or restart the nemesis did not cause",
        exits,
        "none".into(),
    ));
    checks.push(check(
        "no panic in any log",
        stack.log_panics(),
        "none".into(),
    ));

    // A round of each wallet after the heal (a restarted proxy's counters start again; its
    // proofs and the mint's quotes persist).
    let mut honest = Vec::new();
    for who in profile.honest() {
        match wallet_after_heal(stack, who).await {
            Ok(s) if s.failed > 0 => honest.push(format!(
                "honest operator {who}: {} ehash of quotes FAILED: {}",
                s.failed,
                failed_reasons(stack, who).await
            )),
            Ok(s) if s.held + s.melted + s.melting == 0 => {
                honest.push(format!("honest operator {who} holds no ehash: {s:?}"))
            }
            Ok(_) => {}
            Err(e) => honest.push(format!("{who}'s wallet: {e:#}")),
        }
    }
    checks.push(check(
        "no honest template FAILED (each honest operator's wallet)",
        honest,
        profile.honest().join(", "),
    ));
    let mut fraud = Vec::new();
    for who in profile.fraudulent() {
        match wallet_after_heal(stack, who).await {
            Ok(s) if s.held + s.melted + s.melting + s.paid_unminted > 0 => fraud.push(format!(
                "fraudulent operator {who} was paid: {} ehash held, {} melted, {} PAID unminted",
                s.held, s.melted, s.paid_unminted
            )),
            // Vacuous unless its templates were audited and failed.
            Ok(s) if s.failed == 0 => fraud.push(format!(
                "fraudulent operator {who} has no FAILED quote: nothing was audited ({s:?})"
            )),
            Ok(_) => {}
            Err(e) => fraud.push(format!("{who}'s wallet: {e:#}")),
        }
    }
    checks.push(check(
        "every fraudulent template FAILED (the fraudulent operator has FAILED quotes and holds no ehash)",
        fraud,
        profile.fraudulent().join(", "),
    ));
    checks.push(redemption_check(redemptions));
    checks.push(replay_check(stack, history).await);

    let inputs = SweepInputs {
        known: proxy_keys(stack).await,
        ..Default::default()
    };
    checks.extend(sweep_stack(stack, &inputs).await);
    checks
}

/// Hostile redemptions never paid, an invoice redeemed twice paid at most once, every
/// redemption answered.
fn redemption_check(redemptions: &[RedemptionRecord]) -> Check {
    let mut problems = Vec::new();
    for r in redemptions {
        let limit = u32::from(!r.hostile || r.kind == "same-twice");
        if r.paid > limit {
            problems.push(format!(
                "redemption {} ({}, by {}) was paid {} time(s): {}",
                r.index,
                r.kind,
                r.by,
                r.paid,
                r.outcome.join("; ")
            ));
        }
        // A proxy killed mid-redemption drops the connection (its wallet's balance is
        // checked below); a redemption still unanswered at the timeout is stuck.
        if r.outcome
            .iter()
            .any(|o| o.starts_with("no answer") && o.contains(": no answer in "))
        {
            problems.push(format!(
                "redemption {} ({}, by {}) is stuck: {}",
                r.index,
                r.kind,
                r.by,
                r.outcome.join("; ")
            ));
        }
    }
    let paid = redemptions.iter().filter(|r| r.paid > 0).count();
    check(
        "redemptions: every one answered, hostile ones never paid, an invoice paid at most once",
        problems,
        format!("{} redemption(s), {paid} paid", redemptions.len()),
    )
}

/// Why `who`'s FAILED quotes failed, as the mint says: each reason with its templates and
/// how many quotes (so a failing run names its cause without its data directory).
async fn failed_reasons(stack: &Stack, who: &str) -> String {
    let found = async {
        let mint = stack.mint()?;
        let secret = stack
            .proxy(who)?
            .locking_secret
            .clone()
            .ok_or_else(|| anyhow::anyhow!("{who} has no locking key"))?;
        crate::ehash_api::lookup(&mint.addr, &secret).await
    };
    let quotes = match found.await {
        Ok(q) => q,
        Err(e) => return format!("(the mint's lookup failed: {e:#})"),
    };
    let mut by_reason: std::collections::BTreeMap<
        String,
        (std::collections::BTreeSet<u64>, usize),
    > = Default::default();
    for q in quotes.iter().filter(|q| q.audit_status == "FAILED") {
        let e = by_reason
            .entry(q.reason.clone().unwrap_or_else(|| "no reason".into()))
            .or_default();
        e.0.insert(q.template_id);
        e.1 += 1;
    }
    by_reason
        .iter()
        .map(|(reason, (templates, n))| {
            format!("{n} quote(s) of template(s) {templates:?}: {reason}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The replaying miners, judged from their own logs and the pool's records: no share was
/// accepted twice, every share one of them saw accepted has exactly one record, and a
/// duplicating miner that ran had some replay refused as `duplicate-share` (or the check is
/// vacuous and fails).
pub async fn replay_check(stack: &Stack, history: &History) -> Check {
    let name = "replayed shares: refused, never accepted or recorded twice";
    let ran = |behaviour: &str| {
        let fault = Fault::Replay {
            behaviour: match behaviour {
                "duplicate" => Replay::Duplicate,
                _ => Replay::Stale,
            },
        }
        .describe();
        history
            .faults
            .iter()
            .any(|f| f.what == "apply" && f.fault == fault && f.result.as_deref() == Ok("started"))
    };
    let records = async {
        let mut conn = stack.redis()?.connect().await?;
        crate::invariants::share_records(&mut conn).await
    };
    let mut per_hash: std::collections::HashMap<String, usize> = Default::default();
    match records.await {
        Ok(r) => r
            .into_iter()
            .for_each(|(_, r)| *per_hash.entry(r.share_hash.clone()).or_default() += 1),
        Err(e) => {
            return check(
                name,
                vec![format!("reading the share records: {e:#}")],
                String::new(),
            )
        }
    }
    let mut problems = Vec::new();
    let mut summary = Vec::new();
    for replay in [Replay::Duplicate, Replay::Stale] {
        if !ran(replay.behaviour()) {
            summary.push(format!("{}: no fault ran it", replay.miner()));
            continue;
        }
        let Ok(miner) = stack.miner(&replay.miner()) else {
            continue;
        };
        let log = miner.log();
        let refused = log.rejected_by_reason();
        let mut seen: std::collections::HashMap<&str, usize> = Default::default();
        for h in &log.accepted {
            *seen.entry(h.as_str()).or_default() += 1;
        }
        for (h, n) in &seen {
            if *n > 1 {
                problems.push(format!("{}: share {h} accepted {n} times", replay.miner()));
            }
            let records = per_hash.get(*h).copied().unwrap_or(0);
            if records != 1 {
                problems.push(format!(
                    "{}: share {h} accepted, {records} record(s)",
                    replay.miner()
                ));
            }
        }
        let duplicates = refused.get("duplicate-share").copied().unwrap_or(0);
        if replay == Replay::Duplicate
            && ran("duplicate")
            && !log.accepted.is_empty()
            && duplicates == 0
        {
            problems.push(format!(
                "{} ran and had {} share(s) accepted but no replay refused as duplicate-share: {refused:?}",
                replay.miner(),
                log.accepted.len()
            ));
        }
        summary.push(format!(
            "{}: {} accepted, refused {refused:?}",
            replay.miner(),
            log.accepted.len()
        ));
    }
    check(name, problems, summary.join("; "))
}

/// What `who`'s wallet reports after a whole round that started after this call.
async fn wallet_after_heal(stack: &Stack, who: &str) -> anyhow::Result<crate::roles::WalletStatus> {
    stack.proxy(who)?.fresh_wallet_status().await
}

/// Mining and minting went on after the heal: each honest operator's wallet came to hold more
/// than it held when the heal ended (within two minutes; miners still running).
pub async fn resumed(stack: &Stack, profile: Profile, held_at_heal: &[(String, u64)]) -> Check {
    let mut problems = Vec::new();
    for who in profile.honest() {
        let Some((_, before)) = held_at_heal.iter().find(|(w, _)| w == who) else {
            problems.push(format!("{who}'s wallet did not answer at the heal"));
            continue;
        };
        let Ok(proxy) = stack.proxy(who) else {
            problems.push(format!("no proxy {who}"));
            continue;
        };
        let r = crate::wait::wait_until(
            &format!("{who}'s wallet to hold more than the {before} ehash it held at the heal"),
            std::time::Duration::from_secs(120),
            || async {
                let s = proxy.wallet_status().await.map_err(|e| e.to_string())?;
                if s.held + s.melted > *before {
                    Ok(s.held)
                } else {
                    Err(format!("{s:?}"))
                }
            },
        )
        .await;
        if let Err(e) = r {
            problems.push(format!("{e:#}"));
        }
    }
    check(
        "mining and minting went on after the heal (each honest wallet holds more)",
        problems,
        profile.honest().join(", "),
    )
}

/// One honest redemption per redeemer once the stack is quiet: the channel is normal again
/// and the melt is PAID.
pub async fn redemption_after_heal(stack: &Stack, profile: Profile) -> Check {
    let mut problems = Vec::new();
    for who in profile.redeemers() {
        let r = async {
            let (pool_ln, op_ln) = (stack.lightning("pool")?, stack.lightning(who)?);
            pool_ln
                .wait_channel_normal(&op_ln.id, std::time::Duration::from_secs(90))
                .await?;
            let proxy = stack.proxy(who)?;
            let held = proxy.fresh_wallet_status().await?.held;
            let reserve = stack.mint()?.redemption_reserve().await?;
            // Within what the channel can carry (a wallet's ehash may be worth far more).
            let held = crate::roles::held_within(&reserve, held, op_ln.receivable_sat().await?);
            let sats = crate::roles::invoice_sats_worth(&reserve, held, (20, 50))?
                .ok_or_else(|| anyhow::anyhow!("{held} ehash: no invoice worth redeeming"))?;
            let invoice = op_ln
                .invoice(sats, &format!("soak-after-heal-{who}"))
                .await?;
            let timeout = crate::wait::scaled(super::workload::REDEEM_TIMEOUT);
            match proxy.redeem(&invoice, timeout).await? {
                Ok(v) if v["state"] == "PAID" => anyhow::Ok(()),
                Ok(v) => anyhow::bail!("{who}'s redemption of {sats} sat ended {}", v["state"]),
                Err(e) => anyhow::bail!("{who}'s redemption of {sats} sat was refused: {e}"),
            }
        }
        .await;
        if let Err(e) = r {
            problems.push(format!("{e:#}"));
        }
    }
    check(
        "an honest redemption after the heal is paid (each redeemer)",
        problems,
        profile.redeemers().join(", "),
    )
}
