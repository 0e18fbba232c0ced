//! Real SHA-256d over a real SV1 job: coinbase from `coinb1 + extranonce1 + extranonce2 +
//! coinb2`, merkle root from the branch, then the 80-byte header with a midstate over its first
//! 64 bytes, so each nonce costs two SHA-256 compressions (SHA extensions when the CPU has
//! them, through `bitcoin_hashes`).

use bitcoin::hashes::{sha256, sha256d, Hash, HashEngine};

/// Difficulty-1 target (`0x00000000ffff0000...`), big-endian.
const DIFF1_TARGET_BE: [u8; 32] = {
    let mut t = [0u8; 32];
    t[4] = 0xff;
    t[5] = 0xff;
    t
};

/// A job as `mining.notify` describes it, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Pool's job id (echoed in submits).
    pub job_id: String,
    /// Previous block hash in header (internal) byte order.
    pub prev_hash: [u8; 32],
    /// Coinbase before the extranonces.
    pub coinb1: Vec<u8>,
    /// Coinbase after the extranonces.
    pub coinb2: Vec<u8>,
    /// Merkle branch (internal byte order), deepest first.
    pub merkle_branch: Vec<[u8; 32]>,
    /// Block version.
    pub version: u32,
    /// Compact target of the block.
    pub nbits: u32,
    /// Header time.
    pub ntime: u32,
    /// Whether older jobs are void.
    pub clean: bool,
}

impl Job {
    /// Merkle root (internal order) for this extranonce pair.
    pub fn merkle_root(&self, extranonce1: &[u8], extranonce2: &[u8]) -> [u8; 32] {
        let mut coinbase = Vec::with_capacity(
            self.coinb1.len() + extranonce1.len() + extranonce2.len() + self.coinb2.len(),
        );
        coinbase.extend_from_slice(&self.coinb1);
        coinbase.extend_from_slice(extranonce1);
        coinbase.extend_from_slice(extranonce2);
        coinbase.extend_from_slice(&self.coinb2);
        let mut root = sha256d::Hash::hash(&coinbase).to_byte_array();
        for branch in &self.merkle_branch {
            let mut pair = [0u8; 64];
            pair[..32].copy_from_slice(&root);
            pair[32..].copy_from_slice(branch);
            root = sha256d::Hash::hash(&pair).to_byte_array();
        }
        root
    }

    /// The 80-byte header.
    pub fn header(&self, merkle_root: &[u8; 32], version: u32, ntime: u32, nonce: u32) -> [u8; 80] {
        let mut h = [0u8; 80];
        h[0..4].copy_from_slice(&version.to_le_bytes());
        h[4..36].copy_from_slice(&self.prev_hash);
        h[36..68].copy_from_slice(merkle_root);
        h[68..72].copy_from_slice(&ntime.to_le_bytes());
        h[72..76].copy_from_slice(&self.nbits.to_le_bytes());
        h[76..80].copy_from_slice(&nonce.to_le_bytes());
        h
    }
}

/// Hashes nonces of one header template.
#[derive(Clone)]
pub struct HeaderHasher {
    midstate: sha256::HashEngine,
    tail: [u8; 16],
}

impl HeaderHasher {
    /// Prepare the midstate over the header's first 64 bytes.
    pub fn new(header: &[u8; 80]) -> Self {
        let mut midstate = sha256::HashEngine::default();
        midstate.input(&header[..64]);
        let mut tail = [0u8; 16];
        tail.copy_from_slice(&header[64..80]);
        Self { midstate, tail }
    }

    /// sha256d of the header with `nonce`, internal byte order.
    #[inline]
    pub fn hash(&mut self, nonce: u32) -> [u8; 32] {
        self.tail[12..16].copy_from_slice(&nonce.to_le_bytes());
        let mut engine = self.midstate.clone();
        engine.input(&self.tail);
        let first = sha256::Hash::from_engine(engine);
        sha256::Hash::hash(first.as_byte_array()).to_byte_array()
    }
}

