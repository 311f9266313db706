//! `config.json` of an Ouro looped model (`OuroForCausalLM`; ByteDance's Ouro-1.4B / -2.6B and
//! their -Thinking variants), read into the one model description huginn runs: the whole layer
//! stack is the recurrent block (no prelude, no coda, no adapter), `total_ut_steps` the default
//! loop count.

use serde::{Deserialize, Serialize};

use super::config::{Architecture, HuginnConfig, RopeScaling, TokenIds};
use super::error::ModelError;

/// The keys of a published Ouro config that shape inference (others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OuroConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Must equal hidden_size / num_attention_heads when given.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::total_ut_steps")]
    pub total_ut_steps: usize,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

mod defaults {
    pub fn max_position_embeddings() -> usize {
        65536
    }
    pub fn total_ut_steps() -> usize {
        4
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        1_000_000.0
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
}

impl OuroConfig {
    /// The model description: the `num_hidden_layers` layers are the recurrent block, looped
    /// `total_ut_steps` times by default.
    pub fn to_huginn(&self, file: &str) -> Result<HuginnConfig, ModelError> {
        let bad = |message: String| ModelError::Config { file: file.to_string(), message };
        if self.use_sliding_window {
            return Err(bad("`use_sliding_window` is not supported".into()));
        }
        if self.hidden_act != "silu" {
            return Err(bad(format!("`hidden_act` {} is not supported (silu only)", self.hidden_act)));
        }
        if let Some(head_dim) = self.head_dim
            && self.num_attention_heads > 0
            && head_dim * self.num_attention_heads != self.hidden_size
        {
            return Err(bad(format!(
                "`head_dim` ({head_dim}) times `num_attention_heads` ({}) must equal `hidden_size` ({})",
                self.num_attention_heads, self.hidden_size
            )));
        }
        Ok(HuginnConfig {
            architecture: Architecture::Ouro,
            n_embd: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            intermediate_size: self.intermediate_size,
            n_layers_in_prelude: 0,
            n_layers_in_recurrent_block: self.num_hidden_layers,
            n_layers_in_coda: 0,
            vocab_size: self.vocab_size,
            block_size: self.max_position_embeddings,
            mean_recurrence: self.total_ut_steps,
            mean_backprop_depth: self.total_ut_steps,
            tie_embeddings: self.tie_word_embeddings,
            qk_bias: false,
            bias: false,
            norm_eps: self.rms_norm_eps,
            rope_base: self.rope_theta,
            rope_theta: Some(self.rope_theta),
            rope_scaling: self.rope_scaling,
            init_values: None,
            torch_dtype: self.torch_dtype.clone(),
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.clone(),
            pad_token_id: self.pad_token_id,
        })
    }

    /// The published config of a model description built from one (`init-random`).
    pub fn from_huginn(cfg: &HuginnConfig) -> Self {
        Self {
            hidden_size: cfg.n_embd,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: Some(cfg.kv_heads()),
            head_dim: Some(cfg.head_dim()),
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.n_layers_in_recurrent_block,
            vocab_size: cfg.vocab_size,
            max_position_embeddings: cfg.block_size,
            total_ut_steps: cfg.mean_recurrence,
            rms_norm_eps: cfg.norm_eps,
            rope_theta: cfg.rope_theta.unwrap_or(cfg.rope_base),
            rope_scaling: cfg.rope_scaling,
            tie_word_embeddings: cfg.tie_embeddings,
            use_sliding_window: false,
            hidden_act: "silu".into(),
            torch_dtype: cfg.torch_dtype.clone(),
            bos_token_id: cfg.bos_token_id,
            eos_token_id: cfg.eos_token_id.clone(),
            pad_token_id: cfg.pad_token_id,
        }
    }
}
