//! Settlement steps: the mint and the auditors, operators' wallets, signed lookups, and the
//! faults of the pool side.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use cucumber::{given, then, when};
use ehash::{AuditResult, AUDIT_RESULTS_STREAM};
use harness::ehash_api::{self, QuoteInfo};
use harness::invariants::{expected_amount, stream_entries};
use harness::wait::wait_until;
use harness::Chain;

use super::mining::share_records;
use crate::world::{HarnessWorld, DEFAULT_STACK};

/// Time settlement gets after the miners stop (a verdict takes milliseconds).
pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

#[given(expr = "the mint pays quotes {int} seconds after a valid verdict")]
async fn settlement_delay(w: &mut HarnessWorld, secs: u64) {
    w.mint_options.settlement_delay_secs = secs;
}

#[given(expr = "a {chain} stack with the pool side")]
async fn pool_side(w: &mut HarnessWorld, chain: super::ChainParam) -> anyhow::Result<()> {
    w.start_stack(DEFAULT_STACK, Some(chain.0), true).await?;
    let (pool, mint) = (w.pool_options.clone(), w.mint_options.clone());
    let auditor = harness::roles::AuditorOptions {
        streams: w.auditor_streams.clone(),
        ..harness::roles::AuditorOptions::new(2)
    };
    let stack = w.default_stack_mut()?;
    stack.start_pool(&pool).await?;
    stack.start_mint(&mint).await?;
    stack.start_auditor_with("a", &auditor).await?;
    Ok(())
}

#[given("a signet stack with a pool and a mint, and no auditor yet")]
async fn pool_and_mint(w: &mut HarnessWorld) -> anyhow::Result<()> {
    w.start_stack(DEFAULT_STACK, Some(Chain::Signet), true)
        .await?;
    let (pool, mint) = (w.pool_options.clone(), w.mint_options.clone());
    let stack = w.default_stack_mut()?;
    stack.start_pool(&pool).await?;
    stack.start_mint(&mint).await?;
    Ok(())
}

#[given(expr = "auditor {string} with {int} worker(s)")]
#[when(expr = "auditor {string} starts with {int} worker(s)")]
async fn auditor(w: &mut HarnessWorld, name: String, workers: usize) -> anyhow::Result<()> {
    w.default_stack_mut()?.start_auditor(&name, workers).await?;
    Ok(())
}

/// The (name, secret) of a proxy's or client's key.
pub(crate) fn secret_of(w: &HarnessWorld, who: &str) -> anyhow::Result<String> {
    if let Some(c) = w.clients.get(who) {
        return Ok(c.secret.clone());
    }
    w.default_stack()?
        .proxy(who)?
        .locking_secret
        .clone()
        .ok_or_else(|| anyhow!("{who} has no locking key"))
}

pub(crate) async fn quotes_of(w: &HarnessWorld, who: &str) -> anyhow::Result<Vec<QuoteInfo>> {
    let mint = w.default_stack()?.mint()?;
    ehash_api::lookup(&mint.addr, &secret_of(w, who)?).await
}

#[then(expr = "every quote of {string} is PENDING and its wallet has minted nothing")]
async fn all_pending(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let records = share_records(w).await?;
    let key = stack.proxy(&who)?.locking_pubkey.context("no key")?;
    let expected = records.values().filter(|r| r.locking_pubkey == key).count();
    let quotes = wait_until(
        &format!("a quote for each of {expected} record(s) of {who}"),
        Duration::from_secs(20),
        || async {
            let q = quotes_of(w, &who).await.map_err(|e| e.to_string())?;
            if q.len() >= expected && expected > 0 {
                Ok(q)
            } else {
                Err(format!("{} quote(s)", q.len()))
            }
        },
    )
    .await?;
    for q in &quotes {
        anyhow::ensure!(
            q.audit_status == "PENDING" && q.state == "UNPAID",
            "quote {} is {} / {} before any audit",
            q.quote,
            q.audit_status,
            q.state
        );
    }
    let status = stack.proxy(&who)?.wallet_status().await?;
    anyhow::ensure!(
        status.held == 0 && status.minted == 0,
        "the wallet minted before any audit: {status:?}"
    );
    Ok(())
}

