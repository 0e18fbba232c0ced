//! The operator's ehash wallet (cdk, SQLite in the proxy's data dir). It learns its quotes only
//! through the mint's signed lookup, mints every quote the mint reports PAID (NUT-20 signed
//! with the locking key, in NUT-29 batches), never asks for an unpaid one, and wakes on NUT-17
//! quote notifications, polling as a fallback.
//!
//! Its seed is derived from the locking key (`SHA512("hashpool/wallet-seed/v1" || key)`), so
//! the key alone restores the wallet.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Context};
use bitcoin::hashes::{sha512, Hash, HashEngine};
use cdk::amount::SplitTarget;
use cdk::mint_url::MintUrl;
use cdk::nuts::{CurrencyUnit, MintQuoteState, PaymentMethod, SecretKey};
use cdk::wallet::{Wallet, WalletBuilder};
use cdk::Amount;
use cdk_common::wallet::MintQuote;
use ehash::lookup::sign_lookup;

mod redeem;
pub use redeem::{
    quote_with, redeem_with, MeltQuoteView, MeltRecord, RedeemOptions, Redeemer, Redemption,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Unit and method the pool's mint uses.
const UNIT: &str = "ehash";
const METHOD: &str = "mining_share";
/// Pending quotes the wallet subscribes to (NUT-17) at once. cdk opens one remote
/// subscription per quote and its mint refuses more than 100 per websocket connection with
/// "Invalid params": the old set's are dropped before a new set subscribes, and two sets
/// together stay under 100 even if the mint has not yet processed the old set's unsubscribes.
const MAX_SUBSCRIBED_QUOTES: usize = 48;
/// Quotes per batch mint (the mint allows up to 1000).
const BATCH: usize = 200;
/// The least time between two rounds woken by notifications.
const MIN_ROUND_INTERVAL: Duration = Duration::from_millis(100);

/// What the wallet reports (`GET /wallet`, `hashpool-proxy wallet balance`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WalletStatus {
    /// ehash held in unspent proofs.
    pub held: u64,
    /// ehash minted by this wallet so far.
    pub minted: u64,
    /// ehash in proofs a melt holds (PENDING at the mint until its payment is final).
    #[serde(default)]
    pub melting: u64,
    /// ehash completed melts took (their inputs less their change).
    #[serde(default)]
    pub melted: u64,
    /// ehash of quotes the mint reports PENDING (template not audited yet, or settling).
    pub pending: u64,
    /// ehash of quotes reported PAID and not minted yet.
    pub paid_unminted: u64,
    /// ehash of quotes whose template was found invalid (never paid).
    pub failed: u64,
    /// Quotes the last lookup returned.
    pub quotes: usize,
    /// Lookups done.
    pub lookups: u64,
    /// Why the last cycle failed, if it did.
    pub last_error: Option<String>,
}

/// A quote as the mint's signed lookup reports it.
#[derive(Debug, Clone, Deserialize)]
struct LookupQuote {
    quote: String,
    share_hash: String,
    amount: u64,
    state: String,
    audit_status: String,
}

#[derive(Debug, Deserialize)]
struct LookupAnswer {
    quotes: Vec<LookupQuote>,
    /// The id to ask the next page after (absent or null: the last page).
    #[serde(default)]
    next: Option<String>,
}

/// Most pages one lookup round reads (a million quotes at the mint's page size).
const MAX_LOOKUP_PAGES: usize = 1_000;

/// The operator's wallet.
pub struct OperatorWallet {
    wallet: Wallet,
    mint_url: String,
    secret: SecretKey,
    http: cdk_common::HttpClient,
    last_timestamp: u64,
    /// The mint's pubkey (`/v1/info`), which every signed lookup names.
    mint_pubkey: Option<ehash::LockingPubkey>,
    /// Shared with the status endpoint.
    pub status: Arc<RwLock<WalletStatus>>,
    /// Held by a redemption while it melts and by each round of the minting loop: recovery
    /// never compensates a melt still in flight, and a melt's balances are its own.
    melt_lock: Arc<tokio::sync::Mutex<()>>,
    /// Batch mints that failed in a row (a batch that failed twice is minted one by one).
    failed_batches: u32,
    /// cdk's recovery of interrupted operations did not finish: tried again each round.
    recovery_pending: bool,
}

/// The wallet seed of a locking key.
fn seed_of(secret: &SecretKey) -> [u8; 64] {
    let mut engine = sha512::Hash::engine();
    engine.input(b"hashpool/wallet-seed/v1");
    engine.input(&secret.to_secret_bytes());
    sha512::Hash::from_engine(engine).to_byte_array()
}

