//! The soak's workload beyond mining: redemptions at the schedule's times, honest or hostile,
//! each run in its own task as an operator would (its own Lightning node makes the invoice,
//! its proxy's wallet redeems), so a paused or dead role delays only that redemption. What
//! each one answered is recorded for the checker.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use super::schedule::{Redemption, ScheduledRedemption};
use crate::roles::WalletClient;
use crate::wait::{scaled, wait_until};
use crate::Stack;

/// How long one redemption may take before it counts as stuck.
pub const REDEEM_TIMEOUT: Duration = Duration::from_secs(300);
/// The node no channel reaches.
pub const UNREACHABLE_NODE: &str = "carol";

/// What one redemption did.
#[derive(Debug, Clone, Serialize)]
pub struct RedemptionRecord {
    /// Its place in the schedule.
    pub index: usize,
    /// Offset it started at, ms.
    pub at_ms: u64,
    /// When it ended, ms from the start.
    pub done_ms: u64,
    /// The operator.
    pub by: String,
    /// Its kind (kebab-case).
    pub kind: String,
    /// Whether the schedule meant it to be refused or to fail.
    pub hostile: bool,
    /// The melts that ended PAID (two for an invoice redeemed twice would be a bug).
    pub paid: u32,
    /// What the wallet answered, one line per attempt.
    pub outcome: Vec<String>,
}

/// What a redemption task needs, owned.
struct Operator {
    wallet: WalletClient,
    node_rpc: PathBuf,
    unreachable_rpc: PathBuf,
    mint_addr: String,
}

/// Start redemption `index` of the schedule in its own task.
pub fn spawn(
    stack: &Stack,
    index: usize,
    r: &ScheduledRedemption,
    started: Instant,
) -> anyhow::Result<tokio::task::JoinHandle<RedemptionRecord>> {
    let op = Operator {
        wallet: stack.proxy(&r.by)?.wallet()?,
        node_rpc: stack.lightning(&r.by)?.rpc_path().to_path_buf(),
        unreachable_rpc: stack.lightning(UNREACHABLE_NODE)?.rpc_path().to_path_buf(),
        mint_addr: stack.mint()?.addr.clone(),
    };
    let r = r.clone();
    Ok(tokio::spawn(async move {
        let kind = serde_json::to_value(&r.kind)
            .ok()
            .map(|v| match v {
                Value::String(s) => s,
                Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
                other => other.to_string(),
            })
            .unwrap_or_default();
        let (paid, outcome) = match run(&op, index, &r.kind).await {
            Ok(x) => x,
            Err(e) => (0, vec![format!("not attempted: {e:#}")]),
        };
        RedemptionRecord {
            index,
            at_ms: r.at_ms,
            done_ms: started.elapsed().as_millis() as u64,
            by: r.by.clone(),
            kind,
            hostile: !matches!(r.kind, Redemption::Honest { .. }),
            paid,
            outcome,
        }
    }))
}

async fn run(op: &Operator, index: usize, kind: &Redemption) -> anyhow::Result<(u32, Vec<String>)> {
    let label = format!("soak-{index}");
    let held = op.wallet.status().await?.held;
    let (code, body) = crate::http::get(
        &op.mint_addr,
        "/v1/ehash/redemption",
        Duration::from_secs(5),
    )
    .await?;
    anyhow::ensure!(code == 200, "the mint's reserve answered {code}: {body}");
    let reserve: Value = serde_json::from_str(&body)?;
    let permille = match kind {
        Redemption::Honest { permille } => u64::from(*permille),
        _ => 50,
    };
    // An honest invoice the operator's channel can carry.
    let held = match kind {
        Redemption::Honest { .. } => crate::roles::held_within(
            &reserve,
            held,
            crate::lightning::receivable_sat(&op.node_rpc).await?,
        ),
        _ => held,
    };
    let sats = crate::roles::invoice_sats_worth(&reserve, held, (permille / 2, permille))?;
    let invoice = |rpc: PathBuf, sats: u64, expiry: u64| {
        let label = label.clone();
        async move {
            let r = crate::lightning::call(
                &rpc,
                "invoice",
                json!({"amount_msat": sats * 1000, "label": label, "description": label, "expiry": expiry}),
            )
            .await?;
            anyhow::Ok((
                r["bolt11"].as_str().unwrap_or_default().to_string(),
                r["expires_at"].as_u64().unwrap_or(0),
            ))
        }
    };
    let timeout = scaled(REDEEM_TIMEOUT);
    let (bolt11, attempts) = match kind {
        Redemption::Honest { .. } => {
            let sats = sats.ok_or_else(|| anyhow::anyhow!("{held} ehash: too little to redeem"))?;
            (invoice(op.node_rpc.clone(), sats, 3600).await?.0, 1)
        }
        Redemption::SameTwice => {
            let sats = sats.ok_or_else(|| anyhow::anyhow!("{held} ehash: too little to redeem"))?;
            (invoice(op.node_rpc.clone(), sats, 3600).await?.0, 2)
        }
        Redemption::Unreachable => {
            let sats = sats.ok_or_else(|| anyhow::anyhow!("{held} ehash: too little to redeem"))?;
            (invoice(op.unreachable_rpc.clone(), sats, 3600).await?.0, 1)
        }
        Redemption::AboveReserve => {
            let over = reserve["available_sat"].as_u64().unwrap_or(0) + 1_000;
            (invoice(op.node_rpc.clone(), over, 3600).await?.0, 1)
        }
        Redemption::Expired => {
            let sats = sats.unwrap_or(1);
            let (bolt11, expires_at) = invoice(op.node_rpc.clone(), sats, 1).await?;
            wait_until(
                "the invoice to expire (wall clock past its expires_at)",
                Duration::from_secs(10),
                || async {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_err(|e| e.to_string())?
                        .as_secs();
                    if now > expires_at {
                        Ok(())
                    } else {
                        Err(format!("now {now}, expires at {expires_at}"))
                    }
                },
            )
            .await?;
            (bolt11, 1)
        }
    };
    let tries = (0..attempts).map(|_| op.wallet.redeem(&bolt11, timeout));
    let mut paid = 0;
    let mut outcome = Vec::new();
    for r in futures::future::join_all(tries).await {
        match r {
            Ok(Ok(v)) => {
                if v["state"] == "PAID" {
                    paid += 1;
                }
                outcome.push(format!(
                    "{}: {} ehash + {} fee",
                    v["state"].as_str().unwrap_or("?"),
                    v["amount_ehash"],
                    v["fee_paid_ehash"]
                ));
            }
            Ok(Err(refused)) => outcome.push(format!("refused: {refused}")),
            Err(e) => outcome.push(format!("no answer: {e:#}")),
        }
    }
    Ok((paid, outcome))
}
