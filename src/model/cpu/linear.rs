//! Linear layers on the CPU: `xs @ W^T` for a `[out, in]` weight, float32 inputs and outputs.
//!
//! A float32 weight is repacked once, at load, into column panels
//! ([`panel_kernel`](super::panel_kernel)) and multiplied by register-tile kernels split across the
//! thread pool by panels. At batch 1 this streams each weight once per call, bound by memory
//! bandwidth; at larger batches every weight load feeds up to 8 rows of multiply-adds. Each output
//! is summed in the same order whatever the number of rows in the call, so a sequence's results
//! do not depend on which other sequences share its batch. A bfloat16 weight is packed for
//! [`bf16_linear`](super::bf16_linear).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::bf16_linear::{Bf16Matmul, Bf16Panels, Kernel};
use super::panel_kernel::{MAX_ROWS, PANEL, panels_per_tile, tile, tile_range};
use super::support::{OutPtr, product_rows, weight_buffer};
use crate::model::error::{ModelError, Result};

/// Input features per chunk when several row groups share a block of panels: a chunk of a
/// block (at most 4 panels x 128 features x 128 bytes = 64 KiB, 32 KiB for the tiles of 5 or 6
/// rows) stays in the L1/L2 cache while every group uses it.
const FEATURE_CHUNK: usize = 128;

/// Row groups that share one pass over the weights. Beyond that (more than 66 rows, prompts)
/// the rows take several passes: the inputs and outputs a pass touches for each chunk then stay in
/// the L1/L2 caches (measured: 128 rows ~13% faster in two passes than in one).
const GROUPS_PER_PASS: usize = 11;

/// Below this many multiply-adds a single thread is faster than waking the pool (measured on
/// the fixture model: at 1 << 16 nine decoding rows woke the pool for every product and a tick
/// cost a third more).
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// A linear layer without bias, its weight packed for the CPU kernels.
#[derive(Clone)]
pub enum Linear {
    /// Float32 weights in panels (the original layout is dropped).
    F32(Arc<Panels>),
    /// Weights rounded to bfloat16 and packed for [`bf16_linear`](super::bf16_linear).
    Bf16(Arc<Bf16Panels>),
}

