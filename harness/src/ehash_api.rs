//! The mint's ehash endpoints from the harness's side: signed lookups (as any operator with
//! its locking key would make them), quote status, and a real Cashu wallet (cdk) that tries to
//! mint a quote with a given key, so scenarios can check what the mint refuses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context};
use cdk::amount::SplitTarget;
use cdk::nuts::{CurrencyUnit, MintQuoteState, PaymentMethod, SecretKey};
use cdk::wallet::WalletBuilder;
use cdk::Amount;
use ehash::lookup::{sign_lookup, LookupRequest};
use serde::Deserialize;

use crate::http;

/// A quote as the mint's ehash endpoints report it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct QuoteInfo {
    /// Quote id.
    pub quote: String,
    /// The share it pays for.
    pub share_hash: String,
    /// Its template.
    pub template_id: u64,
    /// ehash amount.
    pub amount: u64,
    /// cdk's state: UNPAID, PAID, ISSUED.
    pub state: String,
    /// PENDING, PAID or FAILED.
    pub audit_status: String,
    /// Why a FAILED quote failed.
    pub reason: Option<String>,
    /// When a valid template's quotes are paid (ms).
    pub settle_at: Option<u64>,
}

#[derive(Deserialize)]
struct LookupAnswer {
    quotes: Vec<QuoteInfo>,
    /// The id to ask the next page after (null: the last page).
    #[serde(default)]
    next: Option<String>,
}

/// The last lookup timestamp the harness used per key: timestamps must grow.
fn last_timestamps() -> &'static Mutex<HashMap<String, u64>> {
    static LAST: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    LAST.get_or_init(Default::default)
}

/// The pubkey in the `/v1/info` of the mint at `mint_addr` (what signed lookups name).
pub async fn mint_pubkey(mint_addr: &str) -> anyhow::Result<ehash::LockingPubkey> {
    let (code, body) = http::get(mint_addr, "/v1/info", Duration::from_secs(5)).await?;
    anyhow::ensure!(code == 200, "/v1/info answered {code}: {body}");
    let info: serde_json::Value = serde_json::from_str(&body)?;
    info["pubkey"]
        .as_str()
        .context("/v1/info has no pubkey")?
        .parse()
        .map_err(|e| anyhow!("/v1/info pubkey: {e}"))
}

/// A fresh signed lookup for `secret_hex`, for the mint at `mint_addr` (its timestamp after any
/// earlier one of the harness).
pub async fn signed_lookup(mint_addr: &str, secret_hex: &str) -> anyhow::Result<LookupRequest> {
    let mint = mint_pubkey(mint_addr).await?;
    signed_lookup_for(&mint, secret_hex)
}

/// A fresh signed lookup for `secret_hex`, naming the mint `mint`.
pub fn signed_lookup_for(
    mint: &ehash::LockingPubkey,
    secret_hex: &str,
) -> anyhow::Result<LookupRequest> {
    let secret = bitcoin::secp256k1::SecretKey::from_slice(&hex::decode(secret_hex)?)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut last = last_timestamps()
        .lock()
        .map_err(|_| anyhow!("lock poisoned"))?;
    let entry = last.entry(secret_hex.to_string()).or_default();
    *entry = now.max(*entry + 1);
    Ok(sign_lookup(&secret, *entry, mint))
}

/// POST a lookup body as is; returns status and body.
pub async fn post_lookup(mint_addr: &str, body: &str) -> anyhow::Result<(u16, String)> {
    http::post_json(mint_addr, "/v1/ehash/quotes", body, Duration::from_secs(5)).await
}

