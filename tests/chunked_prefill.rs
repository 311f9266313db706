//! Chunked prefill under a row budget (`engine.max_tick_rows`) is exact: a prompt prefilled in
//! pieces, step-major, gives the same bits as in one piece (prompt logits, echo log-probabilities,
//! generated ids and their logits), for the `full` and `shared:K` caches, alone and beside other
//! sequences. With tensor ops (the device path, whose products may reduce in another order when a
//! pass has other rows) the ids and steps are the same and the numbers within the parity bounds.

mod common;

use std::sync::Arc;

use candle_core::DType;
use huginn::engine::{Completion, Driver, JobSpec};
use huginn::generate::{Decoding, GenerationParams};
use huginn::model::{CacheStrategy, ExitCriterion, ExitRule, HuginnModel};
use huginn::text::TextTokenizer;

use common::{batching_bound, fixture_dir, load, max_gap};

fn prompt(len: usize) -> Vec<u32> {
    (0..len).map(|i| (37 + i * 53 % 300) as u32).collect()
}

fn spec(len: usize, cache: CacheStrategy, seed: u64) -> JobSpec {
    let mut params = GenerationParams::new(3);
    params.max_tokens = 4;
    params.cache = cache;
    params.seed = seed;
    // A random initial state: the pieces must draw it exactly as one piece does.
    params.init_scale = 1.0;
    let mut spec = JobSpec::new(prompt(len), params);
    spec.report_logits = true;
    spec.logprobs = Some(2);
    spec.prompt_logprobs = true;
    spec
}

/// Runs `specs` together with at most `rows` rows per pass (0: unlimited).
fn run(model: &Arc<HuginnModel>, specs: Vec<JobSpec>, rows: usize) -> Vec<Completion> {
    let tokenizer = Arc::new(TextTokenizer::load(&fixture_dir(), model.config()).unwrap());
    let mut driver = Driver::with_tick_rows(model.clone(), tokenizer, 8, rows);
    driver.run(specs, |_, _| {}).unwrap().into_iter().flatten().collect()
}

fn logprob_rows(out: &[huginn::engine::TokenLogprobs]) -> Vec<Vec<f32>> {
    out.iter().map(|t| std::iter::once(t.logprob).chain(t.top.iter().map(|&(_, p)| p)).collect()).collect()
}

fn logprob_ids(out: &[huginn::engine::TokenLogprobs]) -> Vec<Vec<u32>> {
    out.iter().map(|t| std::iter::once(t.token).chain(t.top.iter().map(|&(id, _)| id)).collect()).collect()
}

/// The same ids, steps and K/V bytes; logits and log-probabilities within `bound` (0: the same bits).
fn assert_same(chunked: &Completion, whole: &Completion, bound: f32, what: &str) {
    assert_eq!(chunked.token_ids, whole.token_ids, "{what}: ids");
    assert_eq!(chunked.steps_per_token, whole.steps_per_token, "{what}: steps");
    assert_eq!(chunked.kv_bytes, whole.kv_bytes, "{what}: K/V bytes");
    assert_eq!(logprob_ids(&chunked.prompt_logprobs), logprob_ids(&whole.prompt_logprobs), "{what}: echo ids");
    assert_eq!(logprob_ids(&chunked.logprobs), logprob_ids(&whole.logprobs), "{what}: top ids");
    let gaps = [
        ("prompt logits", max_gap(&chunked.prompt_logits, &whole.prompt_logits)),
        ("token logits", max_gap(&chunked.token_logits, &whole.token_logits)),
        (
            "echo log-probabilities",
            max_gap(&logprob_rows(&chunked.prompt_logprobs), &logprob_rows(&whole.prompt_logprobs)),
        ),
        ("token log-probabilities", max_gap(&logprob_rows(&chunked.logprobs), &logprob_rows(&whole.logprobs))),
    ];
    for (name, gap) in gaps {
        assert!(gap <= bound, "{what}: {name} differ by {gap} (bound {bound})");
    }
}

#[test]
fn a_prompt_in_pieces_gives_the_bits_of_one_piece() {
    let model = load(&fixture_dir(), DType::F32);
    let bound = batching_bound(&model);
    for cache in [CacheStrategy::Full, CacheStrategy::Shared(1), CacheStrategy::Shared(2)] {
        for len in [1, 2, 5, 17, 40] {
            let whole = run(&model, vec![spec(len, cache, 9)], 0);
            assert_eq!(whole[0].prompt_logits.len(), len);
            for rows in [1, 2, 3, 7, 16] {
                let chunked = run(&model, vec![spec(len, cache, 9)], rows);
                assert_same(&chunked[0], &whole[0], bound, &format!("{cache:?}, {len} tokens, {rows} rows a pass"));
            }
        }
    }
}

#[test]
fn prompts_in_pieces_beside_decoders_and_each_other_are_exact() {
    let model = load(&fixture_dir(), DType::F32);
    let bound = batching_bound(&model);
    for cache in [CacheStrategy::Full, CacheStrategy::Shared(1)] {
        // A short job that decodes while two long prompts are prefilled in arrival order.
        let jobs = || vec![spec(3, cache, 1), spec(33, cache, 2), spec(21, cache, 3)];
        let alone: Vec<Completion> = jobs().into_iter().map(|job| run(&model, vec![job], 0).remove(0)).collect();
        for rows in [8, 12, 30] {
            let together = run(&model, jobs(), rows);
            for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
                assert_same(got, want, bound, &format!("{cache:?}, job {i}, {rows} rows a pass"));
            }
        }
    }
}

#[test]
fn adaptive_exit_and_continuous_compute_after_a_chunked_prompt_are_exact() {
    let model = load(&fixture_dir(), DType::F32);
    let adaptive = |len: usize| {
        let mut spec = spec(len, CacheStrategy::Shared(1), 4);
        spec.params.num_steps = 8;
        spec.params.max_tokens = 6;
        spec.params.decoding = Decoding::Sequential { continuous_compute: true };
        spec.params.exit = ExitRule::new(ExitCriterion::Kl, Some(5e-4), 1).unwrap();
        spec
    };
    let whole = run(&model, vec![adaptive(25)], 0);
    let chunked = run(&model, vec![adaptive(25)], 4);
    assert_same(&chunked[0], &whole[0], batching_bound(&model), "kl exit, continuous compute");
}

#[test]
fn bf16_weights_and_cache_chunk_exactly_too() {
    let model = load(&fixture_dir(), DType::BF16);
    for cache in [CacheStrategy::Full, CacheStrategy::Shared(1)] {
        let whole = run(&model, vec![spec(19, cache, 5)], 0);
        let chunked = run(&model, vec![spec(19, cache, 5)], 5);
        assert_same(&chunked[0], &whole[0], batching_bound(&model), &format!("bf16, {cache:?}"));
    }
}
