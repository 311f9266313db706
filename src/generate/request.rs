//! What a request may ask of one generation, as given, and its one resolution into
//! [`GenerationParams`]: each value from the request, else the settings (`generation.*`), else the
//! model's defaults, checked against [`ranges`](super::ranges) and the server's limits. The server
//! deserializes it from a request body and `huginn generate` fills it from its flags: both get
//! the same values and the same errors, each naming its field.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::check::{FieldError, count, named};
use super::defaults::{GenerationSettings, LimitSettings};
use super::parallel::{FreezeRule, SamplerKind};
use super::{GenerationParams, SamplingParams, ranges};
use crate::model::{CacheStrategy, ExitCriterion, ExitKv, ExitRule};

/// The generation fields of a request. `None` (or JSON `null`) means "not given".
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationRequest {
    pub max_tokens: Option<i64>,
    pub num_steps: Option<i64>,
    /// Elastic depth's floor: the worker may cap this request's tokens down to it under overload.
    pub min_num_steps: Option<i64>,
    pub exit_criterion: Option<ExitCriterion>,
    pub exit_threshold: Option<f64>,
    /// `skip` or `fill`: what an early exit does to the K/V of the loops it skips.
    pub exit_kv: Option<ExitKv>,
    pub min_steps: Option<i64>,
    pub max_total_steps: Option<i64>,
    pub init_scale: Option<f64>,
    pub continuous_compute: Option<bool>,
    /// Recurrence steps per drafted token; setting it turns self-speculative decoding on.
    pub draft_steps: Option<i64>,
    /// Tokens drafted per speculation round.
    pub draft_tokens: Option<i64>,
    /// `sequential` or `parallel` (the diffusion-forcing sampler); the next five fields shape the latter.
    pub sampler: Option<SamplerKind>,
    pub inner_steps: Option<i64>,
    pub freeze: Option<FreezeRule>,
    pub max_wavefront: Option<i64>,
    pub state_noise: Option<f64>,
    pub embed_ema: Option<f64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub ignore_eos: Option<bool>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// `huginn generate --kv-cache`; requests always use the `generation.kv_cache` setting.
    #[serde(skip)]
    pub kv_cache: Option<CacheStrategy>,
}

/// What a request is resolved against.
pub struct RequestContext<'a> {
    pub defaults: &'a GenerationSettings,
    pub limits: &'a LimitSettings,
    /// The model's `mean_recurrence`: `num_steps` when neither the request nor the settings say.
    pub mean_recurrence: usize,
    pub vocab_size: usize,
    /// The tokenizer's end-of-text ids (added to the stop ids unless `ignore_eos`).
    pub stop_token_ids: &'a [u32],
}

/// A resolved request.
#[derive(Debug, Clone)]
pub struct ResolvedGeneration {
    pub params: GenerationParams,
    pub max_total_steps: Option<usize>,
    /// `max_tokens` was given (an over-long request is then an error, not clamped to the context).
    pub max_tokens_explicit: bool,
}

