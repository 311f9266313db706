//! The one check of a generation's parameters, and its error. Whoever builds a
//! [`GenerationParams`] (a request's resolution, the settings' defaults at start-up, `huginn
//! generate`, a library caller) gets the same rules and a [`FieldError`] naming the field; the
//! ranges themselves are in [`ranges`].

use super::parallel::ParallelSampling;
use super::sampling::SamplingParams;
use super::{Decoding, GenerationParams, ranges};
use crate::model::{ExitCriterion, HuginnConfig};

/// A bad value, with the field it came from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct FieldError {
    pub field: String,
    /// The whole message, naming the field.
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: field.to_string(), message: message.into() }
    }

    /// What is wrong, without the field's name in front (for callers that name it their way,
    /// like the settings' `generation.<field>`).
    pub fn reason(&self) -> &str {
        self.message.strip_prefix(&format!("`{}` ", self.field)).unwrap_or(&self.message)
    }
}

/// `Err` naming `name` when `check` failed.
pub fn named(name: &str, check: Result<(), String>) -> Result<(), FieldError> {
    check.map_err(|e| FieldError::new(name, format!("`{name}` {e}")))
}

/// `value` as a count between `low` and `high`.
pub fn count(name: &str, value: i64, low: usize, high: usize) -> Result<usize, FieldError> {
    usize::try_from(value)
        .ok()
        .filter(|v| (low..=high).contains(v))
        .ok_or_else(|| FieldError::new(name, format!("`{name}` must be between {low} and {high}, got {value}")))
}

impl GenerationParams {
    /// Every range and every rule between the values. The decoding strategies cannot be combined
    /// wrongly (one [`Decoding`]); what is left is each one's bounds against `num_steps`.
    pub fn check(&self) -> Result<(), FieldError> {
        let num_steps = self.num_steps;
        if num_steps == 0 {
            return Err(FieldError::new("num_steps", "`num_steps` must be at least 1"));
        }
        if self.exit.min_steps > num_steps {
            let message = format!("`min_steps` ({}) exceeds num_steps ({num_steps})", self.exit.min_steps);
            return Err(FieldError::new("min_steps", message));
        }
        named("init_scale", ranges::init_scale(self.init_scale))?;
        if let Some(floor) = self.min_num_steps {
            if !(1..=num_steps).contains(&floor) {
                let message = format!("`min_num_steps` must be between 1 and num_steps ({num_steps}), got {floor}");
                return Err(FieldError::new("min_num_steps", message));
            }
            if !matches!(self.decoding, Decoding::Sequential { .. }) {
                let message = "`min_num_steps` (elastic depth) works with sequential decoding, not with speculation \
                               or the parallel sampler";
                return Err(FieldError::new("min_num_steps", message));
            }
        }
        match self.decoding {
            Decoding::Sequential { .. } => {}
            Decoding::Speculative(s) => {
                named("draft_steps", ranges::draft_steps(s.draft_steps, num_steps))?;
                named("draft_tokens", ranges::at_least_one(s.draft_tokens))?;
            }
            Decoding::Parallel(p) => p.check(num_steps)?,
        }
        self.sampling.check()
    }
}

impl GenerationParams {
    /// What the model itself allows: the `gate` criterion needs a model with an exit gate; the
    /// parallel sampler and continuous compute need Huginn's input injection at every step,
    /// which a looped model (Ouro) does not have.
    pub fn check_model(&self, cfg: &HuginnConfig) -> Result<(), FieldError> {
        if self.exit.criterion == ExitCriterion::Gate && !cfg.has_exit_gate() {
            let message = "`exit_criterion` `gate` needs a model with a learned exit gate (Ouro); this model has none";
            return Err(FieldError::new("exit_criterion", message));
        }
        if !cfg.injects_input() {
            let looped = "a looped model (Ouro) has no prelude injection to start each step from";
            match self.decoding {
                Decoding::Parallel(_) => {
                    return Err(FieldError::new("sampler", format!("`sampler` `parallel` is not available: {looped}")));
                }
                Decoding::Sequential { continuous_compute: true } => {
                    let message = format!("`continuous_compute` is not available: {looped}");
                    return Err(FieldError::new("continuous_compute", message));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl ParallelSampling {
    /// The parallel sampler's bounds, for a generation of `num_steps`.
    pub fn check(&self, num_steps: usize) -> Result<(), FieldError> {
        named("inner_steps", ranges::inner_steps(self.inner_steps, num_steps))?;
        named("max_wavefront", ranges::at_least_one(self.max_wavefront))?;
        named("exit_threshold", ranges::freeze_threshold(self.threshold))?;
        named("state_noise", ranges::state_noise(self.state_noise))?;
        named("embed_ema", ranges::embed_ema(self.embed_ema))
    }
}

impl SamplingParams {
    pub fn check(&self) -> Result<(), FieldError> {
        named("temperature", ranges::temperature(f64::from(self.temperature)))?;
        named("top_p", ranges::top_p(f64::from(self.top_p)))?;
        named("min_p", ranges::min_p(f64::from(self.min_p)))?;
        named("repetition_penalty", ranges::repetition_penalty(f64::from(self.repetition_penalty)))?;
        named("presence_penalty", ranges::penalty(f64::from(self.presence_penalty)))?;
        named("frequency_penalty", ranges::penalty(f64::from(self.frequency_penalty)))?;
        for &(id, bias) in &self.logit_bias {
            let check = ranges::logit_bias(f64::from(bias)).map_err(|e| format!("value of token {id} {e}"));
            named("logit_bias", check)?;
        }
        Ok(())
    }
}
