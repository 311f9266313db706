//! `tokenizer.json` plus the checkpoint's special tokens and chat template.

use std::path::Path;

use serde_json::Value;

use super::chat::{ChatMessage, ChatTemplate};
use crate::model::weights::read_text;
use crate::model::{HuginnConfig, ModelError, Result};

/// Ids with a special role. `stop` are the ids that end a generation by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    pub stop: Vec<u32>,
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    chat: ChatTemplate,
}

const FILE: &str = "tokenizer.json";

impl TextTokenizer {
    /// Loads `tokenizer.json` and resolves special tokens from `config.json`, then
    /// `generation_config.json`, then `tokenizer_config.json`, then well-known token names; the
    /// end-of-text ids also take `tokenizer_config.json`'s `eos_token`.
    pub fn load(dir: &Path, cfg: &HuginnConfig) -> Result<Self> {
        let path = dir.join(FILE);
        if !path.is_file() {
            return Err(ModelError::MissingFile { path });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer { file: FILE.into(), message: e.to_string() })?;
        let generation = optional_json(&dir.join("generation_config.json"))?;
        let tok_config = optional_json(&dir.join("tokenizer_config.json"))?;
        let by_name = |name: &str| inner.token_to_id(name);
        let named_in = |json: &Option<Value>, key: &str| -> Option<u32> {
            let value = json.as_ref()?.get(key)?;
            let text = value.as_str().or_else(|| value.get("content").and_then(Value::as_str))?;
            by_name(text)
        };
        let ids_in = |json: &Option<Value>, key: &str| -> Vec<u32> {
            match json.as_ref().and_then(|j| j.get(key)) {
                Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_u64().map(|n| n as u32)).collect(),
                _ => Vec::new(),
            }
        };
        let first = |ids: Vec<u32>| ids.first().copied();
        let bos = cfg
            .bos_token_id
            .or_else(|| first(ids_in(&generation, "bos_token_id")))
            .or_else(|| named_in(&tok_config, "bos_token"))
            .or_else(|| by_name("<|begin_text|>"));
        let mut eos = cfg.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default();
        if eos.is_empty() {
            eos = ids_in(&generation, "eos_token_id");
        }
        if eos.is_empty() {
            eos = named_in(&tok_config, "eos_token").or_else(|| by_name("<|end_text|>")).into_iter().collect();
        }
        // The chat format's end of turn, which `tokenizer_config.json` names as its `eos_token`,
        // ends generation too where `config.json` names another id (Ouro's configs say
        // `<|endoftext|>`, 0; its ChatML turns end with `<|im_end|>`).
        if let Some(id) = named_in(&tok_config, "eos_token")
            && !eos.contains(&id)
        {
            eos.push(id);
        }
        let pad = cfg
            .pad_token_id
            .or_else(|| first(ids_in(&generation, "pad_token_id")))
            .or_else(|| named_in(&tok_config, "pad_token"))
            .or_else(|| by_name("<|pad|>"));
        // The reference stops on begin_text, end_text and end_turn in addition to eos.
        let mut stop = eos.clone();
        stop.extend(["<|begin_text|>", "<|end_text|>", "<|end_turn|>"].iter().filter_map(|n| by_name(n)));
        stop.sort_unstable();
        stop.dedup();
        let vocab = inner.get_vocab_size(true);
        if let Some(bad) = bos.iter().chain(&eos).chain(&pad).find(|id| **id as usize >= cfg.vocab_size.max(vocab)) {
            return Err(ModelError::Tokenizer {
                file: FILE.into(),
                message: format!("special token id {bad} is outside the vocabulary"),
            });
        }
        let chat = ChatTemplate::from_tokenizer_config(tok_config.as_ref())?;
        Ok(Self { inner, special: SpecialTokens { bos, eos, pad, stop }, chat })
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes text as the tokenizer's own pipeline does (special-token strings become their ids).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer { file: FILE.into(), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer { file: FILE.into(), message: e.to_string() })
    }

    /// The text of one token, special tokens included (for log-probability listings).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Renders a conversation with the checkpoint's chat template (or the built-in Huginn format).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.chat.render(messages, add_generation_prompt)
    }

    /// [`Self::apply_chat_template`] with the request's tools given to the template as `tools`.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat.render_with_tools(messages, tools, add_generation_prompt)
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat
    }
}

fn optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read_text(path)?;
    let name = crate::model::weights::file_name(path);
    serde_json::from_str(&text).map(Some).map_err(|e| ModelError::Config { file: name, message: e.to_string() })
}
