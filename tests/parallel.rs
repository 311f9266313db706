//! The parallel (diffusion-forcing) sampler inside the token loop: with `inner_steps` =
//! `num_steps` and the `fixed` rule it is ordinary decoding, token for token and logit for logit;
//! otherwise it keeps a window of positions in flight, freezes them by its rules, honours
//! `max_tokens`, stop tokens and the step budget (every row's steps), and gives each sequence the
//! same alone as beside others.

mod common;

use std::sync::Arc;

use candle_core::DType;
use common::*;
use huginn::checkpoint::{preset, write_random_checkpoint};
use huginn::engine::shared::kv_reservation;
use huginn::engine::{Completion, Driver, ExitReason, JobSpec};
use huginn::generate::{
    Decoding, FinishReason, FreezeRule, GenerationParams, ParallelSampling, SamplingParams, Speculation,
};
use huginn::model::{CacheStrategy, HuginnModel};
use huginn::text::TextTokenizer;

fn greedy(num_steps: usize, max_tokens: usize) -> GenerationParams {
    let mut p = GenerationParams::new(num_steps);
    p.max_tokens = max_tokens;
    p.init_scale = 0.0;
    p.cache = CacheStrategy::Full;
    p.stop_token_ids.clear();
    p
}

fn sampler(inner_steps: usize, freeze: FreezeRule, threshold: f64) -> ParallelSampling {
    ParallelSampling { inner_steps, freeze, threshold, max_wavefront: 64, state_noise: 0.0, embed_ema: 0.1 }
}

fn parallel(num_steps: usize, max_tokens: usize, sampling: ParallelSampling) -> GenerationParams {
    let mut p = greedy(num_steps, max_tokens);
    p.decoding = Decoding::Parallel(sampling);
    p
}

fn prompt() -> Vec<u32> {
    "The quick brown".bytes().map(u32::from).collect()
}

fn with_logits(params: GenerationParams) -> JobSpec {
    let mut spec = JobSpec::new(prompt(), params);
    spec.report_logits = true;
    spec
}

/// Runs `specs` together on one driver.
fn run_together(dir: &std::path::Path, model: &Arc<HuginnModel>, specs: Vec<JobSpec>) -> Vec<Completion> {
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config()).unwrap());
    let mut driver = Driver::new(model.clone(), tokenizer, 16);
    driver.run(specs, |_, _| {}).unwrap().into_iter().map(|mut c| c.remove(0)).collect()
}

fn run(dir: &std::path::Path, model: &Arc<HuginnModel>, params: GenerationParams) -> Completion {
    run_together(dir, model, vec![with_logits(params)]).remove(0)
}

fn reduces_to_ordinary_decoding(dir: &std::path::Path, num_steps: usize) {
    let model = load(dir, DType::F32);
    let plain = run(dir, &model, greedy(num_steps, 24));
    for ema in [0.0, 0.1, 0.5] {
        let sampling = ParallelSampling { embed_ema: ema, ..sampler(num_steps, FreezeRule::Fixed, 0.0) };
        let out = run(dir, &model, parallel(num_steps, 24, sampling));
        assert_eq!(out.token_ids, plain.token_ids, "embed_ema {ema}");
        assert_eq!(out.steps_per_token, plain.steps_per_token, "embed_ema {ema}");
        let gap = max_logit_gap(&out, &plain);
        assert!(gap < 1e-5, "embed_ema {ema}: logits differ by {gap}");
        assert_eq!(out.kv_bytes, plain.kv_bytes, "the cache holds what ordinary decoding's holds");
        assert_eq!(
            (out.waves().steps, out.waves().frozen, out.waves().rows),
            (23, 23, 23),
            "one row, one token a step"
        );
    }
}

#[test]
fn with_inner_steps_at_num_steps_and_the_fixed_rule_it_is_ordinary_decoding() {
    reduces_to_ordinary_decoding(&fixture_dir(), 8);
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), &preset("tiny").unwrap(), 13, DType::F32, 1).unwrap();
    reduces_to_ordinary_decoding(dir.path(), 6);
}

