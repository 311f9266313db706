//! A request's decoding strategy, resolved once into [`Decoding`]: what the request asks for wins
//! over the settings' defaults, and a default that cannot apply beside what the request asks for
//! gives way (README, "Server-wide defaults"); what the request itself asks for and cannot have is
//! refused, naming its field.

use super::check::{FieldError, count, named};
use super::defaults::{GenerationSettings, LimitSettings};
use super::parallel::{DEFAULT_FREEZE_THRESHOLD, FreezeRule, ParallelSampling, SamplerKind};
use super::request::GenerationRequest;
use super::{Decoding, Speculation, ranges};
use crate::model::ExitCriterion;

impl GenerationRequest {
    /// The decoding of this request at `num_steps`.
    pub(super) fn decoding(
        &self,
        defaults: &GenerationSettings,
        limits: &LimitSettings,
        num_steps: usize,
    ) -> Result<Decoding, FieldError> {
        let asks_speculation = self.draft_steps.is_some_and(|steps| steps != 0);
        let asks_parallel = self.sampler == Some(SamplerKind::Parallel);
        let continuous_compute =
            self.continuous_compute.unwrap_or(defaults.continuous_compute && !asks_speculation && !asks_parallel);
        let sampler = self.sampler_kind(defaults, asks_speculation, continuous_compute);
        let speculation = self.speculation(defaults, limits, num_steps, continuous_compute, sampler)?;
        let parallel =
            self.parallel(sampler, defaults, limits, num_steps, speculation.is_some(), continuous_compute)?;
        Ok(match (parallel, speculation) {
            (Some(p), _) => Decoding::Parallel(p),
            (None, Some(s)) => Decoding::Speculative(s),
            (None, None) => Decoding::Sequential { continuous_compute },
        })
    }

    /// The request's `sampler`, else the settings'; a parallel default gives way to the sequential
    /// sampler for a request that asks for what only that one does (`draft_steps`,
    /// `continuous_compute`, an `exit_criterion`) and sets none of the parallel fields.
    fn sampler_kind(
        &self,
        defaults: &GenerationSettings,
        asks_speculation: bool,
        continuous_compute: bool,
    ) -> SamplerKind {
        let sequential_only =
            asks_speculation || continuous_compute || self.exit_criterion.is_some_and(|c| c != ExitCriterion::None);
        match self.sampler {
            Some(kind) => kind,
            None if defaults.sampler == SamplerKind::Parallel && sequential_only && self.parallel_field().is_none() => {
                SamplerKind::Sequential
            }
            None => defaults.sampler,
        }
    }

    /// The first parallel-sampler field the request gives, if any.
    pub(super) fn parallel_field(&self) -> Option<&'static str> {
        [
            ("inner_steps", self.inner_steps.is_some()),
            ("freeze", self.freeze.is_some()),
            ("max_wavefront", self.max_wavefront.is_some()),
            ("state_noise", self.state_noise.is_some()),
            ("embed_ema", self.embed_ema.is_some()),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }

