//! Benchmarks: batch-1 decode against the memory-bandwidth bound, and the serving load generator.
//!
//! At batch 1 every core step re-reads the core block's weights, so decode is bound by memory
//! bandwidth on large models: `bound = read bandwidth / bytes of weights per step`. The benchmark
//! measures the machine's read bandwidth with the same number of threads the model uses, then
//! reports decode speed next to that bound.

pub mod attention;
pub mod elastic;
pub mod interference;
pub mod load;
pub mod roofline;

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{Driver, Event, JobSpec, RunError};
use crate::generate::GenerationParams;
use crate::model::{CacheStrategy, HuginnModel};
use crate::text::TextTokenizer;

/// Decode speed of one configuration.
#[derive(Debug, Clone)]
pub struct DecodeStats {
    pub num_steps: usize,
    pub tokens: usize,
    pub seconds: f64,
}

impl DecodeStats {
    pub fn core_steps_per_second(&self) -> f64 {
        (self.tokens * self.num_steps) as f64 / self.seconds
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

/// Prefills `prompt`, then times `tokens` decode steps at `num_steps` (greedy, no exit, init 0),
/// through the scheduler as the server runs them. One more token than timed is generated (its
/// first decode step warms caches and allocations). The best of `repeats` runs is kept (the least
/// disturbed by other load).
pub fn decode_speed(
    model: &Arc<HuginnModel>,
    tokenizer: &Arc<TextTokenizer>,
    prompt: &[u32],
    num_steps: usize,
    tokens: usize,
    repeats: usize,
) -> Result<DecodeStats, RunError> {
    let mut params = GenerationParams::new(num_steps);
    params.max_tokens = tokens + 2;
    params.init_scale = 0.0;
    params.cache = CacheStrategy::Shared(1);
    let mut best = f64::INFINITY;
    let mut driver = Driver::new(model.clone(), tokenizer.clone(), 1);
    for _ in 0..repeats.max(1) {
        // Token 0 comes from the prefill, token 1 warms up; tokens 2.. are timed.
        let mut times = Vec::with_capacity(tokens + 2);
        let started = Instant::now();
        driver.run(vec![JobSpec::new(prompt.to_vec(), params.clone())], |_, event| {
            if matches!(event, Event::Token { .. }) {
                times.push(started.elapsed().as_secs_f64());
            }
        })?;
        if times.len() == tokens + 2 {
            best = best.min(times[tokens + 1] - times[1]);
        }
    }
    Ok(DecodeStats { num_steps, tokens, seconds: best })
}

/// Weights of one sandwich block: Wqkv, attention proj, MLP fc and proj, four norms, q/k bias.
fn block_params(cfg: &crate::model::HuginnConfig) -> usize {
    let (d, hd) = (cfg.n_embd, cfg.head_dim());
    let (h, kv) = (cfg.num_attention_heads, cfg.kv_heads());
    // Queries, keys and values (grouped), the output projection, the gated MLP, up to four norms.
    (h + 2 * kv) * hd * d + d * h * hd + 3 * cfg.intermediate_size * d + 4 * d
}

/// The adapter's `d x d` half that a step (or a token) reads, where the family has an adapter.
fn adapter_half(model: &HuginnModel) -> usize {
    let d = model.config().n_embd;
    if model.family().has_adapter() { d * d } else { 0 }
}

/// Bytes of weights one core step reads: the adapter's state half and the core layers.
pub fn core_step_weight_bytes(model: &HuginnModel) -> usize {
    let cfg = model.config();
    (adapter_half(model) + cfg.n_layers_in_recurrent_block * block_params(cfg)) * model.dtype().size_in_bytes()
}

/// Bytes of weights one token reads outside the recurrence: embedding row, prelude, adapter input
/// half, coda and the head.
pub fn per_token_weight_bytes(model: &HuginnModel) -> usize {
    let cfg = model.config();
    let d = cfg.n_embd;
    let layers = cfg.n_layers_in_prelude + cfg.n_layers_in_coda;
    (d + adapter_half(model) + layers * block_params(cfg) + cfg.vocab_size * d) * model.dtype().size_in_bytes()
}

/// Bytes of the model's weights as held for serving: the embedding table and the head (once
/// when tied), every block, the adapter, the final norm and the exit gate.
pub fn serving_weight_bytes(model: &HuginnModel) -> usize {
    let cfg = model.config();
    let (d, v) = (cfg.n_embd, cfg.vocab_size);
    let layers = cfg.n_layers_in_prelude + cfg.n_layers_in_recurrent_block + cfg.n_layers_in_coda;
    let tables = if cfg.tie_embeddings { 1 } else { 2 };
    let gate = if model.has_exit_gate() { d + 1 } else { 0 };
    (tables * v * d + layers * block_params(cfg) + 2 * adapter_half(model) + d + gate) * model.dtype().size_in_bytes()
}

/// Read bandwidth in bytes per second: `threads` threads summing disjoint parts of a `bytes`-sized
/// buffer, best of `repeats`.
pub fn read_bandwidth(bytes: usize, threads: usize, repeats: usize) -> f64 {
    let data = filled(bytes);
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        parallel_sum(&data, threads);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (data.len() * 4) as f64 / best
}

/// Tokens per second of pure weight reads with a decode token's access pattern: a buffer of
/// `token_bytes` read once, then a buffer of `step_bytes` read `num_steps` times. On a CPU whose
/// last-level cache holds much of the core block, this is the bound that counts the same cache
/// hits the model gets. Best of `repeats`.
pub fn read_pattern_tokens_per_second(
    token_bytes: usize,
    step_bytes: usize,
    num_steps: usize,
    threads: usize,
    repeats: usize,
) -> f64 {
    let (once, every_step) = (filled(token_bytes), filled(step_bytes));
    parallel_sum(&every_step, threads); // warm, as the model's weights are after the first token
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        parallel_sum(&once, threads);
        for _ in 0..num_steps {
            parallel_sum(&every_step, threads);
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    1.0 / best
}

fn filled(bytes: usize) -> Vec<f32> {
    (0..bytes / 4).map(|i| (i % 7) as f32).collect()
}

fn parallel_sum(data: &[f32], threads: usize) -> f32 {
    let per_thread = data.len().div_ceil(threads.max(1)).max(1);
    let total: f32 = std::thread::scope(|scope| {
        let handles: Vec<_> = data.chunks(per_thread).map(|part| scope.spawn(move || sum_f32(part))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    });
    // Keep the sum observable so the reads cannot be optimised away.
    std::hint::black_box(total)
}

/// Sum of `values`, vectorised with the widest instructions the CPU has (as the model's kernels are).
fn sum_f32(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the feature the function is compiled for.
        return unsafe { sum_f32_avx2(values) };
    }
    sum_f32_portable(values)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_f32_avx2(values: &[f32]) -> f32 {
    sum_f32_portable(values)
}

/// Sum with 16 independent accumulators so the compiler can vectorise the loop.
#[inline(always)]
fn sum_f32_portable(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}
