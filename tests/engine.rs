//! The engine without HTTP: continuous batching gives each request exactly what it gets alone
//! (driven on the test's thread, as `huginn generate` runs it), whatever else runs beside it.

mod common;

use std::sync::Arc;

use candle_core::DType;
use common::*;
use huginn::engine::job::{EVENTS_PER_CHOICE, EVENTS_PER_TICK};
use huginn::engine::{Engine, EngineConfig, Event, ExitReason, JobSpec, SchedulerLimits};
use huginn::generate::{FinishReason, GenerationParams};
use huginn::model::{CacheStrategy, ExitCriterion, ExitRule, HuginnModel};
use huginn::text::TextTokenizer;

fn engine(model: Arc<HuginnModel>, max_active: usize) -> Engine {
    let tokenizer = Arc::new(TextTokenizer::load(&fixture_dir(), model.config()).unwrap());
    let limits = SchedulerLimits {
        max_active_sequences: max_active,
        max_kv_bytes: 1 << 30,
        max_tick_rows: 0,
        prefix_cache_bytes: 0,
        elastic: huginn::engine::ElasticTargets::default(),
    };
    Engine::start(
        vec![model],
        tokenizer,
        EngineConfig { queue_capacity: 64, limits, restart_backoff: std::time::Duration::from_millis(1000) },
    )
}

fn params(num_steps: usize, exit: ExitRule, max_tokens: usize) -> GenerationParams {
    let mut p = GenerationParams::new(num_steps);
    p.max_tokens = max_tokens;
    p.init_scale = 0.0;
    p.exit = exit;
    p.cache = CacheStrategy::Shared(1);
    p
}

fn spec(prompt: Vec<u32>, params: GenerationParams) -> JobSpec {
    JobSpec::new(prompt, params)
}

/// Validates `spec` (as every library caller must) and queues it.
fn submit(engine: &Engine, spec: JobSpec) -> huginn::engine::JobHandle {
    engine.submit(engine.validate(spec).expect("a valid job")).expect("queued")
}

/// (token ids, steps per token, finish reason) of choice 0.
fn collect(handle: &mut huginn::engine::JobHandle) -> (Vec<u32>, Vec<usize>, FinishReason) {
    let (mut ids, mut steps) = (Vec::new(), Vec::new());
    loop {
        match handle.events.blocking_recv().expect("the job ends with Finished") {
            Event::Token { id, steps: s, .. } => {
                ids.push(id);
                steps.push(s);
            }
            Event::Finished { reason, .. } => return (ids, steps, reason),
            Event::Error { failure } => panic!("engine error: {failure}"),
            Event::PromptLogprobs { .. } | Event::Logits { .. } => {}
        }
    }
}

#[test]
fn concurrent_requests_get_the_same_tokens_as_alone() {
    concurrent_requests_match_alone(DType::F32);
}

/// bfloat16 weights on the CPU go through their own kernels (AMX tiles where the CPU has them).
#[test]
fn concurrent_requests_get_the_same_tokens_as_alone_with_bf16_weights() {
    concurrent_requests_match_alone(DType::BF16);
}

fn concurrent_requests_match_alone(dtype: DType) {
    let model = load(&fixture_dir(), dtype);
    let prompts: Vec<Vec<u32>> = vec![PROMPT.to_vec(), vec![313, 14, 316, 32], vec![40, 41, 42], vec![100; 9]];
    let rules = [
        ExitRule::default(),
        ExitRule::new(ExitCriterion::Kl, Some(5e-4), 0).unwrap(),
        ExitRule::new(ExitCriterion::LatentDiff, None, 2).unwrap(),
        ExitRule::new(ExitCriterion::ArgmaxStability, None, 0).unwrap(),
    ];
    let cases: Vec<(Vec<u32>, GenerationParams)> = (0..16)
        .map(|i| (prompts[i % 4].clone(), params([3, 8, 17, 32][i % 4] + i / 4, rules[(i / 2) % 4], 6 + i % 5)))
        .collect();
    let expected: Vec<_> = cases
        .iter()
        .map(|(prompt, p)| {
            let out = generate(&model, prompt, p).unwrap();
            (out.token_ids, out.steps_per_token)
        })
        .collect();
    let engine = engine(model, 64);
    let mut handles: Vec<_> =
        cases.iter().map(|(prompt, p)| submit(&engine, spec(prompt.clone(), p.clone()))).collect();
    for (i, handle) in handles.iter_mut().enumerate() {
        let (ids, steps, reason) = collect(handle);
        assert_eq!((ids, steps), expected[i], "{dtype:?} request {i}");
        assert_eq!(reason, FinishReason::Length);
    }
}

