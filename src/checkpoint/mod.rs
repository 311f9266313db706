//! Writing checkpoints: random-weight models of any shape and their byte-level tokenizer.

pub mod byte_tokenizer;
pub mod init_random;

pub use init_random::{write_metadata, write_random_checkpoint};

use crate::model::{HuginnConfig, ModelError, Result};

/// Named shapes for `init-random`.
pub const PRESETS: [&str; 4] = ["huginn-0125", "tiny", "width-1024", "addition"];

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
        other => Err(ModelError::InvalidArgument(format!("unknown preset `{other}` (one of {})", PRESETS.join(", ")))),
    }
}

/// Special-token ids belong to a vocabulary; other shapes get theirs from the tokenizer they are
/// written with.
fn without_special_ids(cfg: HuginnConfig) -> HuginnConfig {
    HuginnConfig { bos_token_id: None, eos_token_id: None, pad_token_id: None, ..cfg }
}
