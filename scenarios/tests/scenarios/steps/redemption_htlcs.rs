//! Redemptions of named invoices whose HTLCs a scenario watches on the pool's channel: one
//! committed (signed for) while the payee is paused, the next only offered behind it (Core
//! Lightning sends no new commitment before the payee's revocation). The oracles are Core
//! Lightning's `listpeerchannels` and `listpays` and each operator's wallet.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use cucumber::{then, when};
use serde_json::{json, Value};

use super::redemption::{u, REDEEM_TIMEOUT};
use crate::world::HarnessWorld;

/// An invoice a scenario named: (bolt11, sats, the node that made it).
pub type NamedInvoice = (String, u64, String);

/// What a named invoice's redemption started from: (redeemer, ehash its wallet held, the
/// redemption running in the background).
pub type NamedRedemption = (
    String,
    u64,
    tokio::task::JoinHandle<anyhow::Result<Result<Value, String>>>,
);

#[when(expr = "{string} makes an invoice {string} of {int} sat on its node")]
async fn named_invoice(
    w: &mut HarnessWorld,
    who: String,
    name: String,
    sats: u64,
) -> anyhow::Result<()> {
    let invoice = w
        .default_stack()?
        .lightning(&who)?
        .invoice(sats, &format!("named-{name}"))
        .await?;
    w.named_invoices.insert(name, (invoice, sats, who));
    Ok(())
}

#[when(expr = "{string} makes an invoice {string} worth a tenth of {string}'s ehash on its node")]
async fn named_invoice_worth(
    w: &mut HarnessWorld,
    who: String,
    name: String,
    payer: String,
) -> anyhow::Result<()> {
    let sats = super::redemption::tenth_of_worth(w, &payer).await?;
    named_invoice(w, who, name, sats).await
}

#[when(expr = "{string} starts redeeming invoice {string}")]
async fn start_named(w: &mut HarnessWorld, who: String, name: String) -> anyhow::Result<()> {
    let (invoice, _, _) = w
        .named_invoices
        .get(&name)
        .cloned()
        .context("no such invoice")?;
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    let held = proxy.wallet_status().await?.held;
    let addr = proxy.wallet_addr.clone().context("no wallet")?;
    let timeout = harness::wait::scaled(Duration::from_secs(300));
    let task = tokio::spawn(async move {
        let body = json!({ "invoice": invoice }).to_string();
        let (code, body) =
            harness::http::post_json(&addr, "/wallet/redeem", &body, timeout).await?;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.clone()));
        Ok(match code {
            200 => Ok(v),
            _ => Err(v["error"].as_str().unwrap_or(&body).to_string()),
        })
    });
    w.named_redemptions.insert(name, (who, held, task));
    Ok(())
}

/// The payment hash of a named invoice, decoded by the pool's node.
async fn hash_of(w: &HarnessWorld, name: &str) -> anyhow::Result<String> {
    let (invoice, _, _) = w.named_invoices.get(name).context("no such invoice")?;
    let d = w
        .default_stack()?
        .lightning("pool")?
        .call("decode", json!({ "string": invoice }))
        .await?;
    Ok(d["payment_hash"]
        .as_str()
        .context("payment_hash")?
        .to_string())
}

