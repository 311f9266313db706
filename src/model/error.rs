//! Errors of the model layer: loading a checkpoint and running it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: file not found", path.display())]
    MissingFile { path: PathBuf },

    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },

    #[error("{file}: invalid config: {message}")]
    Config { file: String, message: String },

    #[error("{file}: not a valid safetensors file (truncated or corrupt?): {message}")]
    Safetensors { file: String, message: String },

    #[error("{file}: invalid shard index: {message}")]
    ShardIndex { file: String, message: String },

    #[error("tensor `{name}` is missing from the checkpoint ({files})")]
    MissingTensor { name: String, files: String },

    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { file: String, name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{file}: tensor `{name}` has dtype {found}, which cannot be loaded")]
    UnsupportedTensorDtype { file: String, name: String, found: String },

    #[error("{file}: invalid tokenizer: {message}")]
    Tokenizer { file: String, message: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("unsupported dtype `{0}` (use f32, bf16 or f16)")]
    UnsupportedDtype(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("sequence of {needed} tokens exceeds the context length {limit}")]
    ContextOverflow { needed: usize, limit: usize },

    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },

    /// The message carries candle's (not also as a source, which would print it twice in a chain).
    #[error("tensor computation failed: {0}")]
    Compute(candle_core::Error),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Compute(e)
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
