//! Parity with the reference implementation on `tests/fixtures/huginn-tiny-ref` (golden data produced
//! by the public PyTorch modeling file; see the fixture's README).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use huginn::engine::{Completion, Driver, ExitReason, JobSpec};
use huginn::generate::GenerationParams;
use huginn::model::{BackendChoice, CacheStrategy, ExitCriterion, ExitRule, HuginnModel};
use huginn::text::TextTokenizer;
use serde_json::Value;

/// Under the repository root at run time (`CARGO_MANIFEST_DIR`, as `tests/common` reads it): the GPU
/// check runs this file's binary on another machine.
fn fixture_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("tests/fixtures/huginn-tiny-ref")
}

fn load_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join(name)).unwrap()).unwrap()
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// The fixture on both kernel sets: the CPU kernels and tensor ops (the device path); on
/// `HUGINN_TEST_DEVICE` when set (`scripts/gpu-check.sh`: `cuda:0`, where auto means tensor ops).
fn models() -> Vec<Arc<HuginnModel>> {
    let device = match std::env::var("HUGINN_TEST_DEVICE") {
        Ok(spec) => huginn::model::parse_device(&spec).expect("HUGINN_TEST_DEVICE"),
        Err(_) => Device::Cpu,
    };
    [BackendChoice::Auto, BackendChoice::Tensor]
        .into_iter()
        .map(|backend| Arc::new(HuginnModel::load_with(&fixture_dir(), &device, Some(DType::F32), backend).unwrap()))
        .collect()
}

/// Greedy decoding from a zero state through the scheduler (the one token loop), with raw logits:
/// the prompt's pass at `prefill_steps`, then `tokens` more tokens at up to `num_steps` under `rule`.
fn run(
    model: &Arc<HuginnModel>,
    prompt: &[u32],
    cache: CacheStrategy,
    (prefill_steps, num_steps): (usize, usize),
    rule: ExitRule,
    tokens: usize,
) -> Completion {
    assert_eq!(prefill_steps, num_steps, "the scheduler prefills at the request's num_steps");
    let mut params = GenerationParams::new(num_steps);
    params.max_tokens = tokens;
    params.init_scale = 0.0;
    params.cache = cache;
    params.exit = rule;
    let mut spec = JobSpec::new(prompt.to_vec(), params);
    spec.report_logits = true;
    let tokenizer = Arc::new(TextTokenizer::load(&fixture_dir(), model.config()).unwrap());
    Driver::new(model.clone(), tokenizer, 1).run_one(spec).unwrap()
}

fn rows_tensor(rows: &[Vec<f32>]) -> Tensor {
    Tensor::from_vec(rows.concat(), (rows.len(), rows.first().map_or(0, Vec::len)), &Device::Cpu).unwrap()
}

