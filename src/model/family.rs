//! The checkpoint families huginn runs, and where their math and names differ. One model type
//! ([`super::HuginnModel`]) runs them all: its parts vary where a family's math varies (this
//! file), while the recurrence, the cache, the exit and the engine stay one (docs/DESIGN.md,
//! "Checkpoint families").

use super::config::{Architecture, HuginnConfig};
use super::error::Result;
use super::layers::{BlockShape, RopeSpec, RopeStyle, Stage};
use super::weights::WeightFiles;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Huginn-0125: sandwich blocks (`norm_1`..`norm_4`), `qk_bias`, interleaved RoPE, embeddings
    /// times sqrt(n_embd), `ln_f` before and after the coda, tied head.
    Huginn0125,
    /// Retrofitted Llama / TinyLlama (McLeish et al. 2025): pre-norm blocks (`norm_1`, `norm_2`),
    /// grouped-query attention, rotate-half RoPE with `rope_theta` (and Llama-3 scaling),
    /// `init_values.embed_scale`, `ln_f` after the coda only, untied head.
    RetrofitLlama,
    /// Retrofitted OLMo-2: as retrofitted Llama, but post-norm blocks whose attention norms its
    /// queries and keys (`attn.q_norm`, `attn.k_norm`) before RoPE.
    RetrofitOlmo,
    /// Ouro (`OuroForCausalLM`): the whole layer stack is the recurrent block, four-norm blocks,
    /// rotate-half RoPE, a loop's input is the previous loop's output after `model.norm` (the
    /// first loop's the embeddings), the head reads that normed output, and a learned exit gate.
    Ouro,
}

impl Family {
    /// The family of the checkpoint `w` holds, described by `cfg` (Ouro by its config; the
    /// formats in Huginn-0125's by their first core block's tensors).
    pub fn detect(cfg: &HuginnConfig, w: &WeightFiles) -> Result<Self> {
        if cfg.architecture == Architecture::Ouro {
            return Ok(Family::Ouro);
        }
        let block = "transformer.core_block.0";
        Ok(if w.contains(&format!("{block}.norm_3.weight")) {
            Family::Huginn0125
        } else if w.contains(&format!("{block}.attn.q_norm.weight")) {
            Family::RetrofitOlmo
        } else {
            Family::RetrofitLlama
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Family::Huginn0125 => "huginn-0125",
            Family::RetrofitLlama => "retrofit-llama",
            Family::RetrofitOlmo => "retrofit-olmo",
            Family::Ouro => "ouro",
        }
    }

    pub fn block_shape(&self) -> BlockShape {
        match self {
            Family::Huginn0125 => BlockShape::Sandwich,
            Family::RetrofitLlama => BlockShape::PreNorm,
            Family::RetrofitOlmo => BlockShape::PostNorm,
            Family::Ouro => BlockShape::FourNorm,
        }
    }

    pub fn rope(&self, cfg: &HuginnConfig) -> RopeSpec {
        match self {
            Family::Huginn0125 => RopeSpec::huginn_0125(cfg),
            Family::RetrofitLlama | Family::RetrofitOlmo | Family::Ouro => RopeSpec {
                base: cfg.rope_theta.unwrap_or(cfg.rope_base),
                scaling: cfg.rope_scaling,
                style: RopeStyle::RotateHalf,
            },
        }
    }

    /// What the embeddings are multiplied by.
    pub fn embed_scale(&self, cfg: &HuginnConfig) -> f64 {
        match self {
            Family::Huginn0125 => (cfg.n_embd as f64).sqrt(),
            Family::RetrofitLlama | Family::RetrofitOlmo => cfg.init_values.and_then(|v| v.embed_scale).unwrap_or(1.0),
            Family::Ouro => 1.0,
        }
    }

    /// Where the final norm sits: before the coda too (Huginn-0125), after every core step
    /// (Ouro: each loop's output is normed, and the head reads it), or after the coda only.
    pub fn final_norm(&self) -> FinalNorm {
        match self {
            Family::Huginn0125 => FinalNorm::AroundCoda,
            Family::RetrofitLlama | Family::RetrofitOlmo => FinalNorm::AfterCoda,
            Family::Ouro => FinalNorm::AfterEachStep,
        }
    }

    /// Whether a core step's input is Huginn's adapter over the state and the prelude's output
    /// (else the state alone: Ouro's loops).
    pub fn has_adapter(&self) -> bool {
        *self != Family::Ouro
    }

    /// The published tensor names of this family's checkpoints.
    pub fn names(&self) -> TensorNames {
        match self {
            Family::Ouro => TensorNames {
                embedding: "model.embed_tokens.weight",
                final_norm: "model.norm.weight",
                gate: Some(("model.early_exit_gate.weight", "model.early_exit_gate.bias")),
            },
            _ => TensorNames { embedding: "transformer.wte.weight", final_norm: "transformer.ln_f.weight", gate: None },
        }
    }

    /// The name prefix of layer `i` of `stage`.
    pub fn block_prefix(&self, stage: Stage, i: usize) -> String {
        match (self, stage) {
            (Family::Ouro, _) => format!("model.layers.{i}"),
            (_, Stage::Prelude) => format!("transformer.prelude.{i}"),
            (_, Stage::Core) => format!("transformer.core_block.{i}"),
            (_, Stage::Coda) => format!("transformer.coda.{i}"),
        }
    }
}

/// Where a family applies its final norm (see [`Family::final_norm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalNorm {
    AroundCoda,
    AfterCoda,
    AfterEachStep,
}

/// The names of a family's model-level tensors (the head is `lm_head.weight` in every family).
pub struct TensorNames {
    pub embedding: &'static str,
    pub final_norm: &'static str,
    /// The exit gate's weight `[1, d]` and bias `[1]`.
    pub gate: Option<(&'static str, &'static str)>,
}
