//! The CPU kernels: float32 activations, float32 or bfloat16 weights, float32 or bfloat16 K/V.
//! [`Backend::Cpu`](super::backend::Backend) runs the model's operations through them; nothing
//! else in the crate reaches in. Every kernel computes a row the same way whatever the other rows
//! of its call, so a sequence gets the same bits alone or in a batch.

mod add_norm;
mod amx;
mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx512;
mod attention_tile;
mod avx512_bf16;
mod bf16_linear;
mod bf16_pack;
mod kv_write;
mod linear;
mod panel_kernel;
mod support;
mod swiglu;

use candle_core::Tensor;

use super::error::Result;
pub use add_norm::add_rms_norm;
pub use attention::attention_time;
pub use bf16_linear::Kernel;
pub use kv_write::write_rows;
pub use linear::Linear;
pub use swiglu::swiglu;

/// Every row of `q` (`[tokens, heads, head_dim]`, the chunks' rows in order) attends over its
/// sequence's positions up to its own: chunk `c` covers positions `spans[c].0 ..+ spans[c].1` and
/// `cached[c]` holds its keys and values up to its last position (`[heads, positions, head_dim]`).
/// All rows in one call, with one score per position as scratch (no `[heads, n, n]` matrix).
pub fn attend(q: &Tensor, spans: &[(usize, usize)], cached: &[(Tensor, Tensor)]) -> Result<Tensor> {
    attention::attend_rows(q, spans, cached)
}

/// Flops of `iterations` rounds of the AMX multiply-add loop on this thread (tiles held in
/// registers), or `None` without AMX: the AMX peak of `huginn bench --roofline`.
pub fn amx_peak_loop(iterations: usize) -> Option<f64> {
    if !amx::available() {
        return None;
    }
    // SAFETY: AMX is available to this process.
    unsafe { amx::peak_loop(iterations) };
    Some((iterations * amx::PEAK_FLOPS_PER_ITERATION) as f64)
}

/// What multiplies bfloat16 weights on this CPU, in words.
pub fn bf16_kernel_description() -> &'static str {
    match Kernel::best() {
        Kernel::Amx => "AMX tiles on this CPU",
        Kernel::Avx512Bf16 => "AVX512_BF16 dot products on this CPU (no AMX)",
        Kernel::Portable => "this CPU has neither AMX nor AVX512_BF16: the portable kernel",
    }
}
