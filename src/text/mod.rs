//! Text side of a checkpoint: tokenizer, special tokens, chat template.

pub mod chat;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, HUGINN_CHAT_TEMPLATE};
pub use tokenizer::{SpecialTokens, StreamDecoder, TextTokenizer};
