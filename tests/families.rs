//! Checkpoint families in Huginn-0125's format other than Huginn-0125 itself: parity with their
//! reference modeling files on their fixtures (see each fixture's README), on both kernel sets, and
//! batch invariance. `tests/fixtures/retrofit-llama-tiny-ref`: a retrofitted-recurrence Llama
//! checkpoint (pre-norm blocks, grouped-query attention, rotate-half RoPE with Llama-3 scaling,
//! embeddings unscaled, no `ln_f` before the coda, untied head, BOS prepended by the tokenizer).
//! `tests/fixtures/retrofit-olmo-tiny-ref`: the OLMo-2 variant (post-norm blocks, queries and keys
//! normed before RoPE, no scaling, no BOS).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{batching_bound, max_gap, repo_root};
use huginn::engine::{Completion, Driver, JobSpec};
use huginn::generate::GenerationParams;
use huginn::model::{BackendChoice, CacheStrategy, Family, HuginnModel};
use huginn::text::TextTokenizer;
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

/// Each family's fixture, the family it must load as, and its key/value heads.
const FIXTURES: [(&str, Family, usize); 2] =
    [("retrofit-llama-tiny-ref", Family::RetrofitLlama, 2), ("retrofit-olmo-tiny-ref", Family::RetrofitOlmo, 4)];

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// The fixture on the CPU kernels and on tensor ops (on `HUGINN_TEST_DEVICE` when set).
fn models(dir: &Path) -> Vec<Arc<HuginnModel>> {
    [BackendChoice::Auto, BackendChoice::Tensor]
        .into_iter()
        .map(|backend| Arc::new(HuginnModel::load_with(dir, &common::device(), Some(DType::F32), backend).unwrap()))
        .collect()
}

fn cases(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["cases"].as_array().unwrap().clone()
}

fn expected(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn ids(case: &Value, key: &str) -> Vec<u32> {
    case[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
    tensor.to_vec2::<f32>().unwrap()
}

/// Greedy decoding from a zero state with the full cache, with raw logits: `tokens` tokens at
/// `num_steps` each.
fn spec(prompt: Vec<u32>, num_steps: usize, tokens: usize) -> JobSpec {
    let mut params = GenerationParams::new(num_steps);
    params.max_tokens = tokens;
    params.init_scale = 0.0;
    params.cache = CacheStrategy::Full;
    params.stop_token_ids.clear();
    let mut spec = JobSpec::new(prompt, params);
    spec.report_logits = true;
    spec
}

fn run(model: &Arc<HuginnModel>, dir: &Path, specs: Vec<JobSpec>) -> Vec<Completion> {
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config()).unwrap());
    let batch = specs.len();
    let outcomes = Driver::new(model.clone(), tokenizer, batch).run(specs, |_, _| {}).unwrap();
    outcomes.into_iter().map(|mut choices| choices.remove(0)).collect()
}

#[test]
fn each_family_is_detected_and_tokenizes_as_its_reference() {
    for (name, family, kv_heads) in FIXTURES {
        let dir = fixture(name);
        let model = &models(&dir)[0];
        assert_eq!((model.family(), model.config().kv_heads()), (family, kv_heads), "{name}");
        // The Llama tokenizer prepends BOS; the OLMo one does not.
        let tokenizer = TextTokenizer::load(&dir, model.config()).unwrap();
        for case in cases(&dir) {
            let prompt = case["prompt"].as_str().unwrap();
            assert_eq!(tokenizer.encode(prompt).unwrap(), ids(&case, "ids"), "{name}: {prompt}");
        }
    }
}

#[test]
fn prompt_logits_match_the_references() {
    for (name, ..) in FIXTURES {
        prompt_logits_match(&fixture(name));
    }
}

fn prompt_logits_match(dir: &Path) {
    let expected = expected(dir);
    for model in models(dir) {
        let mut checked = 0;
        for case in cases(dir).iter().filter(|c| c["kind"] == "prompt_logits") {
            let steps = case["num_steps"].as_u64().unwrap() as usize;
            let out = run(&model, dir, vec![spec(ids(case, "ids"), steps, 0)]).remove(0);
            let want = rows(&expected[case["tensor"].as_str().unwrap()]);
            let gap = max_gap(&out.prompt_logits, &want);
            assert!(
                gap < TOLERANCE,
                "{} {} {}: max abs diff {gap}",
                dir.display(),
                model.backend().name(),
                case["tensor"]
            );
            checked += 1;
        }
        assert_eq!(checked, 9);
    }
}

#[test]
fn greedy_decoding_matches_the_references_alone_and_batched() {
    for (name, ..) in FIXTURES {
        greedy_decoding_matches(&fixture(name));
    }
}

