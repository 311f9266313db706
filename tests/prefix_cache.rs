//! Prefix caching is exact: a prompt whose beginning the cache supplies gives the bits a cold
//! prefill gives (prompt logits, echo log-probabilities, generated ids and their logits), for the
//! `full` and `shared:K` caches, chunked prefill on or off, alone and beside other sequences, with
//! the sequential, speculative and parallel decoders; the choices of one request share one
//! prefill; eviction under a budget of a few blocks never takes a block a prefill reads; a
//! prompt's encoding is a function of its tokens, not of the request's seed. With tensor ops (the
//! device path) the ids are the same and the numbers within the parity bounds.

mod common;

use std::sync::Arc;

use candle_core::DType;
use huginn::engine::{Completion, Driver, JobSpec, TokenLogprobs};
use huginn::generate::{Decoding, FreezeRule, GenerationParams, ParallelSampling, Speculation};
use huginn::model::{CacheStrategy, HuginnModel, PREFIX_BLOCK_TOKENS, PrefixLayout};
use huginn::text::TextTokenizer;

use common::{batching_bound, fixture_dir, load, max_gap};

/// A prompt of `len` tokens; `variant` changes every token from position `from` on.
fn prompt(len: usize, variant: u32, from: usize) -> Vec<u32> {
    (0..len).map(|i| 37 + ((i * 53) % 300) as u32 + if i >= from { variant } else { 0 }).collect()
}

fn spec(prompt: Vec<u32>, cache: CacheStrategy, seed: u64) -> JobSpec {
    let mut params = GenerationParams::new(3);
    params.max_tokens = 4;
    params.cache = cache;
    params.seed = seed;
    params.init_scale = 1.0;
    let mut spec = JobSpec::new(prompt, params);
    spec.report_logits = true;
    spec.logprobs = Some(2);
    spec.prompt_logprobs = true;
    spec
}

fn driver(model: &Arc<HuginnModel>, rows: usize, cache_bytes: usize) -> Driver {
    let tokenizer = Arc::new(TextTokenizer::load(&fixture_dir(), model.config()).unwrap());
    Driver::with_tick_rows(model.clone(), tokenizer, 16, rows).with_prefix_cache(cache_bytes)
}

/// Every choice of every job, in order.
fn run(driver: &mut Driver, specs: Vec<JobSpec>) -> Vec<Completion> {
    driver.run(specs, |_, _| {}).unwrap().into_iter().flatten().collect()
}

/// Each job alone on a driver without a cache.
fn cold(model: &Arc<HuginnModel>, specs: Vec<JobSpec>) -> Vec<Completion> {
    specs.into_iter().flat_map(|spec| run(&mut driver(model, 0, 0), vec![spec])).collect()
}

fn rows(out: &[TokenLogprobs]) -> Vec<Vec<f32>> {
    out.iter().map(|t| std::iter::once(t.logprob).chain(t.top.iter().map(|&(_, p)| p)).collect()).collect()
}

fn ids(out: &[TokenLogprobs]) -> Vec<Vec<u32>> {
    out.iter().map(|t| std::iter::once(t.token).chain(t.top.iter().map(|&(id, _)| id)).collect()).collect()
}

/// The same ids, steps and K/V bytes; logits and log-probabilities within `bound` (0: the same bits).
fn assert_same(got: &Completion, want: &Completion, bound: f32, what: &str) {
    assert_eq!(got.token_ids, want.token_ids, "{what}: ids");
    assert_eq!(got.steps_per_token, want.steps_per_token, "{what}: steps");
    assert_eq!(got.kv_bytes, want.kv_bytes, "{what}: K/V bytes");
    assert_eq!(ids(&got.prompt_logprobs), ids(&want.prompt_logprobs), "{what}: echo ids");
    assert_eq!(ids(&got.logprobs), ids(&want.logprobs), "{what}: top ids");
    let gaps = [
        ("prompt logits", max_gap(&got.prompt_logits, &want.prompt_logits)),
        ("token logits", max_gap(&got.token_logits, &want.token_logits)),
        ("echo log-probabilities", max_gap(&rows(&got.prompt_logprobs), &rows(&want.prompt_logprobs))),
        ("token log-probabilities", max_gap(&rows(&got.logprobs), &rows(&want.logprobs))),
    ];
    for (name, gap) in gaps {
        assert!(gap <= bound, "{what}: {name} differ by {gap} (bound {bound})");
    }
    assert_eq!(got.prompt_logits.len(), want.prompt_logits.len(), "{what}: prompt rows");
}

