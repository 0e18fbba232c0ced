//! The mint's HTTP surface: cdk's Cashu routes (NUT-01..NUT-29 as cdk serves them, NUT-17
//! websockets) plus the ehash endpoints, `/metrics` and `/health`.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/ehash/quote/{id}` | one quote's audit status: `PENDING` (with `settle_at` once valid), `PAID`, `FAILED` + `reason` |
//! | `POST /v1/ehash/quotes` | signed lookup of every quote of a key ([`ehash::lookup`]) |
//! | `POST /v1/mint/quote/mining_share` | refused: quotes come only from share records |
//! | `GET /v1/ehash/redemption` | the Lightning redemption reserve and rate ([`Reserve`]) |
//! | `GET /v1/ehash/melt/{id}` | a melt quote's terms, the ehash it costs, what rounding loses, its state and why it was refused ([`MeltView`]) |
//!
//! Errors are Cashu-style `{"code": N, "detail": "..."}`: 30001 quote creation refused,
//! 30002 bad lookup signature or key, 30003 stale lookup, 30004 replayed lookup (or one from
//! before the mint's start), 30005 no such quote, 30006 malformed lookup body, 30007
//! redemption is off, 30008 a bolt11 melt quote refused (no amount, or above the redeemable
//! reserve), 30009 a lookup naming no mint (the first version), 30010 a lookup signed for
//! another mint, 30011 too many distinct keys looked up within the window (retry), 30012 a
//! melt refused at payment time (quote too old, the rate fell since, the reserve short), with
//! what to do; 30013 no such melt quote.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ehash::lookup::{verify_lookup, LookupError, LookupRequest};
use serde_json::json;

use crate::backend::REFUSE_QUOTE;
use crate::metrics::MintMetrics;
use crate::redeem::ledger::{Ledger, MeltView, Reserve};
use crate::store::{LookupRefused, Store};

/// What the handlers share.
pub struct Api {
    /// The ledger.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<MintMetrics>,
    /// Allowed lookup clock skew, ms.
    pub max_skew_ms: u64,
    /// The redemption ledger (None: redemption is off).
    pub redemption: Option<Arc<Ledger>>,
    /// This mint's public key (`/v1/info` `pubkey`), which signed lookups must name.
    pub mint_pubkey: ehash::LockingPubkey,
}

/// The reserve as served: [`Reserve`] plus the rate.
#[derive(serde::Serialize)]
struct ReserveView {
    #[serde(flatten)]
    reserve: Reserve,
    available_sat: u64,
    redeemed_sat: u64,
    rate_msat_per_ehash: f64,
}

async fn redemption(State(api): State<Arc<Api>>) -> Response {
    let Some(ledger) = &api.redemption else {
        return error(
            StatusCode::NOT_FOUND,
            30007,
            "Lightning redemption is off on this mint (no `redemption.lightning_rpc`)",
        );
    };
    match ledger.reserve().await {
        Ok(reserve) => {
            api.metrics.observe_reserve(&reserve);
            Json(ReserveView {
                available_sat: reserve.available_msat / 1000,
                redeemed_sat: reserve.redeemed_msat / 1000,
                rate_msat_per_ehash: reserve.rate_msat_per_ehash(),
                reserve,
            })
            .into_response()
        }
        Err(e) => internal(e),
    }
}

fn error(status: StatusCode, code: u32, detail: impl std::fmt::Display) -> Response {
    (
        status,
        Json(json!({"code": code, "detail": detail.to_string()})),
    )
        .into_response()
}

fn internal(e: anyhow::Error) -> Response {
    tracing::warn!("ehash endpoint failed: {e:#}");
    error(StatusCode::INTERNAL_SERVER_ERROR, 30000, format!("{e:#}"))
}

async fn melt_view(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    let Some(ledger) = &api.redemption else {
        return error(
            StatusCode::NOT_FOUND,
            30007,
            "Lightning redemption is off on this mint (no `redemption.lightning_rpc`)",
        );
    };
    match ledger.view(&id).await {
        Ok(Some(v)) => Json::<MeltView>(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, 30013, format!("no melt quote {id}")),
        Err(e) => internal(e),
    }
}

async fn refuse_quote() -> Response {
    error(StatusCode::BAD_REQUEST, 30001, REFUSE_QUOTE)
}

async fn quote(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    match api.store.quote(&id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, 30005, format!("no ehash quote {id}")),
        Err(e) => internal(e),
    }
}

