//! `rms_norm(a + b)`, the residual step of a sandwich block, in one pass per row.
//!
//! candle runs the sum and the norm as two ops (an allocation and a trip through memory each,
//! the sum on the thread pool even for a few rows). This one sums and normalises a row at a time,
//! with the same float32 operations in the same order as candle's add followed by its
//! `rms_norm`, so the results are the same bits (the tensor backend runs candle's two ops).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::support::contiguous_f32;
use crate::model::error::Result;

/// candle's `rms_norm` splits the rows over the thread pool above this many rows; so does this.
const PARALLEL_MIN_ROWS: usize = 32;

/// `rms_norm(a + b, weight, eps)` over the last dimension, for float32 CPU tensors.
pub fn add_rms_norm(a: &Tensor, b: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op3_no_bwd(&b.contiguous()?, &weight.contiguous()?, &AddRmsNorm { eps })?)
}

struct AddRmsNorm {
    eps: f32,
}

impl AddRmsNorm {
    fn row(&self, a: &[f32], b: &[f32], alpha: &[f32], out: &mut [f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
        let sum2 = out.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / out.len() as f32 + self.eps).sqrt();
        for (o, &w) in out.iter_mut().zip(alpha) {
            *o = *o / m * w;
        }
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = |s, l| contiguous_f32(s, l, self.name(), "input");
        let (a, b, alpha) = (input(s1, l1)?, input(s2, l2)?, contiguous_f32(s3, l3, self.name(), "weight")?);
        let width = l1.shape().dims().last().copied().unwrap_or(0);
        if l1.shape() != l2.shape() || alpha.len() != width {
            candle_core::bail!(
                "add-rms-norm: shapes {:?}, {:?} and weight {:?} disagree",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let mut out = vec![0.0f32; a.len()];
        match a.len().checked_div(width) {
            None => {}
            Some(rows) if rows > PARALLEL_MIN_ROWS => {
                let rows = out.par_chunks_mut(width).zip(a.par_chunks(width)).zip(b.par_chunks(width));
                rows.for_each(|((o, a), b)| self.row(a, b, alpha, o));
            }
            Some(_) => {
                let rows = out.chunks_mut(width).zip(a.chunks(width)).zip(b.chunks(width));
                rows.for_each(|((o, a), b)| self.row(a, b, alpha, o));
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn same_bits_as_candle_add_then_norm() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(1f32, 0.5, 300, &dev).unwrap();
        for rows in [1, 16, 40] {
            let a = Tensor::randn(0f32, 2.0, (rows, 300), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (rows, 300), &dev).unwrap();
            let fused = add_rms_norm(&a, &b, &weight, 1e-6).unwrap().to_vec2::<f32>().unwrap();
            let reference = candle_nn::ops::rms_norm(&(&a + &b).unwrap(), &weight, 1e-6).unwrap();
            assert_eq!(fused, reference.to_vec2::<f32>().unwrap(), "{rows} rows");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let weight = Tensor::ones(8, DType::F32, &dev).unwrap();
        let a = Tensor::ones((2, 8), DType::F32, &dev).unwrap();
        assert!(add_rms_norm(&a, &Tensor::ones((3, 8), DType::F32, &dev).unwrap(), &weight, 1e-6).is_err());
        assert!(add_rms_norm(&a, &a, &Tensor::ones(4, DType::F32, &dev).unwrap(), 1e-6).is_err());
    }
}