#[test]
fn a_hit_gives_the_bits_of_a_cold_prefill() {
    let model = load(&fixture_dir(), DType::F32);
    let bound = batching_bound(&model);
    for cache in [CacheStrategy::Full, CacheStrategy::Shared(1), CacheStrategy::Shared(2)] {
        // 40 tokens (two blocks cached), a prompt of exactly two blocks (a full hit but its last
        // token), one that shares 35 tokens, one that shares less than a block.
        let first = spec(prompt(40, 0, 0), cache, 5);
        let later = vec![
            spec(prompt(40, 0, 0), cache, 6),
            spec(prompt(32, 0, 0), cache, 7),
            spec(prompt(44, 9, 35), cache, 8),
            spec(prompt(20, 5, 10), cache, 9),
        ];
        let want_first = cold(&model, vec![first.clone()]);
        let want = cold(&model, later.clone());
        for tick_rows in [0, 16, 7] {
            let what = format!("{cache:?}, {tick_rows} rows a pass");
            let mut warm = driver(&model, tick_rows, 1 << 30);
            let got = run(&mut warm, vec![first.clone()]);
            assert_eq!(got[0].cached_tokens, 0, "{what}: a cold cache supplies nothing");
            assert_same(&got[0], &want_first[0], bound, &format!("{what}, recording"));
            assert!(warm.prefix_cache_bytes() > 0, "{what}: the prompt's blocks were kept");
            for (i, (job, want)) in later.iter().zip(&want).enumerate() {
                let got = run(&mut warm, vec![job.clone()]);
                let expected = [32, 31, 32, 0][i];
                assert_eq!(got[0].cached_tokens, expected, "{what}, job {i}: cached tokens");
                assert_same(&got[0], want, bound, &format!("{what}, job {i}"));
            }
        }
    }
}

#[test]
fn hits_beside_other_sequences_are_exact() {
    let model = load(&fixture_dir(), DType::F32);
    let bound = batching_bound(&model);
    for cache in [CacheStrategy::Full, CacheStrategy::Shared(1)] {
        let jobs = || {
            vec![
                spec(prompt(3, 0, 0), cache, 1),
                spec(prompt(48, 0, 0), cache, 2),
                spec(prompt(50, 3, 40), cache, 3),
                spec(prompt(33, 4, 0), cache, 4),
            ]
        };
        let want = cold(&model, jobs());
        for tick_rows in [0, 20] {
            let mut warm = driver(&model, tick_rows, 1 << 30);
            // The first run records the blocks (the prompts arrive together: each records its own),
            // the second finds them (the third prompt its own third block too), beside each other
            // and a short decoder.
            for round in 0..2 {
                let got = run(&mut warm, jobs());
                for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                    assert_same(got, want, bound, &format!("{cache:?}, {tick_rows} rows, round {round}, job {i}"));
                }
                if round == 1 {
                    assert_eq!(got.iter().map(|c| c.cached_tokens).collect::<Vec<_>>(), [0, 47, 48, 32]);
                }
            }
        }
    }
}

fn greedy(decoding: Decoding, cache: CacheStrategy, len: usize, variant: u32) -> JobSpec {
    let mut spec = spec(prompt(len, variant, 30), cache, 3);
    spec.params.init_scale = 0.0;
    spec.params.sampling.temperature = 0.0;
    spec.params.max_tokens = 6;
    spec.params.decoding = decoding;
    spec
}

#[test]
fn hits_are_exact_with_every_decoder() {
    let model = load(&fixture_dir(), DType::F32);
    let bound = batching_bound(&model);
    let parallel = ParallelSampling {
        inner_steps: 2,
        freeze: FreezeRule::LatentDiff,
        threshold: 0.03,
        max_wavefront: 8,
        state_noise: 0.0,
        embed_ema: 0.1,
    };
    let decoders = [
        (Decoding::default(), CacheStrategy::Shared(1)),
        (Decoding::Speculative(Speculation { draft_steps: 1, draft_tokens: 3 }), CacheStrategy::Full),
        (Decoding::Parallel(parallel), CacheStrategy::Full),
    ];
    for (decoding, cache) in decoders {
        let jobs = vec![greedy(decoding, cache, 40, 0), greedy(decoding, cache, 45, 7)];
        let want = cold(&model, jobs.clone());
        let mut warm = driver(&model, 0, 1 << 30);
        for (i, job) in jobs.iter().enumerate() {
            let got = run(&mut warm, vec![job.clone()]);
            assert_eq!(got[0].cached_tokens, [0, 16][i], "{decoding:?}, job {i}: cached tokens");
            assert_same(&got[0], &want[i], bound, &format!("{decoding:?}, job {i}"));
        }
        // Both again, together: every block of both from the cache.
        let got = run(&mut warm, jobs.clone());
        for (i, got) in got.iter().enumerate() {
            assert_eq!(got.cached_tokens, 32, "{decoding:?}, job {i} again: cached tokens");
            assert_same(got, &want[i], bound, &format!("{decoding:?}, job {i} again"));
        }
    }
}