#[then(expr = "every quote of {string} becomes PAID and its wallet mints it")]
async fn all_minted(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    // One quote per record locked to the key: without it the step would pass
    // while the mint still lags behind the last records.
    let key = proxy.locking_pubkey.context("no key")?;
    let records = share_records(w).await?;
    let expected = records.values().filter(|r| r.locking_pubkey == key).count();
    wait_until(
        &format!("a quote for each of the {expected} record(s) of {who}, each PAID and minted"),
        SETTLE_TIMEOUT,
        || async {
            let q = quotes_of(w, &who).await.map_err(|e| e.to_string())?;
            let s = proxy.wallet_status().await.map_err(|e| e.to_string())?;
            let unminted = q.iter().filter(|q| q.state != "ISSUED").count();
            if q.len() >= expected
                && expected > 0
                && unminted == 0
                && s.paid_unminted == 0
                && s.pending == 0
            {
                Ok(())
            } else {
                Err(format!(
                    "{unminted} of {} quote(s) not minted, {expected} record(s); wallet {s:?}",
                    q.len()
                ))
            }
        },
    )
    .await?;
    Ok(())
}

#[then(expr = "the wallet of {string} holds exactly what its accepted shares were worth")]
async fn balance_exact(w: &mut HarnessWorld, who: String) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let proxy = stack.proxy(&who)?;
    let key = proxy.locking_pubkey.context("no key")?;
    let min_bits = stack.pool()?.config.min_bits;
    // The oracle: every share recorded for the key, valued from its hash's hex digits; and
    // every share the miners saw accepted is among them. (A miner stopped between a share's
    // record and its answer never logs that share, but the share is owed all the same.)
    let records = share_records(w).await?;
    for m in stack.miners() {
        for hash in m.log().accepted {
            records
                .get(&hash)
                .with_context(|| format!("accepted share {hash} has no record"))?;
        }
    }
    let mut worth = 0u64;
    for (hash, r) in &records {
        if r.locking_pubkey == key {
            worth += expected_amount(hash, min_bits).context("below min_bits")?;
        }
    }
    let held = proxy.wallet_status().await?.held;
    anyhow::ensure!(
        held == worth && worth > 0,
        "the wallet of {who} holds {held} ehash, the shares recorded for its key were worth {worth}"
    );
    Ok(())
}

#[then(
    expr = "no quote of {string} is PAID earlier than {int} seconds after its template's verdict"
)]
async fn paid_after_delay(w: &mut HarnessWorld, who: String, secs: u64) -> anyhow::Result<()> {
    let stack = w.default_stack()?;
    let mint = stack.mint()?;
    let secret = secret_of(w, &who)?;
    let delay_ms = secs * 1000;
    let mut first_paid: HashMap<String, (u64, u64)> = HashMap::new();
    let started = Instant::now();
    // Poll often: a quote paid too early is caught within one poll of its payment.
    loop {
        let quotes = ehash_api::lookup(&mint.addr, &secret).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        for q in &quotes {
            if q.audit_status == "PAID" {
                first_paid
                    .entry(q.quote.clone())
                    .or_insert((now, q.template_id));
            }
        }
        if !quotes.is_empty() && first_paid.len() == quotes.len() {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < harness::wait::scaled(SETTLE_TIMEOUT + Duration::from_secs(secs)),
            "only {} of {} quote(s) PAID",
            first_paid.len(),
            quotes.len()
        );
        // Poll interval of this observation.
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }
    let mut conn = stack.redis()?.connect().await?;
    let mut verdicts = HashMap::new();
    for (_, f) in stream_entries(&mut conn, AUDIT_RESULTS_STREAM).await? {
        let r = AuditResult::from_fields(&f)?;
        verdicts.insert(r.template_id, r.audited_at);
    }
    for (quote, (seen_paid, template)) in first_paid {
        let audited = verdicts
            .get(&template)
            .with_context(|| format!("template {template} has no verdict"))?;
        anyhow::ensure!(
            seen_paid >= audited + delay_ms,
            "quote {quote} was PAID {} ms after its template's verdict, before the {delay_ms} ms delay",
            seen_paid.saturating_sub(*audited)
        );
    }
    Ok(())
}

