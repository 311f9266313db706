//! Ouro looped models (`OuroForCausalLM`): parity with the reference modeling file on
//! `tests/fixtures/ouro-tiny-ref` (see its README: the whole layer stack looped, four-norm blocks,
//! grouped-query attention, rotate-half RoPE, the final norm after every loop, untied head, and the
//! learned exit gate), on both kernel sets, and batch invariance. The reference runs every loop
//! for every token and takes each token's output from its exit loop: `exit_kv: fill` here.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{batching_bound, max_gap, repo_root};
use huginn::engine::{Completion, Driver, ExitReason, JobSpec};
use huginn::generate::GenerationParams;
use huginn::model::{
    BackendChoice, CacheStrategy, Chunk, ExitCriterion, ExitKv, ExitRule, Family, GateExit, HuginnModel,
};
use huginn::text::{ChatMessage, TextTokenizer};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

fn dir() -> PathBuf {
    repo_root().join("tests/fixtures/ouro-tiny-ref")
}

/// The fixture on the CPU kernels and on tensor ops (on `HUGINN_TEST_DEVICE` when set).
fn models() -> Vec<Arc<HuginnModel>> {
    [BackendChoice::Auto, BackendChoice::Tensor]
        .into_iter()
        .map(|backend| Arc::new(HuginnModel::load_with(&dir(), &common::device(), Some(DType::F32), backend).unwrap()))
        .collect()
}

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap()
}