#[test]
fn a_short_budget_finishes_while_long_ones_run() {
    let model = load(&fixture_dir(), DType::F32);
    let engine = engine(model, 64);
    let mut long: Vec<_> =
        (0..4).map(|_| submit(&engine, spec(PROMPT.to_vec(), params(64, ExitRule::default(), 8)))).collect();
    let mut short = submit(&engine, spec(PROMPT.to_vec(), params(4, ExitRule::default(), 8)));
    let (ids, steps, _) = collect(&mut short);
    assert_eq!(ids.len(), 8);
    assert_eq!(steps, vec![4; 8]);
    // The long ones are still mid-way: none has finished yet.
    for handle in long.iter_mut() {
        let mut finished = false;
        while let Ok(event) = handle.events.try_recv() {
            finished |= matches!(event, Event::Finished { .. });
        }
        assert!(!finished, "a num_steps=64 request finished before the num_steps=4 one");
    }
}

#[test]
fn step_budget_ends_the_choice_with_length() {
    let model = load(&fixture_dir(), DType::F32);
    let engine = engine(model, 64);
    let mut job = spec(PROMPT.to_vec(), params(8, ExitRule::default(), 20));
    job.max_total_steps = Some(21);
    let mut handle = submit(&engine, job);
    let mut exits = Vec::new();
    let mut steps = Vec::new();
    let reason = loop {
        match handle.events.blocking_recv().unwrap() {
            Event::Token { steps: s, exit, .. } => {
                steps.push(s);
                exits.push(exit);
            }
            Event::Finished { reason, .. } => break reason,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(steps, vec![8, 8, 5]);
    assert_eq!(exits, vec![ExitReason::Cap, ExitReason::Cap, ExitReason::Budget]);
    assert_eq!(reason, FinishReason::Length);
}

#[test]
fn n_choices_differ_by_seed_and_dropping_the_handle_cancels() {
    let model = load(&fixture_dir(), DType::F32);
    let engine = engine(model, 64);
    let mut p = params(4, ExitRule::default(), 5);
    p.init_scale = 1.0;
    p.sampling.temperature = 1.0;
    p.seed = 9;
    let mut job = spec(PROMPT.to_vec(), p.clone());
    job.n = 3;
    let mut handle = submit(&engine, job);
    let mut per_choice = vec![Vec::new(); 3];
    let mut finished = 0;
    while finished < 3 {
        match handle.events.blocking_recv().unwrap() {
            Event::Token { choice, id, .. } => per_choice[choice].push(id),
            Event::Finished { .. } => finished += 1,
            other => panic!("{other:?}"),
        }
    }
    // Choice i uses seed + i: choice 1 equals a single request with seed 10.
    let mut alone = p.clone();
    alone.seed = 10;
    let mut single = submit(&engine, spec(PROMPT.to_vec(), alone));
    assert_eq!(collect(&mut single).0, per_choice[1]);
    assert!(per_choice[0] != per_choice[1] || per_choice[1] != per_choice[2]);

    let long = submit(&engine, spec(PROMPT.to_vec(), params(64, ExitRule::default(), 200)));
    drop(long);
    // The engine keeps serving after a cancellation.
    let mut after = submit(&engine, spec(PROMPT.to_vec(), params(2, ExitRule::default(), 2)));
    assert_eq!(collect(&mut after).0.len(), 2);
}

#[test]
fn a_reader_that_falls_behind_pauses_its_sequence_and_loses_nothing() {
    let model = load(&fixture_dir(), DType::F32);
    let engine = engine(model.clone(), 64);
    let slow_params = params(1, ExitRule::default(), 120);
    let expected = generate(&model, &PROMPT, &slow_params).unwrap();
    let mut slow = submit(&engine, spec(PROMPT.to_vec(), slow_params));
    // Another request runs to its end while the slow one's reader does not read.
    let mut other = submit(&engine, spec(vec![40, 41, 42], params(2, ExitRule::default(), 40)));
    let (ids, _, reason) = collect(&mut other);
    assert_eq!((ids.len(), reason), (40, FinishReason::Length));
    // The slow job fills its channel up to where a tick no longer fits, then pauses: it stays in
    // the engine (neither finished nor dropped as too slow) with most of its tokens still to come.
    let paused_at = EVENTS_PER_CHOICE - EVENTS_PER_TICK + 1;
    let waited = std::time::Instant::now();
    while slow.events.len() < paused_at {
        assert!(waited.elapsed().as_secs() < 120, "the slow job never filled its channel");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(engine.sequences(), 1, "the slow sequence is held, paused");
    assert!(!slow.events.is_closed());
    // Nothing lost: once read, every token arrives, exactly the sequence's output alone.
    let (ids, steps, reason) = collect(&mut slow);
    assert_eq!((ids, steps, reason), (expected.token_ids, expected.steps_per_token, expected.finish_reason));
}

#[test]
fn wait_idle_returns_once_the_last_job_has_left_the_engine() {
    let model = load(&fixture_dir(), DType::F32);
    let engine = Arc::new(engine(model, 64));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Idle already: returns at once.
    runtime.block_on(engine.wait_idle());
    let mut handle = submit(&engine, spec(PROMPT.to_vec(), params(16, ExitRule::default(), 30)));
    let waiter = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(engine.wait_idle());
            engine.in_flight()
        })
    };
    let (ids, _, _) = collect(&mut handle);
    assert_eq!(ids.len(), 30);
    assert_eq!(waiter.join().unwrap(), 0, "woken with nothing in flight");
}

