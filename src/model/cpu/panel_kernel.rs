//! Register-tile kernels for `x @ W^T` with `W` packed in column panels.
//!
//! A panel holds [`PANEL`] consecutive output features for every input feature, laid out
//! `[k][PANEL]`, so a kernel streams contiguous blocks of weights. The input rows are packed too,
//! in groups of up to [`MAX_ROWS`] rows laid out `[k][rows]`, so that the values broadcast at one
//! input feature sit side by side. A tile multiplies one row group by a few panels at once (several
//! independent weight streams and enough accumulators to hide the multiply-add latency). Every
//! output is a single accumulator summed over the input features in order, whatever the tile
//! shape: a row's results do not depend on the other rows computed beside it (the engine relies on
//! this for batch-invariant outputs).

/// Output features per panel.
pub const PANEL: usize = 32;
/// Rows per packed input group.
pub const MAX_ROWS: usize = 6;

/// Calls `$module::tile::<R, P>` for the runtime row and panel counts.
macro_rules! dispatch {
    ($module:ident, $rows:expr, $count:expr, $($arg:expr),*) => {
        match ($rows, $count) {
            (1, 1) => $module::tile::<1, 1>($($arg),*),
            (1, 2) => $module::tile::<1, 2>($($arg),*),
            (1, 3) => $module::tile::<1, 3>($($arg),*),
            (1, _) => $module::tile::<1, 4>($($arg),*),
            (2, 1) => $module::tile::<2, 1>($($arg),*),
            (2, 2) => $module::tile::<2, 2>($($arg),*),
            (2, 3) => $module::tile::<2, 3>($($arg),*),
            (2, _) => $module::tile::<2, 4>($($arg),*),
            (3, 1) => $module::tile::<3, 1>($($arg),*),
            (3, 2) => $module::tile::<3, 2>($($arg),*),
            (3, _) => $module::tile::<3, 3>($($arg),*),
            (4, 1) => $module::tile::<4, 1>($($arg),*),
            (4, 2) => $module::tile::<4, 2>($($arg),*),
            (4, _) => $module::tile::<4, 3>($($arg),*),
            (5, 1) => $module::tile::<5, 1>($($arg),*),
            (5, _) => $module::tile::<5, 2>($($arg),*),
            (_, 1) => $module::tile::<6, 1>($($arg),*),
            (_, _) => $module::tile::<6, 2>($($arg),*),
        }
    };
}

/// How many panels a tile of `rows` rows takes at once (so that the accumulators fit the registers).
pub fn panels_per_tile(rows: usize) -> usize {
    match rows {
        0..=2 => 4,
        3..=4 => 3,
        _ => 2,
    }
}

/// `out[r * stride + j] = sum_c x[c * rows + r] * panels[p][c][j']` (with `j = p * PANEL + j'`) for
/// the `rows` rows of the packed group `x` (`[k][rows]`) and the `panels.len() / (k * PANEL)` panels
/// (at most [`panels_per_tile`]`(rows)`). Meanwhile `ahead` (weights the caller needs next) is
/// prefetched into the cache, spread evenly over the tile's work, so that the next tile finds
/// its weights without waiting on memory.
///
/// The output is a raw pointer because the threads of one product write disjoint column ranges of
/// the same rows.
///
/// # Safety
/// For every `r < rows`, `out + r * stride .. out + r * stride + count * PANEL` must be valid for
/// writes and not accessed by anyone else during the call.
pub unsafe fn tile(x: &[f32], rows: usize, k: usize, panels: &[f32], out: *mut f32, stride: usize, ahead: &[f32]) {
    // SAFETY: the caller's contract.
    unsafe { tile_range(x, rows, k, panels, 0..k, false, out, stride, ahead) }
}

/// [`tile`] over the input features `features` only; with `accumulate`, the sums continue from
/// what `out` holds (the partial sums of the features before), so that splitting the features
/// into consecutive ranges gives the same bits as one call over all of them.
///
/// # Safety
/// As [`tile`]; with `accumulate`, the outputs must hold the partial sums.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_range(
    x: &[f32],
    rows: usize,
    k: usize,
    panels: &[f32],
    features: std::ops::Range<usize>,
    accumulate: bool,
    out: *mut f32,
    stride: usize,
    ahead: &[f32],
) {
    let count = panels.len() / (k * PANEL);
    assert!((1..=MAX_ROWS).contains(&rows) && (1..=panels_per_tile(rows)).contains(&count));
    assert!(x.len() >= rows * k && panels.len() == count * k * PANEL && features.end <= k);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports the features the function is compiled for; input bounds asserted
        // above, the output's by the caller.
        unsafe { dispatch!(avx512, rows, count, x, k, panels, features, accumulate, out, stride, ahead) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        unsafe { dispatch!(avx2, rows, count, x, k, panels, features, accumulate, out, stride, ahead) };
        return;
    }
    // SAFETY: the output's bounds are the caller's contract.
    unsafe { dispatch!(portable, rows, count, x, k, panels, features, accumulate, out, stride, ahead) };
}