/// Longest the wallet waits for cdk to recover interrupted operations.
const RECOVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl OperatorWallet {
    /// Open (or create) the wallet in `data_dir` for `mint_url`, keyed by `secret_hex`.
    pub async fn open(mint_url: &str, secret_hex: &str, data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
        let secret =
            SecretKey::from_hex(secret_hex).map_err(|e| anyhow!("locking_secret_key: {e}"))?;
        let path = data_dir.join("wallet.sqlite");
        let db = cdk_sqlite::WalletSqliteDatabase::new(&path)
            .await
            .map_err(|e| anyhow!("wallet database {}: {e}", path.display()))?;
        let url: MintUrl = mint_url
            .parse()
            .map_err(|e| anyhow!("mint_url {mint_url}: {e}"))?;
        let wallet = WalletBuilder::new()
            .mint_url(url)
            .unit(CurrencyUnit::custom(UNIT))
            .localstore(Arc::new(db))
            .seed(seed_of(&secret))
            // cdk 0.18 paces a wallet's requests to each mint host by default (a burst of 20,
            // then 20 a minute: `RateLimitConfig::default`, sized for public mints). An
            // operator's wallet mints every share of its miners at its own pool's mint, and
            // cdk's recovery of an interrupted batch mint asks the mint about each quote of the
            // batch: 174 quotes took over 5 minutes at that pace, the round stalled behind it
            // (soak seed 5). The wallet talks only to its own pool's mint, as fast as its
            // miners earn.
            .without_rate_limiting()
            .build()
            .map_err(|e| anyhow!("wallet: {e}"))?;
        // A mint interrupted by a crash or a lost answer leaves its quotes reserved: settle it.
        // Bounded, so a mint that does not answer does not hold up start-up.
        let recovery_pending = !recover(&wallet, "interrupted wallet operations").await;
        Ok(Self {
            wallet,
            mint_url: mint_url.trim_end_matches('/').to_string(),
            secret,
            http: cdk_common::HttpClient::new(),
            last_timestamp: 0,
            mint_pubkey: None,
            status: Arc::default(),
            melt_lock: Arc::default(),
            failed_batches: 0,
            recovery_pending,
        })
    }

    /// Every quote of this key not minted yet, page by page (each page its own signed
    /// lookup).
    async fn lookup(&mut self) -> anyhow::Result<Vec<LookupQuote>> {
        let mut all = Vec::new();
        let mut after = None;
        for _ in 0..MAX_LOOKUP_PAGES {
            let page = self.lookup_page(after.take()).await?;
            all.extend(page.quotes);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
        anyhow::bail!("the lookup had more than {MAX_LOOKUP_PAGES} pages")
    }

    /// One page of the quotes of this key not minted yet, after quote id `after`.
    async fn lookup_page(&mut self, after: Option<String>) -> anyhow::Result<LookupAnswer> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        // Strictly increasing, or the mint refuses it as a replay.
        let timestamp = now.max(self.last_timestamp + 1);
        self.last_timestamp = timestamp;
        let secret = bitcoin::secp256k1::SecretKey::from_slice(&self.secret.to_secret_bytes())?;
        let mint = match self.mint_pubkey {
            Some(k) => k,
            None => {
                let info = self
                    .wallet
                    .fetch_mint_info()
                    .await
                    .map_err(|e| anyhow!("the mint's /v1/info: {e}"))?
                    .context("the mint answered no /v1/info")?;
                let key = info
                    .pubkey
                    .context("the mint's /v1/info has no pubkey: it cannot take signed lookups")?;
                let key = ehash::LockingPubkey::from_slice(&key.to_bytes())
                    .map_err(|e| anyhow!("the mint's pubkey: {e}"))?;
                self.mint_pubkey = Some(key);
                key
            }
        };
        let mut req = sign_lookup(&secret, timestamp, &mint);
        // Minted quotes are done with; the wallet's own store counts them.
        req.unissued_only = true;
        req.after = after;
        let url = format!("{}/v1/ehash/quotes", self.mint_url);
        let raw = self
            .http
            .post(&url)
            .json(&req)
            .send()
            .await
            .map_err(|e| anyhow!("lookup at {url}: {e}"))?;
        let status = raw.status();
        let body = raw.bytes().await.map_err(|e| anyhow!("lookup body: {e}"))?;
        anyhow::ensure!(
            (200..300).contains(&status),
            "lookup at {url} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).context("lookup answer")
    }

    /// Make sure the wallet's store has `q` (PAID, with its signing key) so it can be minted.
    async fn import(&self, q: &LookupQuote) -> anyhow::Result<()> {
        if self
            .wallet
            .localstore
            .get_mint_quote(&q.quote)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let unit = CurrencyUnit::custom(UNIT);
        let mut quote = MintQuote::new(
            q.quote.clone(),
            self.wallet.mint_url.clone(),
            PaymentMethod::Custom(METHOD.into()),
            Some(Amount::from(q.amount)),
            unit,
            q.share_hash.clone(),
            u64::MAX / 2,
            Some(self.secret.clone()),
        );
        quote.state = MintQuoteState::Paid;
        quote.amount_paid = Amount::from(q.amount);
        self.wallet.localstore.add_mint_quote(quote).await?;
        Ok(())
    }

    /// One round: look up, mint what is PAID, refresh the status. Returns the PENDING quote
    /// ids (to listen for over NUT-17).
    pub async fn cycle(&mut self) -> anyhow::Result<Vec<String>> {
        // Recovery and each batch run one at a time with redemptions: recovery never
        // compensates a melt in flight, and a melt's balances before and after are its own.
        let lock = self.melt_lock.clone();
        {
            let _g = lock.lock().await;
            self.recover_melts().await;
        }
        let quotes = self.lookup().await?;
        self.reconcile_issued(&quotes).await?;
        let (mut st, to_mint, pending) = classify(&quotes);
        let mut minted_now = 0;
        for chunk in to_mint.chunks(BATCH) {
            let _g = lock.lock().await;
            for q in chunk {
                self.import(q).await?;
            }
            let ids: Vec<&str> = chunk.iter().map(|q| q.quote.as_str()).collect();
            let amount = match self
                .wallet
                .batch_mint(&ids, fewest_proofs(), None, None)
                .await
            {
                Ok(proofs) => {
                    self.failed_batches = 0;
                    proofs.iter().map(|p| u64::from(p.amount)).sum()
                }
                Err(e) => {
                    // An ambiguous failure (the mint busy, its answer lost) leaves the batch's
                    // saga to recover: what the mint did issue is recovered, and the next
                    // lookup no longer lists it. So the round ends and the next one mints
                    // the rest as a batch; only a batch failing twice in a row is tried one by
                    // one, so one bad quote cannot hold up the others.
                    self.recovery_pending =
                        !recover(&self.wallet, "the failed batch mint (retried next round)").await;
                    self.failed_batches += 1;
                    if self.failed_batches < 2 {
                        tracing::warn!(
                            "batch mint of {} quote(s) failed ({e}); trying again after a fresh lookup",
                            ids.len()
                        );
                        break;
                    }
                    tracing::warn!(
                        "batch mint of {} quote(s) failed again ({e}): one by one",
                        ids.len()
                    );
                    self.failed_batches = 0;
                    let mut amount = 0;
                    for id in &ids {
                        match self.wallet.mint(id, fewest_proofs(), None).await {
                            Ok(proofs) => {
                                amount += proofs.iter().map(|p| u64::from(p.amount)).sum::<u64>()
                            }
                            Err(e) => tracing::warn!(quote = %id, "minting failed: {e}"),
                        }
                    }
                    amount
                }
            };
            tracing::info!(quotes = ids.len(), amount, "minted ehash");
            minted_now += amount;
        }
        st.paid_unminted -= minted_now.min(st.paid_unminted);
        st.minted = self.minted().await?;
        st.held = u64::from(self.wallet.total_balance().await?);
        st.melting = u64::from(self.wallet.total_pending_balance().await?);
        st.melted = self.melted().await?;
        if let Ok(mut s) = self.status.write() {
            st.lookups = s.lookups + 1;
            *s = st;
        }
        Ok(pending)
    }

    /// Run cycles until `stop`: after each, wait for a NUT-17 notification on a pending quote
    /// or the poll interval, whichever comes first.
    pub async fn run(mut self, poll: Duration, stop: CancellationToken) {
        let method = cdk_common::PaymentMethod::Custom(METHOD.into());
        // One NUT-17 subscription for the pending quotes, renewed when that set changes.
        let mut sub = None;
        let mut subscribed: Vec<String> = Vec::new();
        loop {
            if self.recovery_pending {
                self.recovery_pending =
                    !recover(&self.wallet, "interrupted wallet operations (again)").await;
            }
            let pending = match self.cycle().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("wallet round failed (retrying): {e:#}");
                    if let Ok(mut s) = self.status.write() {
                        s.last_error = Some(format!("{e:#}"));
                    }
                    Vec::new()
                }
            };
            // cdk opens one remote subscription per quote and the mint allows 100 per
            // connection: subscribe to the first few, polling covers the rest.
            let mut pending = pending;
            pending.truncate(MAX_SUBSCRIBED_QUOTES);
            if pending != subscribed {
                // The old subscriptions go first (see MAX_SUBSCRIBED_QUOTES).
                drop(sub.take());
                sub = if pending.is_empty() {
                    None
                } else {
                    self.wallet
                        .subscribe_mint_quote_state(pending.clone(), method.clone())
                        .await
                        .ok()
                };
                subscribed = pending;
            }
            let notified = async {
                match sub.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = notified => {
                    // One round for a burst of notifications (a whole template settles at
                    // once, and a new subscription replays every quote's state).
                    if let Some(s) = sub.as_mut() {
                        while s.try_recv().is_some() {}
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        // The least time between two rounds.
                        _ = tokio::time::sleep(MIN_ROUND_INTERVAL) => {}
                    }
                }
                // Poll interval: the fallback when a notification is missed.
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// ehash completed melts took, from the wallet's own transactions.
    async fn melted(&self) -> anyhow::Result<u64> {
        Ok(self
            .wallet
            .list_transactions(Some(cdk::wallet::types::TransactionDirection::Outgoing))
            .await?
            .iter()
            .filter(|t| t.status == cdk_common::wallet::TransactionStatus::Completed)
            .filter(|t| t.quote_id.is_some())
            .map(|t| u64::from(t.amount) + u64::from(t.fee))
            .sum())
    }

    /// Mark as issued every quote this wallet imported that the mint no longer lists as
    /// unissued (`unissued`: a whole lookup) and that the mint, asked about that quote alone,
    /// says is ISSUED: most likely minted in a batch whose proofs cdk's saga recovery restored
    /// without marking the quote issued here, which left `minted` short of what the wallet
    /// holds. A reservation by a saga that no longer exists (recovery ended it) does not count.
    async fn reconcile_issued(&self, unissued: &[LookupQuote]) -> anyhow::Result<()> {
        let listed: std::collections::HashSet<&str> =
            unissued.iter().map(|q| q.quote.as_str()).collect();
        let mut fixed = (0usize, 0u64);
        for mut q in self.wallet.localstore.get_mint_quotes().await? {
            if q.unit != CurrencyUnit::custom(UNIT)
                || q.amount_issued >= q.amount_paid
                || listed.contains(q.id.as_str())
            {
                continue;
            }
            if let Some(op) = &q.used_by_operation {
                let live = match op.parse::<uuid::Uuid>() {
                    Ok(id) => self.wallet.localstore.get_saga(&id).await?.is_some(),
                    Err(_) => true,
                };
                if live {
                    continue; // the saga that holds it decides
                }
            }
            match self.mint_says_issued(&q.id).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(
                        "quote {}: asking the mint whether it is issued: {e:#}",
                        q.id
                    );
                    continue;
                }
            }
            let amount = u64::from(q.amount_paid) - u64::from(q.amount_issued);
            q.amount_issued = q.amount_paid;
            q.state = MintQuoteState::Issued;
            q.used_by_operation = None;
            let id = q.id.clone();
            if let Err(e) = self.wallet.localstore.add_mint_quote(q).await {
                tracing::warn!("quote {id}: marking it issued: {e} (tried again next round)");
                continue;
            }
            fixed.0 += 1;
            fixed.1 += amount;
        }
        if fixed.0 > 0 {
            tracing::info!(
                quotes = fixed.0,
                amount = fixed.1,
                "quotes the mint issued (a recovered batch mint) marked issued here too"
            );
        }
        Ok(())
    }

    /// Whether the mint says quote `id` is ISSUED (`GET /v1/ehash/quote/{id}`).
    async fn mint_says_issued(&self, id: &str) -> anyhow::Result<bool> {
        let url = format!("{}/v1/ehash/quote/{id}", self.mint_url);
        let raw = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| anyhow!("{url}: {e}"))?;
        let status = raw.status();
        let body = raw.bytes().await.map_err(|e| anyhow!("{url}: {e}"))?;
        anyhow::ensure!(
            (200..300).contains(&status),
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        let view: serde_json::Value = serde_json::from_slice(&body).context("quote answer")?;
        Ok(view["state"] == "ISSUED")
    }

    /// ehash minted so far, from the wallet's own quotes.
    async fn minted(&self) -> anyhow::Result<u64> {
        Ok(self
            .wallet
            .localstore
            .get_mint_quotes()
            .await?
            .iter()
            .filter(|q| q.unit == CurrencyUnit::custom(UNIT))
            .map(|q| u64::from(q.amount_issued))
            .sum())
    }

    /// A snapshot of the status.
    pub fn status(&self) -> WalletStatus {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }
}