#[test]
fn the_choices_of_one_request_share_one_prefill() {
    let model = load(&fixture_dir(), DType::F32);
    let bound = batching_bound(&model);
    let mut job = spec(prompt(37, 0, 0), CacheStrategy::Shared(1), 11);
    job.n = 3;
    // Without a cache each choice prefills the prompt: the same encoding, so the same choices.
    let want = cold(&model, vec![job.clone()]);
    let mut warm = driver(&model, 16, 1 << 30);
    let got = run(&mut warm, vec![job.clone()]);
    assert_eq!(got.iter().map(|c| c.cached_tokens).collect::<Vec<_>>(), [0, 32, 32]);
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_same(got, want, bound, &format!("choice {i}"));
    }
    // The choices sample differently (their own seeds) from one prompt encoding.
    assert_eq!(max_gap(&want[0].prompt_logits, &want[1].prompt_logits), 0.0);
    assert_ne!(want[0].token_ids, want[1].token_ids, "the choices drew the same tokens");
}

#[test]
fn eviction_under_pressure_never_frees_a_block_in_use() {
    let model = load(&fixture_dir(), DType::F32);
    let bound = batching_bound(&model);
    let cfg = model.config();
    let block = PrefixLayout::new(cfg, 3).block_bytes(cfg, model.kv_dtype(), model.activation_dtype());
    // Twelve prompts of three blocks each, pairs sharing their first block, through a cache of
    // four blocks, together and with a row budget: prefills read blocks while others record.
    let jobs = || {
        (0..12)
            .map(|i| spec(prompt(50, 1 + i as u32, 16 * (1 + i % 2)), CacheStrategy::Full, i as u64))
            .collect::<Vec<_>>()
    };
    let want = cold(&model, jobs());
    let mut warm = driver(&model, 24, 4 * block);
    let mut hits = 0;
    for round in 0..3 {
        let got = run(&mut warm, jobs());
        hits += got.iter().map(|c| c.cached_tokens).sum::<usize>();
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_same(got, want, bound, &format!("round {round}, job {i}"));
        }
        assert!(warm.prefix_cache_bytes() <= 4 * block, "the cache outgrew its budget");
    }
    assert!(warm.prefix_cache_bytes() > 0);
    assert!(hits > 0, "the small cache never supplied a block");
}

#[test]
fn seeded_requests_reproduce_and_the_prompt_encoding_ignores_the_seed() {
    let model = load(&fixture_dir(), DType::F32);
    let job = |seed| spec(prompt(21, 0, 0), CacheStrategy::Full, seed);
    let a = cold(&model, vec![job(1), job(1), job(2)]);
    assert_same(&a[1], &a[0], 0.0, "the same seed");
    assert_eq!(max_gap(&a[2].prompt_logits, &a[0].prompt_logits), 0.0, "the prompt's encoding depends on the seed");
    assert_ne!(a[2].token_ids, a[0].token_ids, "another seed drew the same tokens");
    // The prompt's encoding does depend on its tokens before each position, and only on those.
    let other = cold(&model, vec![spec(prompt(21, 1, 10), CacheStrategy::Full, 1)]);
    assert_eq!(max_gap(&other[0].prompt_logits[..10], &a[0].prompt_logits[..10]), 0.0);
    assert!(max_gap(&other[0].prompt_logits[10..], &a[0].prompt_logits[10..]) > 0.0);
}

#[test]
fn a_cached_token_holds_every_steps_kv_whatever_the_layout() {
    let model = load(&fixture_dir(), DType::F32);
    let cfg = model.config();
    let kv = model.kv_dtype().size_in_bytes();
    let state = cfg.n_embd * model.activation_dtype().size_in_bytes();
    for (steps, cache) in [(1, CacheStrategy::Full), (3, CacheStrategy::Shared(1)), (6, CacheStrategy::Shared(2))] {
        let mut job = spec(prompt(40, 0, 0), cache, 1);
        job.params.num_steps = steps;
        let mut warm = driver(&model, 0, 1 << 30);
        run(&mut warm, vec![job]);
        // K and V of every prelude layer, every core layer at every step, every coda layer (the
        // fixture has as many K/V heads as heads), and the state, for two blocks of 16 tokens.
        let layers = cfg.n_layers_in_prelude + steps * cfg.n_layers_in_recurrent_block + cfg.n_layers_in_coda;
        let per_token = layers * 2 * cfg.n_embd * kv + state;
        assert_eq!(warm.prefix_cache_bytes(), 2 * PREFIX_BLOCK_TOKENS * per_token, "{steps} steps, {cache:?}");
        let layout = PrefixLayout::new(cfg, steps);
        assert_eq!(
            layout.block_bytes(cfg, model.kv_dtype(), model.activation_dtype()),
            PREFIX_BLOCK_TOKENS * per_token
        );
    }
}
