//! Request bodies to validated engine parameters. Every field is read on its own so a wrong type
//! or value names its parameter; unknown fields are ignored, as OpenAI-compatible servers do.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::state::AppState;
use crate::engine::JobSpec;
use crate::generate::{GenerationParams, SamplingParams, ranges};
use crate::model::{CacheStrategy, ExitCriterion, ExitRule};

/// Typed access to the fields of a JSON object.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub fn parse(body: &'a Value) -> Result<Self, ApiError> {
        body.as_object().map(Fields).ok_or_else(|| ApiError::invalid("the request body must be a JSON object"))
    }

    /// The field's value; `null` counts as absent.
    pub fn get<T: DeserializeOwned>(&self, name: &str, expected: &str) -> Result<Option<T>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => serde_json::from_value(value.clone())
                .map(Some)
                .map_err(|_| ApiError::param(name, format!("`{name}` must be {expected}, got {}", describe(value)))),
        }
    }

    pub fn raw(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// 400 naming the first of `names` present (parameters this server does not implement).
    pub fn reject_unsupported(&self, names: &[&str]) -> Result<(), ApiError> {
        match names.iter().find(|n| self.raw(n).is_some()) {
            Some(name) => Err(ApiError::Unsupported {
                param: name.to_string(),
                message: format!("`{name}` is not supported by this server"),
            }),
            None => Ok(()),
        }
    }
}

fn describe(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 40 { format!("{}...", &text[..text.floor_char_boundary(40)]) } else { text }
}

fn check(ok: bool, name: &str, message: impl FnOnce() -> String) -> Result<(), ApiError> {
    if ok { Ok(()) } else { Err(ApiError::param(name, message())) }
}

fn finite_in(value: f64, low: f64, high: f64) -> bool {
    value.is_finite() && value >= low && value <= high
}

/// What the completion and chat endpoints share: sampling, the compute budget, stops, `n`.
pub struct CommonParams {
    pub params: GenerationParams,
    pub n: usize,
    pub max_total_steps: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `max_tokens` was given explicitly (an over-long request is then an error, not clamped).
    pub max_tokens_explicit: bool,
}

