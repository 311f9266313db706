//! What shapes a generation: its parameters, sampling and how it ends. Tokens are produced by the
//! engine's scheduler only (served, or driven on the caller's thread by `engine::Driver`).

pub mod sampling;

pub mod parallel;
pub mod ranges;
pub mod request;
pub mod speculative;

use serde::Serialize;

use crate::model::{CacheStrategy, ExitRule, ModelError, Result};
pub use parallel::{FreezeRule, ParallelSampling, SamplerKind};
pub use request::{FieldError, GenerationRequest, RequestContext, ResolvedGeneration, fit_context};
pub use sampling::{GREEDY_TEMPERATURE, Sampler, SamplingParams};
pub use speculative::Verdict;

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
    /// Self-speculative decoding: draft tokens at few steps, verify them at `num_steps`.
    pub speculation: Option<Speculation>,
    /// The parallel (diffusion-forcing) sampler instead of one token at a time.
    pub parallel: Option<ParallelSampling>,
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
            speculation: None,
            parallel: None,
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
        if let Some(s) = self.speculation {
            if s.draft_steps == 0 || s.draft_steps >= self.num_steps {
                return Err(ModelError::InvalidArgument(format!(
                    "draft_steps must be between 1 and num_steps - 1 ({}), got {}",
                    self.num_steps.saturating_sub(1),
                    s.draft_steps
                )));
            }
            if s.draft_tokens == 0 {
                return Err(ModelError::InvalidArgument("draft_tokens must be at least 1".into()));
            }
            if self.continuous_compute {
                return Err(ModelError::InvalidArgument(
                    "draft_steps cannot be combined with continuous_compute".into(),
                ));
            }
        }
        if let Some(p) = self.parallel {
            p.validate(self.num_steps)?;
            if self.speculation.is_some() || self.continuous_compute {
                return Err(ModelError::InvalidArgument(
                    "the parallel sampler cannot be combined with speculation or continuous_compute".into(),
                ));
            }
        }
        ranges::init_scale(self.init_scale).map_err(|e| ModelError::InvalidArgument(format!("init_scale {e}")))?;
        self.sampling.validate()
    }
}

/// Self-speculative decoding (docs/DESIGN.md): each round drafts up to `draft_tokens` tokens one
/// by one at `draft_steps` recurrence steps each, then verifies them in one chunk at `num_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Speculation {
    pub draft_steps: usize,
    pub draft_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}