fn greedy_decoding_matches(dir: &Path) {
    let expected = expected(dir);
    let decodes: Vec<Value> = cases(dir).into_iter().filter(|c| c["kind"] == "greedy_decode").collect();
    assert_eq!(decodes.len(), 9);
    let specs = || -> Vec<JobSpec> {
        decodes
            .iter()
            .map(|case| {
                let steps = case["num_steps"].as_u64().unwrap() as usize;
                // The reference decodes `generated.len()` tokens and reports one more row of logits.
                spec(ids(case, "ids"), steps, ids(case, "generated_ids").len() + 1)
            })
            .collect()
    };
    for model in models(dir) {
        let backend = format!("{} {}", dir.display(), model.backend().name());
        let alone: Vec<Completion> = specs().into_iter().map(|s| run(&model, dir, vec![s]).remove(0)).collect();
        for (case, out) in decodes.iter().zip(&alone) {
            let generated = ids(case, "generated_ids");
            assert_eq!(out.token_ids[..generated.len()], generated, "{backend} {}: greedy ids", case["tensor"]);
            let want = rows(&expected[case["tensor"].as_str().unwrap()]);
            let gap = max_gap(&out.token_logits, &want);
            assert!(gap < TOLERANCE, "{backend} {}: max abs diff {gap}", case["tensor"]);
        }
        // All nine together, at their different depths: each gets what it gets alone.
        let together = run(&model, dir, specs());
        for (a, t) in alone.iter().zip(&together) {
            assert_eq!(a.token_ids, t.token_ids, "{backend}: batched ids");
            let gap = max_gap(&a.token_logits, &t.token_logits);
            assert!(gap <= batching_bound(&model), "{backend}: batched logits drift {gap}");
        }
    }
}

/// The random initial state is drawn as the references draw it: a truncated normal of standard
/// deviation `init_values.std` (these configs carry Huginn-0125's 0.0087, not sqrt(2 / 5d) = 0.079
/// at their width), times `init_scale` and the embedding scale (1 here).
#[test]
fn the_initial_state_follows_init_values_std() {
    use rand::SeedableRng;
    for (name, ..) in FIXTURES {
        let model = &models(&fixture(name))[0];
        let std = model.config().state_std();
        assert!((std - 0.008703882797784892).abs() < 1e-12, "{name}: {std}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let state = model.init_state(2000, 2.0, &mut rng).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = state.len() as f64;
        let mean = state.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let sd = (state.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n).sqrt();
        // A normal truncated at 3 sigma keeps 98.7% of its standard deviation.
        let want = 2.0 * std * 0.9866;
        assert!((sd / want - 1.0).abs() < 0.01, "{name}: standard deviation {sd}, expected {want}");
        let bound = 3.0 * 2.0 * std * (1.0 + 1e-6);
        assert!(state.iter().all(|&v| f64::from(v).abs() <= bound), "{name}: truncated at 3 sigma");
    }
}

/// A copy of the fixture whose weights are rounded to bfloat16 and stored as float32: the float32
/// function of the weights a bfloat16 checkpoint holds.
fn rounded_copy(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let rounded: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (name, t.to_dtype(DType::BF16).and_then(|t| t.to_dtype(DType::F32)).unwrap()))
        .collect();
    candle_core::safetensors::save(&rounded, copy.path().join("model.safetensors")).unwrap();
    copy
}

/// bfloat16 on every family, on both kernel sets. These random-weight fixtures are far more
/// sensitive to rounding than Huginn-0125's: rounding the weights alone and computing in float32
/// moves their logits by up to 0.14 (retrofitted Llama), 0.13 (OLMo) and 0.22 (Ouro) from the
/// float32 reference (the logits span about ±4), where the whole bf16 computation moves
/// Huginn-0125's fixture by 0.0125-0.037. So the bf16 computation (bfloat16 K/V on the CPU
/// kernels; everything in bfloat16 on tensor ops) is measured against the float32 function of the
/// same rounded weights. Measured there: CPU kernels 0.072 / 0.108 / 0.124, tensor ops 0.151 /
/// 0.143 / 0.158 (Llama / OLMo / Ouro, the worst case over every prompt and depth).
#[test]
fn bf16_stays_within_the_bf16_bound_of_its_rounded_weights() {
    for name in ["retrofit-llama-tiny-ref", "retrofit-olmo-tiny-ref", "ouro-tiny-ref"] {
        let dir = fixture(name);
        let rounded = rounded_copy(&dir);
        let reference = Arc::new(
            HuginnModel::load_with(rounded.path(), &Device::Cpu, Some(DType::F32), BackendChoice::Auto).unwrap(),
        );
        for backend in [BackendChoice::Auto, BackendChoice::Tensor] {
            let model = Arc::new(HuginnModel::load_with(&dir, &common::device(), Some(DType::BF16), backend).unwrap());
            let mut worst = 0f32;
            for case in cases(&dir).iter().filter(|c| c["kind"] == "prompt_logits") {
                let steps = case["num_steps"].as_u64().or(case["total_ut_steps"].as_u64()).unwrap() as usize;
                let want = run(&reference, &dir, vec![spec(ids(case, "ids"), steps, 0)]).remove(0);
                let got = run(&model, &dir, vec![spec(ids(case, "ids"), steps, 0)]).remove(0);
                worst = worst.max(max_gap(&got.prompt_logits, &want.prompt_logits));
            }
            eprintln!("{name} {backend}: bf16 against its rounded weights in float32: {worst}");
            assert!(worst > 0.0 && worst < BF16_BOUND, "{name} {backend}: {worst}");
        }
    }
}

/// The bf16 bound of these fixtures: the measured worst case (0.158) with the headroom Huginn-0125's
/// bound leaves over its own (0.06 over 0.037).
const BF16_BOUND: f32 = 0.25;
