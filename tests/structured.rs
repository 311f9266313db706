//! Structured outputs in the engine: whatever the seed and the sampling transforms (temperature,
//! top-p, top-k, min-p, penalties), a constrained choice of the fixture model (random weights)
//! that ends on its own is valid JSON matching the schema, and one cut by `max_tokens` is a
//! beginning of such a document; greedy constrained decoding takes the argmax of the masked row.

mod common;

use std::sync::Arc;

use candle_core::DType;
use huginn::engine::{Driver, JobSpec};
use huginn::generate::constraint::{ConstraintLimits, ConstraintSpec, ConstraintVocab};
use huginn::generate::{Decoding, FinishReason, FreezeRule, GenerationParams, ParallelSampling, Speculation};
use huginn::model::CacheStrategy;
use huginn::text::TextTokenizer;
use proptest::prelude::*;
use serde_json::{Value, json};

use common::{fixture_dir, load};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
            "ok": {"type": "boolean"}
        },
        "required": ["n", "tags", "ok"],
        "additionalProperties": false
    })
}

fn matches(value: &Value) -> bool {
    let Some(object) = value.as_object() else { return false };
    object.len() == 3
        && value["n"].as_u64().is_some_and(|n| n <= 99)
        && value["ok"].is_boolean()
        && value["tags"].as_array().is_some_and(|t| t.len() <= 2 && t.iter().all(|x| x == "a" || x == "b"))
}

struct Setup {
    model: Arc<huginn::model::HuginnModel>,
    tokenizer: Arc<TextTokenizer>,
    vocab: ConstraintVocab,
}

fn setup() -> Setup {
    let model = load(&fixture_dir(), DType::F32);
    let tokenizer = Arc::new(TextTokenizer::load(&fixture_dir(), model.config()).unwrap());
    let width = model.config().vocab_size;
    let vocab = ConstraintVocab::load(&fixture_dir(), tokenizer.clone(), width, ConstraintLimits::default()).unwrap();
    Setup { model, tokenizer, vocab }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn constrained_choices_are_documents_of_the_schema(
        seed in 0u64..1_000_000,
        temperature in prop_oneof![Just(0.0f32), 0.3f32..1.8],
        top_p in prop_oneof![Just(1.0f32), 0.05f32..1.0],
        top_k in prop_oneof![Just(0usize), 1usize..20],
        min_p in prop_oneof![Just(0.0f32), 0.01f32..0.5],
        presence in prop_oneof![Just(0.0f32), -2.0f32..2.0],
        repetition in prop_oneof![Just(1.0f32), 0.5f32..2.0],
    ) {
        let s = SETUP.with(|s| s.clone());
        let mut params = GenerationParams::new(2);
        params.max_tokens = 48;
        params.seed = seed;
        params.sampling.temperature = temperature;
        params.sampling.top_p = top_p;
        params.sampling.top_k = top_k;
        params.sampling.min_p = min_p;
        params.sampling.presence_penalty = presence;
        params.sampling.repetition_penalty = repetition;
        let mut spec = JobSpec::new("data:".bytes().map(u32::from).collect(), params);
        spec.constraint = Some(s.vocab.compile(&ConstraintSpec::JsonSchema(schema())).unwrap());
        let out = Driver::new(s.model.clone(), s.tokenizer.clone(), 1).run_one(spec).unwrap();
        match out.finish_reason {
            FinishReason::Stop => {
                let value: Value = serde_json::from_str(&out.text).map_err(|e| TestCaseError::fail(format!("{:?}: {e}", out.text)))?;
                prop_assert!(matches(&value), "{}", out.text);
            }
            _ => prop_assert!(out.text.starts_with("{\"n\": ") || "{\"n\": ".starts_with(&out.text), "{:?}", out.text),
        }
    }
}

thread_local! {
    static SETUP: Arc<Setup> = Arc::new(setup());
}

#[test]
fn greedy_constrained_decoding_takes_the_masked_argmax() {
    let s = setup();
    let mut params = GenerationParams::new(2);
    params.max_tokens = 6;
    params.sampling.temperature = 0.0;
    let mut spec = JobSpec::new("pick:".bytes().map(u32::from).collect(), params);
    spec.report_logits = true;
    spec.logprobs = Some(5);
    let options = ["alpha", "beta", "gamma"].map(String::from).to_vec();
    spec.constraint = Some(s.vocab.compile(&ConstraintSpec::Choice(options.clone())).unwrap());
    let out = Driver::new(s.model.clone(), s.tokenizer.clone(), 1).run_one(spec).unwrap();
    assert!(options.contains(&out.text), "{:?}", out.text);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    // The rows after the prompt's (which is reported as the model computed it) are the masked
    // ones: the token taken is the argmax, and some of the vocabulary is refused.
    for (row, &id) in out.token_logits.iter().zip(&out.token_ids).skip(1) {
        let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32);
        assert_eq!(best, Some(id));
        assert!(row.contains(&f32::NEG_INFINITY));
    }
    // Every alternative the log-probabilities report continues some option.
    let mut text = String::new();
    for (step, t) in out.logprobs.iter().enumerate() {
        for &(alt, logprob) in &t.top {
            if logprob.is_finite() {
                let next = text.clone() + &s.tokenizer.decode(&[alt]).unwrap();
                assert!(options.iter().any(|o| o.starts_with(&next)), "step {step}: {next:?}");
            }
        }
        text += &s.tokenizer.decode(&[t.token]).unwrap();
    }
}

