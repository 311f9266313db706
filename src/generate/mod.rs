//! What shapes a generation: its parameters, sampling and how it ends. Tokens are produced by the
//! engine's scheduler only (served, or driven on the caller's thread by `engine::Driver`).

pub mod sampling;

pub mod check;
pub mod constraint;
mod decoding;
pub mod defaults;
pub mod parallel;
pub mod ranges;
pub mod request;
pub mod speculative;

use serde::Serialize;

use crate::model::{CacheStrategy, ExitKv, ExitRule};
pub use check::FieldError;
pub use parallel::{FreezeRule, ParallelSampling, SamplerKind};
pub use request::{GenerationRequest, RequestContext, ResolvedGeneration, fit_context};
pub use sampling::{GREEDY_TEMPERATURE, Sampler, SamplingParams};
pub use speculative::Verdict;

/// Everything that shapes one generation. [`Self::check`] is its one check.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    /// Recurrence cap per token (and the depth of the prompt prefill).
    pub num_steps: usize,
    /// Elastic depth: under overload the worker may cap this generation's tokens anywhere
    /// between this floor and `num_steps` (`None`: never).
    pub min_num_steps: Option<usize>,
    pub exit: ExitRule,
    /// What an early exit does to the K/V of the loops it skips.
    pub exit_kv: ExitKv,
    /// Scale of the random initial state (0: start from zeros, fully deterministic).
    pub init_scale: f64,
    pub cache: CacheStrategy,
    /// How tokens are produced.
    pub decoding: Decoding,
    pub sampling: SamplingParams,
    /// Generation ends after any of these ids (included in `token_ids`).
    pub stop_token_ids: Vec<u32>,
    pub seed: u64,
}

/// The decoding strategy of one generation, with the parameters only it has: one of them, so that
/// no two can be asked for together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// One token at a time, each iterated to its exit or cap; `continuous_compute`: each token
    /// starts from the previous token's final state instead of a fresh one.
    Sequential { continuous_compute: bool },
    /// Self-speculative decoding: draft tokens at few steps, verify them at `num_steps`.
    Speculative(Speculation),
    /// The parallel (diffusion-forcing) sampler.
    Parallel(ParallelSampling),
}

impl Decoding {
    /// A bound on the tokens one settle of a chunk emits beyond the first: a speculative round's
    /// drafts (then the verifier's own token), a parallel window's rows; none sequentially.
    pub fn extra_tokens_per_settle(&self) -> usize {
        match self {
            Decoding::Sequential { .. } => 0,
            Decoding::Speculative(s) => s.draft_tokens,
            Decoding::Parallel(p) => p.max_wavefront,
        }
    }
}

impl Default for Decoding {
    fn default() -> Self {
        Decoding::Sequential { continuous_compute: false }
    }
}

impl GenerationParams {
    pub fn new(num_steps: usize) -> Self {
        Self {
            max_tokens: 16,
            num_steps,
            min_num_steps: None,
            exit: ExitRule::default(),
            exit_kv: ExitKv::default(),
            init_scale: 1.0,
            cache: CacheStrategy::default(),
            decoding: Decoding::default(),
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            seed: 0,
        }
    }

    /// The speculation, when decoding speculatively.
    pub fn speculation(&self) -> Option<Speculation> {
        match self.decoding {
            Decoding::Speculative(s) => Some(s),
            _ => None,
        }
    }

    /// The parallel sampler, when it decodes.
    pub fn parallel(&self) -> Option<ParallelSampling> {
        match self.decoding {
            Decoding::Parallel(p) => Some(p),
            _ => None,
        }
    }

    /// Whether each token starts from the previous token's final state.
    pub fn continuous_compute(&self) -> bool {
        matches!(self.decoding, Decoding::Sequential { continuous_compute: true })
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