/// Cache-line prefetches of a region, spread over the `k` steps of a tile.
struct Prefetch {
    start: *const f32,
    lines: usize,
    per_step: usize,
}

impl Prefetch {
    /// Floats per 64-byte cache line.
    const LINE: usize = 16;

    fn new(region: &[f32], k: usize) -> Self {
        let lines = region.len() / Self::LINE;
        Self { start: region.as_ptr(), lines, per_step: lines.div_ceil(k.max(1)) }
    }

    #[inline(always)]
    fn step(&self, c: usize) {
        #[cfg(target_arch = "x86_64")]
        for line in c * self.per_step..((c + 1) * self.per_step).min(self.lines) {
            // SAFETY: line < lines, so the address is inside the region; a prefetch never faults.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T1>(self.start.add(line * Self::LINE).cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = c;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// `R` rows by `P` panels: 2 * R * P accumulators; per input feature 2 * P weight loads and R
    /// broadcasts feed 2 * R * P fused multiply-adds.
    /// # Safety
    /// As [`super::tile`]; the CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const R: usize, const P: usize>(
        x: &[f32],
        k: usize,
        panels: &[f32],
        range: std::ops::Range<usize>,
        accumulate: bool,
        out: *mut f32,
        stride: usize,
        ahead: &[f32],
    ) {
        assert!(x.len() >= R * k && panels.len() >= P * k * PANEL && range.end <= k);
        let mut acc = [[[_mm512_setzero_ps(); 2]; P]; R];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (p, a) in acc.iter_mut().enumerate() {
                    // SAFETY: row r's outputs of panel p (the caller's contract).
                    unsafe {
                        let at = out.add(r * stride + p * PANEL);
                        *a = [_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16))];
                    }
                }
            }
        }
        let (xp, wp) = (x.as_ptr(), panels.as_ptr());
        let lines = super::Prefetch::new(ahead, range.len());
        let first = range.start;
        for c in range {
            lines.step(c - first);
            // SAFETY: c < k, so every offset is inside the lengths asserted above.
            unsafe {
                let w: [[__m512; 2]; P] = std::array::from_fn(|p| {
                    let at = wp.add(p * k * PANEL + c * PANEL);
                    [_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16))]
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*xp.add(c * R + r));
                    for (a, w) in acc.iter_mut().zip(&w) {
                        a[0] = _mm512_fmadd_ps(b, w[0], a[0]);
                        a[1] = _mm512_fmadd_ps(b, w[1], a[1]);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (p, a) in acc.iter().enumerate() {
                // SAFETY: inside row r's P * PANEL outputs (the caller's contract).
                unsafe {
                    let at = out.add(r * stride + p * PANEL);
                    _mm512_storeu_ps(at, a[0]);
                    _mm512_storeu_ps(at.add(16), a[1]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// The same tile with 8-lane registers (4 per panel row). The 16 registers hold at most 12
    /// accumulators beside a broadcast, so the tile runs as blocks of rows x panels that fit
    /// (1 row x up to 3 panels, or up to 3 rows x 1 panel), each over all of `range`: the later
    /// blocks find the weights in the cache. Each output is still one accumulator over the
    /// features in order.
    /// # Safety
    /// As [`super::tile`]; the CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const R: usize, const P: usize>(
        x: &[f32],
        k: usize,
        panels: &[f32],
        range: std::ops::Range<usize>,
        accumulate: bool,
        out: *mut f32,
        stride: usize,
        ahead: &[f32],
    ) {
        assert!(x.len() >= R * k && panels.len() >= P * k * PANEL && range.end <= k);
        let lines = super::Prefetch::new(ahead, range.len());
        // The first block prefetches `ahead` (when there is any); the others run without the
        // bookkeeping.
        let fetching = lines.lines > 0;
        // One row takes up to 3 panels a block; more rows take one panel, 3 rows at a time (4 as
        // 2 + 2).
        let panels_per_block = if R == 1 { 3 } else { 1 };
        for p in (0..P).step_by(panels_per_block) {
            let q = (P - p).min(panels_per_block);
            let mut r = 0;
            while r < R {
                let b = match R - r {
                    1 => 1,
                    2 | 4 => 2,
                    _ => 3,
                };
                let fetch = fetching && p == 0 && r == 0;
                // SAFETY: rows r..r + b and panels p..p + q, inside those asserted above; their
                // outputs by the caller's contract.
                unsafe {
                    let (xr, w, o) =
                        (x.as_ptr().add(r), panels[p * k * PANEL..].as_ptr(), out.add(r * stride + p * PANEL));
                    run_block((b, q, fetch), xr, R, k, w, &range, accumulate, o, stride, &lines);
                }
                r += b;
            }
        }
    }

    /// [`block`] for `shape` = (rows, panels, prefetching) at run time.
    /// # Safety
    /// As [`block`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_block(
        shape: (usize, usize, bool),
        x: *const f32,
        rows: usize,
        k: usize,
        w: *const f32,
        range: &std::ops::Range<usize>,
        accumulate: bool,
        out: *mut f32,
        stride: usize,
        lines: &super::Prefetch,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            match shape {
                (1, 1, false) => block::<1, 1, false>(x, rows, k, w, range, accumulate, out, stride, lines),
                (1, 1, true) => block::<1, 1, true>(x, rows, k, w, range, accumulate, out, stride, lines),
                (1, 2, false) => block::<1, 2, false>(x, rows, k, w, range, accumulate, out, stride, lines),
                (1, 2, true) => block::<1, 2, true>(x, rows, k, w, range, accumulate, out, stride, lines),
                (1, _, false) => block::<1, 3, false>(x, rows, k, w, range, accumulate, out, stride, lines),
                (1, _, true) => block::<1, 3, true>(x, rows, k, w, range, accumulate, out, stride, lines),
                (2, _, false) => block::<2, 1, false>(x, rows, k, w, range, accumulate, out, stride, lines),
                (2, _, true) => block::<2, 1, true>(x, rows, k, w, range, accumulate, out, stride, lines),
                (_, _, false) => block::<3, 1, false>(x, rows, k, w, range, accumulate, out, stride, lines),
                (_, _, true) => block::<3, 1, true>(x, rows, k, w, range, accumulate, out, stride, lines),
            }
        }
    }

    /// `B` rows (of a group of `rows`, row `i`'s feature `c` at `x[c * rows + i]`) by `Q`
    /// consecutive panels (from `w`), over the features `range`, prefetching `lines` when `FETCH`.
    /// # Safety
    /// As [`tile`], for these rows and panels.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const B: usize, const Q: usize, const FETCH: bool>(
        x: *const f32,
        rows: usize,
        k: usize,
        w: *const f32,
        range: &std::ops::Range<usize>,
        accumulate: bool,
        out: *mut f32,
        stride: usize,
        lines: &super::Prefetch,
    ) {
        let mut acc = [[[_mm256_setzero_ps(); 4]; Q]; B];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (p, a) in acc.iter_mut().enumerate() {
                    for (i, a) in a.iter_mut().enumerate() {
                        // SAFETY: row r's outputs of panel p (the caller's contract).
                        *a = unsafe { _mm256_loadu_ps(out.add(r * stride + p * PANEL + 8 * i)) };
                    }
                }
            }
        }
        let first = range.start;
        for c in range.clone() {
            if FETCH {
                lines.step(c - first);
            }
            // SAFETY: c < k, so every offset is inside the rows and panels of the caller.
            unsafe {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = _mm256_set1_ps(*x.add(c * rows + r));
                    for (p, a) in acc.iter_mut().enumerate() {
                        let at = w.add(p * k * PANEL + c * PANEL);
                        for (i, a) in a.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(b, _mm256_loadu_ps(at.add(8 * i)), *a);
                        }
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (p, a) in acc.iter().enumerate() {
                for (i, a) in a.iter().enumerate() {
                    // SAFETY: inside row r's Q * PANEL outputs (the caller's contract).
                    unsafe { _mm256_storeu_ps(out.add(r * stride + p * PANEL + 8 * i), *a) };
                }
            }
        }
    }
}

mod portable {
    use super::PANEL;

    /// # Safety
    /// As [`super::tile`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const R: usize, const P: usize>(
        x: &[f32],
        k: usize,
        panels: &[f32],
        range: std::ops::Range<usize>,
        accumulate: bool,
        out: *mut f32,
        stride: usize,
        _ahead: &[f32],
    ) {
        for p in 0..P {
            let panel = &panels[p * k * PANEL..(p + 1) * k * PANEL];
            let mut acc = [[0.0f32; PANEL]; R];
            if accumulate {
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: row r's outputs of panel p (the caller's contract).
                    unsafe { std::ptr::copy_nonoverlapping(out.add(r * stride + p * PANEL), acc.as_mut_ptr(), PANEL) };
                }
            }
            let first = range.start;
            for (c, w) in panel.chunks_exact(PANEL).enumerate().skip(first).take(range.len()) {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = x[c * R + r];
                    for (a, w) in acc.iter_mut().zip(w) {
                        *a += b * w;
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                // SAFETY: row r's outputs of panel p (the caller's contract).
                unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add(r * stride + p * PANEL), PANEL) };
            }
        }
    }
}
