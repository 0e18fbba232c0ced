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

    fn hash_with_leading_zeros(zeros: u32) -> [u8; 32] {
        let mut h = [0xffu8; 32];
        for i in 0..zeros as usize {
            let byte = 31 - i / 8;
            h[byte] &= !(0x80 >> (i % 8));
        }
        h
    }

    #[test]
    fn counts_from_the_most_significant_end() {
        assert_eq!(leading_zero_bits(&[0xff; 32]), 0);
        assert_eq!(leading_zero_bits(&[0; 32]), 256);
        for z in [1, 7, 8, 9, 31, 32, 70] {
            assert_eq!(leading_zero_bits(&hash_with_leading_zeros(z)), z);
        }
    }

    #[test]
    fn amount_doubles_per_extra_zero_bit_and_is_capped() {
        assert_eq!(share_amount(&hash_with_leading_zeros(31), 32), None);
        assert_eq!(share_amount(&hash_with_leading_zeros(32), 32), Some(1));
        assert_eq!(share_amount(&hash_with_leading_zeros(33), 32), Some(2));
        assert_eq!(share_amount(&hash_with_leading_zeros(42), 32), Some(1024));
        assert_eq!(share_amount(&[0; 32], 0), Some(1 << 63));
    }

    #[test]
    fn every_hash_at_or_below_the_max_target_is_worth_at_least_one() {
        for min_bits in [0, 1, 8, 20, 32] {
            let t = max_target_le(min_bits);
            assert_eq!(leading_zero_bits(&t), min_bits);
            assert!(share_amount(&t, min_bits).is_some());
        }
    }
}
