//! `config.json` of a Huginn-0125-architecture checkpoint.
//!
//! Keys follow the published checkpoint. Missing optional keys take the published model's defaults,
//! unknown keys (training-only settings such as `init_strategy`) are ignored.

use serde::{Deserialize, Serialize};

use super::error::ModelError;
use super::ouro_config::OuroConfig;

/// Shape and numerics of a recurrent-depth model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HuginnConfig {
    /// The checkpoint format the description was read from (not a key of either format).
    #[serde(skip)]
    pub architecture: Architecture,
    /// Model width d.
    pub n_embd: usize,
    /// Attention heads H (head dim = d / H).
    #[serde(alias = "n_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads; the published architecture uses as many as query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// MLP hidden width I (the fused `fc` has 2I rows).
    pub intermediate_size: usize,
    #[serde(default = "defaults::prelude")]
    pub n_layers_in_prelude: usize,
    #[serde(default = "defaults::core")]
    pub n_layers_in_recurrent_block: usize,
    #[serde(default = "defaults::coda")]
    pub n_layers_in_coda: usize,
    pub vocab_size: usize,
    /// Maximum context length in tokens.
    #[serde(default = "defaults::block_size")]
    pub block_size: usize,
    /// Recurrence the model was trained around; the default `num_steps`.
    #[serde(default = "defaults::mean_recurrence")]
    pub mean_recurrence: usize,
    #[serde(default = "defaults::mean_backprop_depth")]
    pub mean_backprop_depth: usize,
    #[serde(default = "defaults::yes")]
    pub tie_embeddings: bool,
    #[serde(default = "defaults::yes")]
    pub qk_bias: bool,
    /// Bias on the adapter (the only biased linear layer of the architecture).
    #[serde(default)]
    pub bias: bool,
    #[serde(default = "defaults::norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "defaults::rope_base")]
    pub rope_base: f64,
    /// The RoPE base of retrofitted checkpoints (they carry the base model's; `rope_base` is
    /// Huginn-0125's key). Wins over `rope_base` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Llama-3 RoPE frequency scaling (retrofitted Llama-3.2 checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// `init_values.embed_scale`: retrofitted checkpoints multiply embeddings by it (1.0);
    /// Huginn-0125 by sqrt(n_embd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_values: Option<InitValues>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// The published checkpoint formats: Huginn-0125's (`RavenForCausalLM`: Huginn-0125 and the
/// retrofitted models converted into it) and Ouro's (`OuroForCausalLM`, read by
/// [`super::ouro_config::OuroConfig`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Architecture {
    #[default]
    Raven,
    Ouro,
}

impl Architecture {
    /// The name in `config.json`'s `architectures`.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Raven => "RavenForCausalLM",
            Architecture::Ouro => "OuroForCausalLM",
        }
    }
}

/// `rope_scaling` of Llama-3 checkpoints: frequencies with wavelengths past
/// `original_max_position_embeddings / low_freq_factor` divided by `factor`, those below
/// `original / high_freq_factor` kept, a smooth blend between.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub rope_type: RopeScalingType,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// The one scaling scheme supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeScalingType {
    Llama3,
}

/// The part of `init_values` that shapes inference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InitValues {
    /// The initial latent state's standard deviation (before `init_scale` and the embedding
    /// scale); the references draw it from here. Unset: sqrt(2 / (5 n_embd)), Huginn-0125's value.
    #[serde(default)]
    pub std: Option<f64>,
    #[serde(default)]
    pub embed_scale: Option<f64>,
}

/// A token id or a list of them (HF configs use both forms for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

mod defaults {
    pub fn prelude() -> usize {
        2
    }
    pub fn core() -> usize {
        4
    }
    pub fn coda() -> usize {
        2
    }
    pub fn block_size() -> usize {
        4096
    }
    pub fn mean_recurrence() -> usize {
        32
    }
    pub fn mean_backprop_depth() -> usize {
        8
    }
    pub fn yes() -> bool {
        true
    }
    pub fn norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_base() -> f64 {
        50_000.0
    }
}