/// `hashpool-proxy wallet balance`: a lookup and the wallet's proofs, minting nothing (the
/// running proxy mints).
pub async fn balance(
    mint_url: &str,
    secret_hex: &str,
    data_dir: &Path,
) -> anyhow::Result<WalletStatus> {
    let mut w = OperatorWallet::open(mint_url, secret_hex, data_dir).await?;
    let quotes = w.lookup().await?;
    w.reconcile_issued(&quotes).await?;
    let (mut st, _, _) = classify(&quotes);
    st.minted = w.minted().await?;
    st.held = u64::from(w.wallet.total_balance().await?);
    st.melting = u64::from(w.wallet.total_pending_balance().await?);
    st.melted = w.melted().await?;
    st.lookups = 1;
    Ok(st)
}

/// Sort a lookup's quotes: the status totals, the quotes to mint, the pending quote ids.
fn classify(quotes: &[LookupQuote]) -> (WalletStatus, Vec<&LookupQuote>, Vec<String>) {
    let mut st = WalletStatus {
        quotes: quotes.len(),
        ..Default::default()
    };
    let mut to_mint = Vec::new();
    let mut pending = Vec::new();
    for q in quotes {
        match (q.audit_status.as_str(), q.state.as_str()) {
            ("PAID", "ISSUED") => {}
            ("PAID", "PAID") => {
                st.paid_unminted += q.amount;
                to_mint.push(q);
            }
            ("FAILED", _) => st.failed += q.amount,
            _ => {
                st.pending += q.amount;
                pending.push(q.quote.clone());
            }
        }
    }
    (st, to_mint, pending)
}