#[test]
fn the_fixed_rule_freezes_one_position_per_step_after_num_steps() {
    let dir = fixture_dir();
    let model = load(&dir, DType::F32);
    for (num_steps, inner) in [(8, 2), (8, 4), (9, 4), (8, 6), (16, 15)] {
        let out = run(&dir, &model, parallel(num_steps, 20, sampler(inner, FreezeRule::Fixed, 0.0)));
        assert_eq!(out.token_ids.len(), 20);
        // Every decoded token's position had exactly num_steps: a sampler step that would pass it
        // is cut short (num_steps is every token's cap, also when inner_steps does not divide it).
        assert!(out.steps_per_token.iter().all(|&s| s == num_steps), "{num_steps}/{inner}: {:?}", out.steps_per_token);
        assert!(out.exits[1..].iter().all(|&e| e == ExitReason::Cap));
        assert_eq!(out.waves().frozen, 19);
        let fill = num_steps.div_ceil(inner) - 1;
        assert!(out.waves().mean_wavefront() > (fill as f64) * 0.8, "{:?}", out.waves());
        if num_steps % inner == 0 {
            // The window fills to num_steps / inner rows, then one token freezes per sampler step.
            assert_eq!(out.waves().steps, 19 + fill, "{num_steps}/{inner}");
            assert_eq!(out.waves().row_steps, out.waves().rows * inner);
        } else {
            assert!(out.waves().row_steps < out.waves().rows * inner, "{num_steps}/{inner}: shortened steps");
        }
    }
}

/// A threshold nothing meets freezes by the cap alone (the fixed rule's output); one everything
/// meets freezes every position on its second sampler step, with the window at two rows.
#[test]
fn latent_diff_freezes_converged_positions() {
    let dir = fixture_dir();
    let model = load(&dir, DType::F32);
    let fixed = run(&dir, &model, parallel(8, 16, sampler(2, FreezeRule::Fixed, 0.0)));
    for freeze in [FreezeRule::LatentDiff, FreezeRule::LatentDiffStrict] {
        let never = run(&dir, &model, parallel(8, 16, sampler(2, freeze, 0.0)));
        assert_eq!((&never.token_ids, &never.steps_per_token), (&fixed.token_ids, &fixed.steps_per_token), "{freeze}");
        let always = run(&dir, &model, parallel(8, 16, sampler(2, freeze, 1e9)));
        assert!(always.steps_per_token[1..].iter().all(|&s| s == 4), "{freeze}: {:?}", always.steps_per_token);
        assert!(always.exits[1..].iter().all(|&e| e == ExitReason::Converged));
        // One row, then two (the head freezing as the new row joins), one again for the last token.
        assert_eq!((always.waves().steps, always.waves().frozen, always.waves().rows), (16, 15, 1 + 14 * 2 + 1));
    }
}

#[test]
fn a_parallel_sequence_gives_the_same_alone_and_beside_others() {
    let dir = fixture_dir();
    let model = load(&dir, DType::F32);
    let mut sampled =
        parallel(8, 20, ParallelSampling { state_noise: 0.5, ..sampler(2, FreezeRule::LatentDiff, 0.05) });
    sampled.sampling = SamplingParams { temperature: 0.8, top_k: 20, ..Default::default() };
    sampled.init_scale = 1.0;
    sampled.seed = 5;
    let mut speculating = greedy(8, 12);
    speculating.decoding = Decoding::Speculative(Speculation { draft_steps: 2, draft_tokens: 3 });
    let jobs = [
        parallel(8, 20, sampler(4, FreezeRule::LatentDiff, 0.05)),
        sampled,
        parallel(12, 16, sampler(3, FreezeRule::Fixed, 0.0)),
        parallel(8, 16, sampler(2, FreezeRule::LatentDiffStrict, 0.1)),
        greedy(6, 12),
        speculating,
    ];
    let alone: Vec<Completion> = jobs.iter().map(|p| run(&dir, &model, p.clone())).collect();
    let together = run_together(&dir, &model, jobs.iter().map(|p| with_logits(p.clone())).collect());
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.token_ids, t.token_ids, "job {i}");
        assert_eq!(a.steps_per_token, t.steps_per_token, "job {i}");
        assert_eq!(a.waves(), t.waves(), "job {i}");
        let bound = batching_bound(&model);
        assert!(max_logit_gap(a, t) <= bound, "job {i}: logits moved by {}", max_logit_gap(a, t));
    }
    let again = run(&dir, &model, jobs[1].clone());
    assert_eq!(again.token_ids, alone[1].token_ids, "sampling is reproducible with its seed");
}

