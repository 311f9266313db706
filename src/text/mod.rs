//! Text side of a checkpoint: tokenizer, special tokens, chat template.

pub mod chat;
pub mod stream;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, HUGINN_CHAT_TEMPLATE};
pub use stream::{StreamPiece, TextStream};
pub use tokenizer::{SpecialTokens, TextTokenizer};
