//! The tensor backend: every operation as candle tensor ops, nothing else. This is what a GPU
//! (CUDA, Metal) runs, and it can be forced on the CPU (`model.backend = "tensor"`) so that the
//! device path is tested on every machine.

mod attention;

use candle_core::Tensor;

use super::error::Result;
pub use attention::{GatherPlan, attend};

/// `xs @ W^T` over the last dimension of `xs`.
pub fn linear(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Ok(xs.broadcast_matmul(&weight.t()?)?)
}

/// `rms_norm(a + b)`.
pub fn add_rms_norm(a: &Tensor, b: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&(a + b)?, weight, eps)?)
}

/// `silu(gate) * up` over `[gate | up]` rows.
pub fn swiglu(xs: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::swiglu(xs)?)
}

/// Writes `rows` (`[n, heads, head_dim]`) into `buffer` (`[capacity, heads, head_dim]`, the
/// position-major layout of this backend) at positions `start..start + n`: one contiguous copy.
pub fn write_rows(buffer: &Tensor, rows: &Tensor, start: usize) -> Result<()> {
    Ok(buffer.slice_set(&rows.to_dtype(buffer.dtype())?.contiguous()?, 0, start)?)
}
