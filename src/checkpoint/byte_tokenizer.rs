//! A byte-level tokenizer of any vocabulary size, in the HF `tokenizer.json` format: ids 0..255 are
//! the bytes (GPT-2 byte-to-unicode alphabet, no merges), the Huginn special tokens sit 32 ids below
//! the end of the vocabulary (as in Huginn-0125: 65504 for a 65536 vocabulary), and the remaining
//! ids are inert placeholders.

use serde_json::{Map, Value, json};

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

/// The `tokenizer.json` document for a byte-level vocabulary of `vocab_size` entries.
pub fn byte_level_tokenizer_json(vocab_size: usize) -> Result<Value> {
    if vocab_size < 256 + 32 {
        return Err(ModelError::InvalidArgument(format!(
            "vocab_size {vocab_size} is too small for the byte-level tokenizer (at least 288)"
        )));
    }
    let base = special_base(vocab_size);
    let mut vocab = Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_to_char(b).to_string(), json!(b as u32));
    }
    let mut added = Vec::new();
    for id in 256..vocab_size {
        let special = id.checked_sub(base).and_then(|i| SPECIAL_TOKENS.get(i));
        let token = match special {
            Some(name) => name.to_string(),
            None => format!("<r{id}>"),
        };
        if special.is_some() {
            added.push(json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}));
        }
        vocab.insert(token, json!(id));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    }))
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
