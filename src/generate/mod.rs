//! Single-sequence generation on top of the model's entry points (used by the CLI and the tests;
//! the server's scheduler batches the same steps across sequences).

pub mod sampling;
pub mod sequence;

use std::time::Instant;

use serde::Serialize;

use crate::model::{CacheStrategy, ExitRule, HuginnModel, LogitRows, ModelError, Result};
pub use sampling::{Sampler, SamplingParams};
pub use sequence::{Sequence, TokenStep};

/// Everything that shapes one generation.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    /// Recurrence cap per token (and the depth of the prompt prefill).
    pub num_steps: usize,
    pub exit: ExitRule,
    /// Scale of the random initial state (0: start from zeros, fully deterministic).
    pub init_scale: f64,
    /// Start each token from the previous token's final state instead of a fresh one.
    pub continuous_compute: bool,
    pub cache: CacheStrategy,
    pub sampling: SamplingParams,
    /// Generation ends after any of these ids (included in `token_ids`).
    pub stop_token_ids: Vec<u32>,
    pub seed: u64,
}

impl GenerationParams {
    pub fn new(num_steps: usize) -> Self {
        Self {
            max_tokens: 16,
            num_steps,
            exit: ExitRule::default(),
            init_scale: 1.0,
            continuous_compute: false,
            cache: CacheStrategy::default(),
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_steps == 0 {
            return Err(ModelError::InvalidArgument("num_steps must be at least 1".into()));
        }
        if self.exit.min_steps > self.num_steps {
            return Err(ModelError::InvalidArgument(format!(
                "min_steps ({}) exceeds num_steps ({})",
                self.exit.min_steps, self.num_steps
            )));
        }
        if !(self.init_scale >= 0.0 && self.init_scale.is_finite()) {
            return Err(ModelError::InvalidArgument(format!("init_scale must be >= 0, got {}", self.init_scale)));
        }
        self.sampling.validate()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// One generated token, as streamed to the caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// Core steps that produced this token (the prefill depth for the first one).
    pub steps: usize,
    pub converged: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationOutput {
    pub token_ids: Vec<u32>,
    /// `steps_per_token[i]`: core steps spent computing the logits that produced `token_ids[i]`.
    pub steps_per_token: Vec<usize>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// K/V bytes the sequence held at the end.
    pub kv_bytes: usize,
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` as each one is chosen.
pub fn generate(
    model: &HuginnModel,
    prompt: &[u32],
    params: &GenerationParams,
    mut on_token: impl FnMut(&GeneratedToken),
) -> Result<GenerationOutput> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(ModelError::InvalidArgument("the prompt is empty".into()));
    }
    let limit = model.config().block_size;
    if prompt.len() >= limit {
        return Err(ModelError::ContextOverflow { needed: prompt.len() + 1, limit });
    }
    let mut sequence = Sequence::new(model, params.cache, params.init_scale, params.continuous_compute, params.seed);
    let mut sampler = Sampler::new(params.sampling.clone(), sampling::sampler_seed(params.seed));
    let mut context = prompt.to_vec();
    let mut output = GenerationOutput {
        token_ids: Vec::new(),
        steps_per_token: Vec::new(),
        finish_reason: FinishReason::Length,
        prompt_tokens: prompt.len(),
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        kv_bytes: 0,
    };
    if params.max_tokens == 0 {
        return Ok(output);
    }
    let started = Instant::now();
    let logits = sequence.prefill(prompt, params.num_steps, LogitRows::Last)?;
    let mut logits = logits.flatten_all()?.to_vec1::<f32>()?;
    let mut step = TokenStep { logits: Vec::new(), steps: params.num_steps, converged: false, exit_value: None };
    output.prefill_seconds = started.elapsed().as_secs_f64();
    let decode_started = Instant::now();
    loop {
        let id = sampler.sample(&mut logits, &context);
        sampler.record(id);
        context.push(id);
        let token = GeneratedToken { id, steps: step.steps, converged: step.converged };
        output.token_ids.push(id);
        output.steps_per_token.push(step.steps);
        on_token(&token);
        if params.stop_token_ids.contains(&id) {
            output.finish_reason = FinishReason::Stop;
            break;
        }
        if output.token_ids.len() >= params.max_tokens || context.len() >= limit {
            break;
        }
        step = sequence.step(id, params.num_steps, &params.exit)?;
        logits = std::mem::take(&mut step.logits);
    }
    output.decode_seconds = decode_started.elapsed().as_secs_f64();
    output.kv_bytes = sequence.cache().bytes();
    Ok(output)
}