#[then(
    expr = "the lookups of {string}, {string} and {string} return disjoint quotes, each only for shares locked to its key"
)]
async fn disjoint(w: &mut HarnessWorld, a: String, b: String, c: String) -> anyhow::Result<()> {
    let mut looked_up = Vec::new();
    for who in [a, b, c] {
        let secret = secret_of(w, &who)?;
        let public = {
            let sk = bitcoin::secp256k1::SecretKey::from_slice(&hex::decode(&secret)?)?;
            hex::encode(
                sk.public_key(&bitcoin::secp256k1::Secp256k1::new())
                    .serialize(),
            )
        };
        let quotes = quotes_of(w, &who).await?;
        anyhow::ensure!(!quotes.is_empty(), "{who} has no quotes");
        looked_up.push((who, public, quotes));
    }
    // The records after the lookups: the miners go on, and a share recorded after the records
    // were read would have a quote and no record here.
    let records = share_records(w).await?;
    let mut seen: HashSet<String> = HashSet::new();
    for (who, public, quotes) in looked_up {
        for q in quotes {
            anyhow::ensure!(
                seen.insert(q.quote.clone()),
                "quote {} is returned to two operators",
                q.quote
            );
            let r = records
                .get(&q.share_hash)
                .with_context(|| format!("quote {} names an unrecorded share", q.quote))?;
            anyhow::ensure!(
                r.locking_pubkey.to_string() == public,
                "{who}'s lookup returned quote {} of a share locked to {}",
                q.quote,
                r.locking_pubkey
            );
        }
    }
    Ok(())
}