pub fn common(f: &Fields, state: &AppState, max_tokens_keys: &[&str]) -> Result<CommonParams, ApiError> {
    let defaults = &state.settings.generation;
    let limits = &state.settings.limits;
    let cfg = state.model_config();
    let vocab = cfg.vocab_size;

    let mut max_tokens = None;
    for key in max_tokens_keys {
        if let Some(v) = f.get::<i64>(key, "an integer")? {
            check(v >= 0 && v as usize <= limits.max_tokens, key, || {
                format!("`{key}` must be between 0 and {}, got {v}", limits.max_tokens)
            })?;
            max_tokens = Some(v as usize);
        }
    }
    let temperature = f.get::<f64>("temperature", "a number")?.unwrap_or(defaults.temperature as f64);
    check(ranges::temperature(temperature), "temperature", || {
        format!("`temperature` must be between 0 and {}, got {temperature}", ranges::MAX_TEMPERATURE)
    })?;
    let top_p = f.get::<f64>("top_p", "a number")?.unwrap_or(defaults.top_p as f64);
    check(ranges::top_p(top_p), "top_p", || format!("`top_p` must be > 0 and <= 1, got {top_p}"))?;
    let top_k = f.get::<i64>("top_k", "an integer")?.unwrap_or(defaults.top_k as i64);
    check(top_k >= -1, "top_k", || format!("`top_k` must be -1 (disabled), 0 (disabled) or positive, got {top_k}"))?;
    let min_p = f.get::<f64>("min_p", "a number")?.unwrap_or(0.0);
    check(finite_in(min_p, 0.0, 1.0), "min_p", || format!("`min_p` must be between 0 and 1, got {min_p}"))?;
    let penalty = |name: &str, low: f64, high: f64, default: f64| -> Result<f64, ApiError> {
        let v = f.get::<f64>(name, "a number")?.unwrap_or(default);
        check(finite_in(v, low, high), name, || format!("`{name}` must be between {low} and {high}, got {v}"))?;
        Ok(v)
    };
    let presence_penalty = penalty("presence_penalty", -2.0, 2.0, 0.0)?;
    let frequency_penalty = penalty("frequency_penalty", -2.0, 2.0, 0.0)?;
    let repetition_penalty = penalty("repetition_penalty", 0.01, 10.0, 1.0)?;
    let n = f.get::<i64>("n", "an integer")?.unwrap_or(1);
    check(n >= 1 && n as usize <= limits.max_n, "n", || {
        format!("`n` must be between 1 and {}, got {n}", limits.max_n)
    })?;

    let num_steps = match f.get::<i64>("num_steps", "an integer")? {
        Some(v) => {
            check(v >= 1 && v as usize <= limits.max_num_steps, "num_steps", || {
                format!("`num_steps` must be between 1 and {}, got {v}", limits.max_num_steps)
            })?;
            v as usize
        }
        None => defaults.num_steps.unwrap_or(cfg.mean_recurrence).min(limits.max_num_steps),
    };
    let criterion = match f.get::<String>("exit_criterion", "a string")? {
        Some(name) => name.parse::<ExitCriterion>().map_err(|e| ApiError::param("exit_criterion", e.to_string()))?,
        None => defaults.exit_criterion,
    };
    let threshold = f.get::<f64>("exit_threshold", "a number")?.or(defaults.exit_threshold);
    if let Some(t) = threshold {
        check(t.is_finite() && t >= 0.0, "exit_threshold", || {
            format!("`exit_threshold` must be a finite number >= 0, got {t}")
        })?;
    }
    let min_steps = f.get::<i64>("min_steps", "an integer")?.unwrap_or(defaults.min_steps as i64);
    check(min_steps >= 0 && min_steps as usize <= num_steps, "min_steps", || {
        format!("`min_steps` must be between 0 and num_steps ({num_steps}), got {min_steps}")
    })?;
    let exit = ExitRule::new(criterion, threshold, min_steps as usize)
        .map_err(|e| ApiError::param("exit_threshold", e.to_string()))?;
    let max_total_steps = f.get::<i64>("max_total_steps", "an integer")?;
    if let Some(v) = max_total_steps {
        check(v >= 1 && v as usize <= limits.max_total_steps, "max_total_steps", || {
            format!("`max_total_steps` must be between 1 and {}, got {v}", limits.max_total_steps)
        })?;
    }
    let init_scale = f.get::<f64>("init_scale", "a number")?.unwrap_or(defaults.init_scale);
    check(ranges::init_scale(init_scale), "init_scale", || {
        format!("`init_scale` must be between 0 and {}, got {init_scale}", ranges::MAX_INIT_SCALE)
    })?;
    let continuous_compute = f.get::<bool>("continuous_compute", "a boolean")?.unwrap_or(defaults.continuous_compute);
    let seed = f.get::<i64>("seed", "an integer")?.map(|s| s as u64).unwrap_or(defaults.seed);

    let stop: Vec<String> = match f.raw("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            check(items.len() <= 4, "stop", || format!("`stop` may hold at most 4 sequences, got {}", items.len()))?;
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ApiError::param("stop", "`stop` must be a string or a list of strings"))
                })
                .collect::<Result<_, _>>()?
        }
        Some(other) => {
            return Err(ApiError::param(
                "stop",
                format!("`stop` must be a string or a list of strings, got {}", describe(other)),
            ));
        }
    };
    let mut stop_token_ids: Vec<u32> = f
        .get::<Vec<i64>>("stop_token_ids", "a list of token ids")?
        .unwrap_or_default()
        .into_iter()
        .map(|id| {
            check(id >= 0 && (id as usize) < vocab, "stop_token_ids", || {
                format!("token id {id} is outside the vocabulary (size {vocab})")
            })?;
            Ok(id as u32)
        })
        .collect::<Result<_, ApiError>>()?;
    if !f.get::<bool>("ignore_eos", "a boolean")?.unwrap_or(false) {
        stop_token_ids.extend(&state.tokenizer.special().stop);
    }
    let logit_bias = match f.get::<Map<String, Value>>("logit_bias", "an object mapping token ids to numbers")? {
        None => Vec::new(),
        Some(map) => map
            .iter()
            .map(|(key, value)| {
                let id: usize = key.parse().map_err(|_| {
                    ApiError::param("logit_bias", format!("`logit_bias` key `{key}` is not a token id"))
                })?;
                check(id < vocab, "logit_bias", || format!("token id {id} is outside the vocabulary (size {vocab})"))?;
                let bias = value.as_f64().filter(|b| finite_in(*b, -100.0, 100.0)).ok_or_else(|| {
                    ApiError::param(
                        "logit_bias",
                        format!("`logit_bias` values must be numbers between -100 and 100, got {value}"),
                    )
                })?;
                Ok((id as u32, bias as f32))
            })
            .collect::<Result<_, ApiError>>()?,
    };
    let stream = f.get::<bool>("stream", "a boolean")?.unwrap_or(false);
    let include_usage = match f.raw("stream_options") {
        None => false,
        Some(options) => {
            check(stream, "stream_options", || "`stream_options` is only allowed when `stream` is true".into())?;
            Fields::parse(options)
                .map_err(|_| ApiError::param("stream_options", "`stream_options` must be an object"))?
                .get::<bool>("include_usage", "a boolean")?
                .unwrap_or(false)
        }
    };
    let cache: CacheStrategy = defaults.kv_cache;

    let params = GenerationParams {
        max_tokens: max_tokens.unwrap_or(defaults.max_tokens.min(limits.max_tokens)),
        num_steps,
        exit,
        init_scale,
        continuous_compute,
        cache,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k: top_k.max(0) as usize,
            top_p: top_p as f32,
            min_p: min_p as f32,
            repetition_penalty: repetition_penalty as f32,
            presence_penalty: presence_penalty as f32,
            frequency_penalty: frequency_penalty as f32,
            logit_bias,
        },
        stop_token_ids,
        seed,
    };
    Ok(CommonParams {
        params,
        n: n as usize,
        max_total_steps: max_total_steps.map(|v| v as usize),
        stop,
        stream,
        include_usage,
        max_tokens_explicit: max_tokens.is_some(),
    })
}