impl HuginnConfig {
    /// The published Huginn-0125 shape.
    pub fn huginn_0125() -> Self {
        Self {
            architecture: Architecture::Raven,
            n_embd: 5280,
            num_attention_heads: 55,
            num_key_value_heads: Some(55),
            intermediate_size: 17920,
            n_layers_in_prelude: 2,
            n_layers_in_recurrent_block: 4,
            n_layers_in_coda: 2,
            vocab_size: 65536,
            block_size: 4096,
            mean_recurrence: 32,
            mean_backprop_depth: 8,
            tie_embeddings: true,
            qk_bias: true,
            bias: false,
            norm_eps: 1e-6,
            rope_base: 50_000.0,
            rope_theta: None,
            rope_scaling: None,
            init_values: None,
            torch_dtype: Some("bfloat16".into()),
            bos_token_id: Some(65504),
            eos_token_id: Some(TokenIds::One(65505)),
            pad_token_id: Some(65509),
        }
    }

    pub fn from_json_str(text: &str, file: &str) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::Config { file: file.to_string(), message };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let architectures = value.get("architectures").and_then(|a| a.as_array()).cloned().unwrap_or_default();
        let names: Vec<&str> = architectures.iter().filter_map(|a| a.as_str()).collect();
        let cfg = if names.contains(&Architecture::Ouro.name()) {
            let ouro: OuroConfig = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            ouro.to_huginn(file)?
        } else if let Some(other) = names.iter().find(|a| **a != Architecture::Raven.name()) {
            return Err(bad(format!(
                "architecture `{other}` is not supported: huginn serves RavenForCausalLM checkpoints (Huginn-0125 \
                 and retrofitted models in its format) and OuroForCausalLM looped models"
            )));
        } else {
            serde_json::from_value(value).map_err(|e| bad(e.to_string()))?
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Standard deviation of the initial latent state at `init_scale` 1, before the embedding
    /// scale: `init_values.std`, else sqrt(2 / (5 n_embd)) (what Huginn-0125's config derives).
    pub fn state_std(&self) -> f64 {
        self.init_values.and_then(|v| v.std).unwrap_or_else(|| (2.0 / (5.0 * self.n_embd as f64)).sqrt())
    }

    /// Whether a core step's input is formed from the token's prelude output (Huginn's adapter
    /// over state and injection); false for Ouro, whose loop input is the last loop's output.
    /// The parallel sampler and continuous compute need the injection.
    pub fn injects_input(&self) -> bool {
        self.architecture == Architecture::Raven
    }

    /// Whether the model has a learned exit gate (the `gate` exit criterion): Ouro's.
    pub fn has_exit_gate(&self) -> bool {
        self.architecture == Architecture::Ouro
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.num_attention_heads
    }

    /// Key/value heads: `num_key_value_heads`, else one per query head. Query head `h` reads
    /// key/value head `h / (num_attention_heads / kv_heads)` (grouped-query attention).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Checks the relations between keys that the architecture needs.
    pub fn validate(&self, file: &str) -> Result<(), ModelError> {
        let bad = |message: String| ModelError::Config { file: file.to_string(), message };
        let positive = [
            ("n_embd", self.n_embd),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layers_in_recurrent_block", self.n_layers_in_recurrent_block),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(bad(format!("`{key}` must be positive")));
            }
        }
        if !self.n_embd.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "`n_embd` ({}) must be divisible by `num_attention_heads` ({})",
                self.n_embd, self.num_attention_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(format!("head dim {} must be even for rotary embeddings", self.head_dim())));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "`num_key_value_heads` ({kv}) must divide `num_attention_heads` ({})",
                self.num_attention_heads
            )));
        }
        if self.qk_bias && kv != self.num_attention_heads {
            return Err(bad(format!(
                "`num_key_value_heads` ({kv}) differs from `num_attention_heads` ({}): a checkpoint with \
                 `qk_bias` (Huginn-0125) uses full multi-head attention",
                self.num_attention_heads
            )));
        }
        if let Some(s) = self.rope_scaling {
            let positive = [s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings];
            if positive.iter().any(|v| !v.is_finite() || *v <= 0.0) || s.high_freq_factor <= s.low_freq_factor {
                return Err(bad("`rope_scaling` needs positive factors and high_freq_factor > low_freq_factor".into()));
            }
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 || self.rope_base.is_nan() || self.rope_base <= 0.0 {
            return Err(bad("`norm_eps` and `rope_base` must be positive".into()));
        }
        Ok(())
    }
}
