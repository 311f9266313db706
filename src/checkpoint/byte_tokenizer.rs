//! A byte-level tokenizer of any vocabulary size, in the HF `tokenizer.json` format: ids 0..255 are
//! the bytes (GPT-2 byte-to-unicode alphabet, no merges), the Huginn special tokens sit 32 ids below
//! the end of the vocabulary (as in Huginn-0125: 65504 for a 65536 vocabulary), and the remaining
//! ids are inert placeholders.

use serde_json::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::model::{ModelError, Result};

/// Huginn special tokens, in id order from `vocab_size - 32`.
pub const SPECIAL_TOKENS: [&str; 6] =
    ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>"];

pub fn special_base(vocab_size: usize) -> usize {
    vocab_size - 32
}

/// GPT-2's reversible byte -> printable char map used by ByteLevel pre-tokenizers.
pub fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return b as char;
    }
    let shifted = (0u8..=255).filter(|&x| !printable(x)).position(|x| x == b).unwrap_or(0);
    char::from_u32(256 + shifted as u32).unwrap_or('?')
}

/// A byte-level tokenizer of `vocab_size` entries, built with the tokenizers crate.
pub fn byte_level_tokenizer(vocab_size: usize) -> Result<Tokenizer> {
    if vocab_size < 256 + 32 {
        return Err(ModelError::InvalidArgument(format!(
            "vocab_size {vocab_size} is too small for the byte-level tokenizer (at least 288)"
        )));
    }
    let base = special_base(vocab_size);
    let name = |id: usize| match id.checked_sub(base).and_then(|i| SPECIAL_TOKENS.get(i)) {
        Some(special) => special.to_string(),
        None => format!("<r{id}>"),
    };
    let vocab: Vocab = (0..=255u8)
        .map(|b| (byte_to_char(b).to_string(), b as u32))
        .chain((256..vocab_size).map(|id| (name(id), id as u32)))
        .collect();
    let bad = |e: tokenizers::Error| ModelError::InvalidArgument(format!("building the tokenizer: {e}"));
    let bpe = BPE::builder().vocab_and_merges(vocab, Vec::new()).build().map_err(bad)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
    tokenizer.add_special_tokens(specials).map_err(bad)?;
    Ok(tokenizer)
}

/// The `tokenizer.json` document of [`byte_level_tokenizer`].
pub fn byte_level_tokenizer_json(vocab_size: usize) -> Result<Value> {
    serde_json::to_value(byte_level_tokenizer(vocab_size)?)
        .map_err(|e| ModelError::InvalidArgument(format!("serializing the tokenizer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(b' '), 'Ġ');
    }

    #[test]
    fn round_trips_text_and_places_specials() {
        let json = byte_level_tokenizer_json(512).unwrap();
        let tok = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(tok.get_vocab_size(true), 512);
        let text = "472+389= héllo";
        let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), text.len());
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        assert_eq!(tok.token_to_id("<|begin_text|>"), Some(480));
        assert_eq!(tok.token_to_id("<|pad|>"), Some(485));
        let with_special = tok.encode("<|begin_text|>hi", true).unwrap().get_ids().to_vec();
        assert_eq!(with_special, vec![480, b'h' as u32, b'i' as u32]);
    }

    #[test]
    fn too_small_vocab_is_rejected() {
        assert!(byte_level_tokenizer_json(100).is_err());
    }
}