/// A PAID quote of `owner`, waiting for settlement.
async fn paid_quote_of(w: &HarnessWorld, owner: &str) -> anyhow::Result<QuoteInfo> {
    Ok(wait_until(
        &format!("a PAID, unminted quote of {owner}"),
        SETTLE_TIMEOUT,
        || async {
            let q = quotes_of(w, owner).await.map_err(|e| e.to_string())?;
            q.into_iter()
                .find(|q| q.audit_status == "PAID" && q.state == "PAID")
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await?)
}

#[then(expr = "{string}'s key cannot mint a quote of {string}: the mint refuses the signature")]
async fn cannot_mint_other(
    w: &mut HarnessWorld,
    thief: String,
    owner: String,
) -> anyhow::Result<()> {
    let q = paid_quote_of(w, &owner).await?;
    let mint = w.default_stack()?.mint()?;
    let outcome = ehash_api::try_mint(&mint.url, &q, &secret_of(w, &thief)?).await?;
    match outcome {
        Err(e) if e.to_lowercase().contains("signature") => {}
        other => anyhow::bail!("minting {owner}'s quote with {thief}'s key gave {other:?}"),
    }
    // Still PAID and unminted: the refusal spent nothing.
    let after = ehash_api::quote(&mint.addr, &q.quote).await?;
    anyhow::ensure!(
        after.state == "PAID",
        "after the refusal the quote is {}",
        after.state
    );
    Ok(())
}

#[then(expr = "{string}'s own key mints that quote")]
async fn owner_mints(w: &mut HarnessWorld, owner: String) -> anyhow::Result<()> {
    let q = paid_quote_of(w, &owner).await?;
    let mint = w.default_stack()?.mint()?;
    match ehash_api::try_mint(&mint.url, &q, &secret_of(w, &owner)?).await? {
        Ok(amount) if amount == q.amount => Ok(()),
        other => anyhow::bail!("{owner} minting its own quote gave {other:?}"),
    }
}

#[when("a client asks the mint for a mining_share quote over HTTP")]
async fn http_quote(w: &mut HarnessWorld) -> anyhow::Result<()> {
    let mint = w.default_stack()?.mint()?;
    let (code, body) = harness::http::post_json(
        &mint.addr,
        "/v1/mint/quote/mining_share",
        r#"{"amount": 1, "unit": "ehash"}"#,
        Duration::from_secs(5),
    )
    .await?;
    w.last_error = Some(format!("{code} {body}"));
    Ok(())
}

#[then(expr = "the mint refuses it with status {int}, code {int} and a detail saying {string}")]
async fn refused_with(
    w: &mut HarnessWorld,
    status: u16,
    code: u32,
    detail: String,
) -> anyhow::Result<()> {
    let got = w.last_error.take().context("no answer recorded")?;
    let (s, body) = got.split_once(' ').context("answer")?;
    let v: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("body {body}"))?;
    anyhow::ensure!(
        s == status.to_string()
            && v["code"] == code
            && v["detail"].as_str().unwrap_or_default().contains(&detail),
        "expected {status} / {code} / {detail:?}, got {got}"
    );
    Ok(())
}

/// A first-version lookup, built here from its definition (tag `hashpool/ehash/quote-lookup/v1`
/// over key and timestamp, no mint named), as a wallet of an older release sends it.
fn lookup_v1(sk: &bitcoin::secp256k1::SecretKey, timestamp: u64) -> ehash::lookup::LookupRequest {
    use bitcoin::hashes::{sha256, Hash, HashEngine};
    use bitcoin::secp256k1::{Keypair, Message, Secp256k1};
    let secp = Secp256k1::new();
    let keypair = Keypair::from_secret_key(&secp, sk);
    let pubkey = keypair.public_key().serialize();
    let tag = sha256::Hash::hash(b"hashpool/ehash/quote-lookup/v1");
    let mut e = sha256::Hash::engine();
    e.input(tag.as_byte_array());
    e.input(tag.as_byte_array());
    e.input(&pubkey);
    e.input(&timestamp.to_be_bytes());
    let digest = sha256::Hash::from_engine(e).to_byte_array();
    let sig = secp.sign_schnorr(&Message::from_digest(digest), &keypair);
    ehash::lookup::LookupRequest {
        pubkey: hex::encode(pubkey),
        timestamp,
        signature: hex::encode(sig.serialize()),
        mint: None,
        unissued_only: false,
        after: None,
        limit: None,
    }
}

#[when(
    regex = r#"^a lookup for "([^"]+)"'s key is (replayed|signed five minutes ago|signed by another key|signed the old way, naming no mint|signed for another mint)$"#
)]
async fn bad_lookup(w: &mut HarnessWorld, who: String, how: String) -> anyhow::Result<()> {
    let mint = w.default_stack()?.mint()?;
    let secret = secret_of(w, &who)?;
    let mint_key = ehash_api::mint_pubkey(&mint.addr).await?;
    let mut req = ehash_api::signed_lookup_for(&mint_key, &secret)?;
    let sk = bitcoin::secp256k1::SecretKey::from_slice(&hex::decode(&secret)?)?;
    match how.as_str() {
        "replayed" => {
            let body = serde_json::to_string(&req)?;
            let (first, _) = ehash_api::post_lookup(&mint.addr, &body).await?;
            anyhow::ensure!(first == 200, "the first lookup answered {first}");
        }
        "signed five minutes ago" => {
            req = ehash::lookup::sign_lookup(&sk, req.timestamp - 300_000, &mint_key);
        }
        "signed the old way, naming no mint" => {
            req = lookup_v1(&sk, req.timestamp);
        }
        "signed for another mint" => {
            let (_, other_mint) = harness::keys::locking_keys();
            req = ehash::lookup::sign_lookup(&sk, req.timestamp, &other_mint);
        }
        _ => {
            let (other, _) = harness::keys::locking_keys();
            let forged = ehash_api::signed_lookup_for(&mint_key, &other)?;
            req.signature = forged.signature;
        }
    }
    let (code, body) = ehash_api::post_lookup(&mint.addr, &serde_json::to_string(&req)?).await?;
    w.last_error = Some(format!("{code} {body}"));
    Ok(())
}
