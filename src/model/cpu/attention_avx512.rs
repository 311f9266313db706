//! The AVX-512 path of [`attention_tile`](super::attention_tile): the same operations in the same
//! order as its generic path, 16 lanes to a register. Scores are 16 dot products at a time (4 rows
//! × 4 positions, 2 × 8 or 1 × 16) with their accumulators in registers, added pairwise in one
//! transposing pass; outputs are blocks of rows × up to 64 columns in registers while the values
//! stream past once.

// Counted loops over rows, positions and columns pick registers and addresses alike.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::attention_tile::{
    CacheValue, EXP_MIN, EXP_POLY, LANES, LN2_HI, LN2_LO, LOG2E, ROUND, TILE_ROWS, Tile, pairwise, score_stride,
};

/// Whether this CPU has AVX-512F (asked once).
pub(super) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
}

/// 16 cache values at `p` as float32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load<T: CacheValue>(p: *const T) -> __m512 {
    // SAFETY: the caller's pointer holds 16 values of T.
    unsafe {
        if size_of::<T>() == 2 {
            let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
        } else {
            _mm512_loadu_ps(p.cast())
        }
    }
}

/// # Safety
/// AVX-512F; `tile.dim` a multiple of 16 and the slices as [`Tile`] says.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn attend_tile<T: CacheValue>(tile: &Tile<'_, T>, scratch: &mut Vec<f32>, out: &mut [&mut [f32]]) {
    let (dim, rows) = (tile.dim, tile.counts.len());
    let (last, first) = (tile.counts[rows - 1], tile.counts[0]);
    assert!(rows <= TILE_ROWS && first >= 1 && tile.k.len() >= last * dim && tile.v.len() >= last * dim);
    assert!(tile.q[..rows].iter().all(|q| q.len() >= dim) && out.iter().all(|o| o.len() >= dim));
    let stride = score_stride(tile.counts);
    // Every score a row reads is written below (positions past its count too).
    if scratch.len() < rows * stride {
        scratch.resize(rows * stride, 0.0);
    }
    // Scores, 16 at a time: 4 rows × 4 positions, 2 × 8 or 1 × 16.
    let mut row = 0;
    while row < rows {
        let block = match rows - row {
            4.. => 4,
            2 | 3 => 2,
            _ => 1,
        };
        // SAFETY: rows row..row + block exist; keys are read at most up to `last - 1`.
        unsafe {
            match block {
                4 => scores::<T, 4, 4>(tile, row, last, stride, scratch),
                2 => scores::<T, 2, 8>(tile, row, last, stride, scratch),
                _ => scores::<T, 1, 16>(tile, row, last, stride, scratch),
            }
        }
        row += block;
    }
    // Minus infinity past each row's positions, as the generic path has it.
    for (r, scores) in scratch[..rows * stride].chunks_exact_mut(stride).enumerate() {
        scores[tile.counts[r]..].fill(f32::NEG_INFINITY);
        // SAFETY: `scores` is whole vectors.
        unsafe { softmax(scores) };
    }
    // Outputs, in column blocks of up to 64 values (4 vectors per row).
    let mut column = 0;
    while column < dim {
        let vectors = ((dim - column) / LANES).min(4);
        let mut row = 0;
        while row < rows {
            let block = if rows - row >= 2 { 2 } else { 1 };
            let block = if rows - row >= 4 { 4 } else { block };
            // SAFETY: as above, for these rows and columns.
            unsafe {
                match (block, vectors) {
                    (4, 4) => values::<T, 4, 4>(tile, row, column, stride, scratch, out),
                    (4, 3) => values::<T, 4, 3>(tile, row, column, stride, scratch, out),
                    (4, 2) => values::<T, 4, 2>(tile, row, column, stride, scratch, out),
                    (4, _) => values::<T, 4, 1>(tile, row, column, stride, scratch, out),
                    (2, 4) => values::<T, 2, 4>(tile, row, column, stride, scratch, out),
                    (2, 3) => values::<T, 2, 3>(tile, row, column, stride, scratch, out),
                    (2, 2) => values::<T, 2, 2>(tile, row, column, stride, scratch, out),
                    (2, _) => values::<T, 2, 1>(tile, row, column, stride, scratch, out),
                    (_, 4) => values::<T, 1, 4>(tile, row, column, stride, scratch, out),
                    (_, 3) => values::<T, 1, 3>(tile, row, column, stride, scratch, out),
                    (_, 2) => values::<T, 1, 2>(tile, row, column, stride, scratch, out),
                    _ => values::<T, 1, 1>(tile, row, column, stride, scratch, out),
                }
            }
            row += block;
        }
        column += vectors * LANES;
    }
}