/// A job of `multi_token` params (many tokens per tick) cancelled after 3 tokens frees its
/// sequence and K/V; the same with 120 tokens into a reader that does not read loses nothing.
fn cancelled_then_slow_reader(multi_token: GenerationParams, what: &str) {
    let model = load(&fixture_dir(), DType::F32);
    let engine = engine(model.clone(), 64);
    let mut handle = submit(&engine, spec(PROMPT.to_vec(), multi_token.clone()));
    for _ in 0..3 {
        assert!(matches!(handle.events.blocking_recv(), Some(Event::Token { .. })));
    }
    drop(handle);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (engine.sequences() > 0 || engine.kv_bytes() > 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!((engine.sequences(), engine.kv_bytes()), (0, 0), "the cancelled {what} left nothing behind");

    // Many tokens per tick into a reader that does not read: the channel holds them, the
    // sequence waits, nothing is lost.
    let mut slow_params = multi_token;
    slow_params.max_tokens = 120;
    let expected = generate(&model, &PROMPT, &slow_params).unwrap();
    let mut slow = submit(&engine, spec(PROMPT.to_vec(), slow_params));
    let mut other = submit(&engine, spec(vec![40, 41, 42], params(2, ExitRule::default(), 40)));
    assert_eq!(collect(&mut other).0.len(), 40);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(slow.events.len() < 120, "{} events queued", slow.events.len());
    let (ids, steps, reason) = collect(&mut slow);
    assert_eq!((ids, steps, reason), (expected.token_ids, expected.steps_per_token, expected.finish_reason));
}

#[test]
fn a_speculating_job_cancelled_mid_round_frees_everything_and_a_slow_reader_loses_nothing() {
    let mut speculating = params(16, ExitRule::default(), 200);
    speculating.decoding =
        huginn::generate::Decoding::Speculative(huginn::generate::Speculation { draft_steps: 1, draft_tokens: 16 });
    cancelled_then_slow_reader(speculating, "round");
}

#[test]
fn a_parallel_job_cancelled_mid_window_frees_everything_and_a_slow_reader_loses_nothing() {
    let mut wide = params(8, ExitRule::default(), 200);
    wide.decoding = huginn::generate::Decoding::Parallel(huginn::generate::ParallelSampling {
        inner_steps: 1,
        freeze: huginn::generate::FreezeRule::LatentDiff,
        threshold: 0.5,
        max_wavefront: 32,
        state_noise: 0.0,
        embed_ema: 0.1,
    });
    cancelled_then_slow_reader(wide, "window");
}

#[test]
fn the_library_cannot_queue_what_the_server_would_refuse() {
    let model = load(&fixture_dir(), DType::F32);
    let context = model.config().block_size;
    let engine = engine(model, 4);
    let refused = |spec: JobSpec| engine.validate(spec).expect_err("refused").field;
    assert_eq!(refused(spec(Vec::new(), params(2, ExitRule::default(), 2))), "prompt", "an empty prompt");
    assert_eq!(refused(spec(vec![1; context], params(2, ExitRule::default(), 2))), "prompt", "no room for a token");
    assert_eq!(refused(spec(vec![u32::MAX], params(2, ExitRule::default(), 2))), "prompt", "outside the vocabulary");
    assert_eq!(refused(spec(PROMPT.to_vec(), params(0, ExitRule::default(), 2))), "num_steps");
    let mut no_choice = spec(PROMPT.to_vec(), params(2, ExitRule::default(), 2));
    no_choice.n = 0;
    assert_eq!(refused(no_choice), "n");
    let mut drafts_too_deep = params(4, ExitRule::default(), 2);
    drafts_too_deep.decoding =
        huginn::generate::Decoding::Speculative(huginn::generate::Speculation { draft_steps: 4, draft_tokens: 2 });
    assert_eq!(refused(spec(PROMPT.to_vec(), drafts_too_deep)), "draft_steps");
    // The engine still serves a valid job after the refusals.
    let mut handle = submit(&engine, spec(PROMPT.to_vec(), params(2, ExitRule::default(), 3)));
    assert_eq!(collect(&mut handle).0.len(), 3);
}

/// `exit_kv: fill`, for any criterion: a token that converges keeps its exit step's output (the
/// first decoded token's logits equal `skip`'s bit for bit, the criterion reading the state or
/// the coda's logits) while its remaining steps run for their K/V: every token spends the cap
/// and reports it converged where `skip` stopped.
#[test]
fn fill_keeps_the_exit_steps_output_and_spends_every_step() {
    use huginn::model::ExitKv;
    let model = load(&fixture_dir(), DType::F32);
    for (criterion, threshold) in [(ExitCriterion::LatentDiff, 0.2), (ExitCriterion::Kl, 1e-2)] {
        let rule = ExitRule::new(criterion, Some(threshold), 0).unwrap();
        let skip = generate_logits(&model, &PROMPT, &params(16, rule, 6));
        let mut filling = params(16, rule, 6);
        filling.exit_kv = ExitKv::Fill;
        let fill = generate_logits(&model, &PROMPT, &filling);
        assert!(skip.steps_per_token[1] < 16, "{criterion}: the first decoded token should exit early");
        assert_eq!(fill.token_ids[..2], skip.token_ids[..2], "{criterion}");
        assert_eq!(fill.token_logits[1], skip.token_logits[1], "{criterion}: the exit step's logits");
        assert!(fill.steps_per_token.iter().all(|&s| s == 16), "{criterion}: {:?}", fill.steps_per_token);
        assert_eq!(fill.exits[1], ExitReason::Converged, "{criterion}");
    }
}
