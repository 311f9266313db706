//! bfloat16 products with AVX512_BF16 (`vdpbf16ps`: Intel Cooper Lake and Sapphire Rapids, AMD
//! Zen 4 and later), over the packed layout of [`Bf16Panels`](super::bf16_linear::Bf16Panels).
//!
//! A packed line (64 bytes) is one feature pair of 16 columns, each 32-bit lane holding the
//! column's two weights (the first feature in the low half): exactly the operand `vdpbf16ps`
//! multiplies with a broadcast pair of inputs, adding both products to the lane's float32 sum. A
//! block of up to `ROW_BLOCK` rows keeps `ROW_BLOCK × 4` sums (the group's 64 columns) in
//! registers while the group's lines stream once, so each line loaded feeds `ROW_BLOCK`
//! instructions. Each output is summed pair by pair in feature order by the same instruction
//! whatever the number of rows, so a row's bits do not depend on its batch.

use super::amx::{GROUP_COLUMNS, STEP_VALUES, TILE_FEATURES};

// A column group is four tiles of 16 columns.
const _: () = assert!(GROUP_COLUMNS == 64);

/// Rows whose sums stay in registers together (4 × 4 = 16 of the 32 vector registers).
const ROW_BLOCK: usize = 4;

/// Whether this CPU has AVX512_BF16 (asked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE
            .get_or_init(|| std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[r][j]` for the rows of `x` (each `width` bfloat16 values, `width` a multiple of 32) and one
/// column group's packed `weights`.
///
/// # Safety
/// The CPU must have AVX512F and AVX512_BF16 ([`available`]); `weights` must be one group's
/// lines, 64-byte aligned, `width / 32` steps of `STEP_VALUES` values.
#[cfg(target_arch = "x86_64")]
pub unsafe fn column_group(x: &[u16], width: usize, weights: &[u16], out: &mut [[f32; GROUP_COLUMNS]]) {
    let rows = out.len();
    let mut first = 0;
    while first < rows {
        let count = ROW_BLOCK.min(rows - first);
        let x = &x[first * width..][..count * width];
        let out = &mut out[first..first + count];
        // SAFETY: the caller's guarantees, for this block of rows.
        unsafe {
            match count {
                4 => block::<4>(x, width, weights, out),
                3 => block::<3>(x, width, weights, out),
                2 => block::<2>(x, width, weights, out),
                _ => block::<1>(x, width, weights, out),
            }
        }
        first += count;
    }
}

/// `R` rows at once: `R × 4` accumulators, one broadcast input pair per row and one weight line
/// per column tile for each feature pair. Written with fixed-size arrays indexed by constants so
/// that every accumulator stays in a register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block<const R: usize>(x: &[u16], width: usize, weights: &[u16], out: &mut [[f32; GROUP_COLUMNS]]) {
    use std::arch::x86_64::*;
    let steps = width / TILE_FEATURES;
    assert!(weights.len() >= steps * STEP_VALUES && x.len() >= R * width && out.len() >= R);
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let w = weights.as_ptr();
    let xp = x.as_ptr();
    for step in 0..steps {
        // SAFETY: the step's lines are inside `weights` (checked above).
        let lines = unsafe { w.add(step * STEP_VALUES) };
        for pair in 0..TILE_FEATURES / 2 {
            // SAFETY: line (step, tile, pair) is 64-byte aligned inside the step (tile stride 512
            // values, pair stride 32); the input pair is inside each row (`width` values).
            unsafe {
                let line = |tile: usize| {
                    let bits = _mm512_load_si512(lines.add(tile * 512 + pair * 32).cast::<__m512i>());
                    std::mem::transmute::<__m512i, __m512bh>(bits)
                };
                let (w0, w1, w2, w3) = (line(0), line(1), line(2), line(3));
                let feature = step * TILE_FEATURES + 2 * pair;
                let mut r = 0;
                while r < R {
                    let bits = xp.add(r * width + feature).cast::<i32>().read_unaligned();
                    let input = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(bits));
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], input, w0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], input, w1);
                    acc[r][2] = _mm512_dpbf16_ps(acc[r][2], input, w2);
                    acc[r][3] = _mm512_dpbf16_ps(acc[r][3], input, w3);
                    r += 1;
                }
            }
        }
    }
    for (sums, row) in acc.iter().zip(out.iter_mut()) {
        for (tile, sum) in sums.iter().enumerate() {
            // SAFETY: 16 floats at column tile * 16 of a 64-float row.
            unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(tile * 16), *sum) };
        }
    }
}