impl Linear {
    /// Packs a `[out, in]` CPU weight: float32 panels, or bfloat16 tiles when `bf16`. Float32 and
    /// bfloat16 weights are packed straight from their storage (no intermediate copy, which matters
    /// for a 700 MB embedding table); other dtypes are converted to float32 first.
    pub fn new(weight: &Tensor, bf16: bool) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        if !weight.device().is_cpu() || n == 0 || k == 0 {
            return Err(ModelError::InvalidArgument(format!(
                "the CPU kernels take a non-empty CPU weight, got {:?} on {:?}",
                weight.dims(),
                weight.device().location()
            )));
        }
        let weight = weight.contiguous()?;
        let packed = {
            let (storage, layout) = weight.storage_and_layout();
            let (Storage::Cpu(storage), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
                return Err(ModelError::InvalidArgument("the CPU kernels take a contiguous CPU weight".into()));
            };
            match (storage, bf16) {
                (CpuStorage::F32(v), false) => Some(Self::F32(Arc::new(Panels::pack(&v[start..end], n, k)))),
                (CpuStorage::F32(v), true) => Some(Self::Bf16(Arc::new(Bf16Panels::pack(&v[start..end], n, k)))),
                (CpuStorage::BF16(v), true) => {
                    let v = &v[start..end];
                    Some(Self::from_bf16_rows(n, k, |first, rows| {
                        for (bits, value) in rows.iter_mut().zip(&v[first * k..]) {
                            *bits = value.to_bits();
                        }
                        Ok(())
                    })?)
                }
                _ => None,
            }
        };
        match packed {
            Some(linear) => Ok(linear),
            None => Self::new(&weight.to_dtype(DType::F32)?, bf16),
        }
    }

    /// A bfloat16 `[n, k]` weight packed as `read` supplies its rows, a column group at a time
    /// (see [`Bf16Panels::pack_rows`]): no copy of the whole weight is made.
    pub fn from_bf16_rows(n: usize, k: usize, read: impl Fn(usize, &mut [u16]) -> Result<()> + Sync) -> Result<Self> {
        if n == 0 || k == 0 {
            return Err(ModelError::InvalidArgument(format!(
                "the CPU kernels take a non-empty weight, got [{n}, {k}]"
            )));
        }
        Ok(Self::Bf16(Arc::new(Bf16Panels::pack_rows(n, k, read)?)))
    }

    /// Rows `ids` of the weight, `[ids.len(), k]` float32, read back from the packed layout
    /// (exactly the stored values: bfloat16 widens exactly).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (n, k) = match self {
            Self::F32(panels) => (panels.n, panels.k),
            Self::Bf16(panels) => (panels.n, panels.k),
        };
        let mut values = vec![0.0f32; ids.len() * k];
        for (&id, out) in ids.iter().zip(values.chunks_exact_mut(k)) {
            let id = id as usize;
            if id >= n {
                return Err(ModelError::InvalidArgument(format!("row {id} of a weight with {n} rows")));
            }
            match self {
                Self::F32(panels) => panels.row(id, out),
                Self::Bf16(panels) => panels.row(id, out),
            }
        }
        Ok(Tensor::from_vec(values, (ids.len(), k), &candle_core::Device::Cpu)?)
    }

    /// `xs @ W^T` over the last dimension of `xs` (float32).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, Kernel::best())
    }

    /// [`Self::forward`] through the bfloat16 kernel `kernel` (one this CPU lacks runs the portable
    /// kernel; float32 layers ignore it), for comparing the kernels in one process.
    pub fn forward_with(&self, xs: &Tensor, kernel: Kernel) -> Result<Tensor> {
        match self {
            Self::F32(panels) => apply_rows(xs, &PanelMatmul(panels.clone()), panels.n),
            Self::Bf16(panels) => apply_rows(&xs.to_dtype(DType::F32)?, &Bf16Matmul(panels.clone(), kernel), panels.n),
        }
    }
}

/// Applies a rows-in, rows-out `op` with `n` outputs over the last dimension of `xs`.
fn apply_rows(xs: &Tensor, op: &impl CustomOp1, n: usize) -> Result<Tensor> {
    let (&k, leading) = xs.dims().split_last().unwrap_or((&0, &[]));
    let rows = xs.contiguous()?.reshape((leading.iter().product::<usize>(), k))?;
    let out = rows.apply_op1_no_bwd(op)?;
    Ok(out.reshape([leading, &[n]].concat())?)
}

/// A `[n, k]` matrix stored as `ceil(n / PANEL)` panels of `[k][PANEL]`, zero-padded.
pub struct Panels {
    data: Vec<f32>,
    n: usize,
    k: usize,
}

impl Panels {
    /// Row `row` of the weight (`row < n`) into `out` (`k` values).
    fn row(&self, row: usize, out: &mut [f32]) {
        let panel = &self.data[row / PANEL * self.k * PANEL..][..self.k * PANEL];
        for (c, value) in out.iter_mut().enumerate() {
            *value = panel[c * PANEL + row % PANEL];
        }
    }

    fn pack(w: &[f32], n: usize, k: usize) -> Self {
        let fill = |_: &mut (), p: usize, panel: &mut [std::mem::MaybeUninit<f32>]| {
            panel.iter_mut().for_each(|slot| {
                slot.write(0.0);
            });
            // SAFETY: every element was just written.
            let panel = unsafe { std::slice::from_raw_parts_mut(panel.as_mut_ptr().cast::<f32>(), panel.len()) };
            for j in 0..PANEL.min(n - p * PANEL) {
                let row = &w[(p * PANEL + j) * k..][..k];
                for (c, value) in row.iter().enumerate() {
                    panel[c * PANEL + j] = *value;
                }
            }
            Ok::<(), std::convert::Infallible>(())
        };
        // SAFETY: `fill` writes every element of its panel (zeros first).
        let packed = unsafe { weight_buffer(n.div_ceil(PANEL) * k * PANEL, k * PANEL, || (), fill) };
        let data = match packed {
            Ok(data) => data,
            Err(never) => match never {},
        };
        Self { data, n, k }
    }