async fn lookup(State(api): State<Arc<Api>>, body: axum::body::Bytes) -> Response {
    let req: LookupRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                30006,
                format!(
                    "lookup body is not {{pubkey, timestamp, signature, mint[, unissued_only, after, limit]}}: {e}"
                ),
            )
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let key = match verify_lookup(&req, now, api.max_skew_ms, &api.mint_pubkey) {
        Ok(k) => k,
        Err(e @ LookupError::Stale { .. }) => return error(StatusCode::UNAUTHORIZED, 30003, e),
        Err(e @ LookupError::Unbound) => return error(StatusCode::UNAUTHORIZED, 30009, e),
        Err(e @ LookupError::OtherMint { .. }) => return error(StatusCode::UNAUTHORIZED, 30010, e),
        Err(e) => return error(StatusCode::UNAUTHORIZED, 30002, e),
    };
    let pubkey = key.to_string();
    match api.store.bump_lookup(&pubkey, req.timestamp) {
        Ok(()) => {}
        Err(LookupRefused::Replayed { last }) => {
            let e = LookupError::Replayed {
                timestamp: req.timestamp,
                last,
            };
            return error(StatusCode::UNAUTHORIZED, 30004, e);
        }
        Err(LookupRefused::BeforeStart { start }) => {
            return error(
                StatusCode::UNAUTHORIZED,
                30004,
                format!(
                    "timestamp {} ms is not after the mint's start ({start} ms), which forgot earlier lookups: sign a fresh one",
                    req.timestamp
                ),
            )
        }
        Err(LookupRefused::Unavailable) => {
            return internal(anyhow::anyhow!(
                "the lookup replay guard is unusable after a panic: restart the mint"
            ))
        }
        Err(LookupRefused::Full) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                30011,
                format!(
                    "more than {} distinct keys looked up within the lookup window: retry in a minute",
                    crate::store::MAX_LOOKUP_KEYS
                ),
            )
        }
    }
    let limit = match req.limit {
        None => ehash::lookup::MAX_LOOKUP_PAGE,
        Some(n) if (1..=ehash::lookup::MAX_LOOKUP_PAGE).contains(&n) => n,
        Some(n) => {
            return error(
                StatusCode::BAD_REQUEST,
                30006,
                format!(
                    "limit {n}: a page holds 1 to {} quotes",
                    ehash::lookup::MAX_LOOKUP_PAGE
                ),
            )
        }
    };
    let page = crate::store::Page {
        unissued_only: req.unissued_only,
        after: req.after.as_deref(),
        limit: limit as usize,
    };
    match api.store.quotes_of(&pubkey, page).await {
        Ok((quotes, next)) => {
            Json(json!({"pubkey": pubkey, "quotes": quotes, "next": next})).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn metrics(State(api): State<Arc<Api>>) -> impl IntoResponse {
    if let Some(ledger) = &api.redemption {
        match ledger.reserve().await {
            Ok(r) => api.metrics.observe_reserve(&r),
            Err(e) => tracing::warn!("redemption reserve unavailable for /metrics: {e:#}"),
        }
    }
    api.metrics.render()
}

async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Decide a bolt11 melt quote against the reserve before cdk sees it: cdk hides a payment
/// backend's reason behind "Payment backend error", and an operator must learn why (the
/// backend checks again, atomically, when it pays).
pub async fn melt_quote_guard(
    State(api): State<Arc<Api>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(ledger) = api.redemption.clone() else {
        return next.run(req).await;
    };
    if req.method() == axum::http::Method::POST && req.uri().path() == "/v1/melt/bolt11" {
        return melt_guard(ledger, req, next).await;
    }
    if req.method() != axum::http::Method::POST || req.uri().path() != "/v1/melt/quote/bolt11" {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                30008,
                format!("melt quote body: {e}"),
            )
        }
    };
    let request: Option<String> = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["request"].as_str().map(str::to_string));
    if let Some(invoice) = request.and_then(|r| r.parse::<cdk_common::Bolt11Invoice>().ok()) {
        let msat = invoice.amount_milli_satoshis().unwrap_or(0);
        let hash = hex::encode::<&[u8]>(invoice.payment_hash().as_ref());
        match ledger.quote(msat, hash).await {
            Ok((Err(why), _)) => {
                tracing::info!("melt quote refused: {why}");
                return error(StatusCode::BAD_REQUEST, 30008, why);
            }
            Ok((Ok(_), _)) => {}
            Err(e) => return internal(e),
        }
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Refuse a melt the ledger already knows it cannot pay (quote too old, the rate fell since,
/// the reserve short) with the reason before cdk starts it: cdk reports a processor's refusal
/// only as "Payment failed". The processor checks again, atomically, when it pays; a refusal
/// there is kept and shown by `GET /v1/ehash/melt/{id}`.
async fn melt_guard(
    ledger: Arc<Ledger>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, 4 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, 30012, format!("melt body: {e}")),
    };
    let quote: Option<String> = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["quote"].as_str().map(str::to_string));
    if let Some(q) = quote {
        if let Ok(Some(terms)) = ledger.terms(&q).await {
            if let Err(why) = crate::redeem::payable(&ledger, &terms).await {
                tracing::info!(quote = %q, "melt refused before it started: {why}");
                if let Err(e) = ledger.refuse(&q, &why).await {
                    tracing::warn!(quote = %q, "keeping the refusal's reason failed: {e:#}");
                }
                return error(StatusCode::BAD_REQUEST, 30012, why);
            }
        }
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// The ehash routes (merged with cdk's by the caller).
pub fn routes(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/ehash/quote/{id}", get(quote))
        .route("/v1/ehash/quotes", post(lookup))
        .route("/v1/mint/quote/mining_share", post(refuse_quote))
        .route("/v1/ehash/redemption", get(redemption))
        .route("/v1/ehash/melt/{id}", get(melt_view))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(api)
}