/// Greedy speculative decoding under a constraint gives exactly what greedy constrained plain
/// decoding gives (drafts from the masked draft distribution, verified under the same row's mask,
/// the constraint rolled back to the accepted prefix); sampled, it still gives documents of the
/// schema.
#[test]
fn speculation_under_a_constraint_is_exact() {
    let s = setup();
    let run = |decoding: Decoding, seed: u64, temperature: f32| {
        let mut params = GenerationParams::new(4);
        params.max_tokens = 40;
        params.init_scale = 0.0;
        params.cache = CacheStrategy::Full;
        params.seed = seed;
        params.sampling.temperature = temperature;
        params.decoding = decoding;
        let mut spec = JobSpec::new(format!("q{seed}:").bytes().map(u32::from).collect(), params);
        spec.constraint = Some(s.vocab.compile(&ConstraintSpec::JsonSchema(schema())).unwrap());
        Driver::new(s.model.clone(), s.tokenizer.clone(), 1).run_one(spec).unwrap()
    };
    let mut rounds = 0;
    for seed in 0..6 {
        let plain = run(Decoding::default(), seed, 0.0);
        for (draft_steps, draft_tokens) in [(1, 3), (2, 5)] {
            let fast = run(Decoding::Speculative(Speculation { draft_steps, draft_tokens }), seed, 0.0);
            assert_eq!(fast.token_ids, plain.token_ids, "seed {seed}, d={draft_steps} K={draft_tokens}");
            assert_eq!(fast.finish_reason, plain.finish_reason);
            rounds += fast.drafts().drafted;
        }
        let sampled = run(Decoding::Speculative(Speculation { draft_steps: 1, draft_tokens: 4 }), seed, 1.0);
        if sampled.finish_reason == FinishReason::Stop {
            let value: Value =
                serde_json::from_str(&sampled.text).unwrap_or_else(|e| panic!("{:?}: {e}", sampled.text));
            assert!(matches(&value), "{}", sampled.text);
        } else {
            assert!(
                sampled.text.starts_with("{\"n\": ") || "{\"n\": ".starts_with(&sampled.text),
                "{:?}",
                sampled.text
            );
        }
    }
    assert!(rounds > 0, "nothing was drafted");
}

/// The parallel sampler under a constraint: every token it emits (the guesses it freezes with a
/// row included) is one the grammar accepts in that order, and a choice that stops on its own is
/// a document of the schema; windows do freeze guesses.
#[test]
fn the_parallel_sampler_emits_only_what_the_grammar_accepts() {
    let s = setup();
    let mut guesses_frozen = 0;
    let rules = [
        (FreezeRule::LatentDiff, 0.5, 0.0),
        (FreezeRule::LatentDiff, 0.5, 1.0),
        (FreezeRule::LatentDiffStrict, 0.4, 0.7),
        (FreezeRule::Fixed, 0.0, 1.0),
    ];
    for seed in 0..6 {
        for (freeze, threshold, temperature) in rules {
            let mut params = GenerationParams::new(8);
            params.max_tokens = 40;
            params.seed = seed;
            params.sampling.temperature = temperature;
            params.decoding = Decoding::Parallel(ParallelSampling {
                inner_steps: 2,
                freeze,
                threshold,
                max_wavefront: 8,
                state_noise: 0.0,
                embed_ema: 0.1,
            });
            let stops = params.stop_token_ids.clone();
            let constraint = s.vocab.compile(&ConstraintSpec::JsonSchema(schema())).unwrap();
            let mut spec = JobSpec::new(format!("p{seed}:").bytes().map(u32::from).collect(), params);
            spec.constraint = Some(constraint.clone());
            let out = Driver::new(s.model.clone(), s.tokenizer.clone(), 1).run_one(spec).unwrap();
            let case = format!("seed {seed}, {freeze} {threshold}, t={temperature}: {:?}", out.text);
            let mut check = constraint;
            for (i, &token) in out.token_ids.iter().enumerate() {
                if stops.contains(&token) {
                    assert_eq!(i + 1, out.token_ids.len(), "{case}");
                    break;
                }
                check.accept(token).unwrap_or_else(|e| panic!("token {i} ({token}) refused: {e}; {case}"));
            }
            if out.finish_reason == FinishReason::Stop {
                assert!(check.can_end(), "{case}");
                let value: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}; {case}"));
                assert!(matches(&value), "{case}");
            } else {
                assert_eq!(out.finish_reason, FinishReason::Length, "{case}");
            }
            guesses_frozen += out.waves().guesses_frozen;
        }
    }
    assert!(guesses_frozen > 0, "no window froze a guess");
}