    /// The outputs of the whole panels in `panels`: row `r`'s `panels.len() / k` columns start at
    /// `out + r * stride`.
    ///
    /// One row group streams each block of panels once. Several row groups take a block in chunks
    /// of [`FEATURE_CHUNK`] input features: every group multiplies the chunk (from memory for the
    /// first, from the L1 cache for the others) while prefetching a panel's share of the next
    /// chunk, so the weight stream and the arithmetic overlap; more than [`GROUPS_PER_PASS`] groups
    /// take several passes. Chunks continue the same sums, in the same order: the results do not
    /// depend on the number of rows.
    ///
    /// # Safety
    /// Those outputs of every row of `x` must be valid for writes and written by no one else.
    unsafe fn multiply(&self, x: &RowGroups, panels: &[f32], out: *mut f32, stride: usize) {
        let k = self.k;
        let per_tile = panels_per_tile(x.largest);
        let step = per_tile * k * PANEL;
        if let [group] = x.groups.as_slice() {
            for (i, block) in panels.chunks(step).enumerate() {
                // SAFETY: this block's columns of the group's rows, inside the caller's region.
                unsafe { tile(&x.data[..group.rows * k], group.rows, k, block, out.add(i * step / k), stride, &[]) };
            }
            return;
        }
        // The weights of panel `p` of block `b` for the chunk of features starting at `first`.
        let chunk = |b: usize, first: usize, p: usize| -> &[f32] {
            let panel = b * step + p * k * PANEL;
            if panel + k * PANEL <= panels.len() && first < k {
                &panels[panel + first * PANEL..panel + (first + FEATURE_CHUNK).min(k) * PANEL]
            } else {
                &[]
            }
        };
        for groups in x.groups.chunks(GROUPS_PER_PASS) {
            for (i, block) in panels.chunks(step).enumerate() {
                for first in (0..k).step_by(FEATURE_CHUNK) {
                    let features = first..(first + FEATURE_CHUNK).min(k);
                    let (next_block, next_first) = if features.end < k { (i, features.end) } else { (i + 1, 0) };
                    for (g, group) in groups.iter().enumerate() {
                        let ahead = if g < per_tile { chunk(next_block, next_first, g) } else { &[][..] };
                        // SAFETY: this block's columns of the group's rows, inside the caller's region.
                        unsafe {
                            let out = out.add(group.first_row * stride + i * step / k);
                            let xs = &x.data[group.offset..][..group.rows * k];
                            tile_range(xs, group.rows, k, block, features.clone(), first > 0, out, stride, ahead);
                        }
                    }
                }
            }
        }
    }
}

/// The input rows packed in groups of at most [`MAX_ROWS`] rows, each `[k][rows]`.
struct RowGroups {
    data: Vec<f32>,
    groups: Vec<RowGroup>,
    largest: usize,
}

struct RowGroup {
    first_row: usize,
    rows: usize,
    offset: usize,
}

impl RowGroups {
    /// Splits `m` rows into groups of near-equal size.
    fn pack(xs: &[f32], m: usize, k: usize) -> Self {
        let count = m.div_ceil(MAX_ROWS);
        let (base, extra) = (m / count, m % count);
        let mut data: Vec<f32> = Vec::with_capacity(m * k);
        let spare = &mut data.spare_capacity_mut()[..m * k];
        let mut groups = Vec::with_capacity(count);
        let mut first_row = 0;
        for g in 0..count {
            let rows = base + usize::from(g < extra);
            let offset = first_row * k;
            let packed = &mut spare[offset..offset + rows * k];
            for r in 0..rows {
                for (c, value) in xs[(first_row + r) * k..][..k].iter().enumerate() {
                    packed[c * rows + r].write(*value);
                }
            }
            groups.push(RowGroup { first_row, rows, offset });
            first_row += rows;
        }
        // SAFETY: the groups cover the m rows, and every value of each was written above.
        unsafe { data.set_len(m * k) };
        Self { data, groups, largest: base + usize::from(extra > 0) }
    }
}

struct PanelMatmul(Arc<Panels>);

