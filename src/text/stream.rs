//! Incremental detokenization with stop strings.
//!
//! Tokens arrive one at a time; text is released as soon as it is final: not while the last bytes
//! are an incomplete character, and not while the end of the text could still become a stop
//! string. A stop string ends the text before it; it is never released.

use super::tokenizer::TextTokenizer;
use crate::model::Result;

#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Ids before `prefix` are fully released; `prefix..read` were decoded as context for the next.
    prefix: usize,
    read: usize,
    stops: Vec<String>,
    /// Decoded but not yet released (may be the start of a stop string).
    pending: String,
    stopped: bool,
}

/// What one token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPiece {
    pub text: String,
    /// A stop string was completed: the generation should end.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<StreamPiece> {
        if self.stopped {
            return Ok(StreamPiece { text: String::new(), stopped: true });
        }
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = tokenizer.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len()) {
            self.pending.push_str(&after[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(self.release())
    }

    /// Releases everything still held (the generation ended for another reason).
    pub fn finish(&mut self) -> String {
        if self.stopped { String::new() } else { std::mem::take(&mut self.pending) }
    }

    fn release(&mut self) -> StreamPiece {
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.stopped = true;
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return StreamPiece { text, stopped: true };
        }
        let hold = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StreamPiece { text, stopped: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::byte_tokenizer::byte_level_tokenizer_json;
    use crate::model::HuginnConfig;

    fn tokenizer() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let json = byte_level_tokenizer_json(512).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), serde_json::to_vec(&json).unwrap()).unwrap();
        let cfg = HuginnConfig { vocab_size: 512, ..crate::checkpoint::preset("tiny").unwrap() };
        TextTokenizer::load(dir.path(), &cfg).unwrap()
    }

    fn run(stream: &mut TextStream, tok: &TextTokenizer, text: &str) -> (Vec<String>, bool) {
        let mut pieces = Vec::new();
        for id in tok.encode(text).unwrap() {
            let piece = stream.push(tok, id).unwrap();
            pieces.push(piece.text);
            if piece.stopped {
                return (pieces, true);
            }
        }
        pieces.push(stream.finish());
        (pieces, false)
    }

    #[test]
    fn multibyte_characters_are_released_whole() {
        let tok = tokenizer();
        let mut stream = TextStream::new(vec![]);
        let (pieces, stopped) = run(&mut stream, &tok, "aé€b");
        assert!(!stopped);
        assert_eq!(pieces.concat(), "aé€b");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        assert!(pieces.contains(&"€".to_string()), "{pieces:?}");
    }

    #[test]
    fn stop_string_cuts_the_text_and_is_never_released() {
        let tok = tokenizer();
        let mut stream = TextStream::new(vec!["\n\n".into(), "END".into()]);
        let (pieces, stopped) = run(&mut stream, &tok, "one EN two END three");
        assert!(stopped);
        assert_eq!(pieces.concat(), "one EN two ");
        // "E" and "EN" were held back until they could no longer start "END".
        assert!(!pieces.iter().any(|p| p.ends_with('E')), "{pieces:?}");
    }

    #[test]
    fn held_prefix_is_released_at_the_end() {
        let tok = tokenizer();
        let mut stream = TextStream::new(vec!["STOP".into()]);
        let (pieces, stopped) = run(&mut stream, &tok, "ST");
        assert!(!stopped);
        assert_eq!(pieces.concat(), "ST");
        assert_eq!(pieces.last().unwrap(), "ST");
    }
}