/// Scores of rows `row..row + R` at every position below `last`, `P` positions at a time
/// (`R × P = 16`): the accumulators in registers over the dimensions, then added pairwise
/// in one transposing pass. Positions past `last` in the final block read key `last - 1`
/// (their scores are overwritten).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scores<T: CacheValue, const R: usize, const P: usize>(
    tile: &Tile<'_, T>,
    row: usize,
    last: usize,
    stride: usize,
    scratch: &mut [f32],
) {
    const { assert!(R * P == 16) };
    let dim = tile.dim;
    let q: [*const f32; R] = std::array::from_fn(|r| tile.q[row + r].as_ptr());
    let mut lanes = [0.0f32; LANES];
    for first in (0..last).step_by(P) {
        let keys: [*const T; P] = std::array::from_fn(|p| tile.k[(first + p).min(last - 1) * dim..].as_ptr());
        // Dot t = r × P + p sums in accumulator (t % 4) × 4 + t / 4, which the pairwise
        // pass below leaves in lane t.
        let mut acc = [_mm512_setzero_ps(); 16];
        for c in (0..dim).step_by(LANES) {
            // SAFETY: every row and key has `dim` values (checked by the caller).
            unsafe {
                let mut qv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    qv[r] = _mm512_loadu_ps(q[r].add(c));
                }
                for p in 0..P {
                    let kv = load(keys[p].add(c));
                    for r in 0..R {
                        let t = r * P + p;
                        let a = (t % 4) * 4 + t / 4;
                        acc[a] = _mm512_fmadd_ps(qv[r], kv, acc[a]);
                    }
                }
            }
        }
        // SAFETY: 16 floats into a 16-float array.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), pairwise_16(&acc)) };
        let count = P.min(last - first);
        for r in 0..R {
            let to = &mut scratch[(row + r) * stride + first..];
            if count == P {
                // A fixed size: a move of registers, not a call.
                to[..P].copy_from_slice(&lanes[r * P..][..P]);
            } else {
                to[..count].copy_from_slice(&lanes[r * P..][..count]);
            }
        }
    }
}

/// 16 accumulators' lanes added pairwise (`i + 8`, `+ 4`, `+ 2`, `+ 1`, as [`pairwise`]),
/// accumulator `a`'s sum landing in lane `(a % 4) × 4 + a / 4`.
#[inline]
#[target_feature(enable = "avx512f")]
fn pairwise_16(acc: &[__m512; 16]) -> __m512 {
    // Loops, not closures: a closure would not take this function's target features.
    // Lanes i + 8: two accumulators' halves side by side.
    let mut halves = [_mm512_setzero_ps(); 8];
    for (j, half) in halves.iter_mut().enumerate() {
        let (a, b) = (acc[2 * j], acc[2 * j + 1]);
        *half = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    }
    // Lanes i + 4: four accumulators' quarters.
    let mut quarters = [_mm512_setzero_ps(); 4];
    for (j, quarter) in quarters.iter_mut().enumerate() {
        let (a, b) = (halves[2 * j], halves[2 * j + 1]);
        *quarter = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
    }
    // Lanes i + 2: pairs within each quarter.
    let mut pairs = [_mm512_setzero_ps(); 2];
    for (j, pair) in pairs.iter_mut().enumerate() {
        let (a, b) = (_mm512_castps_pd(quarters[2 * j]), _mm512_castps_pd(quarters[2 * j + 1]));
        // Moved as 64-bit pairs, added as floats.
        let (low, high) = (_mm512_unpacklo_pd(a, b), _mm512_unpackhi_pd(a, b));
        *pair = _mm512_add_ps(_mm512_castpd_ps(low), _mm512_castpd_ps(high));
    }
    // Lane i + 1.
    let (a, b) = (pairs[0], pairs[1]);
    _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(a, b), _mm512_shuffle_ps::<0b11_01_11_01>(a, b))
}

