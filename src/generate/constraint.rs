//! Structured outputs: a request's constraint (a JSON schema, any JSON object, a regular
//! expression, a choice of strings, a Lark grammar) compiled by `llguidance` against the model's
//! vocabulary into a matcher that says, token by token, which tokens the output may take next.
//!
//! [`ConstraintVocab`] is built once per model from its `tokenizer.json` (each token's bytes in a
//! token trie, padded to the logits' width: ids past the tokenizer's vocabulary are never
//! allowed); [`ConstraintVocab::compile`] turns a [`ConstraintSpec`] into a [`Constraint`] within
//! [`ConstraintLimits`], so that a hostile schema or grammar costs bounded time and memory and
//! its failure is a message naming the reason.

use std::path::Path;
use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, token_bytes_from_tokenizer_json};
use serde_json::Value;

use crate::text::TextTokenizer;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON matching a schema.
    JsonSchema(Value),
    /// Text matching a regular expression (the whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Grammar(String),
}

/// JSON as `json.dumps` writes it by default (`{"a": 1, "b": [2, 3]}`), not with arbitrary whitespace.
fn with_layout(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(
            || serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// How deeply `value` nests (counted without recursion: the input is a client's).
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 1)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
}

impl ConstraintSpec {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            ConstraintSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(with_layout(&serde_json::json!({"type": "object"})))
            }
            ConstraintSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_layout(schema)),
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::Choice(options) => {
                let alternatives: Vec<String> = options.iter().map(|o| regex_syntax::escape(o)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            ConstraintSpec::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// Bounds on compiling one constraint and on computing one token's mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConstraintLimits {
    /// Symbols the compiled grammar may have.
    pub max_grammar_size: usize,
    /// Work (llguidance's lexer fuel, about 50 per microsecond) building the lexer may take.
    pub compile_fuel: u64,
    /// Work one token's mask may take (about 14 per microsecond).
    pub mask_fuel: u64,
    /// Lexer states a constraint may create (each 1-2 kB).
    pub max_lexer_states: usize,
    /// How deeply a JSON schema may nest (its compiler recurses).
    pub max_schema_depth: usize,
}

impl Default for ConstraintLimits {
    fn default() -> Self {
        Self {
            max_grammar_size: 200_000,
            compile_fuel: 1_000_000,
            mask_fuel: 200_000,
            max_lexer_states: 50_000,
            max_schema_depth: 48,
        }
    }
}

/// Why a constraint did not compile, or failed while matching.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ConstraintError(pub String);

impl ConstraintError {
    fn from(e: impl std::fmt::Display) -> Self {
        // llguidance's messages may carry the whole grammar and parser state: the first lines say why.
        let text = e.to_string();
        let reason: Vec<&str> = text.lines().take(3).collect();
        let mut reason = reason.join(" ");
        if reason.len() > 500 {
            let mut cut = 500;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push_str("...");
        }
        Self(reason)
    }
}

/// The model's vocabulary as llguidance sees it, and the compiler built on it.
pub struct ConstraintVocab {
    factory: ParserFactory,
    width: usize,
    max_schema_depth: usize,
}

/// Tokenizes literal text of a grammar with the model's own tokenizer.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl ConstraintVocab {
    /// The vocabulary of the checkpoint in `dir` (its `tokenizer.json`), padded to `width` logits.
    pub fn load(
        dir: &Path,
        tokenizer: Arc<TextTokenizer>,
        width: usize,
        limits: ConstraintLimits,
    ) -> Result<Self, ConstraintError> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ConstraintError(format!("{}: {e}", path.display())))?;
        let json: Value = serde_json::from_str(&text).map_err(ConstraintError::from)?;
        let mut words = token_bytes_from_tokenizer_json(&json).map_err(ConstraintError::from)?;
        if words.len() > width {
            return Err(ConstraintError(format!(
                "the tokenizer has {} tokens, more than the model's {width} logits",
                words.len()
            )));
        }
        words.resize(width, Vec::new());
        let eos = tokenizer.special().eos.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(width as u32, eos);
        let env: TokEnv = Arc::new(Env { trie: TokTrie::from(&info, &words), tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(ConstraintError::from)?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            max_grammar_size: limits.max_grammar_size,
            initial_lexer_fuel: limits.compile_fuel,
            step_lexer_fuel: limits.mask_fuel,
            max_lexer_states: limits.max_lexer_states,
            ..ParserLimits::default()
        };
        Ok(Self { factory, width, max_schema_depth: limits.max_schema_depth })
    }

    /// The logits' width the masks cover.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Compiles `spec` (run it off the async runtime and off the model's worker: it may take
    /// milliseconds, bounded by the limits).
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        if let ConstraintSpec::JsonSchema(schema) = spec {
            let depth = depth(schema);
            if depth > self.max_schema_depth {
                return Err(ConstraintError(format!(
                    "the schema nests {depth} levels deep, more than the limit of {}",
                    self.max_schema_depth
                )));
            }
        }
        let parser = self.factory.create_parser(spec.grammar()).map_err(ConstraintError::from)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::from(e));
        }
        Ok(Constraint { matcher, width: self.width })
    }
}

