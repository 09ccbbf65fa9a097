//! The inputs and hashes of the Pillow sweeps (`scripts/dev/pillow_xcheck.py`,
//! `tests/fixtures/extra/gen_mask_crop.py`): pictures drawn from a 64-bit LCG both sides can
//! reproduce, outputs compared by FNV-1a 64, so a single wrong byte anywhere changes the hash.

/// `n` bytes of the LCG seeded `seed` (the top byte of bits 33-40 of each state).
pub fn lcg_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// FNV-1a 64 of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &v| {
        (h ^ v as u64).wrapping_mul(0x100000001b3)
    })
}
