//! Linear layers on the CPU: a row-dot kernel that reads each weight row once per block of input
//! rows.
//!
//! At batch 1 a core step is a chain of matrix-vector products, bound by how fast the weights
//! stream from memory. General GEMM kernels pack their operands and reach about 60% of the
//! machine's read bandwidth on these shapes; this kernel, split across the thread pool by output
//! features, gets close to the full bandwidth. Every output is computed by the same instruction
//! sequence whatever the number of rows in the call, so a sequence's results do not depend on which
//! other sequences share its batch. Other dtypes, other devices and computations that need
//! gradients use the regular matmul, so the model code stays device-agnostic.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::error::Result;

/// Below this many multiply-adds a single thread is faster than waking the pool.
const PARALLEL_MIN_WORK: usize = 1 << 16;
/// Input rows processed against each block of weight rows while it is in cache.
const ROW_BLOCK: usize = 32;

/// `xs @ weight^T` for a `[out, in]` weight.
pub fn linear(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let fast = xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && xs.rank() == 2
        && weight.is_contiguous()
        && !xs.track_op()
        && !weight.track_op();
    if fast { Ok(xs.contiguous()?.apply_op2_no_bwd(weight, &RowDot)?) } else { Ok(xs.matmul(&weight.t()?)?) }
}

struct RowDot;

impl CustomOp2 for RowDot {
    fn name(&self) -> &'static str {
        "row-dot-matvec"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(xs), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("row-dot-matvec expects float32 inputs")
        };
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("row-dot-matvec expects contiguous inputs")
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("row-dot-matvec: inner dims differ ({k} vs {k2})")
        }
        let (xs, w) = (&xs[x0..x1], &w[w0..w1]);
        // out_t[j * m + r] = <w_j, x_r>: each task owns a contiguous range of output features.
        let mut out_t = vec![0.0f32; n * m];
        if n * k * m < PARALLEL_MIN_WORK {
            dot_rows(xs, m, w, k, &mut out_t);
        } else {
            let threads = rayon::current_num_threads().max(1);
            let per_task = n.div_ceil(threads * 4).max(1);
            out_t
                .par_chunks_mut(per_task * m)
                .zip(w.par_chunks(per_task * k))
                .for_each(|(out, w)| dot_rows(xs, m, w, k, out));
        }
        let out = if m == 1 {
            out_t
        } else {
            let mut out = vec![0.0f32; m * n];
            for j in 0..n {
                for r in 0..m {
                    out[r * n + j] = out_t[j * m + r];
                }
            }
            out
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// For each weight row, its dot product with each of the `m` input rows.
fn dot_rows(xs: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { avx512::dot_rows(xs, m, w, k, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { avx2::dot_rows(xs, m, w, k, out) };
        return;
    }
    for (row, dots) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        for (r, slot) in dots.iter_mut().enumerate() {
            *slot = xs[r * k..(r + 1) * k].iter().zip(row).map(|(a, b)| a * b).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Four weight rows at a time: each load of the input feeds four fused multiply-adds. Input
    /// rows go in blocks so the weight rows are reused from cache.
    #[target_feature(enable = "avx2,fma")]
    pub fn dot_rows(xs: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
        let n = w.len() / k;
        for r0 in (0..m).step_by(super::ROW_BLOCK) {
            let rows = r0..(r0 + super::ROW_BLOCK).min(m);
            let mut j = 0;
            while j + 4 <= n {
                let block = [&w[j * k..], &w[(j + 1) * k..], &w[(j + 2) * k..], &w[(j + 3) * k..]];
                let mut r = rows.start;
                // Three input rows at a time share each weight load (twelve accumulators).
                while r + 3 <= rows.end {
                    let x = [&xs[r * k..], &xs[(r + 1) * k..], &xs[(r + 2) * k..]];
                    for (dr, dots) in dot4x3(x, block, k).into_iter().enumerate() {
                        for (i, value) in dots.into_iter().enumerate() {
                            out[(j + i) * m + r + dr] = value;
                        }
                    }
                    r += 3;
                }
                for r in r..rows.end {
                    let dots = dot4(&xs[r * k..(r + 1) * k], block, k);
                    for (i, value) in dots.into_iter().enumerate() {
                        out[(j + i) * m + r] = value;
                    }
                }
                j += 4;
            }
            while j < n {
                let row = &w[j * k..];
                for r in rows.clone() {
                    out[j * m + r] = dot4(&xs[r * k..(r + 1) * k], [row, row, row, row], k)[0];
                }
                j += 1;
            }
        }
    }

    /// `rows[i][..k] · x[..k]` for four rows; every slice holds at least `k` values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot4(x: &[f32], rows: [&[f32]; 4], k: usize) -> [f32; 4] {
        assert!(x.len() >= k && rows.iter().all(|r| r.len() >= k));
        let whole = k / 8 * 8;
        let (mut a0, mut a1, mut a2, mut a3) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c < whole {
            // SAFETY: c + 8 <= k, and every slice holds at least k values (asserted above).
            unsafe {
                let xv = _mm256_loadu_ps(x.as_ptr().add(c));
                a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(rows[0].as_ptr().add(c)), a0);
                a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(rows[1].as_ptr().add(c)), a1);
                a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(rows[2].as_ptr().add(c)), a2);
                a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(rows[3].as_ptr().add(c)), a3);
            }
            c += 8;
        }
        let mut out = [hsum(a0), hsum(a1), hsum(a2), hsum(a3)];
        for (value, row) in out.iter_mut().zip(rows) {
            *value += x[whole..k].iter().zip(&row[whole..k]).map(|(a, b)| a * b).sum::<f32>();
        }
        out
    }

    /// `dot4` for three input rows at once, with the same per-element arithmetic (so a row's
    /// results do not depend on which path computed them).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot4x3(xs: [&[f32]; 3], rows: [&[f32]; 4], k: usize) -> [[f32; 4]; 3] {
        assert!(xs.iter().all(|x| x.len() >= k) && rows.iter().all(|r| r.len() >= k));
        let whole = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); 4]; 3];
        let mut c = 0;
        while c < whole {
            // SAFETY: c + 8 <= k, and every slice holds at least k values (asserted above).
            unsafe {
                let x0 = _mm256_loadu_ps(xs[0].as_ptr().add(c));
                let x1 = _mm256_loadu_ps(xs[1].as_ptr().add(c));
                let x2 = _mm256_loadu_ps(xs[2].as_ptr().add(c));
                for i in 0..4 {
                    let wv = _mm256_loadu_ps(rows[i].as_ptr().add(c));
                    acc[0][i] = _mm256_fmadd_ps(x0, wv, acc[0][i]);
                    acc[1][i] = _mm256_fmadd_ps(x1, wv, acc[1][i]);
                    acc[2][i] = _mm256_fmadd_ps(x2, wv, acc[2][i]);
                }
            }
            c += 8;
        }
        let mut out = [[0.0f32; 4]; 3];
        for (r, x) in xs.iter().enumerate() {
            for (i, row) in rows.iter().enumerate() {
                out[r][i] = hsum(acc[r][i]) + x[whole..k].iter().zip(&row[whole..k]).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
    }
}

