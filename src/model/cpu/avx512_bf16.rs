//! bfloat16 products with AVX512_BF16 (`vdpbf16ps`: Intel Cooper Lake and Sapphire Rapids, AMD
//! Zen 4 and later), over the packed layout of [`Bf16Panels`](super::bf16_linear::Bf16Panels).
//!
//! A packed line (64 bytes) is one feature pair of 16 columns, each 32-bit lane holding the
//! column's two weights (the first feature in the low half): exactly the operand `vdpbf16ps`
//! multiplies with a broadcast pair of inputs, adding both products to the lane's float32 sum. A
//! block of up to `ROW_BLOCK` rows keeps `ROW_BLOCK × 4` sums (the group's 64 columns) in
//! registers while a step's lines are read, so each line loaded feeds `ROW_BLOCK` instructions.
//! Each output is summed pair by pair in feature order by the same instruction whatever the
//! number of rows, so a row's bits do not depend on its batch.

use super::amx::{GROUP_COLUMNS, STEP_VALUES, TILE_FEATURES};

// A column group is four tiles of 16 columns.
const _: () = assert!(GROUP_COLUMNS == 64);

/// Rows whose sums stay in registers together (6 × 4 = 24 of the 32 vector registers, with the
/// four weight lines of a pair beside them).
const ROW_BLOCK: usize = 6;

/// How far ahead of the line being multiplied the first block of rows asks for weights: two
/// steps. With a few rows, a 4 KB step keeps the core busy long enough that the hardware
/// prefetcher, which stops at every 4 KB page, starts the next page late: at 4 rows the weights
/// streamed at 60% of the 1-row rate; prefetching each line 8 KB ahead (one instruction per line
/// multiplied, spread over the step rather than in a burst) brought it back to the 1-row rate
/// (measured on the full-size shapes, 4 to 16 rows: 1.4-2x faster; neutral at 1 and 64 rows).
const PREFETCH_VALUES: usize = 2 * STEP_VALUES;

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
/// Step by step (32 features, 4 KB of weights, which stay in the first-level cache), every block
/// of rows takes the step's 16 feature pairs with its sums in registers, loaded from and stored
/// back to `out` between steps (exactly: float32 in, float32 out); so the weights stream from
/// memory once for all the rows, and each output still sums its pairs in feature order.
///
/// # Safety
/// The CPU must have AVX512F and AVX512_BF16 ([`available`]); `weights` must be one group's
/// lines, 64-byte aligned, `width / 32` steps of `STEP_VALUES` values.
#[cfg(target_arch = "x86_64")]
pub unsafe fn column_group(x: &[u16], width: usize, weights: &[u16], out: &mut [[f32; GROUP_COLUMNS]]) {
    let rows = out.len();
    let steps = width / TILE_FEATURES;
    assert!(weights.len() >= steps * STEP_VALUES && x.len() >= rows * width);
    for row in out.iter_mut() {
        *row = [0.0; GROUP_COLUMNS];
    }
    for step in 0..steps {
        let lines = &weights[step * STEP_VALUES..][..STEP_VALUES];
        let mut first = 0;
        while first < rows {
            let count = ROW_BLOCK.min(rows - first);
            let x = &x[first * width..][..count * width];
            let out = &mut out[first..first + count];
            let feature = step * TILE_FEATURES;
            // Past the group's end this is the next group's weights (the caller's task reads them
            // next) or beyond the buffer, where a prefetch does nothing.
            let ahead = if first == 0 {
                weights.as_ptr().wrapping_add(step * STEP_VALUES + PREFETCH_VALUES)
            } else {
                std::ptr::null()
            };
            // SAFETY: the caller's guarantees, for this block of rows and this step.
            unsafe {
                match count {
                    6 => block::<6>(x, width, feature, lines, out, ahead),
                    5 => block::<5>(x, width, feature, lines, out, ahead),
                    4 => block::<4>(x, width, feature, lines, out, ahead),
                    3 => block::<3>(x, width, feature, lines, out, ahead),
                    2 => block::<2>(x, width, feature, lines, out, ahead),
                    _ => block::<1>(x, width, feature, lines, out, ahead),
                }
            }
            first += count;
        }
    }
}

/// One step (`lines`: its 16 feature pairs of 4 tiles, from input feature `feature`) for `R`
/// rows: `R × 4` sums loaded from `out`, one broadcast input pair per row and one weight line per
/// tile for each pair, the sums stored back. Unless `ahead` is null, each line's counterpart in
/// the `ahead` step is prefetched. Fixed-size arrays indexed by constants keep every
/// sum in a register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
// `tile` picks the weight line's address as well as the sum: a counted loop says both.
#[allow(clippy::needless_range_loop)]
unsafe fn block<const R: usize>(
    x: &[u16],
    width: usize,
    feature: usize,
    lines: &[u16],
    out: &mut [[f32; GROUP_COLUMNS]],
    ahead: *const u16,
) {
    use std::arch::x86_64::*;
    assert!(lines.len() >= STEP_VALUES && x.len() >= (R - 1) * width + feature + TILE_FEATURES && out.len() >= R);
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for (sums, row) in acc.iter_mut().zip(out.iter()) {
        for (tile, sum) in sums.iter_mut().enumerate() {
            // SAFETY: 16 floats at column tile * 16 of a 64-float row.
            *sum = unsafe { _mm512_loadu_ps(row.as_ptr().add(tile * 16)) };
        }
    }
    let (w, xp) = (lines.as_ptr(), x.as_ptr());
    // Each output takes its pairs in feature order (the compiler schedules the four tiles'
    // instructions together, each input broadcast once for them).
    for tile in 0..4 {
        for pair in 0..TILE_FEATURES / 2 {
            // SAFETY: line (tile, pair) is 64-byte aligned inside the step (tile stride 512
            // values, pair stride 32); the input pair is inside each row (checked above).
            unsafe {
                let bits = _mm512_load_si512(w.add(tile * 512 + pair * 32).cast::<__m512i>());
                let line = std::mem::transmute::<__m512i, __m512bh>(bits);
                if !ahead.is_null() {
                    // A prefetch reads nothing the program sees and never faults.
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(tile * 512 + pair * 32).cast());
                }
                let mut r = 0;
                while r < R {
                    // The input pair as the broadcast operand (the product of a pair is the same
                    // either way round), which the instruction can take straight from memory.
                    let bits = xp.add(r * width + feature + 2 * pair).cast::<i32>().read_unaligned();
                    let input = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(bits));
                    acc[r][tile] = _mm512_dpbf16_ps(acc[r][tile], line, input);
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
