//! The soak's checker: once the nemesis has stopped and everything is healed, judge what the
//! stack's clients saw (the wallets, the redemptions' answers) and its independent oracles
//! (Bitcoin Core, Core Lightning's `listpays`, the Redis streams) — never a role's own
//! tables read back.

use super::history::History;
use super::profile::Profile;
use super::workload::RedemptionRecord;
use crate::stack_sweep::{proxy_keys, sweep_stack, Check, SweepInputs};
use crate::Stack;

fn check(name: &str, problems: Vec<String>, summary: String) -> Check {
    Check {
        name: name.into(),
        passed: problems.is_empty(),
        detail: if problems.is_empty() {
            summary
        } else {
            problems.join("\n")
        },
    }
}

/// Every check, in the order the report lists them.
pub async fn run(
    stack: &Stack,
    profile: Profile,
    history: &History,
    heal_problems: Vec<String>,
    caused_exits: &[String],
    redemptions: &[RedemptionRecord],
) -> Vec<Check> {
    let mut checks = Vec::new();
    // A start during the run may fail while a dependency is down (the fault table shows
    // it); what counts is that the heal brought every process back.
    let not_applied: Vec<String> = history
        .faults
        .iter()
        .filter(|f| f.what == "apply")
        .filter_map(|f| {
            f.result
                .as_ref()
                .err()
                .map(|e| format!("{} (fault {}): {e}", f.fault, f.index))
        })
        .collect();
    checks.push(check(
        "the nemesis applied every fault",
        not_applied,
        format!(
            "{} applied, {} skipped (their process was not up)",
            history
                .faults
                .iter()
                .filter(|f| f.what == "apply"
                    && f.result.as_ref().is_ok_and(|r| !r.starts_with("skipped")))
                .count(),
            history
                .faults
                .iter()
                .filter(|f| f.what == "apply"
                    && f.result.as_ref().is_ok_and(|r| r.starts_with("skipped")))
                .count()
        ),
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
            // Miners are stopped for the record sweep.
            phase != crate::supervisor::Phase::Ready
                && !(n.starts_with("miner-") && phase == crate::supervisor::Phase::Stopped)
        })
        .map(|(n, p)| format!("{n} is {:?}", p.status().phase))
        .chain(heal_problems)
        .collect();
    checks.push(check(
        "every process is up again after the heal",
        down,
        format!("{} processes", stack.processes().len()),
    ));
    let (caused, exits): (Vec<_>, Vec<_>) = stack
        .unexpected_exits()
        .into_iter()
        .partition(|(p, how)| caused_exits.contains(p) && how == "exit code 0");
    checks.push(check(
        "no exit or restart the nemesis did not cause",
        exits
            .into_iter()
            .map(|(p, how)| format!("{p} exited without the nemesis: {how}"))
            .collect(),
        format!(
            "none; {} miner exit(s) when the nemesis took their proxy away",
            caused.len()
        ),
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
                "honest operator {who}: {} ehash of quotes FAILED",
                s.failed
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
            Ok(_) => {}
            Err(e) => fraud.push(format!("{who}'s wallet: {e:#}")),
        }
    }
    checks.push(check(
        "every fraudulent template FAILED (the fraudulent operator holds no ehash)",
        fraud,
        profile.fraudulent().join(", "),
    ));
    checks.push(redemption_check(redemptions));

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

/// What `who`'s wallet reports after a whole round that started after this call.
async fn wallet_after_heal(stack: &Stack, who: &str) -> anyhow::Result<crate::roles::WalletStatus> {
    stack.proxy(who)?.fresh_wallet_status().await
}