    /// `draft_steps` turns speculation on (the request's; 0 turns it off), else
    /// `generation.draft_steps` where it can apply: below this `num_steps`, with the sequential
    /// sampler and without `continuous_compute` (otherwise that request does not speculate).
    /// `draft_tokens` is checked whenever given.
    fn speculation(
        &self,
        defaults: &GenerationSettings,
        limits: &LimitSettings,
        num_steps: usize,
        continuous_compute: bool,
        sampler: SamplerKind,
    ) -> Result<Option<Speculation>, FieldError> {
        let draft_tokens = match self.draft_tokens {
            Some(v) => count("draft_tokens", v, 1, limits.max_draft_tokens)?,
            None => defaults.draft_tokens.min(limits.max_draft_tokens),
        };
        let draft_steps = match (self.draft_steps, defaults.draft_steps) {
            (Some(0), _) => return Ok(None),
            (Some(v), _) => v,
            (None, Some(v)) if v < num_steps && !continuous_compute && sampler == SamplerKind::Sequential => {
                return Ok(Some(Speculation { draft_steps: v, draft_tokens }));
            }
            (None, _) => return Ok(None),
        };
        // From here on the request itself asks to speculate.
        if num_steps < 2 {
            let message = format!(
                "`draft_steps` needs num_steps of at least 2, got num_steps {num_steps} (0 turns speculation off)"
            );
            return Err(FieldError::new("draft_steps", message));
        }
        let draft_steps =
            usize::try_from(draft_steps).ok().filter(|v| (1..num_steps).contains(v)).ok_or_else(|| {
                let message = format!(
                    "`draft_steps` must be 0 (no speculation) or between 1 and num_steps - 1 ({}), got {draft_steps}",
                    num_steps - 1
                );
                FieldError::new("draft_steps", message)
            })?;
        if continuous_compute {
            let message = "`draft_steps` cannot be combined with `continuous_compute` (verified rows start together)";
            return Err(FieldError::new("draft_steps", message));
        }
        Ok(Some(Speculation { draft_steps, draft_tokens }))
    }

    /// The parallel sampler when `sampler` (the request's, else the settings') is `parallel`: its
    /// fields from the request, else the settings, checked; the sequential exit fields and the
    /// features it cannot be combined with are refused by name.
    pub(super) fn parallel(
        &self,
        sampler: SamplerKind,
        defaults: &GenerationSettings,
        limits: &LimitSettings,
        num_steps: usize,
        speculating: bool,
        continuous_compute: bool,
    ) -> Result<Option<ParallelSampling>, FieldError> {
        let fields = self;
        if sampler == SamplerKind::Sequential {
            if let Some(name) = self.parallel_field() {
                return Err(FieldError::new(name, format!("`{name}` applies to `sampler` `parallel` only")));
            }
            return Ok(None);
        }
        let refuse = |field: &str, message: &str| Err(FieldError::new(field, message.to_string()));
        if self.exit_criterion.is_some_and(|c| c != ExitCriterion::None) {
            return refuse(
                "exit_criterion",
                "`exit_criterion` applies to the sequential sampler; `sampler` `parallel` freezes positions by `freeze`",
            );
        }
        // Only the request's own fields get here (a default speculation or continuous_compute
        // gives way to the parallel sampler): `sampler` is named if the request sent it, else
        // the other field, which it did send.
        let clash = |other: &'static str| if self.sampler.is_some() { "sampler" } else { other };
        if speculating {
            return refuse(
                clash("draft_steps"),
                "`sampler` `parallel` cannot be combined with `draft_steps` (speculation)",
            );
        }
        if continuous_compute {
            return refuse(
                clash("continuous_compute"),
                "`sampler` `parallel` cannot be combined with `continuous_compute`",
            );
        }
        let inner_steps = match fields.inner_steps {
            Some(v) => count("inner_steps", v, 1, num_steps)?,
            None => defaults.inner_steps.min(num_steps),
        };
        let max_wavefront = match fields.max_wavefront {
            Some(v) => count("max_wavefront", v, 1, limits.max_wavefront)?,
            None => defaults.max_wavefront.min(limits.max_wavefront),
        };
        let freeze = fields.freeze.unwrap_or(defaults.freeze);
        let threshold = self.exit_threshold.unwrap_or(DEFAULT_FREEZE_THRESHOLD);
        named("exit_threshold", ranges::freeze_threshold(threshold))?;
        if freeze == FreezeRule::Fixed && self.exit_threshold.is_some() {
            return refuse("exit_threshold", "`exit_threshold` does not apply to `freeze` `fixed`");
        }
        let state_noise = fields.state_noise.unwrap_or(defaults.state_noise);
        named("state_noise", ranges::state_noise(state_noise))?;
        let embed_ema = fields.embed_ema.unwrap_or(defaults.embed_ema);
        named("embed_ema", ranges::embed_ema(embed_ema))?;
        Ok(Some(ParallelSampling { inner_steps, freeze, threshold, max_wavefront, state_noise, embed_ema }))
    }
}