#[then(expr = "the pool's node has {word} an HTLC for invoice {string}")]
async fn htlc_state(w: &mut HarnessWorld, how: String, name: String) -> anyhow::Result<()> {
    let hash = hash_of(w, &name).await?;
    let pool = w.default_stack()?.lightning("pool")?;
    // Offered only: added to the channel, no commitment signed for it yet (it is forgotten
    // by a node killed then). Committed: any later state.
    let wanted = |state: &str| match how.as_str() {
        "offered" => state == "SENT_ADD_HTLC",
        _ => state != "SENT_ADD_HTLC",
    };
    anyhow::ensure!(
        ["offered", "committed"].contains(&how.as_str()),
        "an HTLC is offered or committed, not {how}"
    );
    harness::wait::wait_until(
        &format!("the pool's node to have {how} an HTLC for invoice {name} ({hash})"),
        Duration::from_secs(30),
        || async {
            let c = pool
                .call("listpeerchannels", json!({}))
                .await
                .map_err(|e| e.to_string())?;
            let htlcs: Vec<Value> = c["channels"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|ch| ch["htlcs"].as_array().cloned().unwrap_or_default())
                .collect();
            let found = htlcs.iter().any(|h| {
                h["payment_hash"] == hash.as_str()
                    && h["direction"] == "out"
                    && h["state"].as_str().is_some_and(wanted)
            });
            if found {
                Ok(())
            } else {
                Err(format!("htlcs {}", Value::Array(htlcs)))
            }
        },
    )
    .await?;
    Ok(())
}

#[then(
    expr = "invoice {string} is paid exactly once and {string}'s wallet holds what that melt took less"
)]
async fn named_paid_once(w: &mut HarnessWorld, name: String, who: String) -> anyhow::Result<()> {
    let hash = hash_of(w, &name).await?;
    let (_, held_before, task) = w.named_redemptions.remove(&name).context("no redemption")?;
    let stack = w.default_stack()?;
    let pool = stack.lightning("pool")?;
    harness::wait::wait_until(
        &format!("the pool's node to complete exactly one payment of invoice {name}"),
        Duration::from_secs(60),
        || async {
            let p = pool
                .call("listpays", json!({ "payment_hash": hash }))
                .await
                .map_err(|e| e.to_string())?;
            let complete = p["pays"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["status"] == "complete")
                .count();
            match complete {
                1 => Ok(()),
                n => Err(format!("{n} complete payments: {p}")),
            }
        },
    )
    .await?;
    let answer = task.await?;
    eprintln!("[redemption] the redemption of {name}'s own answer: {answer:?}");
    let proxy = stack.proxy(&who)?;
    harness::wait::wait_until(
        &format!("{who}'s wallet to have melted for invoice {name} and hold the rest"),
        Duration::from_secs(60),
        || async {
            let st = proxy.wallet_status().await.map_err(|e| e.to_string())?;
            if st.melting == 0 && st.melted > 0 && st.held + st.melted == held_before {
                Ok(())
            } else {
                Err(format!("{st:?}, {held_before} held before"))
            }
        },
    )
    .await?;
    Ok(())
}

#[then(
    expr = "the redemption of invoice {string} ends UNPAID, its ehash is back and the mint holds nothing"
)]
async fn named_unpaid(w: &mut HarnessWorld, name: String) -> anyhow::Result<()> {
    let (who, held_before, task) = w.named_redemptions.remove(&name).context("no redemption")?;
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    let mint = stack.mint()?;
    harness::wait::wait_until(
        &format!(
            "{who}'s wallet to hold its {held_before} ehash again and the mint to hold no sats"
        ),
        Duration::from_secs(150),
        || async {
            let st = proxy.wallet_status().await.map_err(|e| e.to_string())?;
            let reserve = mint.redemption_reserve().await.map_err(|e| e.to_string())?;
            let held_msat = u(&reserve, "held_msat").map_err(|e| e.to_string())?;
            if st.held == held_before && st.melting == 0 && held_msat == 0 {
                Ok(())
            } else {
                Err(format!("wallet {st:?}, the mint holds {held_msat} msat"))
            }
        },
    )
    .await?;
    let answer = tokio::time::timeout(harness::wait::scaled(REDEEM_TIMEOUT), task).await;
    eprintln!("[redemption] the redemption of {name}'s own answer: {answer:?}");
    let m = stack.mint()?.metrics().await?;
    anyhow::ensure!(
        m.get("hashpool_mint_holds_resolved_total{outcome=\"orphaned\"}") >= 1.0,
        "the mint counted no orphaned payment released: {:?}",
        m.0.iter()
            .filter(|(k, _)| k.contains("holds"))
            .collect::<HashMap<_, _>>()
    );
    Ok(())
}
