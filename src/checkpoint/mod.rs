//! Writing checkpoints: random-weight models of any shape and their byte-level tokenizer.

pub mod byte_tokenizer;
pub mod init_random;

pub use init_random::{write_metadata, write_random_checkpoint, write_random_family_checkpoint};

use crate::model::config::{InitValues, RopeScaling, RopeScalingType};
use crate::model::{Architecture, Family, HuginnConfig, ModelError, Result};

/// Named shapes for `init-random`.
pub const PRESETS: [&str; 8] = [
    "huginn-0125",
    "tiny",
    "width-1024",
    "addition",
    "ouro-1.4b",
    "ouro-2.6b",
    "recurrent-llama-3.2-1b",
    "recurrent-tinyllama-1.1b",
];

/// The checkpoint family a preset is written in (its tensor names and block shape).
pub fn preset_family(name: &str) -> Family {
    match name {
        "ouro-1.4b" | "ouro-2.6b" => Family::Ouro,
        "recurrent-llama-3.2-1b" | "recurrent-tinyllama-1.1b" => Family::RetrofitLlama,
        _ => Family::Huginn0125,
    }
}

/// Ouro-1.4B (`layers` 24) and Ouro-2.6B (48): width 2048, 16 heads (multi-head), head dim 128,
/// MLP 5632, vocabulary 49152, 4 loops, RoPE base 10^6, untied head, bfloat16.
fn ouro(layers: usize) -> HuginnConfig {
    HuginnConfig {
        architecture: Architecture::Ouro,
        n_embd: 2048,
        num_attention_heads: 16,
        num_key_value_heads: Some(16),
        intermediate_size: 5632,
        n_layers_in_prelude: 0,
        n_layers_in_recurrent_block: layers,
        n_layers_in_coda: 0,
        vocab_size: 49152,
        block_size: 65536,
        mean_recurrence: 4,
        mean_backprop_depth: 4,
        tie_embeddings: false,
        qk_bias: false,
        bias: false,
        norm_eps: 1e-6,
        rope_base: 1e6,
        rope_theta: Some(1e6),
        rope_scaling: None,
        init_values: None,
        torch_dtype: Some("bfloat16".into()),
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    }
}

/// A Llama model retrofitted into Huginn's format by the retrofitting-recurrence conversion
/// (`convert_llama.py`): layers split 4 / 8 / 4 into prelude, core and coda, Huginn-0125's
/// `init_values` (state std 0.0087, embedding scale 1), untied head, no q/k bias, norm eps 1e-5.
fn retrofit_llama(base: HuginnConfig) -> HuginnConfig {
    HuginnConfig {
        n_layers_in_prelude: 4,
        n_layers_in_recurrent_block: 8,
        n_layers_in_coda: 4,
        mean_recurrence: 32,
        mean_backprop_depth: 8,
        tie_embeddings: false,
        qk_bias: false,
        bias: false,
        norm_eps: 1e-5,
        init_values: Some(InitValues { std: Some(0.008703882797784892), embed_scale: Some(1.0) }),
        torch_dtype: Some("bfloat16".into()),
        ..without_special_ids(base)
    }
}

pub fn preset(name: &str) -> Result<HuginnConfig> {
    let base = HuginnConfig::huginn_0125();
    match name {
        "huginn-0125" => Ok(base),
        // The shape of the reference fixture.
        "tiny" => Ok(HuginnConfig {
            n_embd: 64,
            num_attention_heads: 4,
            num_key_value_heads: Some(4),
            intermediate_size: 160,
            vocab_size: 384,
            block_size: 256,
            n_layers_in_recurrent_block: 2,
            mean_recurrence: 4,
            mean_backprop_depth: 2,
            ..without_special_ids(base)
        }),
        // The benchmark model: width 1024, 16 heads, layers 2/4/2, MLP 2816, vocab 32768.
        "width-1024" => Ok(HuginnConfig {
            n_embd: 1024,
            num_attention_heads: 16,
            num_key_value_heads: Some(16),
            intermediate_size: 2816,
            vocab_size: 32768,
            block_size: 4096,
            ..without_special_ids(base)
        }),
        // The default model's shape (trained by `huginn train`): width 128, 4 heads, layers 1/1/1
        // (one layer per recurrence, so depth comes from iterating), the 288-entry byte-level
        // vocabulary, trained around 8 recurrences.
        "addition" => Ok(HuginnConfig {
            n_embd: 128,
            num_attention_heads: 4,
            num_key_value_heads: Some(4),
            intermediate_size: 384,
            n_layers_in_prelude: 1,
            n_layers_in_recurrent_block: 1,
            n_layers_in_coda: 1,
            vocab_size: 288,
            block_size: 256,
            mean_recurrence: 8,
            mean_backprop_depth: 4,
            qk_bias: false,
            ..without_special_ids(base)
        }),
        "ouro-1.4b" => Ok(ouro(24)),
        "ouro-2.6b" => Ok(ouro(48)),
        // Llama-3.2-1B: width 2048, 32 heads, 8 key/value heads, MLP 8192, vocabulary 128256,
        // RoPE base 500000 with Llama-3 scaling (factor 32), context 131072.
        "recurrent-llama-3.2-1b" => Ok(retrofit_llama(HuginnConfig {
            n_embd: 2048,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            intermediate_size: 8192,
            vocab_size: 128256,
            block_size: 131072,
            rope_base: 500_000.0,
            rope_theta: Some(500_000.0),
            rope_scaling: Some(RopeScaling {
                rope_type: RopeScalingType::Llama3,
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            ..base
        })),
        // TinyLlama-1.1B (3T): width 2048, 32 heads, 4 key/value heads, MLP 5632, vocabulary 32000,
        // RoPE base 10000, context 2048.
        "recurrent-tinyllama-1.1b" => Ok(retrofit_llama(HuginnConfig {
            n_embd: 2048,
            num_attention_heads: 32,
            num_key_value_heads: Some(4),
            intermediate_size: 5632,
            vocab_size: 32000,
            block_size: 2048,
            rope_base: 500_000.0,
            rope_theta: Some(10_000.0),
            rope_scaling: None,
            ..base
        })),
        other => Err(ModelError::InvalidArgument(format!("unknown preset `{other}` (one of {})", PRESETS.join(", ")))),
    }
}

/// Special-token ids belong to a vocabulary; other shapes get theirs from the tokenizer they are
/// written with.
fn without_special_ids(cfg: HuginnConfig) -> HuginnConfig {
    HuginnConfig { bos_token_id: None, eos_token_id: None, pad_token_id: None, ..cfg }
}