/// `n` signed lookups from fresh keys (each key's first), eight at a time, each one
/// expected to answer 200 (an empty list).
pub async fn fresh_key_lookups(mint_addr: &str, n: usize) -> anyhow::Result<()> {
    let mint_key = mint_pubkey(mint_addr).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = n.div_ceil(8);
    for t in 0..8 {
        let addr = mint_addr.to_string();
        let count = per_task.min(n.saturating_sub(t * per_task));
        tasks.spawn(async move {
            for _ in 0..count {
                let (secret, _) = crate::keys::locking_keys();
                let req = signed_lookup_for(&mint_key, &secret)?;
                // A loaded machine (the soak's full stack) may take seconds per answer.
                let (code, body) = http::post_json(
                    &addr,
                    "/v1/ehash/quotes",
                    &serde_json::to_string(&req)?,
                    Duration::from_secs(30),
                )
                .await?;
                anyhow::ensure!(code == 200, "a fresh key's lookup answered {code}: {body}");
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// Every quote of the key `secret_hex`, page by page (a page is retried if the key's own
/// wallet used a later timestamp in the same millisecond).
pub async fn lookup(mint_addr: &str, secret_hex: &str) -> anyhow::Result<Vec<QuoteInfo>> {
    let mint = mint_pubkey(mint_addr).await?;
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    'pages: loop {
        for _ in 0..3 {
            let mut req = signed_lookup_for(&mint, secret_hex)?;
            req.after = after.clone();
            let (code, body) = post_lookup(mint_addr, &serde_json::to_string(&req)?).await?;
            if code == 200 {
                let a: LookupAnswer = serde_json::from_str(&body).context("lookup answer")?;
                all.extend(a.quotes);
                match a.next {
                    Some(next) => {
                        after = Some(next);
                        continue 'pages;
                    }
                    None => return Ok(all),
                }
            }
            if !body.contains("30004") {
                anyhow::bail!("lookup answered {code}: {body}");
            }
        }
        anyhow::bail!("lookup refused as a replay three times")
    }
}

/// One quote's status.
pub async fn quote(mint_addr: &str, id: &str) -> anyhow::Result<QuoteInfo> {
    let (code, body) = http::get(
        mint_addr,
        &format!("/v1/ehash/quote/{id}"),
        Duration::from_secs(5),
    )
    .await?;
    anyhow::ensure!(code == 200, "quote {id}: {code} {body}");
    Ok(serde_json::from_str(&body)?)
}

/// How the harness's wallets split minted ehash: the fewest proofs, as the operator's wallet
/// does (cdk's default reads every unspent proof for every quote of a batch).
pub fn fewest_proofs() -> SplitTarget {
    SplitTarget::Value(Amount::from(1u64 << 63))
}

/// A fresh cdk wallet (in memory) for the mint at `mint_url`, holding `quotes` as PAID quotes
/// signed by `secret_hex` (as an operator's wallet imports what its lookup returned).
async fn wallet_with(
    mint_url: &str,
    quotes: &[QuoteInfo],
    secret_hex: &str,
) -> anyhow::Result<cdk::wallet::Wallet> {
    let db = cdk_sqlite::wallet::memory::empty()
        .await
        .map_err(|e| anyhow!("wallet db: {e}"))?;
    let wallet = wallet_on(mint_url, Arc::new(db))?;
    import_paid(&wallet, quotes, secret_hex).await?;
    Ok(wallet)
}

/// A cdk wallet for the mint at `mint_url` whose store is the sqlite file `path` (kept: it
/// holds every proof it mints, as an operator's wallet does).
pub async fn file_wallet(
    mint_url: &str,
    path: &std::path::Path,
) -> anyhow::Result<cdk::wallet::Wallet> {
    let db = cdk_sqlite::WalletSqliteDatabase::new(&path.to_path_buf())
        .await
        .map_err(|e| anyhow!("wallet database {}: {e}", path.display()))?;
    wallet_on(mint_url, Arc::new(db))
}

fn wallet_on(
    mint_url: &str,
    db: Arc<dyn cdk_common::database::WalletDatabase<cdk_common::database::Error> + Send + Sync>,
) -> anyhow::Result<cdk::wallet::Wallet> {
    let seed: [u8; 64] = std::array::from_fn(|_| rand::random());
    WalletBuilder::new()
        .mint_url(mint_url.parse().map_err(|e| anyhow!("{e}"))?)
        .unit(CurrencyUnit::custom("ehash"))
        .localstore(db)
        .seed(seed)
        // As the operator's wallet: not paced by cdk's default client-side limiter (20
        // requests a minute), which would measure the limiter in the settlement bench.
        .without_rate_limiting()
        .build()
        .map_err(|e| anyhow!("wallet: {e}"))
}

/// Put `quotes` in `wallet`'s store as PAID quotes signed by `secret_hex` (as an operator's
/// wallet imports what its lookup returned), ready for `batch_mint`.
pub async fn import_paid(
    wallet: &cdk::wallet::Wallet,
    quotes: &[QuoteInfo],
    secret_hex: &str,
) -> anyhow::Result<()> {
    let secret = SecretKey::from_hex(secret_hex).map_err(|e| anyhow!("{e}"))?;
    let unit = CurrencyUnit::custom("ehash");
    for q in quotes {
        let mut quote = cdk_common::wallet::MintQuote::new(
            q.quote.clone(),
            wallet.mint_url.clone(),
            PaymentMethod::Custom("mining_share".into()),
            Some(Amount::from(q.amount)),
            unit.clone(),
            q.share_hash.clone(),
            u64::MAX / 2,
            Some(secret.clone()),
        );
        quote.state = MintQuoteState::Paid;
        quote.amount_paid = Amount::from(q.amount);
        wallet
            .localstore
            .add_mint_quote(quote)
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// Try to mint quote `q` (PAID at the mint) with the key `secret_hex` through a fresh cdk
/// wallet; returns the amount minted, or the mint's refusal.
pub async fn try_mint(
    mint_url: &str,
    q: &QuoteInfo,
    secret_hex: &str,
) -> anyhow::Result<Result<u64, String>> {
    let wallet = wallet_with(mint_url, std::slice::from_ref(q), secret_hex).await?;
    match wallet.mint(&q.quote, fewest_proofs(), None).await {
        Ok(proofs) => Ok(Ok(proofs.iter().map(|p| u64::from(p.amount)).sum())),
        Err(e) => Ok(Err(e.to_string())),
    }
}

/// Mint every quote of `quotes` with `secret_hex` in NUT-29 batches of `batch` (a fresh
/// in-memory wallet per batch), `in_flight` batches at a time; returns the amount minted.
///
/// One batch at a time leaves each side idle while the other works: the wallet blinds, signs
/// each quote's NUT-20 request and then checks every DLEQ proof while the mint waits, and the
/// mint checks and signs while the wallet waits (measured: each about half of a batch's
/// time). Two in flight keep both busy, as two operators minting at once would.
pub async fn mint_all(
    mint_url: &str,
    quotes: &[QuoteInfo],
    secret_hex: &str,
    batch: usize,
    in_flight: usize,
) -> anyhow::Result<u64> {
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(quotes.chunks(batch.max(1)))
        .map(|chunk| async move {
            // A wallet per batch: cdk 0.18's wallet takes longer per mint the more quotes and
            // proofs its store holds (measured: 0.17 s, 0.7 s, 1.3 s, 2.0 s for four batches
            // of 250 in one wallet), which would measure the wallet's store, not the mint.
            let wallet = wallet_with(mint_url, chunk, secret_hex).await?;
            let ids: Vec<&str> = chunk.iter().map(|q| q.quote.as_str()).collect();
            let proofs = wallet
                .batch_mint(&ids, fewest_proofs(), None, None)
                .await
                .map_err(|e| anyhow!("batch mint: {e}"))?;
            anyhow::Ok(proofs.iter().map(|p| u64::from(p.amount)).sum::<u64>())
        })
        .buffer_unordered(in_flight.max(1))
        .try_fold(0, |total, amount| async move { Ok(total + amount) })
        .await
}
