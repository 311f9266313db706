//! Linear layers with bfloat16 weights on the CPU: half the bytes of float32 to stream per step,
//! and on CPUs with AMX ([`amx`](super::amx)) tile multiply-adds that make a 16-row product cost
//! about what a 1-row product does.
//!
//! The weights are packed once, at load, in column groups of 64 outputs, `[group][step][tile]
//! [16 feature pairs][16 columns][2]` (zero-padded), which is the layout the tiles load. The input
//! rows are rounded to bfloat16 (to nearest, ties to even); the products are summed in float32
//! and the result stays float32. Without AMX a portable kernel reads the same layout. Either
//! kernel sums each output of each row in an order that does not depend on the other rows, so a
//! sequence's outputs do not depend on which sequences share its batch.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::bf16;
use rayon::prelude::*;

use super::amx::{self, GROUP_COLUMNS, STEP_VALUES, TILE_FEATURES, TILE_ROWS};
use super::avx512_bf16;
use super::bf16_pack::pack_group;
use super::support::{OutPtr, product_rows, weight_buffer};
use crate::model::bf16_bits::{to_bf16, widen};

/// Below this many multiply-adds a single thread is faster than waking the pool (measured on
/// the fixture model: at 1 << 16 nine decoding rows woke the pool for every product and a tick
/// cost a third more).
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// 64 bytes: one tile row, and the alignment of packed weights and inputs.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u16; 32]);

const ZERO_LINE: Line = Line([0; 32]);

/// Which kernel multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles.
    Amx,
    /// AVX512_BF16 dot products (`vdpbf16ps`).
    Avx512Bf16,
    /// Plain Rust over the same layout, for CPUs without either.
    Portable,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::Portable => "portable",
        }
    }

    /// Whether this CPU can run it.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Amx => amx::available(),
            Kernel::Avx512Bf16 => avx512_bf16::available(),
            Kernel::Portable => true,
        }
    }

    /// The kernels this CPU can run, fastest first.
    pub fn available() -> Vec<Self> {
        [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Portable].into_iter().filter(|k| k.is_available()).collect()
    }

    /// The fastest available kernel, or the one `HUGINN_BF16_KERNEL` names (`amx`, `avx512-bf16`,
    /// `portable`) when this CPU has it; `HUGINN_DISABLE_AMX` turns AMX off. Decided once.
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Self::available();
            let asked = std::env::var("HUGINN_BF16_KERNEL").ok();
            available.iter().copied().find(|k| asked.as_deref() == Some(k.name())).unwrap_or(available[0])
        })
    }
}

/// A `[n, k]` weight in bfloat16, packed for [`amx::column_group`].
pub struct Bf16Panels {
    lines: Vec<Line>,
    pub(super) n: usize,
    pub(super) k: usize,
    /// Tile steps per column group: `k` rounded up to 32 features.
    steps: usize,
}