impl OperatorWallet {
    /// A melt whose payment outcome was unknown (the mint or its Lightning node went away)
    /// leaves proofs pending: ask the mint again each round until it settles, paid (change
    /// back) or failed (proofs back).
    async fn recover_melts(&self) {
        match self.wallet.total_pending_balance().await {
            Ok(p) if u64::from(p) > 0 => {}
            _ => return,
        }
        recover(&self.wallet, "interrupted melts").await;
    }
}

/// How minted ehash is split into proofs: as few as the amount allows (each quote's amount is a
/// power of two: one proof). cdk's default (`SplitTarget::None`) instead asks, for every quote
/// of a batch, which denominations the wallet lacks, reading every unspent proof it holds: a
/// batch mint of 100 took 1.5 s with 10^3 proofs held and 14 s with 10^4 (the growth bench).
/// A target of 2^63 is above every amount, so cdk splits each one the fewest-proofs way
/// without looking at the wallet.
pub fn fewest_proofs() -> SplitTarget {
    SplitTarget::Value(cdk::Amount::from(1u64 << 63))
}

/// cdk's recovery of interrupted operations, bounded by [`RECOVERY_TIMEOUT`]; whether it
/// finished.
async fn recover(wallet: &cdk::wallet::Wallet, what: &str) -> bool {
    match tokio::time::timeout(RECOVERY_TIMEOUT, wallet.recover_incomplete_sagas()).await {
        Ok(Ok(report)) => {
            tracing::debug!(?report, "recovered {what}");
            true
        }
        Ok(Err(e)) => {
            tracing::warn!("recovering {what} failed: {e}");
            false
        }
        Err(_) => {
            tracing::warn!("recovering {what} did not finish within {RECOVERY_TIMEOUT:?}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator's wallet is not paced by cdk's client-side limiter (20 requests a minute
    /// by default), which stalled the recovery of an interrupted batch mint for minutes.
    #[tokio::test]
    async fn the_wallet_is_not_rate_limited() {
        let dir = std::env::temp_dir().join(format!(
            "hashpool-wallet-test-{}-{}",
            std::process::id(),
            line!()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let secret = "11".repeat(32);
        // Nothing listens there: opening needs no answer from the mint.
        let wallet = OperatorWallet::open("http://127.0.0.1:9", &secret, &dir)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!wallet.wallet.is_rate_limited());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
