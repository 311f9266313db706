//! The server-wide defaults of a generation (`[generation]`) and the bounds on what a request may
//! ask (`[limits]`): settings sections that belong to generation, so that `generate` never reads
//! `settings` (which reads `generate`). [`GenerationSettings::check_at`] checks the defaults
//! through the one check every generation goes through ([`GenerationParams::check`]).

use serde::{Deserialize, Serialize};

use super::check::FieldError;
use super::parallel::{DEFAULT_FREEZE_THRESHOLD, FreezeRule, ParallelSampling, SamplerKind};
use super::{Decoding, GenerationParams, SamplingParams, Speculation};
use crate::model::{CacheStrategy, ExitCriterion, ExitKv, ExitRule, HuginnConfig};

/// Per-request bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    pub max_num_steps: usize,
    pub max_tokens: usize,
    pub max_n: usize,
    /// Largest `max_total_steps` (core steps a request's choice may spend in all).
    pub max_total_steps: usize,
    /// Unset: the model's context length.
    pub max_prompt_tokens: Option<usize>,
    /// Largest `draft_tokens` (tokens drafted per speculation round).
    pub max_draft_tokens: usize,
    /// Largest `max_wavefront` (positions the parallel sampler keeps in flight).
    pub max_wavefront: usize,
    /// Largest structured-output constraint (schema, regex, choices, grammar), in bytes.
    pub max_constraint_bytes: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_num_steps: 256,
            max_tokens: 4096,
            max_n: 16,
            max_total_steps: 1 << 20,
            max_prompt_tokens: None,
            max_draft_tokens: 16,
            max_wavefront: 256,
            max_constraint_bytes: 1 << 16,
        }
    }
}

/// Defaults of the per-request compute budget and sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationSettings {
    pub max_tokens: usize,
    /// Recurrence steps per token; unset means the model's `mean_recurrence`.
    pub num_steps: Option<usize>,
    /// Elastic depth's floor for requests that do not give `min_num_steps`; unset: not elastic.
    pub min_num_steps: Option<usize>,
    pub exit_criterion: ExitCriterion,
    /// Unset means the criterion's reference default.
    pub exit_threshold: Option<f64>,
    pub min_steps: usize,
    /// `skip` or `fill`: what an early exit does to the K/V of the loops it skips.
    pub exit_kv: ExitKv,
    pub init_scale: f64,
    pub continuous_compute: bool,
    /// `shared:K` or `full`.
    pub kv_cache: CacheStrategy,
    /// Recurrence steps per drafted token: set, every request speculates unless it sets its own.
    pub draft_steps: Option<usize>,
    /// Tokens drafted per speculation round.
    pub draft_tokens: usize,
    /// `sequential` or `parallel`.
    pub sampler: SamplerKind,
    /// Parallel sampler: core steps per sampler step.
    pub inner_steps: usize,
    /// Parallel sampler: `latent-diff`, `latent-diff-strict` or `fixed`.
    pub freeze: FreezeRule,
    /// Parallel sampler: most positions in flight.
    pub max_wavefront: usize,
    /// Parallel sampler: noise mixed into the states each sampler step (damped by steps so far).
    pub state_noise: f64,
    /// Parallel sampler: weight of a position's previous input embedding.
    pub embed_ema: f64,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            max_tokens: 32,
            num_steps: None,
            min_num_steps: None,
            exit_criterion: ExitCriterion::None,
            exit_threshold: None,
            min_steps: 0,
            exit_kv: ExitKv::Skip,
            init_scale: 1.0,
            continuous_compute: false,
            kv_cache: CacheStrategy::Shared(1),
            draft_steps: None,
            draft_tokens: 4,
            sampler: SamplerKind::Sequential,
            inner_steps: 4,
            freeze: FreezeRule::LatentDiff,
            max_wavefront: 128,
            state_noise: 0.0,
            embed_ema: 0.1,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// The recurrence steps per token the defaults are checked at, and where they come from.
#[derive(Debug, Clone, Copy)]
pub struct Depth {
    pub steps: usize,
    pub source: &'static str,
}

impl GenerationSettings {
    /// Elastic depth's floor of a request that gives none: `generation.min_num_steps` cut to its
    /// `num_steps`, for sequential decoding only (speculation and the parallel sampler run at
    /// their depth).
    pub fn default_floor(&self, decoding: &Decoding, num_steps: usize) -> Option<usize> {
        let sequential = matches!(decoding, Decoding::Sequential { .. });
        self.min_num_steps.filter(|_| sequential).map(|m| m.min(num_steps))
    }

