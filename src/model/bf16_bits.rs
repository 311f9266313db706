//! bfloat16 bits to and from float32, written without branches so that loops over them
//! vectorize: the same results as the `half` crate's conversions.

/// Rounds to the nearest bfloat16, ties to even; NaN stays NaN (quiet). The same results as
/// `half::bf16::from_f32`, written without branches so that the loop over a row vectorizes.
pub fn to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) | 0x40) as u16;
    if bits & 0x7fff_ffff > 0x7f80_0000 { quiet_nan } else { rounded }
}

/// A bfloat16 value (its bits) in float32: exact, and without branches (NaN stays NaN as it is).
pub fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    #[test]
    fn rounding_matches_the_half_crate() {
        let mut state = 12345u64;
        let specials = [0.0f32, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        let patterns = (0..100_000).map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            f32::from_bits((state >> 32) as u32)
        });
        // Ties: the low 16 bits exactly half way, with even and odd bit 16.
        let ties = [0x3f80_8000u32, 0x3f81_8000, 0xbf80_8000, 0x7f7f_8000].map(f32::from_bits);
        for value in specials.into_iter().chain(ties).chain(patterns) {
            assert_eq!(to_bf16(value), bf16::from_f32(value).to_bits(), "{:#010x}", value.to_bits());
        }
    }
}
