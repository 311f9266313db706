//! The arithmetic of CPU attention for a tile: up to [`TILE_ROWS`] consecutive query rows of one
//! sequence and one head, over that head's cached keys and values.
//!
//! A tile reads each key and value once for all its rows (from the second-level cache: a head's
//! keys and values at 1,024 positions of 64 dimensions are 512 KB), with the dot products of 16
//! (row, position) pairs in registers at once. Every number a row gets is computed by the same
//! operations in the same order whatever tile, batch or chunk the row is in:
//! - a score is the fused multiply-add of the row and the key in 16 lanes over the dimensions
//!   (dimension `d` in lane `d % 16`), the lanes added pairwise (`i + 8`, `+ 4`, `+ 2`, `+ 1`);
//! - a weight is [`exp`] of the score minus the row's maximum, over the total, which is summed in
//!   16 lanes over the positions (position `p` in lane `p % 16`) and added pairwise the same way;
//! - an output is the fused multiply-adds of the weights and the values, position by position.
//!
//! With AVX-512 this runs as vector code ([`attention_avx512`](super::attention_avx512)); elsewhere
//! (or with a head size that is not a multiple of 16) [`attend_tile_generic`], the same operations
//! on arrays, gives the same bits (tested).

use half::bf16;

#[cfg(target_arch = "x86_64")]
use super::attention_avx512 as avx512;
use crate::model::bf16_bits::widen;
use candle_core::DType;

/// Query rows attended together.
pub(super) const TILE_ROWS: usize = 4;
/// Lanes of the partial sums.
pub(super) const LANES: usize = 16;

/// A cache element: float32, or bfloat16 (read as float32 exactly).
pub(super) trait CacheValue: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn slice(storage: &candle_core::CpuStorage) -> Option<&[Self]>;
    fn float(self) -> f32;
}