fn cases(kind: &str) -> Vec<Value> {
    fixture()["cases"].as_array().unwrap().iter().filter(|c| c["kind"] == kind).cloned().collect()
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn ids(case: &Value, key: &str) -> Vec<u32> {
    case[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
    tensor.to_vec2::<f32>().unwrap()
}

/// Greedy decoding with the full cache and raw logits: `tokens` tokens at `loops` each, exiting
/// by `exit` with `exit_kv`.
fn spec(prompt: Vec<u32>, loops: usize, tokens: usize, exit: ExitRule, exit_kv: ExitKv) -> JobSpec {
    let mut params = GenerationParams::new(loops);
    params.max_tokens = tokens;
    params.cache = CacheStrategy::Full;
    params.exit = exit;
    params.exit_kv = exit_kv;
    params.stop_token_ids.clear();
    let mut spec = JobSpec::new(prompt, params);
    spec.report_logits = true;
    spec
}

fn gate(q: f64) -> ExitRule {
    ExitRule::new(ExitCriterion::Gate, Some(q), 0).unwrap()
}

fn run(model: &Arc<HuginnModel>, specs: Vec<JobSpec>) -> Vec<Completion> {
    let tokenizer = Arc::new(TextTokenizer::load(&dir(), model.config()).unwrap());
    let batch = specs.len();
    let outcomes = Driver::new(model.clone(), tokenizer, batch).run(specs, |_, _| {}).unwrap();
    outcomes.into_iter().map(|mut choices| choices.remove(0)).collect()
}

#[test]
fn ouro_is_detected_and_its_chat_format_is_the_references() {
    let model = &models()[0];
    let cfg = model.config();
    assert_eq!((model.family(), cfg.kv_heads(), cfg.mean_recurrence), (Family::Ouro, 2, 4));
    assert!(model.has_exit_gate());
    let tokenizer = TextTokenizer::load(&dir(), cfg).unwrap();
    let fixture = fixture();
    for case in cases("prompt_logits") {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(tokenizer.encode(prompt).unwrap(), ids(&case, "ids"), "{prompt}");
    }
    // The ChatML prompt is the tokenizer config's template rendered for the fixture's message.
    let messages: Vec<ChatMessage> = fixture["chat_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let chat_prompt = fixture["prompts"][2][1].as_str().unwrap();
    assert_eq!(tokenizer.apply_chat_template(&messages, true).unwrap(), chat_prompt);
    // config.json says eos 0 (`<|endoftext|>`); a ChatML turn ends at `<|im_end|>` (2), which
    // tokenizer_config.json names: both end generation.
    let eos = &tokenizer.special().eos;
    assert!(eos.contains(&0) && eos.contains(&2), "{eos:?}");
}

#[test]
fn prompt_logits_match_the_reference_at_every_loop_count() {
    let expected = expected();
    for model in models() {
        let all = cases("prompt_logits");
        assert_eq!(all.len(), 12);
        for case in all {
            let loops = case["total_ut_steps"].as_u64().unwrap() as usize;
            let spec = spec(ids(&case, "ids"), loops, 0, ExitRule::default(), ExitKv::Skip);
            let out = run(&model, vec![spec]).remove(0);
            let gap = max_gap(&out.prompt_logits, &rows(&expected[case["tensor"].as_str().unwrap()]));
            assert!(gap < TOLERANCE, "{} {}: max abs diff {gap}", model.backend().name(), case["tensor"]);
        }
    }
}

fn chunk(cache: &mut huginn::model::KvCache, len: usize, step: usize) -> Chunk<'_> {
    Chunk { cache, start: 0, len, step }
}

/// The gate's probabilities of every loop, their cumulative sums and each position's Q-exit loop,
/// from the model's own loops (prelude, then core steps on a full cache).
#[test]
fn the_exit_gate_matches_the_reference() {
    let expected = expected();
    for model in models() {
        for case in cases("exit_gate") {
            let prompt = ids(&case, "ids");
            let n = prompt.len();
            let mut cache = model.new_cache(CacheStrategy::Full);
            let injection = model.prelude(&prompt, &mut [chunk(&mut cache, n, 0)]).unwrap();
            let mut state = model.initial_state(&injection, 1.0, &mut rand::rng()).unwrap();
            let mut lambdas = vec![Vec::new(); n];
            for step in 0..4 {
                state = model.core_step(&state, &injection, &mut [chunk(&mut cache, n, step)]).unwrap();
                for (row, lambda) in lambdas.iter_mut().zip(model.exit_gate(&state).unwrap().unwrap()) {
                    row.push(lambda);
                }
            }
            let tensors = &case["tensors"];
            let want = rows(&expected[tensors["lambda"].as_str().unwrap()]);
            let gap = max_gap(&lambdas, &want);
            assert!(gap < 1e-5, "{} {}: lambda off by {gap}", model.backend().name(), tensors["lambda"]);
            // Q-exit on the reference's own lambdas: the cumulative probabilities before the last
            // loop and the exit loop of every position, at each threshold.
            let want_cdf = rows(&expected[tensors["cdf"].as_str().unwrap()]);
            for (q, decision) in case["q_exit"].as_object().unwrap() {
                let q: f64 = q.parse().unwrap();
                let mut exit = GateExit::new(n);
                let mut exit_step = vec![3u64; n];
                for t in 0..3 {
                    let column: Vec<f32> = want.iter().map(|row| row[t]).collect();
                    for (r, now) in exit.push(&column, q, true).into_iter().enumerate() {
                        if now {
                            exit_step[r] = t as u64;
                        }
                    }
                    for (r, cdf) in exit.cdf().into_iter().enumerate() {
                        assert!((cdf - want_cdf[r][t]).abs() < 1e-6, "q {q}: cdf of row {r} at loop {t}");
                    }
                }
                let want_steps: Vec<u64> =
                    decision["exit_step"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
                assert_eq!(exit_step, want_steps, "q {q}: exit loops");
            }
        }
    }
}

/// The gate criterion on a prompt: every loop runs, and each position's logits are its exit
/// loop's (the reference's forward with `exit_threshold` q).
#[test]
fn gate_exit_logits_match_the_reference_at_every_threshold() {
    let expected = expected();
    for model in models() {
        let mut checked = 0;
        for case in cases("exit_gate") {
            for (q, decision) in case["q_exit"].as_object().unwrap() {
                let q: f64 = q.parse().unwrap();
                for exit_kv in [ExitKv::Skip, ExitKv::Fill] {
                    let out = run(&model, vec![spec(ids(&case, "ids"), 4, 1, gate(q), exit_kv)]).remove(0);
                    let want = rows(&expected[decision["tensor"].as_str().unwrap()]);
                    let gap = max_gap(&out.prompt_logits, &want);
                    assert!(gap < TOLERANCE, "{} q {q}: max abs diff {gap}", model.backend().name());
                    // The prompt ran every loop.
                    assert_eq!(out.steps_per_token[0], 4);
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 12);
    }
}

#[test]
fn greedy_decoding_matches_the_reference_alone_and_batched() {
    let expected = expected();
    let decodes = cases("greedy_decode");
    assert_eq!(decodes.len(), 9);
    let specs = || -> Vec<JobSpec> {
        decodes
            .iter()
            .map(|case| {
                let loops = case["total_ut_steps"].as_u64().unwrap() as usize;
                let q = case["exit_threshold"].as_f64().unwrap();
                // The default exit (q = 1) takes the last loop: no criterion. Else the gate, with
                // every loop run for the K/V, as the reference runs them.
                let (exit, exit_kv) =
                    if q < 1.0 { (gate(q), ExitKv::Fill) } else { (ExitRule::default(), ExitKv::Skip) };
                // The reference decodes `generated.len()` tokens and reports one more row of logits.
                spec(ids(case, "ids"), loops, ids(case, "generated_ids").len() + 1, exit, exit_kv)
            })
            .collect()
    };
    for model in models() {
        let backend = model.backend().name();
        let alone: Vec<Completion> = specs().into_iter().map(|s| run(&model, vec![s]).remove(0)).collect();
        for (case, out) in decodes.iter().zip(&alone) {
            let generated = ids(case, "generated_ids");
            assert_eq!(out.token_ids[..generated.len()], generated, "{backend} {}: greedy ids", case["tensor"]);
            let gap = max_gap(&out.token_logits, &rows(&expected[case["tensor"].as_str().unwrap()]));
            assert!(gap < TOLERANCE, "{backend} {}: max abs diff {gap}", case["tensor"]);
            // Every token spent every loop (`fill` included).
            let loops = case["total_ut_steps"].as_u64().unwrap() as usize;
            assert!(out.steps_per_token.iter().all(|&s| s == loops), "{backend}: {:?}", out.steps_per_token);
        }
        let together = run(&model, specs());
        for (a, t) in alone.iter().zip(&together) {
            assert_eq!(a.token_ids, t.token_ids, "{backend}: batched ids");
            let gap = max_gap(&a.token_logits, &t.token_logits);
            assert!(gap <= batching_bound(&model), "{backend}: batched logits drift {gap}");
        }
    }
}

/// With `exit_kv: skip` a token that the gate lets go stops computing: at a low threshold the
/// tokens spend fewer loops than `num_steps`, and say they converged.
#[test]
fn the_gate_with_skip_spends_fewer_loops() {
    let model = &models()[0];
    let prompt = ids(&cases("greedy_decode")[0], "ids");
    let out = run(model, vec![spec(prompt.clone(), 4, 12, gate(0.3), ExitKv::Skip)]).remove(0);
    let decoded = &out.steps_per_token[1..];
    assert!(decoded.iter().all(|&s| (1..=4).contains(&s)));
    let early = decoded.iter().filter(|&&s| s < 4).count();
    assert!(early > 0, "no token exited early: {:?}", out.steps_per_token);
    let converged = out.exits[1..].iter().filter(|e| **e == ExitReason::Converged).count();
    assert_eq!(converged, early, "{:?}", out.exits);
    // The same with `fill` spends all four loops on every token.
    let filled = run(model, vec![spec(prompt, 4, 12, gate(0.3), ExitKv::Fill)]).remove(0);
    assert!(filled.steps_per_token.iter().all(|&s| s == 4), "{:?}", filled.steps_per_token);
}

/// Requests a looped model cannot run are refused, each naming its field.
#[test]
fn what_a_looped_model_cannot_run_is_refused() {
    let model = &models()[0];
    let mut continuous = spec(vec![5, 6], 4, 2, ExitRule::default(), ExitKv::Skip);
    continuous.params.decoding = huginn::generate::Decoding::Sequential { continuous_compute: true };
    assert_eq!(continuous.validate(model.config()).unwrap_err().field, "continuous_compute");
    let mut parallel = spec(vec![5, 6], 4, 2, ExitRule::default(), ExitKv::Skip);
    parallel.params.decoding = huginn::generate::Decoding::Parallel(huginn::generate::ParallelSampling {
        inner_steps: 2,
        freeze: huginn::generate::FreezeRule::Fixed,
        threshold: 0.0,
        max_wavefront: 8,
        state_noise: 0.0,
        embed_ema: 0.1,
    });
    assert_eq!(parallel.validate(model.config()).unwrap_err().field, "sampler");
    assert!(spec(vec![5, 6], 4, 2, gate(0.5), ExitKv::Fill).validate(model.config()).is_ok());
}

/// A checkpoint folder with Ouro's config keys but its exit gate missing fails to load, naming it.
#[test]
fn an_ouro_checkpoint_without_its_gate_is_refused() {
    let folder = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir().join(file), folder.path().join(file)).unwrap();
    }
    let mut tensors = candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.retain(|name, _| !name.starts_with("model.early_exit_gate"));
    candle_core::safetensors::save(&tensors, folder.path().join("model.safetensors")).unwrap();
    let err = HuginnModel::load(folder.path(), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("model.early_exit_gate.weight"), "{err}");
}

/// Chunked prefill (a row budget per pass) with the gate tracked per row across the pieces, a
/// `shared:2` cache (a slot per (loop mod 2, layer)) and `skip`: a long prompt prefilled in pieces
/// beside another sequence gives what it gives in one piece, bit for bit on the CPU kernels.
#[test]
fn chunked_prefill_with_the_gate_and_a_shared_cache_is_exact() {
    let prompt: Vec<u32> = (0..40).map(|i| (3 + i * 53 % 380) as u32).collect();
    for model in models() {
        let specs = || {
            [prompt.clone(), prompt[..9].to_vec()]
                .into_iter()
                .map(|p| {
                    let mut s = spec(p, 4, 6, gate(0.4), ExitKv::Skip);
                    s.params.cache = CacheStrategy::Shared(2);
                    s
                })
                .collect::<Vec<_>>()
        };
        let tokenizer = Arc::new(TextTokenizer::load(&dir(), model.config()).unwrap());
        let run_with = |rows| -> Vec<Completion> {
            let mut driver = Driver::with_tick_rows(model.clone(), tokenizer.clone(), 4, rows);
            driver.run(specs(), |_, _| {}).unwrap().into_iter().flatten().collect()
        };
        let (whole, chunked) = (run_with(0), run_with(5));
        for (w, c) in whole.iter().zip(&chunked) {
            assert_eq!(c.token_ids, w.token_ids, "{}: ids", model.backend().name());
            assert_eq!(c.steps_per_token, w.steps_per_token, "{}: steps", model.backend().name());
            let gap = max_gap(&c.prompt_logits, &w.prompt_logits).max(max_gap(&c.token_logits, &w.token_logits));
            assert!(gap <= batching_bound(&model), "{}: chunked logits drift {gap}", model.backend().name());
        }
    }
}
