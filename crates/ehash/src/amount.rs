//! What an accepted share is worth, in ehash (hashpool's rule):
//!
//! `amount = 2^(leading_zero_bits(share_hash) - min_bits)`, capped at `2^63`.
//!
//! `leading_zero_bits` counts the zero bits at the top of the block header hash read as a
//! 256-bit number (the hash as block explorers print it). Each extra zero bit halves the
//! chance of finding the share, so the amount is proportional to the expected work. The pool
//! never gives a channel a target easier than `2^(256 - min_bits)`, so every share it accepts
//! has at least `min_bits` leading zeros and is worth at least 1.

/// Largest exponent: amounts stop doubling at `2^63` (they must fit a `u64`).
pub const MAX_AMOUNT_EXPONENT: u32 = 63;

/// Leading zero bits of a block header hash given in Bitcoin's internal byte order (the
/// order `sha256d` produces; the number's most significant byte is the last one).
pub fn leading_zero_bits(hash_internal: &[u8; 32]) -> u32 {
    let mut zeros = 0;
    for byte in hash_internal.iter().rev() {
        if *byte == 0 {
            zeros += 8;
        } else {
            zeros += byte.leading_zeros();
            break;
        }
    }
    zeros
}

/// The ehash amount of a share whose hash (internal byte order) has the given value, or
/// `None` if it has fewer than `min_bits` leading zero bits (not a share under this rule).
pub fn share_amount(hash_internal: &[u8; 32], min_bits: u32) -> Option<u64> {
    let zeros = leading_zero_bits(hash_internal);
    let exponent = zeros.checked_sub(min_bits)?;
    Some(1u64 << exponent.min(MAX_AMOUNT_EXPONENT))
}

/// The easiest target (little-endian 256-bit, as Stratum V2 carries it) whose shares all have
/// at least `min_bits` leading zero bits: `2^(256 - min_bits) - 1`.
pub fn max_target_le(min_bits: u32) -> [u8; 32] {
    let mut target = [0u8; 32];
    let bits = 256u32.saturating_sub(min_bits);
    for i in 0..bits as usize {
        target[i / 8] |= 1 << (i % 8);
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block hash as explorers print it, in internal byte order.
    fn internal(display: &str) -> [u8; 32] {
        let mut h: [u8; 32] = hex::decode(display).unwrap().try_into().unwrap();
        h.reverse();
        h
    }

    /// Real block hashes with the zero bits their printed form shows.
    const KNOWN: [(&str, u32); 3] = [
        // Bitcoin's genesis block: 00000000 0019d668...: 32 + 4 (digit 0) + 3 (digit 1).
        (
            "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f",
            43,
        ),
        // Block 1: 00000000 839a...: digit 8 has no leading zero bit.
        (
            "00000000839a8e6886ab5951d76f411475428afc90947ee320161bbf18eb6048",
            32,
        ),
        // Block 800,000: 19 zero digits, then 2 (2 bits).
        (
            "00000000000000000002a7c4c1e48d76c5a37902165a270156b7a8d72728a054",
            78,
        ),
    ];

    #[test]
    fn counts_zero_bits_of_real_block_hashes() {
        for (hash, zeros) in KNOWN {
            assert_eq!(leading_zero_bits(&internal(hash)), zeros, "{hash}");
        }
        assert_eq!(leading_zero_bits(&[0xff; 32]), 0);
        assert_eq!(leading_zero_bits(&[0; 32]), 256);
    }

    #[test]
    fn amounts_of_real_block_hashes() {
        let genesis = internal(KNOWN[0].0);
        assert_eq!(share_amount(&genesis, 32), Some(2048));
        assert_eq!(share_amount(&genesis, 43), Some(1));
        assert_eq!(share_amount(&genesis, 44), None);
        assert_eq!(share_amount(&internal(KNOWN[2].0), 0), Some(1 << 63));
        assert_eq!(share_amount(&internal(KNOWN[2].0), 15), Some(1 << 63));
        assert_eq!(share_amount(&internal(KNOWN[2].0), 16), Some(1 << 62));
    }

    #[test]
    fn max_target_is_the_easiest_target_of_min_bits() {
        // 2^(256-16) - 1: the two most significant bytes (last, little-endian) are zero.
        let mut expected = [0xff; 32];
        expected[30] = 0;
        expected[31] = 0;
        assert_eq!(max_target_le(16), expected);
        let mut expected = [0xff; 32];
        expected[31] = 0x7f;
        assert_eq!(max_target_le(1), expected);
        assert_eq!(max_target_le(0), [0xff; 32]);
    }
}