/// The same kernels with 16-lane registers (and 32 of them: four input rows at a time).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub fn dot_rows(xs: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
        let n = w.len() / k;
        for r0 in (0..m).step_by(super::ROW_BLOCK) {
            let rows = r0..(r0 + super::ROW_BLOCK).min(m);
            let mut j = 0;
            while j < n {
                // Four weight rows, or the last one repeated at the end of the matrix.
                let take = (n - j).min(4);
                let block = [0, 1, 2, 3].map(|i| &w[(j + i.min(take - 1)) * k..]);
                let mut r = rows.start;
                while r < rows.end {
                    let count = (rows.end - r).min(4);
                    let mut put = |dr: usize, row: &[f32; 4]| {
                        for (i, value) in row.iter().enumerate().take(take) {
                            out[(j + i) * m + r + dr] = *value;
                        }
                    };
                    let x = |i: usize| &xs[(r + i) * k..];
                    match count {
                        4 => dot4xr([x(0), x(1), x(2), x(3)], block, k).iter().enumerate().for_each(|(d, v)| put(d, v)),
                        3 => dot4xr([x(0), x(1), x(2)], block, k).iter().enumerate().for_each(|(d, v)| put(d, v)),
                        2 => dot4xr([x(0), x(1)], block, k).iter().enumerate().for_each(|(d, v)| put(d, v)),
                        _ => dot4xr([x(0)], block, k).iter().enumerate().for_each(|(d, v)| put(d, v)),
                    }
                    r += count;
                }
                j += take;
            }
        }
    }

    /// Dot products of `R` (1 to 4) input rows with four weight rows; each result is accumulated
    /// lane-wise in the same order whatever rows it is computed beside.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn dot4xr<const R: usize>(xs: [&[f32]; R], rows: [&[f32]; 4], k: usize) -> [[f32; 4]; R] {
        assert!(xs.iter().all(|x| x.len() >= k) && rows.iter().all(|r| r.len() >= k));
        let whole = k / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut c = 0;
        while c < whole {
            // SAFETY: c + 16 <= k, and every slice holds at least k values (asserted above).
            unsafe {
                let x = xs.map(|x| _mm512_loadu_ps(x.as_ptr().add(c)));
                for i in 0..4 {
                    let wv = _mm512_loadu_ps(rows[i].as_ptr().add(c));
                    for r in 0..R {
                        acc[r][i] = _mm512_fmadd_ps(x[r], wv, acc[r][i]);
                    }
                }
            }
            c += 16;
        }
        let mut out = [[0.0f32; 4]; R];
        for (r, x) in xs.iter().enumerate() {
            for (i, row) in rows.iter().enumerate() {
                let tail: f32 = x[whole..k].iter().zip(&row[whole..k]).map(|(a, b)| a * b).sum();
                out[r][i] = _mm512_reduce_add_ps(acc[r][i]) + tail;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn check(m: usize, n: usize, k: usize) {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let fast = linear(&xs, &w).unwrap();
        let reference = xs.matmul(&w.t().unwrap()).unwrap();
        let diff = (fast - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-3, "m={m} n={n} k={k}: {diff}");
    }

    #[test]
    fn matches_matmul_for_small_and_large_shapes() {
        check(1, 3, 5);
        check(1, 192, 64);
        check(3, 300, 257);
        check(16, 2048, 512);
        check(1, 4096, 1024);
    }

    #[test]
    fn large_batches_match_matmul() {
        check(40, 64, 32);
        check(100, 300, 128);
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (1000, 256), &dev).unwrap();
        let batch = Tensor::randn(0f32, 1.0, (70, 256), &dev).unwrap();
        let together = linear(&batch, &w).unwrap();
        for r in [0, 33, 69] {
            let alone = linear(&batch.narrow(0, r, 1).unwrap(), &w).unwrap();
            let same = together.narrow(0, r, 1).unwrap();
            assert_eq!(alone.to_vec2::<f32>().unwrap(), same.to_vec2::<f32>().unwrap());
        }
    }
}