impl CustomOp1 for PanelMatmul {
    fn name(&self) -> &'static str {
        "panel-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let (xs, m) = product_rows(storage, layout, self.name(), w.k)?;
        let k = w.k;
        if m == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((0, w.n))));
        }
        let x = RowGroups::pack(xs, m, k);
        let count = w.n.div_ceil(PANEL);
        let threads = rayon::current_num_threads().max(1);
        let per_task = if m * w.n * k < PARALLEL_MIN_WORK {
            count
        } else {
            count.div_ceil(threads * 4).next_multiple_of(panels_per_tile(x.largest))
        };
        // Each task writes its columns of every row straight into the output, whose rows are
        // padded to whole panels when `n` is not a multiple of PANEL.
        let padded = count * PANEL;
        // Not zeroed first: the tiles write every output (the first chunk of features without
        // reading it), the padding columns included.
        let mut out: Vec<f32> = Vec::with_capacity(m * padded);
        let base = OutPtr(out.as_mut_ptr());
        let base = &base;
        w.data.par_chunks(per_task * k * PANEL).enumerate().for_each(|(task, panels)| {
            // SAFETY: task `task` owns columns task * per_task * PANEL .. + panels.len() / k of
            // every row, inside the `m * padded` output; no two tasks share a column.
            unsafe { w.multiply(&x, panels, base.at(task * per_task * PANEL), padded) };
        });
        // SAFETY: the tasks cover every panel's columns of every row, and each tile wrote them.
        unsafe { out.set_len(m * padded) };
        if padded != w.n {
            out = out.chunks_exact(padded).flat_map(|row| &row[..w.n]).copied().collect();
        }
        Ok((CpuStorage::F32(out), Shape::from((m, w.n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn check(m: usize, n: usize, k: usize) {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let fast = Linear::new(&w, false).unwrap().forward(&xs).unwrap();
        let reference = xs.matmul(&w.t().unwrap()).unwrap();
        let diff = max_diff(&fast, &reference);
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
    fn zero_rows_give_an_empty_result() {
        let linear = Linear::new(&Tensor::ones((64, 16), DType::F32, &Device::Cpu).unwrap(), false).unwrap();
        let out = linear.forward(&Tensor::zeros((0, 16), DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(out.dims(), &[0, 64]);
    }

    #[test]
    fn large_batches_match_matmul() {
        check(40, 64, 32);
        check(100, 300, 128);
        check(13, 33, 7);
    }

    #[test]
    fn rank_three_inputs_match_matmul() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 48), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (70, 48), &dev).unwrap();
        let fast = Linear::new(&w, false).unwrap().forward(&xs).unwrap();
        let reference = xs.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&fast, &reference) < 1e-4);
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let dev = Device::Cpu;
        let linear = Linear::new(&Tensor::randn(0f32, 1.0, (1000, 256), &dev).unwrap(), false).unwrap();
        let batch = Tensor::randn(0f32, 1.0, (70, 256), &dev).unwrap();
        let together = linear.forward(&batch).unwrap();
        for r in [0, 33, 69] {
            let alone = linear.forward(&batch.narrow(0, r, 1).unwrap()).unwrap();
            let same = together.narrow(0, r, 1).unwrap();
            assert_eq!(alone.to_vec2::<f32>().unwrap(), same.to_vec2::<f32>().unwrap());
        }
        for rows in [2, 9, 16] {
            let part = linear.forward(&batch.narrow(0, 0, rows).unwrap()).unwrap();
            assert_eq!(part.to_vec2::<f32>().unwrap(), together.narrow(0, 0, rows).unwrap().to_vec2::<f32>().unwrap());
        }
        // Input features in chunks with a partial last one (300 = 2 x 128 + 44).
        let linear = Linear::new(&Tensor::randn(0f32, 1.0, (96, 300), &dev).unwrap(), false).unwrap();
        let batch = Tensor::randn(0f32, 1.0, (16, 300), &dev).unwrap();
        let together = linear.forward(&batch).unwrap().to_vec2::<f32>().unwrap();
        for r in [0, 7, 15] {
            let alone = linear.forward(&batch.narrow(0, r, 1).unwrap()).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(alone[0], together[r]);
        }
    }
}