/// One output's matcher: the tokens allowed next, advanced by each token taken.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    width: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("width", &self.width).field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// Whether the output so far is complete: the grammar allows it to end here.
    pub fn can_end(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Whether the grammar allows nothing more (the output must end).
    pub fn must_end(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The tokens allowed next (the end of sequence among them when the output may end).
    pub fn allowed(&mut self) -> Result<Mask, ConstraintError> {
        let vob = self.matcher.compute_mask_or_eos().map_err(ConstraintError::from)?;
        Ok(Mask { vob, width: self.width })
    }

    /// Takes `token`; an error when the grammar refuses it.
    pub fn accept(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.matcher.consume_token(token).map_err(ConstraintError::from)
    }

    /// Forgets the last `tokens` taken (a rejected speculation's drafts).
    pub fn rollback(&mut self, tokens: usize) -> Result<(), ConstraintError> {
        self.matcher.rollback(tokens).map_err(ConstraintError::from)
    }
}

/// A set of allowed token ids.
pub struct Mask {
    vob: SimpleVob,
    width: usize,
}

impl Mask {
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.width && self.vob.is_allowed(token)
    }

    /// How many tokens are allowed.
    pub fn count(&self) -> usize {
        self.vob.num_set()
    }

    /// Sets every disallowed entry of `logits` (the model's row, `width` wide) to minus infinity.
    pub fn apply(&self, logits: &mut [f32]) {
        for (id, logit) in logits.iter_mut().enumerate() {
            if !self.allows(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::model::HuginnConfig;

    fn vocab() -> (ConstraintVocab, Arc<TextTokenizer>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/huginn-addition");
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let cfg = HuginnConfig::from_json_str(&text, "config.json").unwrap();
        let tokenizer = Arc::new(TextTokenizer::load(&dir, &cfg).unwrap());
        // Wider than the tokenizer, as a model's padded head is.
        let vocab = ConstraintVocab::load(&dir, tokenizer.clone(), 320, ConstraintLimits::default()).unwrap();
        (vocab, tokenizer)
    }

    /// Walks `constraint` to its end taking random allowed tokens; the text produced.
    fn walk(constraint: &mut Constraint, tokenizer: &TextTokenizer, eos: u32, rng: &mut StdRng) -> String {
        let mut ids = Vec::new();
        for _ in 0..200 {
            let mask = constraint.allowed().unwrap();
            let allowed: Vec<u32> = (0..320).filter(|&id| mask.allows(id)).collect();
            assert!(!allowed.is_empty(), "a dead end after {ids:?}");
            assert!(allowed.iter().all(|&id| id < 288 || id == eos), "a padding id is allowed");
            // Prefer continuing while the output is short, so that the walks reach inside the grammar.
            let id = allowed[rng.random_range(0..allowed.len())];
            if id == eos {
                assert!(constraint.can_end() || constraint.must_end());
                break;
            }
            constraint.accept(id).unwrap();
            ids.push(id);
            if constraint.must_end() {
                break;
            }
        }
        tokenizer.decode(&ids).unwrap()
    }

    #[test]
    fn random_walks_through_a_schema_give_json_that_matches_it() {
        let (vocab, tokenizer) = vocab();
        let eos = tokenizer.special().eos[0];
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"sum": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["sum", "ok"],
            "additionalProperties": false
        });
        let compiled = vocab.compile(&ConstraintSpec::JsonSchema(schema)).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..30 {
            let text = walk(&mut compiled.clone(), &tokenizer, eos, &mut rng);
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            // (serde_json reads `-0` as a float)
            assert!(value["sum"].as_f64().is_some_and(|n| n.fract() == 0.0), "{text}");
            assert!(!text.contains(['\n', '\t']) && text.starts_with("{\"sum\": "), "{text}");
            assert!(value["ok"].is_boolean(), "{text}");
            assert_eq!(value.as_object().unwrap().len(), 2, "{text}");
        }
    }

    #[test]
    fn regexes_and_choices_hold() {
        let (vocab, tokenizer) = vocab();
        let eos = tokenizer.special().eos[0];
        let mut rng = StdRng::seed_from_u64(3);
        let digits = vocab.compile(&ConstraintSpec::Regex("[0-9]{2,4}".into())).unwrap();
        let choice = ["861", "871", "8 6 1", "{\"a\": 1}"].map(String::from).to_vec();
        let choices = vocab.compile(&ConstraintSpec::Choice(choice.clone())).unwrap();
        for _ in 0..30 {
            let text = walk(&mut digits.clone(), &tokenizer, eos, &mut rng);
            assert!((2..=4).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
            let text = walk(&mut choices.clone(), &tokenizer, eos, &mut rng);
            assert!(choice.contains(&text), "{text:?}");
        }
        let mut any = vocab.compile(&ConstraintSpec::JsonObject).unwrap();
        let first = any.allowed().unwrap();
        assert!(first.allows(u32::from(b'{')) && !first.allows(u32::from(b'[')) && !first.allows(u32::from(b'1')));
        // A token the grammar refuses is an error; rollback undoes what was taken.
        let mut c = digits.clone();
        assert!(c.accept(u32::from(b'x')).is_err());
        let mut c = digits.clone();
        c.accept(u32::from(b'1')).unwrap();
        c.accept(u32::from(b'2')).unwrap();
        assert!(c.can_end());
        c.rollback(1).unwrap();
        assert!(!c.can_end());
        let mut logits = vec![0.0; 320];
        c.allowed().unwrap().apply(&mut logits);
        let kept: Vec<usize> = (0..320).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept, (b'0'..=b'9').map(usize::from).collect::<Vec<_>>());
    }

    #[test]
    fn bad_constraints_fail_with_the_compilers_reason() {
        let (vocab, _) = vocab();
        let cases = [
            ConstraintSpec::Regex("(unclosed".into()),
            ConstraintSpec::JsonSchema(serde_json::json!({"type": "no-such-type"})),
            ConstraintSpec::JsonSchema(serde_json::json!({"type": "string", "format": "no-such-format-x"})),
            ConstraintSpec::Grammar("start: undefined_rule".into()),
        ];
        for spec in cases {
            let err = vocab.compile(&spec).err().unwrap_or_else(|| panic!("{spec:?} compiled"));
            assert!(!err.0.is_empty() && err.0.len() <= 503, "{spec:?}: {err}");
        }
    }

    #[test]
    fn hostile_constraints_stop_at_the_limits() {
        let (vocab, _) = vocab();
        // A regex whose automaton explodes, and a schema nested thousands deep.
        let regex = ConstraintSpec::Regex("(a|b)*a(a|b){40}".into());
        let nested = |levels: usize| {
            let mut schema = serde_json::json!({"type": "integer"});
            for _ in 0..levels {
                schema = serde_json::json!({"type": "array", "items": schema});
            }
            ConstraintSpec::JsonSchema(schema)
        };
        // Within the depth limit a nested schema compiles on an ordinary thread's stack.
        assert!(vocab.compile(&nested(23)).is_ok());
        let err = vocab.compile(&nested(200)).err().unwrap();
        assert!(err.0.contains("nests 202 levels deep"), "{err}");
        // A regex whose DFA would explode is matched lazily: compiling and fifty masks stay fast.
        let started = std::time::Instant::now();
        let mut c = vocab.compile(&regex).unwrap();
        for _ in 0..50 {
            c.allowed().unwrap();
            c.accept(u32::from(b'a')).unwrap();
        }
        assert!(started.elapsed().as_secs_f64() < 20.0, "took {:?}", started.elapsed());
        // So is a million-fold repetition: its first masks cost what a small regex's do.
        let started = std::time::Instant::now();
        let mut c = vocab.compile(&ConstraintSpec::Regex("((a|b){1000}){1000}".into())).unwrap();
        for _ in 0..50 {
            assert_eq!(c.allowed().unwrap().count(), 2);
            c.accept(u32::from(b'b')).unwrap();
        }
        assert!(started.elapsed().as_secs_f64() < 20.0, "took {:?}", started.elapsed());
    }
}
