//! cdk's per-quote backend payment check is skipped for the quotes settlement creates (a cdk
//! upgrade that clamps `last_checked` or changes its rule fails here, not as a slow mint).

use std::str::FromStr;

use cdk_common::database::mint::{Database, QuotesDatabase};
use ehash::{LockingPubkey, ShareRecord};

use super::*;

fn record(n: u8) -> ShareRecord {
    ShareRecord {
        share_hash: format!("{n:02x}").repeat(32),
        template_id: 7,
        channel_id: 1,
        // The generator point: a valid compressed key.
        locking_pubkey: LockingPubkey::from_str(
            "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
        )
        .expect("a valid key"),
        amount: 4,
        ntime: 0,
        version: 0,
        nonce: 0,
        extranonce: String::new(),
    }
}

#[tokio::test]
async fn cdk_never_claims_a_backend_check_of_a_share_quote() {
    let db = cdk_sqlite::mint::memory::empty().await.expect("memory db");
    let unit = CurrencyUnit::custom(UNIT);
    let method = PaymentMethod::Custom(METHOD.into());
    let now = cdk_common::util::unix_time();
    let ours = share_quote(QuoteId::new(), &record(1), now, &unit, &method, now).expect("quote");
    // The same quote as cdk would make it: its check is due at once.
    let mut plain =
        share_quote(QuoteId::new(), &record(2), now, &unit, &method, now).expect("quote");
    plain.set_last_checked(0);
    let (ours_id, plain_id) = (ours.id.clone(), plain.id.clone());
    let mut tx = db.begin_transaction().await.expect("tx");
    tx.add_mint_quote(ours).await.expect("add");
    tx.add_mint_quote(plain).await.expect("add");
    tx.commit().await.expect("commit");
    // The interval cdk 0.18 checks with (`MINT_QUOTE_PAYMENT_CHECK_INTERVAL_SECS`).
    let claimed = |id| db.try_update_mint_quote_last_checked(id, now, 10);
    assert!(
        claimed(&plain_id).await.expect("update"),
        "a plain quote's check is claimed"
    );
    assert!(
        !claimed(&ours_id).await.expect("update"),
        "a share quote's check never is"
    );
    let later = now + 100 * 365 * 24 * 3600;
    assert!(!db
        .try_update_mint_quote_last_checked(&ours_id, later, 10)
        .await
        .expect("update"));
}
