//! Self-speculative decoding: drafts at few recurrence steps, verified in one chunk at the
//! request's `num_steps`. Greedy with `init_scale` 0 and the `full` cache must give exactly what
//! plain decoding gives (ids, and the logits behind each token), leave the cache holding only the
//! accepted tokens, and give the same alone as beside other sequences.

mod common;

use std::sync::Arc;

use candle_core::DType;
use common::*;
use huginn::checkpoint::{preset, write_random_checkpoint};
use huginn::engine::{Completion, Driver, JobSpec};
use huginn::generate::{Decoding, FinishReason, GenerationParams, SamplingParams, Speculation};
use huginn::model::{CacheStrategy, ExitCriterion, ExitRule, HuginnModel};
use huginn::text::TextTokenizer;

fn greedy(num_steps: usize, max_tokens: usize, speculation: Option<Speculation>) -> GenerationParams {
    let mut p = GenerationParams::new(num_steps);
    p.max_tokens = max_tokens;
    p.init_scale = 0.0;
    p.cache = CacheStrategy::Full;
    p.decoding = speculation.map_or_else(Decoding::default, Decoding::Speculative);
    p
}

fn speculate(draft_steps: usize, draft_tokens: usize) -> Option<Speculation> {
    Some(Speculation { draft_steps, draft_tokens })
}

fn prompt() -> Vec<u32> {
    "The quick brown".bytes().map(u32::from).collect()
}

/// Runs `specs` together on one driver, logits reported.
fn run_together(dir: &std::path::Path, model: &Arc<HuginnModel>, specs: Vec<JobSpec>) -> Vec<Completion> {
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config()).unwrap());
    let mut driver = Driver::new(model.clone(), tokenizer, 16);
    driver.run(specs, |_, _| {}).unwrap().into_iter().map(|mut c| c.remove(0)).collect()
}

fn with_logits(params: GenerationParams) -> JobSpec {
    let mut spec = JobSpec::new(prompt(), params);
    spec.report_logits = true;
    spec
}

/// Same ids, same logits behind every token, same K/V bytes at the end (the cache holds the
/// accepted tokens only) as plain decoding, for several draft depths and round sizes.
fn speculation_is_exact(dir: &std::path::Path, model: &Arc<HuginnModel>, num_steps: usize) -> (usize, usize) {
    let max_tokens = 24;
    let plain = run_together(dir, model, vec![with_logits(greedy(num_steps, max_tokens, None))]).remove(0);
    let (mut drafted, mut accepted) = (0, 0);
    for (d, k) in [(1, 4), (2, 3), (num_steps - 1, 6), (1, 1)] {
        let spec =
            run_together(dir, model, vec![with_logits(greedy(num_steps, max_tokens, speculate(d, k)))]).remove(0);
        assert_eq!(spec.token_ids, plain.token_ids, "draft_steps {d}, draft_tokens {k}");
        let gap = max_logit_gap(&spec, &plain);
        assert!(gap < 1e-5, "draft_steps {d}, draft_tokens {k}: logits differ by {gap}");
        assert_eq!(spec.kv_bytes, plain.kv_bytes, "the cache holds exactly the accepted tokens");
        assert_eq!(spec.finish_reason, plain.finish_reason);
        assert!(spec.drafts().drafted > 0 && spec.drafts().accepted <= spec.drafts().drafted);
        drafted += spec.drafts().drafted;
        accepted += spec.drafts().accepted;
        // The steps reported are every core step spent: prompt, drafts and verifications.
        let rounds_steps: usize = spec.steps_per_token.iter().skip(1).sum();
        assert!(rounds_steps >= num_steps * (spec.token_ids.len() - 1) / (k + 1));
    }
    (drafted, accepted)
}

#[test]
fn greedy_speculation_gives_plain_decodings_tokens_on_the_fixture() {
    let model = load(&fixture_dir(), DType::F32);
    let (drafted, accepted) = speculation_is_exact(&fixture_dir(), &model, 8);
    assert!(accepted > 0, "some drafts are accepted ({accepted} of {drafted})");
}

#[test]
fn greedy_speculation_is_exact_on_a_random_model_that_rejects_most_drafts() {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), &preset("tiny").unwrap(), 13, DType::F32, 1).unwrap();
    let model = load(dir.path(), DType::F32);
    let (drafted, accepted) = speculation_is_exact(dir.path(), &model, 6);
    assert!(accepted < drafted, "rejections are exercised ({accepted} of {drafted} accepted)");
}