fn ids(case: &Value, key: &str) -> Vec<u32> {
    case[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_device(&Device::Cpu).unwrap();
    (&a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn strategy(name: &str) -> CacheStrategy {
    match name {
        "full" => CacheStrategy::Full,
        // compress-s2 with two core layers = one shared recurrence slot per token.
        "compress-s2" => CacheStrategy::Shared(1),
        other => panic!("unknown fixture cache strategy {other}"),
    }
}

const TOLERANCE: f32 = 1e-4;

#[test]
fn prompt_logits_match_reference() {
    for model in models() {
        prompt_logits_match(&model);
    }
}

fn prompt_logits_match(model: &Arc<HuginnModel>) {
    let backend = model.backend().name();
    let expected = expected();
    let cases = load_json("cases.json");
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap().iter().filter(|c| c["kind"] == "prompt_logits") {
        let steps = case["num_steps"].as_u64().unwrap() as usize;
        let out = run(model, &ids(case, "ids"), CacheStrategy::Full, (steps, steps), ExitRule::default(), 0);
        let logits = rows_tensor(&out.prompt_logits);
        let want = &expected[case["tensor"].as_str().unwrap()];
        let diff = max_abs_diff(&logits, want);
        assert!(diff < TOLERANCE, "{backend} {}: max abs diff {diff}", case["tensor"]);
        eprintln!("{backend} {}: max abs diff {diff:e}", case["tensor"]);
        checked += 1;
    }
    assert_eq!(checked, 9);
}

#[test]
fn greedy_decode_matches_reference_for_both_cache_strategies() {
    for model in models() {
        greedy_decode_matches(&model);
    }
}

fn greedy_decode_matches(model: &Arc<HuginnModel>) {
    let backend = model.backend().name();
    let expected = expected();
    let cases = load_json("cases.json");
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap().iter().filter(|c| c["kind"] == "greedy_decode") {
        let steps = case["num_steps"].as_u64().unwrap() as usize;
        let generated = ids(case, "generated_ids");
        let want = &expected[case["tensor"].as_str().unwrap()];
        let cache = strategy(case["cache_strategy"].as_str().unwrap());
        // The reference decodes `generated.len()` tokens and reports one more row of logits.
        let out = run(model, &ids(case, "ids"), cache, (steps, steps), ExitRule::default(), generated.len() + 1);
        assert_eq!(out.token_ids[..generated.len()], generated, "{backend} {}: greedy ids", case["tensor"]);
        assert!(out.steps_per_token.iter().all(|&s| s == steps));
        let got = rows_tensor(&out.token_logits);
        let diff = max_abs_diff(&got, want);
        assert!(diff < TOLERANCE, "{backend} {}: max abs diff {diff}", case["tensor"]);
        eprintln!("{backend} {}: max abs diff {diff:e}", case["tensor"]);
        checked += 1;
    }
    assert_eq!(checked, 18);
}

#[test]
fn adaptive_exit_matches_reference_ids_and_steps() {
    for model in models() {
        adaptive_exit_matches(&model);
    }
}

fn adaptive_exit_matches(model: &Arc<HuginnModel>) {
    let fixture = load_json("adaptive.json");
    let mut compared_tokens = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let name = format!("{} {} / {}", model.backend().name(), case["criterion"], case["prompt"]);
        let criterion: ExitCriterion = case["criterion"].as_str().unwrap().parse().unwrap();
        let threshold = case["threshold"].as_f64().unwrap();
        let rule = ExitRule::new(criterion, Some(threshold), 0).unwrap();
        let max_steps = case["max_steps"].as_u64().unwrap() as usize;
        let prefill_steps = case["prefill_steps"].as_u64().unwrap() as usize;
        let want_ids = ids(case, "generated_ids");
        let want_steps = ids(case, "steps_per_generated_token");
        let at_exit: Vec<f64> =
            case["criterion_value_at_exit"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();

        let out = run(
            model,
            &ids(case, "ids"),
            CacheStrategy::Shared(1),
            (prefill_steps, max_steps),
            rule,
            want_steps.len() + 1,
        );
        assert_eq!(out.token_ids[0], want_ids[0], "{name}: token from the prefill");
        for i in 0..want_steps.len() {
            // Token i + 1 is what feeding token i produced.
            let steps = out.steps_per_token[i + 1];
            let near_threshold = (at_exit[i] - threshold).abs() <= 1e-6 * threshold;
            if steps as u32 != want_steps[i] {
                assert!(near_threshold, "{name}: token {i}: {steps} steps, reference {}", want_steps[i]);
                eprintln!("{name}: token {i} sits within float noise of the threshold; stopping there");
                break; // a legitimate float-noise divergence; the rest of the sequence may differ
            }
            if steps < max_steps {
                assert_eq!(out.exits[i + 1], ExitReason::Converged, "{name}: token {i}: exit reason");
            }
            if i + 1 < want_ids.len() {
                assert_eq!(out.token_ids[i + 1], want_ids[i + 1], "{name}: token {}", i + 1);
            }
            compared_tokens += 1;
        }
    }
    eprintln!("adaptive: {compared_tokens} tokens compared");
    assert!(compared_tokens >= 100, "only {compared_tokens} tokens compared");
}
