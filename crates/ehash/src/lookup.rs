//! The signed quote lookup: how an operator's wallet learns its quotes from the mint without
//! anyone else learning which quotes belong to which key.
//!
//! The request carries the operator's locking key, a timestamp in milliseconds, the public key
//! of the mint it is for (`pubkey` of the mint's `/v1/info`) and a BIP-340 Schnorr signature by
//! the locking key over the tagged hash
//! `SHA256(SHA256(tag) || SHA256(tag) || pubkey (33 bytes) || timestamp (u64 big-endian) ||
//! mint pubkey (33 bytes))` with tag [`LOOKUP_TAG`] (domain separation: no other message of the
//! protocol hashes to the same digest). The mint refuses a bad signature, a lookup for another
//! mint (so one captured elsewhere is no use here), a lookup of the first version (tag `.../v1`,
//! naming no mint), a timestamp outside its allowed skew, and a timestamp not above the last one
//! it accepted for the key (a replay).

use bitcoin::hashes::{sha256, Hash, HashEngine};
use bitcoin::secp256k1::{schnorr, Keypair, Message, Secp256k1, SecretKey};
use serde::{Deserialize, Serialize};

use crate::tlv::LockingPubkey;

/// BIP-340 tag of the lookup message.
pub const LOOKUP_TAG: &str = "hashpool/ehash/quote-lookup/v2";

/// How far ahead of the mint's clock a lookup's timestamp may be, at most (ms).
pub const MAX_AHEAD_MS: u64 = 5_000;

/// `POST /v1/ehash/quotes` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupRequest {
    /// The locking key (33-byte compressed, hex).
    pub pubkey: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// BIP-340 signature (64 bytes, hex).
    pub signature: String,
    /// The mint the lookup is for: its `/v1/info` `pubkey` (33-byte compressed, hex). Absent
    /// in first-version lookups, which are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mint: Option<String>,
    /// Only quotes not minted yet (a filter: not signed, it reveals nothing more).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unissued_only: bool,
    /// Page: only quotes whose id sorts after this one (the previous answer's `next`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Page size, at most [`MAX_LOOKUP_PAGE`] (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Most quotes one lookup answers; the answer's `next` asks for the following page.
pub const MAX_LOOKUP_PAGE: u32 = 1_000;

/// Why a lookup was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The key is not a 33-byte compressed point.
    #[error("pubkey is not a compressed secp256k1 key: {0}")]
    BadKey(String),
    /// The signature is not 64 hex bytes or does not verify.
    #[error("signature does not verify for this pubkey, timestamp and mint (sign the tagged hash of {LOOKUP_TAG})")]
    BadSignature,
    /// A first-version lookup: it names no mint.
    #[error("this lookup names no mint (the first version): sign lookups v2, the tagged hash of {LOOKUP_TAG} over your key, the timestamp and this mint's pubkey from /v1/info, and send that pubkey as `mint`")]
    Unbound,
    /// Signed for another mint.
    #[error("this lookup was signed for another mint ({named}); this mint's pubkey is {ours} (GET /v1/info)")]
    OtherMint {
        /// The mint it names.
        named: String,
        /// This mint's.
        ours: String,
    },
    /// Too far from the mint's clock.
    #[error("timestamp {timestamp} ms is {skew_ms} ms from the mint's clock (allowed {max_skew_ms} ms): sync the clock and sign a fresh request")]
    Stale {
        /// In the request.
        timestamp: u64,
        /// Its distance from now.
        skew_ms: u64,
        /// The allowance.
        max_skew_ms: u64,
    },
    /// Not above the last accepted timestamp of this key.
    #[error("timestamp {timestamp} ms is not after the last lookup of this key ({last} ms): a replayed request")]
    Replayed {
        /// In the request.
        timestamp: u64,
        /// The last one accepted.
        last: u64,
    },
}

/// The digest a lookup for `mint` signs.
pub fn lookup_digest(pubkey: &LockingPubkey, timestamp: u64, mint: &LockingPubkey) -> [u8; 32] {
    let tag = sha256::Hash::hash(LOOKUP_TAG.as_bytes());
    let mut engine = sha256::Hash::engine();
    engine.input(tag.as_byte_array());
    engine.input(tag.as_byte_array());
    engine.input(pubkey.as_bytes());
    engine.input(&timestamp.to_be_bytes());
    engine.input(mint.as_bytes());
    sha256::Hash::from_engine(engine).to_byte_array()
}

/// A signed lookup for `secret`'s key at `timestamp` (ms), for the mint whose pubkey is `mint`.
pub fn sign_lookup(secret: &SecretKey, timestamp: u64, mint: &LockingPubkey) -> LookupRequest {
    let secp = Secp256k1::new();
    let keypair = Keypair::from_secret_key(&secp, secret);
    let pubkey = LockingPubkey::from_slice(&keypair.public_key().serialize())
        .expect("a secp256k1 public key is a valid locking key");
    let msg = Message::from_digest(lookup_digest(&pubkey, timestamp, mint));
    let sig = secp.sign_schnorr(&msg, &keypair);
    LookupRequest {
        pubkey: pubkey.to_string(),
        timestamp,
        signature: hex::encode(sig.serialize()),
        mint: Some(mint.to_string()),
        unissued_only: false,
        after: None,
        limit: None,
    }
}