/// Drafts enter the penalty counts while the round is under way and leave them before the verdicts:
/// a replaced draft, or a replacement token seen before, must not shift a count.
#[test]
fn penalties_see_the_same_history_with_and_without_speculation() {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), &preset("tiny").unwrap(), 13, DType::F32, 1).unwrap();
    let model = load(dir.path(), DType::F32);
    let penalized = |speculation| {
        let mut p = greedy(6, 32, speculation);
        p.sampling = SamplingParams {
            frequency_penalty: -0.5,
            presence_penalty: 0.5,
            repetition_penalty: 1.0,
            ..Default::default()
        };
        p
    };
    let plain = run_together(dir.path(), &model, vec![with_logits(penalized(None))]).remove(0);
    for (d, k) in [(1, 4), (3, 8), (5, 2)] {
        let out = run_together(dir.path(), &model, vec![with_logits(penalized(speculate(d, k)))]).remove(0);
        assert_eq!(out.token_ids, plain.token_ids, "draft_steps {d}, draft_tokens {k}");
        assert!(out.drafts().accepted < out.drafts().drafted, "rejections are exercised");
    }
}

#[test]
fn a_speculating_sequence_gives_the_same_alone_and_beside_others() {
    let dir = fixture_dir();
    let model = load(&dir, DType::F32);
    let mut sampled = greedy(8, 20, speculate(2, 4));
    sampled.sampling = SamplingParams { temperature: 0.8, top_k: 20, ..Default::default() };
    sampled.init_scale = 1.0;
    sampled.seed = 9;
    let mut adaptive = greedy(12, 16, speculate(3, 3));
    adaptive.exit = ExitRule::new(ExitCriterion::Kl, Some(1e-3), 0).unwrap();
    let jobs = [greedy(8, 20, speculate(1, 4)), sampled, adaptive, greedy(6, 12, None)];
    let alone: Vec<Completion> =
        jobs.iter().map(|p| run_together(&dir, &model, vec![with_logits(p.clone())]).remove(0)).collect();
    let together = run_together(&dir, &model, jobs.iter().map(|p| with_logits(p.clone())).collect());
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.token_ids, t.token_ids, "job {i}");
        assert_eq!(a.steps_per_token, t.steps_per_token, "job {i}");
        assert_eq!(a.drafts(), t.drafts(), "job {i}");
        // Bit for bit on the CPU kernels; tensor ops promise the same ids within tolerance.
        let bound = batching_bound(&model);
        assert!(max_logit_gap(a, t) <= bound, "job {i}: logits moved by {}", max_logit_gap(a, t));
    }
    // Sampling is reproducible with its seed and differs with another.
    let again = run_together(&dir, &model, vec![with_logits(jobs[1].clone())]).remove(0);
    assert_eq!(again.token_ids, alone[1].token_ids);
}

#[test]
fn the_step_budget_counts_draft_and_verification_steps() {
    let dir = fixture_dir();
    let model = load(&dir, DType::F32);
    for budget in [9, 20, 37, 60] {
        let mut spec = with_logits(greedy(8, 200, speculate(2, 4)));
        spec.params.stop_token_ids.clear();
        spec.max_total_steps = Some(budget);
        let out = run_together(&dir, &model, vec![spec]).remove(0);
        let spent: usize = out.steps_per_token.iter().sum();
        assert!(spent <= budget, "budget {budget}: spent {spent}");
        assert_eq!(out.finish_reason, FinishReason::Length, "budget {budget}");
        assert!(spent + 8 > budget, "budget {budget}: stopped early at {spent}");
    }
}

#[test]
fn max_tokens_and_stop_tokens_end_a_round_where_plain_decoding_ends() {
    let dir = fixture_dir();
    let model = load(&dir, DType::F32);
    let plain = run_together(&dir, &model, vec![with_logits(greedy(8, 30, None))]).remove(0);
    let stop = plain.token_ids[5];
    for max_tokens in [1, 2, 3, 7] {
        let out = run_together(&dir, &model, vec![with_logits(greedy(8, max_tokens, speculate(1, 4)))]).remove(0);
        assert_eq!(out.token_ids, plain.token_ids[..max_tokens.min(plain.token_ids.len())], "max_tokens {max_tokens}");
    }
    let mut stopping = greedy(8, 30, speculate(1, 8));
    stopping.stop_token_ids = vec![stop];
    let out = run_together(&dir, &model, vec![with_logits(stopping)]).remove(0);
    let first = plain.token_ids.iter().position(|&t| t == stop).unwrap();
    assert_eq!(out.token_ids, plain.token_ids[..=first]);
    assert_eq!(out.finish_reason, FinishReason::Stop);
}
