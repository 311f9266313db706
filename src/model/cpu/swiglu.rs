//! SwiGLU, `silu(gate) * up` over `[gate | up]` rows, in one pass.
//!
//! candle's version takes two strided halves through a unary and a binary op (two allocations,
//! index arithmetic per element, one thread). This one reads each row once and splits the rows
//! over the thread pool. Each element is computed with the same float32 operations as candle's
//! (`x / (1 + exp(-x)) * up`), so the results are the same bits (the tensor backend runs
//! candle's op).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::support::contiguous_f32;
use crate::model::error::Result;

/// Below this many outputs one thread is faster than waking the pool.
const PARALLEL_MIN_OUTPUTS: usize = 1 << 14;

/// `silu(xs[.., :h]) * xs[.., h:]` with `h` half the last dimension, for a float32 CPU tensor.
pub fn swiglu(xs: &Tensor) -> Result<Tensor> {
    Ok(xs.contiguous()?.apply_op1_no_bwd(&SwiGlu)?)
}

struct SwiGlu;

/// One output row from its `[gate | up]` input row.
fn row(input: &[f32], out: &mut [f32]) {
    let (gate, up) = input.split_at(out.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, self.name(), "input")?;
        let dims = layout.shape().dims();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("swiglu needs an even last dimension, got {width}")
        }
        let half = width / 2;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = half;
        }
        let mut out = vec![0.0f32; xs.len() / 2];
        if half > 0 {
            if out.len() >= PARALLEL_MIN_OUTPUTS {
                out.par_chunks_mut(half).zip(xs.par_chunks(width)).for_each(|(o, x)| row(x, o));
            } else {
                out.chunks_mut(half).zip(xs.chunks(width)).for_each(|(o, x)| row(x, o));
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn same_bits_as_candle() {
        for rows in [1, 3, 40] {
            let xs = (Tensor::randn(0f32, 3.0, (rows, 2 * 700), &Device::Cpu).unwrap() - 1.0).unwrap();
            let fused = swiglu(&xs).unwrap().to_vec2::<f32>().unwrap();
            let reference = candle_nn::ops::swiglu(&xs).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(fused, reference, "{rows} rows");
        }
    }

    #[test]
    fn keeps_leading_dimensions_and_rejects_odd_widths() {
        let xs = Tensor::ones((2, 3, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(swiglu(&xs).unwrap().dims(), &[2, 3, 4]);
        let odd = Tensor::ones((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&odd).is_err());
    }
}