impl GenerationRequest {
    pub fn resolve(&self, context: &RequestContext) -> Result<ResolvedGeneration, FieldError> {
        let (defaults, limits, vocab) = (context.defaults, context.limits, context.vocab_size);
        let max_tokens = self.max_tokens.map(|v| count("max_tokens", v, 0, limits.max_tokens)).transpose()?;
        let temperature = self.temperature.unwrap_or(f64::from(defaults.temperature));
        named("temperature", ranges::temperature(temperature))?;
        let top_p = self.top_p.unwrap_or(f64::from(defaults.top_p));
        named("top_p", ranges::top_p(top_p))?;
        let top_k = match self.top_k {
            None => defaults.top_k,
            Some(-1) => 0,
            Some(v) => usize::try_from(v).map_err(|_| {
                FieldError::new("top_k", format!("`top_k` must be -1 (disabled), 0 (disabled) or positive, got {v}"))
            })?,
        };
        let min_p = self.min_p.unwrap_or(0.0);
        named("min_p", ranges::min_p(min_p))?;
        let presence_penalty = self.presence_penalty.unwrap_or(0.0);
        named("presence_penalty", ranges::penalty(presence_penalty))?;
        let frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
        named("frequency_penalty", ranges::penalty(frequency_penalty))?;
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        named("repetition_penalty", ranges::repetition_penalty(repetition_penalty))?;

        let num_steps = match self.num_steps {
            Some(v) => count("num_steps", v, 1, limits.max_num_steps)?,
            None => defaults.num_steps.unwrap_or(context.mean_recurrence).min(limits.max_num_steps),
        };
        let criterion = self.exit_criterion.unwrap_or(defaults.exit_criterion);
        let threshold = self.exit_threshold.or(defaults.exit_threshold);
        // A default gives way where it cannot apply: `generation.min_steps` is cut to this num_steps.
        let min_steps = self.min_steps.unwrap_or(defaults.min_steps.min(num_steps) as i64);
        let min_steps = usize::try_from(min_steps).ok().filter(|&v| v <= num_steps).ok_or_else(|| {
            let message = format!("`min_steps` must be between 0 and num_steps ({num_steps}), got {min_steps}");
            FieldError::new("min_steps", message)
        })?;
        let exit = ExitRule::new(criterion, threshold, min_steps)
            .map_err(|e| FieldError::new("exit_threshold", format!("`exit_threshold`: {e}")))?;
        let max_total_steps =
            self.max_total_steps.map(|v| count("max_total_steps", v, 1, limits.max_total_steps)).transpose()?;
        let init_scale = self.init_scale.unwrap_or(defaults.init_scale);
        named("init_scale", ranges::init_scale(init_scale))?;

        let decoding = self.decoding(defaults, limits, num_steps)?;
        // The request's floor is checked against its num_steps and decoding; a default floor is cut
        // to num_steps and gives way to decodings it does not apply to.
        let min_num_steps = match self.min_num_steps {
            Some(v) => Some(count("min_num_steps", v, 1, num_steps)?),
            None => defaults.default_floor(&decoding, num_steps),
        };

        let in_vocabulary = |name: &str, id: i64| {
            u32::try_from(id).ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                FieldError::new(name, format!("`{name}`: token id {id} is outside the vocabulary (size {vocab})"))
            })
        };
        let mut stop_token_ids = self
            .stop_token_ids
            .iter()
            .flatten()
            .map(|&id| in_vocabulary("stop_token_ids", id))
            .collect::<Result<Vec<u32>, _>>()?;
        if !self.ignore_eos.unwrap_or(false) {
            stop_token_ids.extend(context.stop_token_ids);
        }
        let logit_bias = self
            .logit_bias
            .iter()
            .flatten()
            .map(|(key, &bias)| {
                let id = key.parse::<i64>().map_err(|_| {
                    FieldError::new("logit_bias", format!("`logit_bias` key `{key}` is not a token id"))
                })?;
                let id = in_vocabulary("logit_bias", id)?;
                named("logit_bias", ranges::logit_bias(bias).map_err(|e| format!("value of token {id} {e}")))?;
                Ok((id, bias as f32))
            })
            .collect::<Result<Vec<_>, FieldError>>()?;

        let params = GenerationParams {
            max_tokens: max_tokens.unwrap_or(defaults.max_tokens.min(limits.max_tokens)),
            num_steps,
            min_num_steps,
            exit,
            exit_kv: self.exit_kv.unwrap_or(defaults.exit_kv),
            init_scale,
            cache: self.kv_cache.unwrap_or(defaults.kv_cache),
            decoding,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                min_p: min_p as f32,
                repetition_penalty: repetition_penalty as f32,
                presence_penalty: presence_penalty as f32,
                frequency_penalty: frequency_penalty as f32,
                logit_bias,
            },
            stop_token_ids,
            // A seed is any 64-bit pattern: negative JSON integers are taken as their bits.
            seed: self.seed.map_or(defaults.seed, |s| s as u64),
        };
        // The one check every generation passes (each field above was checked as the request
        // spells it; this is what the library and the settings get too).
        params.check()?;
        Ok(ResolvedGeneration { params, max_total_steps, max_tokens_explicit: max_tokens.is_some() })
    }
}