impl Bf16Panels {
    /// Rounds `w` (`[n, k]`, row-major) to bfloat16 and packs it.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        let packed = Self::pack_rows(n, k, |first, rows| {
            for (bits, value) in rows.iter_mut().zip(&w[first * k..]) {
                *bits = bf16::from_f32(*value).to_bits();
            }
            Ok::<(), std::convert::Infallible>(())
        });
        match packed {
            Ok(panels) => panels,
            Err(never) => match never {},
        }
    }

    /// Packs a `[n, k]` bfloat16 weight that `read` supplies a column group at a time:
    /// `read(first, rows)` fills `rows` (`rows.len() / k` whole rows, row-major) with the bits of
    /// rows `first..`. Each task reads into one buffer of a group's rows, reused for all its
    /// groups, so a weight can be packed straight from a file with no copy of it in memory.
    pub fn pack_rows<E: Send>(
        n: usize,
        k: usize,
        read: impl Fn(usize, &mut [u16]) -> Result<(), E> + Sync,
    ) -> Result<Self, E> {
        let steps = k.div_ceil(TILE_FEATURES);
        let groups = n.div_ceil(GROUP_COLUMNS);
        let group_lines = steps * STEP_VALUES / 32;
        let fill = |rows: &mut Vec<u16>, group: usize, block: &mut [MaybeUninit<Line>]| {
            let first = group * GROUP_COLUMNS;
            let columns = GROUP_COLUMNS.min(n - first);
            rows.resize(columns * k, 0u16);
            read(first, rows)?;
            // SAFETY: `Line` is 32 u16 with no padding (64 bytes, align 64): 16 u32 pairs, and
            // `MaybeUninit` keeps its layout.
            let pairs = unsafe {
                std::slice::from_raw_parts_mut(block.as_mut_ptr().cast::<MaybeUninit<u32>>(), block.len() * 16)
            };
            pack_group(pairs, rows, k, steps);
            Ok(())
        };
        // SAFETY: `pack_group` writes every line of its group (padding included).
        let lines = unsafe { weight_buffer(groups * group_lines, group_lines, Vec::new, fill) }?;
        Ok(Self { lines, n, k, steps })
    }

    /// Row `row` of the weight (`row < n`) into `out` (`k` values), widened to float32.
    pub(super) fn row(&self, row: usize, out: &mut [f32]) {
        let group = &self.values()[row / GROUP_COLUMNS * self.steps * STEP_VALUES..][..self.steps * STEP_VALUES];
        let (tile, c) = (row % GROUP_COLUMNS / 16, row % 16);
        for (f, value) in out.iter_mut().enumerate() {
            let (step, pair, half) = (f / TILE_FEATURES, f % TILE_FEATURES / 2, f % 2);
            *value = widen(group[((step * 64 + tile * 16 + pair) * 16 + c) * 2 + half]);
        }
    }

    fn values(&self) -> &[u16] {
        // SAFETY: `Line` is 32 u16 with no padding (64 bytes, align 64).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u16>(), self.lines.len() * 32) }
    }

    /// `xs @ W^T` for `m` rows of `k` float32 inputs: `[m, n]` float32. A kernel this CPU lacks
    /// falls back to the portable kernel.
    pub fn multiply(&self, xs: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let kernel = if kernel.is_available() { kernel } else { Kernel::Portable };
        let (n, width) = (self.n, self.steps * TILE_FEATURES);
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        if m == 0 {
            return out;
        }
        // The rows in bfloat16, each padded with zeros to whole tile steps.
        let mut rows = vec![ZERO_LINE; m * width / 32];
        // SAFETY: as in `values`.
        let x: &mut [u16] = unsafe { std::slice::from_raw_parts_mut(rows.as_mut_ptr().cast::<u16>(), m * width) };
        for (row, input) in x.chunks_exact_mut(width).zip(xs.chunks_exact(self.k)) {
            for (value, input) in row.iter_mut().zip(input) {
                *value = to_bf16(*input);
            }
        }
        let x: &[u16] = x;
        let groups = n.div_ceil(GROUP_COLUMNS);
        let per_task = if m * n * self.k < PARALLEL_MIN_WORK {
            groups
        } else {
            groups.div_ceil(rayon::current_num_threads().max(1) * 4)
        };
        let base = OutPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        let base = &base;
        let group_values = self.steps * STEP_VALUES;
        self.values().par_chunks(per_task * group_values).enumerate().for_each(|(task, weights)| {
            let mut tile = [[0.0f32; GROUP_COLUMNS]; TILE_ROWS];
            for (g, weights) in weights.chunks_exact(group_values).enumerate() {
                let first_column = (task * per_task + g) * GROUP_COLUMNS;
                let columns = GROUP_COLUMNS.min(n - first_column);
                for first_row in (0..m).step_by(TILE_ROWS) {
                    let count = TILE_ROWS.min(m - first_row);
                    let x = &x[first_row * width..][..count * width];
                    if kernel == Kernel::Amx && columns == GROUP_COLUMNS {
                        // SAFETY: AMX is available (`Kernel::Amx` is chosen only then); `x` holds
                        // `count` rows of `width` values and `weights` one group's steps; this
                        // task alone writes these 64 columns of these rows of the `m * n` output.
                        unsafe {
                            let out = base.at(first_row * n + first_column);
                            amx::column_group(x.as_ptr(), width * 2, count, weights.as_ptr(), self.steps, out, n * 4);
                        }
                        continue;
                    }
                    match kernel {
                        // SAFETY: as above, into `tile` (16 rows of 64 floats).
                        Kernel::Amx => unsafe {
                            amx::column_group(
                                x.as_ptr(),
                                width * 2,
                                count,
                                weights.as_ptr(),
                                self.steps,
                                tile.as_mut_ptr().cast::<f32>(),
                                GROUP_COLUMNS * 4,
                            )
                        },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: AVX512_BF16 is available (`Kernel::Avx512Bf16` is chosen only
                        // then); `weights` is one group's aligned lines of `width / 32` steps.
                        Kernel::Avx512Bf16 => unsafe {
                            avx512_bf16::column_group(x, width, weights, &mut tile[..count])
                        },
                        _ => portable_column_group(x, width, weights, &mut tile[..count]),
                    }
                    for (r, sums) in tile[..count].iter().enumerate() {
                        // SAFETY: this task alone writes columns first_column..+columns of every
                        // row, inside the `m * n` output.
                        unsafe {
                            let out = base.at((first_row + r) * n + first_column);
                            std::ptr::copy_nonoverlapping(sums.as_ptr(), out, columns);
                        }
                    }
                }
            }
        });
        // SAFETY: the tasks together wrote every column of every row (each group's columns, each
        // row group's rows).
        unsafe { out.set_len(m * n) };
        out
    }
}

