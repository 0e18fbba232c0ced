//! The ehash Stratum V2 extension.
//!
//! Negotiated with `RequestExtensions` after `SetupConnection`; its id is in the experimental
//! range 0x4000-0x7FFF. Its one TLV field carries the miner operator's Cashu locking key (a
//! 33-byte compressed secp256k1 public key, NUT-20) on `OpenExtendedMiningChannel`: the mint
//! locks every quote of that channel's shares to it. A channel without it earns no ehash.
//!
//! Wire form of a TLV (as SRI's codec writes it, type and length little-endian):
//! `[extension type u16][field type u8][length u16][value]`.

use std::fmt;
use std::str::FromStr;

/// Extension id of ehash ("HA", in the experimental range).
pub const EHASH_EXTENSION_TYPE: u16 = 0x4841;
/// TLV field: the locking public key.
pub const LOCKING_PUBKEY_FIELD: u8 = 0x01;
/// Length of a compressed public key.
pub const LOCKING_PUBKEY_LEN: usize = 33;

/// A TLV value or key that is not a valid locking key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlvError {
    /// Not 33 bytes.
    #[error("locking pubkey must be {LOCKING_PUBKEY_LEN} bytes (compressed secp256k1), got {0}")]
    Length(usize),
    /// 33 bytes, but not a point on the curve.
    #[error("locking pubkey is not a valid compressed secp256k1 point")]
    NotAPoint,
    /// Not hex.
    #[error("locking pubkey is not hex: {0}")]
    Hex(String),
    /// The TLV frame is truncated or carries another extension/field.
    #[error("malformed ehash TLV: {0}")]
    Frame(String),
}

/// A miner operator's Cashu locking key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockingPubkey([u8; LOCKING_PUBKEY_LEN]);

impl LockingPubkey {
    /// Validate 33 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, TlvError> {
        let arr: [u8; LOCKING_PUBKEY_LEN] = bytes
            .try_into()
            .map_err(|_| TlvError::Length(bytes.len()))?;
        bitcoin::secp256k1::PublicKey::from_slice(&arr).map_err(|_| TlvError::NotAPoint)?;
        Ok(Self(arr))
    }

    /// The 33 bytes.
    pub fn as_bytes(&self) -> &[u8; LOCKING_PUBKEY_LEN] {
        &self.0
    }

    /// The TLV value plus header, as it travels at the end of `OpenExtendedMiningChannel`.
    pub fn encode_tlv(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + LOCKING_PUBKEY_LEN);
        out.extend_from_slice(&EHASH_EXTENSION_TYPE.to_le_bytes());
        out.push(LOCKING_PUBKEY_FIELD);
        out.extend_from_slice(&(LOCKING_PUBKEY_LEN as u16).to_le_bytes());
        out.extend_from_slice(&self.0);
        out
    }

    /// Parse a TLV produced by [`encode_tlv`](Self::encode_tlv).
    pub fn decode_tlv(bytes: &[u8]) -> Result<Self, TlvError> {
        if bytes.len() < 5 {
            return Err(TlvError::Frame(format!(
                "{} bytes, header needs 5",
                bytes.len()
            )));
        }
        let ext = u16::from_le_bytes([bytes[0], bytes[1]]);
        let field = bytes[2];
        let len = u16::from_le_bytes([bytes[3], bytes[4]]) as usize;
        if ext != EHASH_EXTENSION_TYPE || field != LOCKING_PUBKEY_FIELD {
            return Err(TlvError::Frame(format!(
                "extension {ext:#06x} field {field}"
            )));
        }
        let value = bytes
            .get(5..5 + len)
            .ok_or_else(|| TlvError::Frame("truncated value".into()))?;
        Self::from_slice(value)
    }
}

impl fmt::Display for LockingPubkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for LockingPubkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockingPubkey({self})")
    }
}

impl FromStr for LockingPubkey {
    type Err = TlvError;
    fn from_str(s: &str) -> Result<Self, TlvError> {
        let bytes = hex::decode(s).map_err(|e| TlvError::Hex(e.to_string()))?;
        Self::from_slice(&bytes)
    }
}

impl serde::Serialize for LockingPubkey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for LockingPubkey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public key of secret key 1 (the generator point G).
    pub const G: &str = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";

    #[test]
    fn tlv_wire_format_is_pinned() {
        let pk: LockingPubkey = G.parse().unwrap();
        insta::with_settings!({snapshot_path => "../../../fixtures/snapshots"}, {
            insta::assert_snapshot!("ehash_locking_pubkey_tlv", hex::encode(pk.encode_tlv()));
        });
        assert_eq!(LockingPubkey::decode_tlv(&pk.encode_tlv()).unwrap(), pk);
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        assert_eq!(
            LockingPubkey::from_slice(&[2; 32]),
            Err(TlvError::Length(32))
        );
        let mut not_point = [0u8; 33];
        not_point[0] = 2;
        not_point[1..].fill(0xff);
        assert_eq!(
            LockingPubkey::from_slice(&not_point),
            Err(TlvError::NotAPoint)
        );
        assert!(matches!(
            "zz".parse::<LockingPubkey>(),
            Err(TlvError::Hex(_))
        ));
        let pk: LockingPubkey = G.parse().unwrap();
        let mut tlv = pk.encode_tlv();
        tlv.truncate(20);
        assert!(matches!(
            LockingPubkey::decode_tlv(&tlv),
            Err(TlvError::Frame(_))
        ));
    }
}