/// Fits one generation into the model's `context`: the prompt must leave room for a token and be
/// at most `max_prompt_tokens` long, and `max_tokens` must fit in the room left; an explicit one
/// that does not is an error naming it, a default one is cut to the room. The server and `huginn
/// generate` share it.
pub fn fit_context(
    prompt_len: usize,
    max_tokens: &mut usize,
    max_tokens_explicit: bool,
    context: usize,
    max_prompt_tokens: Option<usize>,
) -> Result<(), FieldError> {
    let longest = max_prompt_tokens.unwrap_or(context).min(context.saturating_sub(1));
    if prompt_len == 0 {
        return Err(FieldError::new("prompt", "the prompt is empty"));
    }
    if prompt_len > longest {
        let message = format!("the prompt has {prompt_len} tokens; the limit is {longest} (context length {context})");
        return Err(FieldError::new("prompt", message));
    }
    let room = context - prompt_len;
    if *max_tokens > room {
        if max_tokens_explicit {
            let message = format!(
                "this model's context length is {context} tokens; the prompt has {prompt_len} and max_tokens asks for {}",
                *max_tokens
            );
            return Err(FieldError::new("max_tokens", message));
        }
        *max_tokens = room;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Speculation;

    fn resolve(request: &GenerationRequest, defaults: &GenerationSettings) -> Result<ResolvedGeneration, FieldError> {
        let limits = LimitSettings::default();
        let context =
            RequestContext { defaults, limits: &limits, mean_recurrence: 32, vocab_size: 100, stop_token_ids: &[7] };
        request.resolve(&context)
    }

    #[test]
    fn each_value_comes_from_the_request_else_the_settings_else_the_model() {
        let mut settings = GenerationSettings::default();
        let empty = GenerationRequest::default();
        let resolved = resolve(&empty, &settings).unwrap();
        assert_eq!(resolved.params.num_steps, 32, "the model's mean_recurrence");
        assert_eq!(resolved.params.max_tokens, settings.max_tokens);
        assert!(!resolved.max_tokens_explicit);
        assert_eq!(resolved.params.stop_token_ids, vec![7], "the tokenizer's end-of-text ids");

        settings.num_steps = Some(6);
        settings.temperature = 0.5;
        settings.kv_cache = CacheStrategy::Full;
        let resolved = resolve(&empty, &settings).unwrap();
        assert_eq!((resolved.params.num_steps, resolved.params.sampling.temperature), (6, 0.5));
        assert_eq!(resolved.params.cache, CacheStrategy::Full);

        let request = GenerationRequest {
            num_steps: Some(3),
            temperature: Some(0.0),
            max_tokens: Some(5),
            stop_token_ids: Some(vec![9]),
            ignore_eos: Some(true),
            top_k: Some(-1),
            seed: Some(-1),
            kv_cache: Some(CacheStrategy::Shared(2)),
            ..Default::default()
        };
        let resolved = resolve(&request, &settings).unwrap();
        let params = &resolved.params;
        assert_eq!((params.num_steps, params.sampling.temperature, params.max_tokens), (3, 0.0, 5));
        assert!(resolved.max_tokens_explicit);
        assert_eq!(params.stop_token_ids, vec![9], "ignore_eos drops the tokenizer's ids");
        assert_eq!((params.sampling.top_k, params.seed, params.cache), (0, u64::MAX, CacheStrategy::Shared(2)));
    }

    #[test]
    fn a_bad_value_names_its_field() {
        let settings = GenerationSettings::default();
        let field = |request: GenerationRequest| resolve(&request, &settings).unwrap_err().field;
        assert_eq!(field(GenerationRequest { temperature: Some(2.5), ..Default::default() }), "temperature");
        assert_eq!(field(GenerationRequest { num_steps: Some(0), ..Default::default() }), "num_steps");
        assert_eq!(
            field(GenerationRequest { num_steps: Some(4), min_steps: Some(5), ..Default::default() }),
            "min_steps"
        );
        assert_eq!(field(GenerationRequest { top_k: Some(-2), ..Default::default() }), "top_k");
        assert_eq!(field(GenerationRequest { max_tokens: Some(-1), ..Default::default() }), "max_tokens");
        assert_eq!(field(GenerationRequest { exit_threshold: Some(-0.5), ..Default::default() }), "exit_threshold");
        assert_eq!(
            field(GenerationRequest { stop_token_ids: Some(vec![100]), ..Default::default() }),
            "stop_token_ids"
        );
        let bias = |key: &str, value: f64| GenerationRequest {
            logit_bias: Some(BTreeMap::from([(key.to_string(), value)])),
            ..Default::default()
        };
        assert_eq!(field(bias("x", 1.0)), "logit_bias");
        assert_eq!(field(bias("5", 101.0)), "logit_bias");
        let message = resolve(&GenerationRequest { repetition_penalty: Some(0.0), ..Default::default() }, &settings)
            .unwrap_err()
            .message;
        assert_eq!(message, "`repetition_penalty` must be between 0.01 and 10, got 0");
    }

    #[test]
    fn draft_steps_turn_speculation_on_within_num_steps() {
        let settings = GenerationSettings::default();
        let spec = |request: GenerationRequest| resolve(&request, &settings).map(|r| r.params.speculation());
        assert_eq!(spec(GenerationRequest::default()), Ok(None));
        let on = spec(GenerationRequest { num_steps: Some(8), draft_steps: Some(2), ..Default::default() });
        assert_eq!(on, Ok(Some(Speculation { draft_steps: 2, draft_tokens: settings.draft_tokens })));
        let six =
            GenerationRequest { num_steps: Some(8), draft_steps: Some(7), draft_tokens: Some(6), ..Default::default() };
        assert_eq!(spec(six), Ok(Some(Speculation { draft_steps: 7, draft_tokens: 6 })));
        let field = |request: GenerationRequest| resolve(&request, &settings).unwrap_err();
        let at_cap = field(GenerationRequest { num_steps: Some(8), draft_steps: Some(8), ..Default::default() });
        assert_eq!(
            (at_cap.field.as_str(), at_cap.message.as_str()),
            ("draft_steps", "`draft_steps` must be 0 (no speculation) or between 1 and num_steps - 1 (7), got 8")
        );
        assert_eq!(field(GenerationRequest { draft_steps: Some(-1), ..Default::default() }).field, "draft_steps");
        assert_eq!(spec(GenerationRequest { draft_steps: Some(0), ..Default::default() }), Ok(None), "0 is off");
        assert_eq!(
            field(GenerationRequest { num_steps: Some(1), draft_steps: Some(1), ..Default::default() }).field,
            "draft_steps"
        );
        let too_many = LimitSettings::default().max_draft_tokens as i64 + 1;
        assert_eq!(
            field(GenerationRequest { draft_tokens: Some(too_many), ..Default::default() }).field,
            "draft_tokens"
        );
        assert_eq!(field(GenerationRequest { draft_tokens: Some(0), ..Default::default() }).field, "draft_tokens");
        let continuous =
            GenerationRequest { draft_steps: Some(2), continuous_compute: Some(true), ..Default::default() };
        assert_eq!(field(continuous).field, "draft_steps");
        // From the settings: every request speculates unless it asks otherwise.
        let speculating = GenerationSettings { draft_steps: Some(3), draft_tokens: 5, ..Default::default() };
        let resolved = resolve(&GenerationRequest::default(), &speculating).unwrap();
        assert_eq!(resolved.params.speculation(), Some(Speculation { draft_steps: 3, draft_tokens: 5 }));
        // ...and a default that cannot apply to a request gives way instead of failing it.
        for request in [
            GenerationRequest { draft_steps: Some(0), ..Default::default() },
            GenerationRequest { num_steps: Some(3), ..Default::default() },
            GenerationRequest { num_steps: Some(1), ..Default::default() },
            GenerationRequest { continuous_compute: Some(true), ..Default::default() },
            GenerationRequest { sampler: Some(SamplerKind::Parallel), ..Default::default() },
        ] {
            let resolved = resolve(&request, &speculating).unwrap_or_else(|e| panic!("{request:?}: {e}"));
            assert_eq!(resolved.params.speculation(), None, "{request:?}");
        }
        let min_steps = GenerationSettings { min_steps: 6, ..Default::default() };
        let resolved = resolve(&GenerationRequest { num_steps: Some(4), ..Default::default() }, &min_steps).unwrap();
        assert_eq!(resolved.params.exit.min_steps, 4, "generation.min_steps cut to the request's num_steps");
    }
}