impl CacheValue for f32 {
    const DTYPE: DType = DType::F32;
    fn slice(storage: &candle_core::CpuStorage) -> Option<&[Self]> {
        match storage {
            candle_core::CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn float(self) -> f32 {
        self
    }
}

impl CacheValue for bf16 {
    const DTYPE: DType = DType::BF16;
    fn slice(storage: &candle_core::CpuStorage) -> Option<&[Self]> {
        match storage {
            candle_core::CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
    #[inline(always)]
    fn float(self) -> f32 {
        widen(self.to_bits())
    }
}

/// One tile of one head: row `r` (`r < counts.len()`) attends with query `q[r]` (`dim` values,
/// already scaled) over the first `counts[r]` positions of `k` and `v` (`[positions][dim]`),
/// into `out[r]` (`dim` values). `counts` ascend (consecutive rows of a chunk: each sees one more
/// position) and are at least 1. `scratch` is reused between calls.
pub(super) struct Tile<'a, T> {
    pub q: [&'a [f32]; TILE_ROWS],
    pub counts: &'a [usize],
    pub k: &'a [T],
    pub v: &'a [T],
    pub dim: usize,
}

/// Attends `tile` into `out`, with the widest path this CPU has.
pub(super) fn attend_tile<T: CacheValue>(tile: &Tile<'_, T>, scratch: &mut Vec<f32>, out: &mut [&mut [f32]]) {
    #[cfg(target_arch = "x86_64")]
    if tile.dim.is_multiple_of(LANES) && avx512::available() {
        // SAFETY: AVX-512F is available; the head size is whole vectors.
        return unsafe { avx512::attend_tile(tile, scratch, out) };
    }
    attend_tile_generic(tile, scratch, out)
}

/// [`attend_tile`] on arrays: the reference for the vector path, and the path of other CPUs.
pub(super) fn attend_tile_generic<T: CacheValue>(tile: &Tile<'_, T>, scratch: &mut Vec<f32>, out: &mut [&mut [f32]]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { generic_fma(tile, scratch, out) };
    }
    generic_body(tile, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn generic_fma<T: CacheValue>(tile: &Tile<'_, T>, scratch: &mut Vec<f32>, out: &mut [&mut [f32]]) {
    generic_body(tile, scratch, out)
}

#[inline(always)]
fn generic_body<T: CacheValue>(tile: &Tile<'_, T>, scratch: &mut Vec<f32>, out: &mut [&mut [f32]]) {
    let (dim, rows) = (tile.dim, tile.counts.len());
    let stride = score_stride(tile.counts);
    scratch.clear();
    scratch.resize(rows * stride, f32::NEG_INFINITY);
    for (r, scores) in scratch.chunks_exact_mut(stride).enumerate() {
        for (p, score) in scores[..tile.counts[r]].iter_mut().enumerate() {
            let key = &tile.k[p * dim..][..dim];
            let mut lanes = [0.0f32; LANES];
            for (d, (&q, key)) in tile.q[r][..dim].iter().zip(key).enumerate() {
                lanes[d % LANES] = q.mul_add(key.float(), lanes[d % LANES]);
            }
            *score = pairwise(lanes);
        }
    }
    for (r, (weights, out)) in scratch.chunks_exact_mut(stride).zip(out.iter_mut()).enumerate() {
        softmax_generic(weights);
        out.fill(0.0);
        for (p, &w) in weights[..tile.counts[r]].iter().enumerate() {
            for (o, x) in out.iter_mut().zip(&tile.v[p * dim..][..dim]) {
                *o = w.mul_add(x.float(), *o);
            }
        }
    }
}

/// Scores of a row in place (minus infinity past its positions, the length a multiple of 16)
/// into its weights.
#[inline(always)]
fn softmax_generic(scores: &mut [f32]) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut lanes = [0.0f32; LANES];
    for chunk in scores.chunks_exact_mut(LANES) {
        let mut x = [0.0f32; LANES];
        for (x, s) in x.iter_mut().zip(chunk.iter()) {
            *x = *s - max;
        }
        let e = exp(x);
        chunk.copy_from_slice(&e);
        for (lane, e) in lanes.iter_mut().zip(e) {
            *lane += e;
        }
    }
    let total = pairwise(lanes);
    for w in scores.iter_mut() {
        *w /= total;
    }
}

/// Scores per row in the scratch: the last row's positions, rounded up to whole vectors.
pub(super) fn score_stride(counts: &[usize]) -> usize {
    counts.last().copied().unwrap_or(0).next_multiple_of(LANES).max(LANES)
}

/// The 16 lanes added pairwise: lane `i` and `i + 8`, then `+ 4`, `+ 2`, `+ 1`.
#[inline(always)]
pub(super) fn pairwise(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0]
}

pub(super) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts, the first with few enough bits that `n × LN2_HI` is exact.
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 × 2^23: adding and subtracting it rounds to an integer (to nearest, ties to even).
pub(super) const ROUND: f32 = 12_582_912.0;
/// Below this, e^x is taken as 0 (or a number below 2^-126).
pub(super) const EXP_MIN: f32 = -88.0;
/// The polynomial of e^r - 1 - r over r² on [-ln 2 / 2, ln 2 / 2] (Cephes' `expf`).
pub(super) const EXP_POLY: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// e^x of 16 values `x <= 0` (within 2 units in the last place; NaN taken as -88): `2^n × e^r`
/// with `n = round(x / ln 2)`, the same operations on every path.
#[inline(always)]
pub(super) fn exp(x: [f32; LANES]) -> [f32; LANES] {
    let mut out = [0.0f32; LANES];
    for (o, &x) in out.iter_mut().zip(&x) {
        let x = x.max(EXP_MIN);
        let n = (x * LOG2E + ROUND) - ROUND;
        // 0 - n, not -n: the vector path has no sign flip (and -0 and 0 - 0 differ).
        let minus_n = 0.0 - n;
        let r = minus_n.mul_add(LN2_HI, x);
        let r = minus_n.mul_add(LN2_LO, r);
        let mut p = EXP_POLY[0];
        for c in &EXP_POLY[1..] {
            p = p.mul_add(r, *c);
        }
        let y = p.mul_add(r * r, r) + 1.0;
        let scale = f32::from_bits(((n as i32).wrapping_add(127) << 23) as u32);
        *o = y * scale;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        crate::model::cpu::support::test_values(len, seed, 2.0)
    }

    #[test]
    fn exp_is_within_two_units_in_the_last_place() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp([x; LANES])[0] as f64;
            let want = (x as f64).exp();
            let ulp = f32::EPSILON as f64 * want;
            assert!((got - want).abs() <= 2.0 * ulp, "e^{x}: {got} against {want}");
            x += 0.0137;
        }
        assert_eq!(exp([0.0; LANES])[0], 1.0);
        assert_eq!(exp([f32::NEG_INFINITY; LANES])[0], 0.0);
        assert_eq!(exp([-100.0; LANES])[0], 0.0);
    }

    /// Attends every row of `counts` through `run`, tiles of `rows` at a time.
    fn tiles<T: CacheValue>(
        q: &[f32],
        k: &[T],
        v: &[T],
        dim: usize,
        counts: &[usize],
        rows: usize,
        run: impl Fn(&Tile<'_, T>, &mut Vec<f32>, &mut [&mut [f32]]),
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; counts.len() * dim];
        let mut scratch = Vec::new();
        for (t, (counts, out)) in counts.chunks(rows).zip(out.chunks_mut(rows * dim)).enumerate() {
            let q = std::array::from_fn(|r| &q[((t * rows + r).min(q.len() / dim - 1)) * dim..][..dim]);
            let mut outs: Vec<&mut [f32]> = out.chunks_mut(dim).collect();
            run(&Tile { q, counts, k, v, dim }, &mut scratch, &mut outs);
        }
        out
    }

    fn check<T: CacheValue>(dim: usize, start: usize, rows: usize, from: impl Fn(f32) -> T) {
        let positions = start + rows;
        let q = random(rows * dim, 3 + dim as u64);
        let k: Vec<T> = random(positions * dim, 5).into_iter().map(&from).collect();
        let v: Vec<T> = random(positions * dim, 7).into_iter().map(&from).collect();
        let counts: Vec<usize> = (1..=rows).map(|i| start + i).collect();
        // The plain definition in float64, for the size of the error.
        let mut exact = vec![0.0f64; rows * dim];
        for (r, &n) in counts.iter().enumerate() {
            let scores: Vec<f64> =
                (0..n).map(|p| (0..dim).map(|d| q[r * dim + d] as f64 * k[p * dim + d].float() as f64).sum()).collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (p, s) in scores.iter().enumerate() {
                for d in 0..dim {
                    exact[r * dim + d] += (s - max).exp() / total * v[p * dim + d].float() as f64;
                }
            }
        }
        let one_at_a_time = tiles(&q, &k, &v, dim, &counts, 1, |t, s, o| attend_tile_generic(t, s, o));
        for (got, want) in one_at_a_time.iter().zip(&exact) {
            assert!((*got as f64 - want).abs() < 1e-4, "dim {dim}: {got} against {want}");
        }
        // Every tiling and every path gives each row the same bits.
        for rows_per_tile in [1, 2, 3, 4] {
            let generic = tiles(&q, &k, &v, dim, &counts, rows_per_tile, |t, s, o| attend_tile_generic(t, s, o));
            let best = tiles(&q, &k, &v, dim, &counts, rows_per_tile, |t, s, o| attend_tile(t, s, o));
            assert_eq!(generic, one_at_a_time, "dim {dim}, {rows_per_tile} rows a tile, generic");
            assert_eq!(best, one_at_a_time, "dim {dim}, {rows_per_tile} rows a tile");
        }
    }

    #[test]
    fn every_tiling_and_path_gives_each_row_the_same_bits() {
        for (dim, start, rows) in [(16, 0, 7), (64, 5, 9), (96, 30, 6), (128, 17, 5), (24, 3, 6), (64, 0, 1)] {
            check::<f32>(dim, start, rows, |x| x);
            check::<bf16>(dim, start, rows, bf16::from_f32);
        }
    }
}