/// Whether a hash (internal order) is at or below a target (big-endian).
#[inline]
pub fn meets_target(hash_internal: &[u8; 32], target_be: &[u8; 32]) -> bool {
    for i in 0..32 {
        let h = hash_internal[31 - i];
        let t = target_be[i];
        if h != t {
            return h < t;
        }
    }
    true
}

/// Share target (big-endian) for an SV1 difficulty: `diff1_target / difficulty`.
pub fn target_from_difficulty(difficulty: f64) -> [u8; 32] {
    if !(difficulty.is_finite() && difficulty > 0.0) {
        return [0xff; 32];
    }
    // diff1 = 0xffff * 2^208; target = 0xffff * 2^208 / d = (0xffff / d) * 2^208.
    let mut value = 65535.0 / difficulty;
    let mut shift = 208i32;
    // Normalise the mantissa into [2^52, 2^53) to keep 53 bits of precision.
    while value < 4_503_599_627_370_496.0 && shift > 0 {
        value *= 2.0;
        shift -= 1;
    }
    while value >= 9_007_199_254_740_992.0 {
        value /= 2.0;
        shift += 1;
    }
    let mantissa = value.floor() as u128;
    let mut target = [0u8; 32];
    if shift >= 256 - 53 {
        return [0xff; 32];
    }
    // Write mantissa << shift into a big-endian 256-bit number.
    for bit in 0..128u32 {
        if mantissa & (1u128 << bit) != 0 {
            let pos = bit as i32 + shift; // bit position from the least significant end
            if (0..256).contains(&pos) {
                let byte = 31 - (pos / 8) as usize;
                target[byte] |= 1 << (pos % 8);
            }
        }
    }
    target
}

/// Difficulty of a target (big-endian), for logs.
pub fn difficulty_of(target_be: &[u8; 32]) -> f64 {
    let to_f = |t: &[u8; 32]| t.iter().fold(0.0f64, |acc, b| acc * 256.0 + f64::from(*b));
    to_f(&DIFF1_TARGET_BE) / to_f(target_be).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difficulty_one_is_the_diff1_target() {
        assert_eq!(target_from_difficulty(1.0), DIFF1_TARGET_BE);
        let t = target_from_difficulty(2.0);
        assert_eq!(&t[..6], &[0, 0, 0, 0, 0x7f, 0xff]);
        // The private signet's starting target, bits 1e0377ae: 0x0377ae * 2^(8*(0x1e-3)),
        // difficulty 0xffff / 0x0377ae * 2^(8*(0x1d-0x1e)) = 0.0011265...
        let mut signet = [0u8; 32];
        signet[2..5].copy_from_slice(&[0x03, 0x77, 0xae]);
        assert!((difficulty_of(&signet) - 0.001_126_515_290_698_186).abs() < 1e-12);
    }

    #[test]
    fn target_comparison_reads_the_hash_as_a_number() {
        let mut target = [0u8; 32];
        target[2] = 1; // 2^232
        let mut hash = [0u8; 32];
        hash[29] = 1; // internal order: byte 29 is the 3rd most significant
        assert!(meets_target(&hash, &target));
        hash[29] = 2;
        assert!(!meets_target(&hash, &target));
    }

    #[test]
    fn midstate_hash_equals_plain_sha256d() {
        let job = Job {
            job_id: "1".into(),
            prev_hash: [7; 32],
            coinb1: vec![1, 2, 3],
            coinb2: vec![4, 5],
            merkle_branch: vec![[9; 32]],
            version: 0x2000_0000,
            nbits: 0x1e03_77ae,
            ntime: 1_700_000_000,
            clean: true,
        };
        let root = job.merkle_root(&[0xaa; 4], &[0xbb; 8]);
        let header = job.header(&root, job.version, job.ntime, 0);
        let mut hasher = HeaderHasher::new(&header);
        for nonce in [0u32, 1, 0xdead_beef] {
            let full = job.header(&root, job.version, job.ntime, nonce);
            assert_eq!(
                hasher.hash(nonce),
                sha256d::Hash::hash(&full).to_byte_array()
            );
        }
    }
}
