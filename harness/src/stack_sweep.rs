//! The invariant checks of a quiet stack, shared by the scenarios' after-hook and the soak:
//! the pool settled every append it lost the answer to, the money (the pool node's payments,
//! Bitcoin Core's matured rewards, each wallet's balance), settlement (a quote per record,
//! PAID only for valid templates) and every share record against Bitcoin Core.

use crate::settlement_sweep::KnownKey;
use crate::wait::wait_until;
use crate::Stack;

/// One check and its verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// What it found: a summary when it held, the broken invariants when not.
    pub detail: String,
}

impl Check {
    /// Passed when `problems` is empty (detail: `summary`), else failed with them.
    pub fn from_problems(name: &str, summary: String, problems: Vec<String>) -> Self {
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

    fn from_result(name: &str, r: anyhow::Result<String>) -> Self {
        match r {
            Ok(summary) => Check::from_problems(name, summary, Vec::new()),
            Err(e) => Check::from_problems(name, String::new(), vec![format!("{e:#}")]),
        }
    }
}

/// What the checks need to know beyond the stack: share channels and locking keys of SV2
/// clients the caller ran itself, and every operator key it knows with its secret.
#[derive(Debug, Default, Clone)]
pub struct SweepInputs {
    /// (channel id, extranonce prefix hex) the pool announced to the caller's own clients.
    pub channels: Vec<(u32, String)>,
    /// Locking keys the caller's own clients sent.
    pub keys: Vec<ehash::LockingPubkey>,
    /// Keys with their secrets (the proxies' are added by [`proxy_keys`]).
    pub known: Vec<KnownKey>,
}

/// Every proxy's locking key with its secret and its wallet's held ehash.
pub async fn proxy_keys(stack: &Stack) -> Vec<KnownKey> {
    let mut keys = Vec::new();
    for (name, proxy) in stack.proxies() {
        let (Some(public), Some(secret)) = (proxy.locking_pubkey, &proxy.locking_secret) else {
            continue;
        };
        keys.push(KnownKey {
            name: format!("proxy {name}"),
            public: public.to_string(),
            secret: secret.clone(),
            wallet_held: proxy.wallet_status().await.ok().map(|s| s.held),
        });
    }
    keys
}

/// Wait until the pool settled every append whose answer it lost (records may still be
/// landing until then).
pub async fn settled_outcomes(pool: &crate::roles::PoolRole) -> anyhow::Result<()> {
    if pool.process().pid().is_none() {
        return Ok(());
    }
    wait_until(
        "the pool to settle every unknown append outcome before the sweep",
        std::time::Duration::from_secs(30),
        || async {
            let m = pool.metrics().await.map_err(|e| e.to_string())?;
            let unknown = m.get("hashpool_pool_redis_unknown_outcomes_total");
            let resolved = m.sum("hashpool_pool_redis_resolved_total");
            if resolved >= unknown {
                Ok(())
            } else {
                Err(format!("{unknown} unknown, {resolved} resolved"))
            }
        },
    )
    .await?;
    Ok(())
}

/// Run every check that applies to `stack` (miners stopped, nothing paused). `inputs.known`
/// should already hold [`proxy_keys`].
pub async fn sweep_stack(stack: &Stack, inputs: &SweepInputs) -> Vec<Check> {
    let mut checks = Vec::new();
    let (Ok(pool), Ok(_), Ok(_)) = (stack.pool(), stack.redis(), stack.bitcoind()) else {
        return checks;
    };
    checks.push(Check::from_result(
        "the pool settled every append it lost the answer to",
        settled_outcomes(pool)
            .await
            .map(|()| "nothing unknown".to_string()),
    ));
    let mut channels = inputs.channels.clone();
    let mut keys = inputs.keys.clone();
    for (_, proxy) in stack.proxies() {
        channels.extend(proxy.announced_channels());
        keys.extend(proxy.locking_pubkey);
    }
    if let (Ok(mint), Ok(node)) = (stack.mint(), stack.lightning("pool")) {
        if mint.config.redemption.enabled() {
            let r = &mint.config.redemption;
            let money = crate::money_sweep::sweep_money(
                stack,
                mint,
                node,
                &r.payout_address,
                r.pool_fee_ppm,
                &inputs.known,
            )
            .await;
            checks.push(Check::from_result(
                "money: sats paid, held + melted = minted per wallet, within matured rewards",
                money.map(|m| m.to_string()),
            ));
        }
    }
    if stack.mint().is_ok() {
        let name = "settlement: one quote per record, PAID exactly for valid templates";
        checks.push(
            match crate::settlement_sweep::sweep_settlement(stack, &inputs.known).await {
                Ok(p) => Check::from_problems(name, format!("{} key(s)", inputs.known.len()), p),
                Err(e) => Check::from_problems(name, String::new(), vec![format!("{e:#}")]),
            },
        );
    }
    let name = "records: every share record against Bitcoin Core";
    checks.push(
        match crate::invariants::sweep_records(stack, pool.config.min_bits, &channels, &keys).await
        {
            Ok(r) => Check::from_problems(
                name,
                format!(
                    "{} share record(s) checked, {} of them by Bitcoin Core's proposal mode",
                    r.records, r.proposals
                ),
                r.problems,
            ),
            Err(e) => Check::from_problems(name, String::new(), vec![format!("{e:#}")]),
        },
    );
    checks
}