/// Checks the prompt against the vocabulary and context, and fits `max_tokens` into the context.
pub fn job_spec(
    state: &AppState,
    prompt: Vec<u32>,
    common: &CommonParams,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
) -> Result<JobSpec, ApiError> {
    let cfg = state.model_config();
    let context = cfg.block_size;
    let max_prompt = state.settings.limits.max_prompt_tokens.unwrap_or(context).min(context);
    if prompt.is_empty() {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(ApiError::param(
            "prompt",
            format!("token id {bad} is outside the vocabulary (size {})", cfg.vocab_size),
        ));
    }
    if prompt.len() >= max_prompt.min(context) {
        return Err(ApiError::param(
            "prompt",
            format!(
                "the prompt has {} tokens; the limit is {} (context length {context})",
                prompt.len(),
                max_prompt.min(context) - 1
            ),
        ));
    }
    let mut params = common.params.clone();
    let room = context - prompt.len();
    if params.max_tokens > room {
        if common.max_tokens_explicit {
            return Err(ApiError::param(
                "max_tokens",
                format!(
                    "this model's context length is {context} tokens; the prompt has {} and max_tokens asks for {}",
                    prompt.len(),
                    params.max_tokens
                ),
            ));
        }
        params.max_tokens = room;
    }
    Ok(JobSpec {
        prompt,
        params,
        n: common.n,
        max_total_steps: common.max_total_steps,
        stop: common.stop.clone(),
        logprobs,
        prompt_logprobs,
        report_logits: false,
    })
}