/// A row's scores in place (minus infinity past its positions) into its weights.
///
/// # Safety
/// `scores.len()` is a multiple of 16.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn softmax(scores: &mut [f32]) {
    let s = scores.as_mut_ptr();
    let vectors = scores.len() / LANES;
    // SAFETY: `vectors` whole vectors of `scores`.
    unsafe {
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in 0..vectors {
            max = _mm512_max_ps(max, _mm512_loadu_ps(s.add(i * LANES)));
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut total = _mm512_setzero_ps();
        for i in 0..vectors {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(s.add(i * LANES)), max));
            _mm512_storeu_ps(s.add(i * LANES), e);
            total = _mm512_add_ps(total, e);
        }
        let mut lanes = [0.0f32; LANES];
        _mm512_storeu_ps(lanes.as_mut_ptr(), total);
        let total = _mm512_set1_ps(pairwise(lanes));
        for i in 0..vectors {
            _mm512_storeu_ps(s.add(i * LANES), _mm512_div_ps(_mm512_loadu_ps(s.add(i * LANES)), total));
        }
    }
}

/// [`super::exp`] of 16 lanes, operation for operation.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp(x: __m512) -> __m512 {
    // `max` returns its second operand for a NaN, as `f32::max` ignores it.
    let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    let round = _mm512_set1_ps(ROUND);
    let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), round), round);
    let minus_n = _mm512_sub_ps(_mm512_setzero_ps(), n);
    let r = _mm512_fmadd_ps(minus_n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fmadd_ps(minus_n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
    _mm512_mul_ps(y, _mm512_castsi512_ps(bits))
}

/// Outputs of rows `row..row + R`, columns `column..column + V × 16`: the weights times the
/// values, position by position; first the positions every row of the tile sees (each value
/// loaded once for all R rows), then each row's remaining ones.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn values<T: CacheValue, const R: usize, const V: usize>(
    tile: &Tile<'_, T>,
    row: usize,
    column: usize,
    stride: usize,
    weights: &[f32],
    out: &mut [&mut [f32]],
) {
    let dim = tile.dim;
    let counts = &tile.counts[row..row + R];
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let v = tile.v.as_ptr();
    let w = |r: usize, p: usize| weights[(row + r) * stride + p];
    // SAFETY: positions below each row's count, columns inside `dim` (the caller's checks).
    unsafe {
        for p in 0..counts[0] {
            let mut values = [_mm512_setzero_ps(); V];
            for c in 0..V {
                values[c] = load(v.add(p * dim + column + c * LANES));
            }
            for r in 0..R {
                let weight = _mm512_set1_ps(w(r, p));
                for c in 0..V {
                    acc[r][c] = _mm512_fmadd_ps(weight, values[c], acc[r][c]);
                }
            }
        }
        for r in 1..R {
            for p in counts[0]..counts[r] {
                let weight = _mm512_set1_ps(w(r, p));
                for c in 0..V {
                    acc[r][c] = _mm512_fmadd_ps(weight, load(v.add(p * dim + column + c * LANES)), acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..V {
                _mm512_storeu_ps(out[row + r][column + c * LANES..][..LANES].as_mut_ptr(), acc[r][c]);
            }
        }
    }
}