#[test]
fn max_tokens_stop_tokens_and_the_step_budget_end_a_parallel_sequence() {
    let dir = fixture_dir();
    let model = load(&dir, DType::F32);
    let sampling = sampler(2, FreezeRule::LatentDiff, 0.05);
    let full = run(&dir, &model, parallel(8, 40, sampling));
    for max_tokens in [1, 2, 3, 7] {
        let out = run(&dir, &model, parallel(8, max_tokens, sampling));
        assert_eq!(out.token_ids.len(), max_tokens, "max_tokens {max_tokens}");
        assert_eq!(out.finish_reason, FinishReason::Length);
    }
    // A stop token: the output ends at its first occurrence.
    let stop = full.token_ids[6];
    let first = full.token_ids.iter().position(|&t| t == stop).unwrap();
    let mut stopping = parallel(8, 40, sampling);
    stopping.stop_token_ids = vec![stop];
    let out = run(&dir, &model, stopping);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.token_ids.last(), Some(&stop));
    assert_eq!(out.token_ids.len(), first + 1, "cut after the first stop token");
    // The budget counts the prompt's steps and every window row's.
    for budget in [9, 20, 45, 90] {
        let mut spec = with_logits(parallel(8, 200, sampling));
        spec.max_total_steps = Some(budget);
        let out = run_together(&dir, &model, vec![spec]).remove(0);
        let spent = 8 + out.waves().row_steps;
        assert!(spent <= budget, "budget {budget}: spent {spent}");
        assert_eq!(out.finish_reason, FinishReason::Length, "budget {budget}");
        assert!(budget < 16 || out.token_ids.len() > 1, "budget {budget}: {:?}", out.token_ids);
    }
}

/// The window never covers positions past `max_tokens`, so the reservation made for the prompt and
/// every generated token covers it, and the context limit holds.
#[test]
fn the_window_stays_inside_the_reservation_and_the_context() {
    let dir = fixture_dir();
    let model = load(&dir, DType::F32);
    let cfg = model.config().clone();
    for cache in [CacheStrategy::Full, CacheStrategy::Shared(1)] {
        let mut params = parallel(8, 30, ParallelSampling { max_wavefront: 16, ..sampler(1, FreezeRule::Fixed, 0.0) });
        params.cache = cache;
        let spec = with_logits(params.clone());
        let reserved = kv_reservation(&cfg, model.kv_dtype().size_in_bytes(), &spec);
        let out = run_together(&dir, &model, vec![spec]).remove(0);
        assert!(out.waves().mean_wavefront() > 4.0, "{:?}", out.waves());
        assert!(out.kv_bytes <= reserved, "{cache}: {} > {reserved}", out.kv_bytes);
    }
    let long: Vec<u32> = (0..cfg.block_size as u32 - 4).map(|i| 97 + i % 20).collect();
    let mut spec = JobSpec::new(long, parallel(8, 30, sampler(2, FreezeRule::LatentDiff, 0.05)));
    spec.report_logits = true;
    let out = run_together(&dir, &model, vec![spec]).remove(0);
    assert_eq!(out.token_ids.len(), 4, "generation ends at the context length");
    assert_eq!(out.finish_reason, FinishReason::Length);
}