/// The portable twin of [`amx::column_group`]: `out[r][j]` for the rows of `x` (each `width`
/// bfloat16 values) and one column group's packed `weights`.
///
/// Each output sums, step by step and pair by pair, `x0 * w0` then `x1 * w1` (a multiply and an
/// add each, never fused), so the bits are the same whichever instruction set runs it; with AVX2
/// the 16 columns of a tile are two vector registers.
fn portable_column_group(x: &[u16], width: usize, weights: &[u16], out: &mut [[f32; GROUP_COLUMNS]]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available.
        return unsafe { column_group_avx2(x, width, weights, out) };
    }
    column_group(x, width, weights, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn column_group_avx2(x: &[u16], width: usize, weights: &[u16], out: &mut [[f32; GROUP_COLUMNS]]) {
    column_group(x, width, weights, out)
}

#[inline(always)]
fn column_group(x: &[u16], width: usize, weights: &[u16], out: &mut [[f32; GROUP_COLUMNS]]) {
    // SAFETY: two u16 make one u32 (the slice is 2-aligned; `align_to` keeps only whole, aligned
    // u32, and the packed lines are 64-aligned with an even length).
    let (head, pairs, _) = unsafe { weights.align_to::<u32>() };
    assert!(head.is_empty(), "packed bfloat16 weights are 64-byte aligned");
    for (row, sums) in x.chunks_exact(width).zip(out.iter_mut()) {
        // The 64 sums stay in registers (8 with AVX2) while the group's weights stream in order.
        let mut acc = [0.0f32; GROUP_COLUMNS];
        for (inputs, lines) in row.chunks_exact(TILE_FEATURES).zip(pairs.chunks_exact(STEP_VALUES / 2)) {
            for (pair, x) in inputs.chunks_exact(2).enumerate() {
                let (x0, x1) = (widen(x[0]), widen(x[1]));
                for (tile, tile_acc) in acc.chunks_exact_mut(16).enumerate() {
                    let w = &lines[tile * 256 + pair * 16..][..16];
                    for (sum, &w) in tile_acc.iter_mut().zip(w) {
                        *sum += x0 * f32::from_bits(w << 16);
                        *sum += x1 * f32::from_bits(w & 0xffff_0000);
                    }
                }
            }
        }
        *sums = acc;
    }
}

/// The candle op: float32 rows in, float32 products out.
pub(super) struct Bf16Matmul(pub(super) Arc<Bf16Panels>, pub(super) Kernel);

impl CustomOp1 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let (xs, m) = product_rows(storage, layout, self.name(), w.k)?;
        let out = w.multiply(xs, m, self.1);
        Ok((CpuStorage::F32(out), Shape::from((m, w.n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        crate::model::cpu::support::test_values(len, seed, 1.0)
    }

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
    }

    fn kernels() -> Vec<Kernel> {
        Kernel::available()
    }

    /// Products of bfloat16 values are exact in float32: only the order of the sums differs.
    fn check(m: usize, n: usize, k: usize) {
        let (w, x) = (random(n * k, 1 + n as u64), random(m * k, 7 + k as u64));
        let panels = Bf16Panels::pack(&w, n, k);
        let (w, x) = (rounded(&w), rounded(&x));
        for kernel in kernels() {
            let out = panels.multiply(&x, m, kernel);
            for r in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k).map(|c| f64::from(x[r * k + c]) * f64::from(w[j * k + c])).sum();
                    let diff = (out[r * n + j] as f64 - exact).abs();
                    assert!(diff < 1e-5 * k as f64, "{kernel:?} m={m} n={n} k={k} [{r},{j}]: {diff}");
                }
            }
        }
    }

    #[test]
    fn the_portable_kernel_sums_features_in_order_with_unfused_multiply_adds() {
        // The vectorized and the scalar builds must give the bits of this plain loop.
        for (m, n, k) in [(1, 64, 32), (3, 70, 45), (17, 130, 200)] {
            let (w, x) = (random(n * k, 5), random(m * k, 9));
            let out = Bf16Panels::pack(&w, n, k).multiply(&x, m, Kernel::Portable);
            let (w, x) = (rounded(&w), rounded(&x));
            for r in 0..m {
                for j in 0..n {
                    let mut sum = 0.0f32;
                    for c in 0..k {
                        sum += x[r * k + c] * w[j * k + c];
                    }
                    assert_eq!(out[r * n + j].to_bits(), sum.to_bits(), "m={m} n={n} k={k} [{r},{j}]");
                }
            }
        }
    }

    #[test]
    fn matches_the_exact_product_of_the_rounded_values() {
        check(1, 3, 5);
        check(1, 192, 64);
        check(3, 300, 257);
        check(16, 128, 512);
        check(17, 70, 45);
        check(40, 64, 32);
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let (n, k) = (1000, 256);
        let panels = Bf16Panels::pack(&random(n * k, 3), n, k);
        let batch = random(40 * k, 5);
        for kernel in kernels() {
            let together = panels.multiply(&batch, 40, kernel);
            for r in [0, 15, 16, 33, 39] {
                let alone = panels.multiply(&batch[r * k..][..k], 1, kernel);
                assert_eq!(alone, together[r * n..][..n], "{kernel:?} row {r}");
            }
            for rows in [2, 9, 16, 17] {
                let part = panels.multiply(&batch[..rows * k], rows, kernel);
                assert_eq!(part, together[..rows * n], "{kernel:?} {rows} rows");
            }
        }
    }

    #[test]
    fn zero_rows_give_an_empty_result() {
        let panels = Bf16Panels::pack(&random(64 * 16, 1), 64, 16);
        assert!(panels.multiply(&[], 0, Kernel::best()).is_empty());
    }
}
