//! Keys a stack needs: the pool's Noise authority key pair (SRI base58 format) and miner
//! operators' Cashu locking keys.

use ehash::LockingPubkey;
use stratum_apps::key_utils::{Secp256k1PublicKey, Secp256k1SecretKey};

/// A Noise authority key pair, as the pool and proxy configs take it.
#[derive(Debug, Clone)]
pub struct AuthorityKeys {
    /// Public key (base58).
    pub public: String,
    /// Secret key (base58); test-only, random per stack.
    pub secret: String,
}

/// A fresh random authority key pair.
pub fn authority_keys() -> AuthorityKeys {
    let secp = secp256k1_28::Secp256k1::new();
    let (secret, _) = secp.generate_keypair(&mut secp256k1_28::rand::thread_rng());
    let secret = Secp256k1SecretKey(secret);
    let public = Secp256k1PublicKey::from(secret);
    AuthorityKeys {
        public: public.to_string(),
        secret: secret.to_string(),
    }
}

/// A Cashu locking key pair: (secret key hex, public key).
pub fn locking_keys() -> (String, LockingPubkey) {
    use bitcoin::secp256k1::{rand, Secp256k1};
    let secp = Secp256k1::new();
    let (sk, pk) = secp.generate_keypair(&mut rand::thread_rng());
    let locking = LockingPubkey::from_slice(&pk.serialize())
        .expect("a secp256k1 public key is a valid locking key");
    (hex::encode(sk.secret_bytes()), locking)
}

/// A fresh P2WPKH address on `network` whose key nobody keeps: coins sent there are only
/// looked at (a pool's payout in scenarios that never spend it, a competing branch's blocks).
pub fn fresh_address(network: bitcoin::Network) -> bitcoin::Address {
    use bitcoin::secp256k1::{rand, Secp256k1};
    let (_, pk) = Secp256k1::new().generate_keypair(&mut rand::thread_rng());
    bitcoin::Address::p2wpkh(&bitcoin::CompressedPublicKey(pk), network)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn authority_keys_parse_back_and_match() {
        let k = authority_keys();
        let public = Secp256k1PublicKey::from_str(&k.public).unwrap();
        let secret = Secp256k1SecretKey::from_str(&k.secret).unwrap();
        assert_eq!(
            Secp256k1PublicKey::from(secret).into_bytes(),
            public.into_bytes()
        );
    }
}