/// Check the mint it names, the signature and the timestamp's freshness against `now` (ms);
/// the replay check needs the last accepted timestamp and is the mint's. Returns the key.
pub fn verify_lookup(
    req: &LookupRequest,
    now: u64,
    max_skew_ms: u64,
    ours: &LockingPubkey,
) -> Result<LockingPubkey, LookupError> {
    let named = req.mint.as_deref().ok_or(LookupError::Unbound)?;
    let mint: LockingPubkey = named.parse().map_err(|_| LookupError::OtherMint {
        named: named.to_string(),
        ours: ours.to_string(),
    })?;
    if &mint != ours {
        return Err(LookupError::OtherMint {
            named: named.to_string(),
            ours: ours.to_string(),
        });
    }
    let pubkey: LockingPubkey = req
        .pubkey
        .parse()
        .map_err(|e: crate::tlv::TlvError| LookupError::BadKey(e.to_string()))?;
    let sig = hex::decode(&req.signature)
        .ok()
        .and_then(|b| schnorr::Signature::from_slice(&b).ok())
        .ok_or(LookupError::BadSignature)?;
    let (xonly, _) = bitcoin::secp256k1::PublicKey::from_slice(pubkey.as_bytes())
        .map_err(|e| LookupError::BadKey(e.to_string()))?
        .x_only_public_key();
    let msg = Message::from_digest(lookup_digest(&pubkey, req.timestamp, ours));
    Secp256k1::verification_only()
        .verify_schnorr(&sig, &msg, &xonly)
        .map_err(|_| LookupError::BadSignature)?;
    // Ahead of the clock by at most a few seconds: a fast clock must not lock the key's other
    // clients out (timestamps must grow) for long.
    let skew_ms = now.abs_diff(req.timestamp);
    if skew_ms > max_skew_ms || req.timestamp > now + MAX_AHEAD_MS.min(max_skew_ms) {
        return Err(LookupError::Stale {
            timestamp: req.timestamp,
            skew_ms,
            max_skew_ms,
        });
    }
    Ok(pubkey)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(n: u8) -> SecretKey {
        SecretKey::from_slice(&[n; 32]).unwrap()
    }

    fn mint(n: u8) -> LockingPubkey {
        let secp = Secp256k1::new();
        LockingPubkey::from_slice(&secret(n).public_key(&secp).serialize()).unwrap()
    }

    #[test]
    fn a_signed_lookup_verifies_and_a_tampered_one_does_not() {
        let ours = mint(9);
        let req = sign_lookup(&secret(1), 1_795_000_000_000, &ours);
        let key = verify_lookup(&req, 1_795_000_001_000, 60_000, &ours).unwrap();
        assert_eq!(key.to_string(), req.pubkey);

        let mut later = req.clone();
        later.timestamp += 1;
        assert_eq!(
            verify_lookup(&later, 1_795_000_001_000, 60_000, &ours),
            Err(LookupError::BadSignature)
        );
        let mut other_key = req.clone();
        other_key.pubkey = sign_lookup(&secret(2), req.timestamp, &ours).pubkey;
        assert_eq!(
            verify_lookup(&other_key, 1_795_000_001_000, 60_000, &ours),
            Err(LookupError::BadSignature)
        );
        assert!(matches!(
            verify_lookup(&req, 1_795_000_120_000, 60_000, &ours),
            Err(LookupError::Stale { .. })
        ));
    }

    #[test]
    fn a_lookup_is_bound_to_its_mint() {
        let (ours, theirs) = (mint(9), mint(8));
        let for_them = sign_lookup(&secret(1), 1_795_000_000_000, &theirs);
        assert!(matches!(
            verify_lookup(&for_them, 1_795_000_001_000, 60_000, &ours),
            Err(LookupError::OtherMint { .. })
        ));
        // Naming this mint while signed for another: the signature does not verify.
        let mut renamed = for_them.clone();
        renamed.mint = Some(ours.to_string());
        assert_eq!(
            verify_lookup(&renamed, 1_795_000_001_000, 60_000, &ours),
            Err(LookupError::BadSignature)
        );
        let mut unbound = for_them;
        unbound.mint = None;
        assert_eq!(
            verify_lookup(&unbound, 1_795_000_001_000, 60_000, &ours),
            Err(LookupError::Unbound)
        );
        // A first-version body (no `mint` field) parses, and is refused as unbound.
        let v1: LookupRequest =
            serde_json::from_str(r#"{"pubkey":"02aa","timestamp":1,"signature":"00"}"#).unwrap();
        assert_eq!(v1.mint, None);
    }

    #[test]
    fn the_digest_is_the_bip340_tagged_hash() {
        // Independent construction: SHA256(SHA256(tag) || SHA256(tag) || msg) spelled out.
        let pk: LockingPubkey =
            "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
                .parse()
                .unwrap();
        let m = mint(7);
        let t = sha256::Hash::hash(b"hashpool/ehash/quote-lookup/v2").to_byte_array();
        let mut data = Vec::new();
        data.extend_from_slice(&t);
        data.extend_from_slice(&t);
        data.extend_from_slice(pk.as_bytes());
        data.extend_from_slice(&42u64.to_be_bytes());
        data.extend_from_slice(m.as_bytes());
        assert_eq!(
            lookup_digest(&pk, 42, &m),
            sha256::Hash::hash(&data).to_byte_array()
        );
    }
}