    /// Checks the defaults at `depth` (`generation.num_steps`, else the model's `mean_recurrence`,
    /// else, before the model is known, `limits.max_num_steps`): every decoding they can give a
    /// request is built as configured (no default gives way here) and goes through
    /// [`GenerationParams::check`]. `Err((key, message))` names `generation.<field>`.
    pub fn check_at(&self, depth: Depth) -> Result<(), (String, String)> {
        let fail = |name: &str, message: &str| Err((format!("generation.{name}"), message.to_string()));
        // What a request would write differently (0 turns speculation off there; here it is unset).
        if self.num_steps == Some(0) {
            return fail("num_steps", "must be at least 1");
        }
        if self.draft_steps == Some(0) {
            return fail("draft_steps", "must be at least 1 (leave it unset for no speculation)");
        }
        let named = |e: FieldError| {
            let mut message = e.reason().to_string();
            if message.contains("num_steps") && depth.source != "generation.num_steps" {
                message.push_str(&format!(" (num_steps here: {})", depth.source));
            }
            (format!("generation.{}", e.field), message)
        };
        let exit = ExitRule::new(self.exit_criterion, self.exit_threshold, self.min_steps)
            .map_err(|e| (String::from("generation.exit_threshold"), e.to_string()))?;
        let params = |decoding: Decoding| GenerationParams {
            max_tokens: self.max_tokens,
            num_steps: depth.steps,
            // 0 is refused (below).
            min_num_steps: self.default_floor(&decoding, depth.steps),
            exit,
            exit_kv: self.exit_kv,
            init_scale: self.init_scale,
            cache: self.kv_cache,
            decoding,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                ..SamplingParams::default()
            },
            stop_token_ids: Vec::new(),
            seed: self.seed,
        };
        params(self.decoding().map_err(named)?).check().map_err(named)?;
        // The other decodings a request may pick with these defaults.
        let speculation = Speculation { draft_steps: 1, draft_tokens: self.draft_tokens };
        let parallel = ParallelSampling {
            // A request's default inner_steps is cut to its num_steps: only a parallel default
            // that can never run as configured is refused.
            inner_steps: match self.sampler {
                SamplerKind::Parallel => self.inner_steps,
                SamplerKind::Sequential => self.inner_steps.min(depth.steps),
            },
            ..self.parallel()
        };
        let mut deep = params(Decoding::Parallel(parallel));
        deep.num_steps = depth.steps.max(2);
        deep.exit.min_steps = 0;
        deep.check().map_err(named)?;
        deep.decoding = Decoding::Speculative(speculation);
        deep.check().map_err(named)
    }

    /// What the model allows of these defaults (see [`GenerationParams::check_model`]).
    /// `Err((key, message))` names `generation.<field>`.
    pub fn check_model(&self, cfg: &HuginnConfig) -> Result<(), (String, String)> {
        let named = |e: FieldError| (format!("generation.{}", e.field), e.reason().to_string());
        let mut params = GenerationParams::new(cfg.mean_recurrence.max(1));
        params.exit.criterion = self.exit_criterion;
        params.decoding = self.decoding().map_err(named)?;
        params.check_model(cfg).map_err(named)
    }

    /// The decoding these defaults give a request that asks for none.
    pub fn decoding(&self) -> Result<Decoding, FieldError> {
        let clash = |field: &str, message: String| Err(FieldError::new(field, format!("`{field}` {message}")));
        match (self.sampler, self.draft_steps) {
            (SamplerKind::Parallel, _) => {
                let set = [
                    ("draft_steps", self.draft_steps.is_some()),
                    ("continuous_compute", self.continuous_compute),
                    ("exit_criterion", self.exit_criterion != ExitCriterion::None),
                ];
                if let Some((name, _)) = set.into_iter().find(|(_, set)| *set) {
                    return clash("sampler", format!("`parallel` cannot be combined with generation.{name}"));
                }
                Ok(Decoding::Parallel(self.parallel()))
            }
            (SamplerKind::Sequential, Some(_)) if self.continuous_compute => {
                clash("draft_steps", "cannot be combined with generation.continuous_compute".into())
            }
            (SamplerKind::Sequential, Some(draft_steps)) => {
                Ok(Decoding::Speculative(Speculation { draft_steps, draft_tokens: self.draft_tokens }))
            }
            (SamplerKind::Sequential, None) => Ok(Decoding::Sequential { continuous_compute: self.continuous_compute }),
        }
    }

    /// The parallel sampler these defaults describe.
    fn parallel(&self) -> ParallelSampling {
        ParallelSampling {
            inner_steps: self.inner_steps,
            freeze: self.freeze,
            // A request's own `exit_threshold` sets it; the default criterion's threshold does not.
            threshold: DEFAULT_FREEZE_THRESHOLD,
            max_wavefront: self.max_wavefront,
            state_noise: self.state_noise,
            embed_ema: self.embed_ema,
        }
    }
}
