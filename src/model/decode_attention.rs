//! Attention of a single query position over the cache, for decode on the CPU.
//!
//! A decode step attends one query per head to every cached key. As matmul + softmax + matmul this
//! is three tensor ops and two small GEMM calls per head; here it is one pass per head that reads
//! each key and value row once. Other devices, dtypes and multi-token chunks use the tensor ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::error::Result;

/// `softmax(q · kᵀ) · v` for `q`: `[heads, 1, head_dim]` (already scaled) and `k`, `v`:
/// `[heads, positions, head_dim]` (head-strided views of the cache are fine).
pub fn attend_one(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let fast = q.device().is_cpu()
        && [q.dtype(), k.dtype(), v.dtype()].iter().all(|d| *d == DType::F32)
        && q.dim(1)? == 1
        && rows_contiguous(k)
        && rows_contiguous(v);
    if fast {
        return Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &AttendOne)?);
    }
    let scores = q.matmul(&k.t()?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(v)?)
}

/// Each `[positions, head_dim]` slice is contiguous (the head stride may be anything).
fn rows_contiguous(t: &Tensor) -> bool {
    let stride = t.stride();
    t.rank() == 3 && stride[2] == 1 && stride[1] == t.dims()[2]
}

struct AttendOne;

impl CustomOp3 for AttendOne {
    fn name(&self) -> &'static str {
        "attend-one"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else {
            candle_core::bail!("attend-one expects float32 inputs")
        };
        let (heads, _, dim) = ql.shape().dims3()?;
        let (k_heads, positions, k_dim) = kl.shape().dims3()?;
        if k_heads != heads || k_dim != dim || vl.shape().dims3()? != (heads, positions, dim) {
            candle_core::bail!("attend-one: shapes {:?} {:?} {:?}", ql.shape(), kl.shape(), vl.shape())
        }
        let q = &q[ql.start_offset()..];
        let (k_head_stride, v_head_stride) = (kl.stride()[0], vl.stride()[0]);
        let mut out = vec![0.0f32; heads * dim];
        let mut scores = vec![0.0f32; positions];
        for h in 0..heads {
            let qh = &q[h * dim..(h + 1) * dim];
            let kh = &k[kl.start_offset() + h * k_head_stride..][..positions * dim];
            let vh = &v[vl.start_offset() + h * v_head_stride..][..positions * dim];
            let mut max = f32::NEG_INFINITY;
            for (score, key) in scores.iter_mut().zip(kh.chunks_exact(dim)) {
                *score = qh.iter().zip(key).map(|(a, b)| a * b).sum();
                max = max.max(*score);
            }
            let mut total = 0.0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                total += *score;
            }
            let oh = &mut out[h * dim..(h + 1) * dim];
            for (weight, value) in scores.iter().zip(vh.chunks_exact(dim)) {
                let w = weight / total;
                for (o, x) in oh.iter_mut().zip(value) {
                    *o += w * x;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((heads, 1, dim))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_matmul_softmax_matmul_on_strided_cache_views() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (4, 1, 16), &dev).unwrap();
        // A cache buffer with spare capacity, viewed up to 7 positions.
        let k = Tensor::randn(0f32, 1.0, (4, 12, 16), &dev).unwrap().narrow(1, 0, 7).unwrap();
        let v = Tensor::randn(0f32, 1.0, (4, 12, 16), &dev).unwrap().narrow(1, 0, 7).unwrap();
        let fast = attend_one(&q, &k, &v).unwrap();
        let scores = q.matmul(&k.t().unwrap()).unwrap();
        let reference = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
        let diff = (fast - reference).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
