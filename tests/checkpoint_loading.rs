//! Loading checkpoints: random-weight checkpoints round-trip, shards, dtypes, and clear errors for
//! every kind of bad checkpoint.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use huginn::checkpoint::{preset, write_random_checkpoint};
use huginn::generate::GenerationParams;
use huginn::model::{BackendChoice, HuginnModel};
use huginn::text::TextTokenizer;

fn load_err(dir: &Path) -> String {
    match HuginnModel::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn save_weights(dir: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
}

/// Measured on the fixture at num_steps 1, 4, 8 and 32, on the CPU (bfloat16 weights and K/V,
/// float32 activations): bf16 logits differ from float32 by at most 0.0096-0.0125 (the logits span
/// about ±2.5); with every tensor in bfloat16 (as on a GPU) 0.030-0.037. The bound leaves headroom.
const BF16_TOLERANCE: f32 = 0.06;

#[test]
fn bf16_weights_stay_within_the_measured_tolerance() {
    let f32_model = std::sync::Arc::new(HuginnModel::load(&fixture_dir(), DType::F32, &Device::Cpu).unwrap());
    // The CPU kernels keep only weights and K/V in bfloat16, activations in float32; tensor ops
    // (the device path) run everything in bfloat16.
    for (backend, activations) in [(BackendChoice::Auto, DType::F32), (BackendChoice::Tensor, DType::BF16)] {
        let bf16_model = std::sync::Arc::new(
            HuginnModel::load_with(&fixture_dir(), &Device::Cpu, Some(DType::BF16), backend).unwrap(),
        );
        assert_eq!(bf16_model.dtype(), DType::BF16);
        assert_eq!(bf16_model.kv_dtype(), DType::BF16);
        assert_eq!(bf16_model.activation_dtype(), activations, "{backend}");
        for steps in [1, 4, 8, 32] {
            let a = prompt_logits(&f32_model, &PROMPT, steps);
            let b = prompt_logits(&bf16_model, &PROMPT, steps);
            let diff = max_abs_diff(&a, &b);
            assert!(diff > 0.0, "bf16 should differ from f32 at all");
            assert!(diff < BF16_TOLERANCE, "{backend} steps {steps}: bf16 differs by {diff}");
            eprintln!("{backend} steps {steps}: bf16 differs by {diff}");
        }
    }
}

#[test]
fn random_checkpoint_loads_back_tokenizes_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = preset("tiny").unwrap();
    write_random_checkpoint(dir.path(), &cfg, 7, DType::F32, 1).unwrap();
    let model = load(dir.path(), DType::F32);
    assert_eq!(model.config().n_embd, 64);
    let tokenizer = TextTokenizer::load(dir.path(), model.config()).unwrap();
    assert_eq!(tokenizer.vocab_size(), cfg.vocab_size);
    assert_eq!(tokenizer.special().bos, Some(352));
    assert!(tokenizer.special().stop.contains(&353), "eos stops generation");
    assert!(!tokenizer.chat_template().is_builtin(), "the written tokenizer_config.json carries a template");
    let ids = tokenizer.encode("472+389=").unwrap();
    assert_eq!(ids.len(), 8);
    let mut params = GenerationParams::new(4);
    params.max_tokens = 6;
    params.init_scale = 0.0;
    let out = run_in(dir.path(), &model, huginn::engine::JobSpec::new(ids.clone(), params)).unwrap();
    assert_eq!(out.token_ids.len(), 6);
    assert!(out.token_ids.iter().all(|&t| (t as usize) < cfg.vocab_size));
    assert_eq!(out.steps_per_token, vec![4; 6]);

    // Grouped-query attention (without Huginn-0125's q/k bias): written, loaded and run, its
    // cache holding half the bytes of the same shape with one key/value head per query head.
    let kv_bytes = |kv_heads: usize| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = huginn::model::HuginnConfig {
            num_key_value_heads: Some(kv_heads),
            qk_bias: false,
            ..preset("tiny").unwrap()
        };
        write_random_checkpoint(dir.path(), &cfg, 7, DType::F32, 1).unwrap();
        let model = load(dir.path(), DType::F32);
        assert_eq!(model.config().kv_heads(), kv_heads);
        let mut params = GenerationParams::new(3);
        params.max_tokens = 4;
        let out = run_in(dir.path(), &model, huginn::engine::JobSpec::new(ids.clone(), params)).unwrap();
        assert_eq!(out.token_ids.len(), 4);
        out.kv_bytes
    };
    assert_eq!(2 * kv_bytes(2), kv_bytes(4));
}

#[test]
fn same_seed_gives_same_weights_and_other_seed_differs() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = preset("tiny").unwrap();
    write_random_checkpoint(a.path(), &cfg, 1, DType::F32, 1).unwrap();
    write_random_checkpoint(b.path(), &cfg, 1, DType::F32, 1).unwrap();
    write_random_checkpoint(c.path(), &cfg, 2, DType::F32, 1).unwrap();
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(a.path()), read(b.path()));
    assert_ne!(read(a.path()), read(c.path()));
}

#[test]
fn sharded_checkpoint_gives_identical_logits() {
    let (single, sharded) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = preset("tiny").unwrap();
    write_random_checkpoint(single.path(), &cfg, 5, DType::F32, 1).unwrap();
    write_random_checkpoint(sharded.path(), &cfg, 5, DType::F32, 3).unwrap();
    assert!(!sharded.path().join("model.safetensors").exists());
    assert!(sharded.path().join("model.safetensors.index.json").is_file());
    let shards = std::fs::read_dir(sharded.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-"))
        .count();
    assert_eq!(shards, 3);
    let a = prompt_logits_in(single.path(), &load(single.path(), DType::F32), &PROMPT, 4);
    let b = prompt_logits_in(sharded.path(), &load(sharded.path(), DType::F32), &PROMPT, 4);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn bf16_checkpoint_on_disk_loads_in_any_dtype() {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), &preset("tiny").unwrap(), 3, DType::BF16, 1).unwrap();
    let as_f32 = load(dir.path(), DType::F32);
    let as_bf16 = load(dir.path(), DType::BF16);
    let (a, b) =
        (prompt_logits_in(dir.path(), &as_f32, &PROMPT, 2), prompt_logits_in(dir.path(), &as_bf16, &PROMPT, 2));
    let diff = max_abs_diff(&a, &b);
    assert!(diff < BF16_TOLERANCE, "{diff}");
}

#[test]
fn missing_config_names_the_file() {
    let dir = fixture_copy();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("not found"), "{err}");
}

#[test]
fn invalid_config_names_the_key() {
    let dir = fixture_copy();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    cfg["n_embd"] = serde_json::json!("wide");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.starts_with("config.json: invalid config") && err.contains("invalid type"), "{err}");

    cfg["n_embd"] = serde_json::json!(66);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("`n_embd` (66) must be divisible by `num_attention_heads` (4)"), "{err}");

    let mut cfg2 = cfg.clone();
    cfg2.as_object_mut().unwrap().remove("vocab_size");
    std::fs::write(dir.path().join("config.json"), cfg2.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("missing field `vocab_size`"), "{err}");
}

#[test]
fn unknown_config_keys_are_ignored_and_optional_keys_default() {
    let dir = fixture_copy();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    cfg["some_future_key"] = serde_json::json!({"nested": true});
    cfg.as_object_mut().unwrap().remove("rope_base");
    cfg.as_object_mut().unwrap().remove("norm_eps");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let model = load(dir.path(), DType::F32);
    assert_eq!(model.config().rope_base, 50_000.0);
    assert_eq!(model.config().norm_eps, 1e-6);
    // Defaults equal the fixture's values, so the logits are unchanged.
    let diff =
        max_abs_diff(&prompt_logits(&model, &PROMPT, 2), &prompt_logits(&load(&fixture_dir(), DType::F32), &PROMPT, 2));
    assert_eq!(diff, 0.0);
}

#[test]
fn missing_weights_file_names_it() {
    let dir = fixture_copy();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors: file not found"), "{err}");
}

#[test]
fn truncated_weights_file_is_an_error_not_a_panic() {
    let dir = fixture_copy();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.starts_with("model.safetensors: not a valid safetensors file (truncated or corrupt?)"), "{err}");
    std::fs::write(&path, &bytes[..5]).unwrap();
    let err = load_err(dir.path());
    assert!(err.starts_with("model.safetensors: not a valid safetensors file"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = fixture_copy();
    let mut tensors = weights(dir.path());
    tensors.remove("transformer.core_block.1.mlp.fc.weight").unwrap();
    save_weights(dir.path(), &tensors);
    let err = load_err(dir.path());
    assert_eq!(
        err,
        "tensor `transformer.core_block.1.mlp.fc.weight` is missing from the checkpoint (model.safetensors)"
    );
}

#[test]
fn mismatched_shape_names_tensor_and_both_shapes() {
    let dir = fixture_copy();
    let mut tensors = weights(dir.path());
    let bad = Tensor::zeros((64, 100), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("transformer.adapter.weight".into(), bad);
    save_weights(dir.path(), &tensors);
    let err = load_err(dir.path());
    assert_eq!(err, "model.safetensors: tensor `transformer.adapter.weight` has shape [64, 100], expected [64, 128]");
}

#[test]
fn untied_head_is_loaded_when_present() {
    let dir = fixture_copy();
    let mut tensors = weights(dir.path());
    let head = (tensors["transformer.wte.weight"].clone() * 2.0).unwrap();
    tensors.insert("lm_head.weight".into(), head);
    save_weights(dir.path(), &tensors);
    let tied = prompt_logits(&load(&fixture_dir(), DType::F32), &PROMPT, 1);
    let untied = prompt_logits(&load(dir.path(), DType::F32), &PROMPT, 1);
    assert!(max_abs_diff(&(tied * 2.0).unwrap(), &untied) < 1e-4);
}

#[test]
fn shard_index_errors_name_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), &preset("tiny").unwrap(), 5, DType::F32, 2).unwrap();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00002.safetensors: file not found"), "{err}");

    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"metadata\": {}}").unwrap();
    let err = load_err(dir.path());
    assert_eq!(err, "model.safetensors.index.json: invalid shard index: missing object `weight_map`");
}

#[test]
fn tokenizer_errors_name_the_file() {
    let dir = fixture_copy();
    let model = load(dir.path(), DType::F32);
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let err = TextTokenizer::load(dir.path(), model.config()).err().unwrap().to_string();
    assert!(err.starts_with("tokenizer.json: invalid tokenizer"), "{err}");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = TextTokenizer::load(dir.path(), model.config()).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json: file not found"), "{err}");
}

#[test]
fn fixture_tokenizer_matches_the_reference_ids_and_specials() {
    let model = load(&fixture_dir(), DType::F32);
    let tokenizer = TextTokenizer::load(&fixture_dir(), model.config()).unwrap();
    assert_eq!(tokenizer.encode("The recurrent block iterates").unwrap(), PROMPT.to_vec());
    assert_eq!(tokenizer.encode("12+34=").unwrap(), vec![313, 14, 316, 32]);
    let special = tokenizer.special();
    assert_eq!((special.bos, special.eos.clone(), special.pad), (Some(0), vec![1], Some(3)));
    assert_eq!(special.stop, vec![0, 1, 2]);
    assert!(tokenizer.chat_template().is_builtin());
}

#[test]
fn other_architectures_and_impossible_head_counts_are_refused_by_name() {
    // An architecture of neither format is named; an Ouro config must have Ouro's keys.
    let dir = fixture_copy();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("architecture `LlamaForCausalLM` is not supported"), "{err}");
    cfg["architectures"] = serde_json::json!(["OuroForCausalLM"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("hidden_size"), "{err}");

    // Grouped-query attention is refused only beside Huginn-0125's query/key bias.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["RavenForCausalLM"]);
    cfg["num_key_value_heads"] = serde_json::json!(2);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("a checkpoint with `qk_bias` (Huginn-0125) uses full multi-head attention"), "{err}");
    cfg["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("`num_key_value_heads` (3) must divide `num_attention_heads` (4)"), "{err}");
}

/// Every family's preset writes a checkpoint in that family's tensor names and format (shrunk to
/// a test size, the rest of its config as published) that loads as that family and generates,
/// with the family's own features: Ouro's exit gate, the retrofitted models' grouped K/V heads.
#[test]
fn every_family_preset_writes_a_checkpoint_that_loads_as_its_family_and_generates() {
    use huginn::checkpoint::{preset_family, write_random_family_checkpoint};
    use huginn::model::{ExitCriterion, ExitRule};
    for name in ["ouro-1.4b", "ouro-2.6b", "recurrent-llama-3.2-1b", "recurrent-tinyllama-1.1b"] {
        let published = preset(name).unwrap();
        let groups = published.num_attention_heads / published.kv_heads();
        let heads = 8;
        let cfg = huginn::model::HuginnConfig {
            n_embd: 64,
            num_attention_heads: heads,
            num_key_value_heads: Some(heads / groups.min(heads)),
            intermediate_size: 96,
            vocab_size: 320,
            block_size: 128,
            n_layers_in_prelude: published.n_layers_in_prelude.min(1),
            n_layers_in_recurrent_block: 2,
            n_layers_in_coda: published.n_layers_in_coda.min(1),
            ..published.clone()
        };
        let dir = tempfile::tempdir().unwrap();
        write_random_family_checkpoint(dir.path(), &cfg, preset_family(name), 3, DType::BF16, 2).unwrap();
        let model = std::sync::Arc::new(HuginnModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap());
        assert_eq!(model.family(), preset_family(name), "{name}");
        assert_eq!(model.config().architecture, published.architecture, "{name}");
        assert_eq!(model.config().kv_heads(), heads / groups.min(heads), "{name}");
        assert_eq!(model.has_exit_gate(), name.starts_with("ouro"), "{name}");
        let mut params = GenerationParams::new(3);
        params.max_tokens = 4;
        params.stop_token_ids.clear();
        if model.has_exit_gate() {
            params.exit = ExitRule::new(ExitCriterion::Gate, Some(0.5), 0).unwrap();
        }
        let out = run_in(dir.path(), &model, huginn::engine::JobSpec::new(vec![1, 2, 3], params)).unwrap();
        assert_eq!(out.token_ids.len(), 4, "{name}");
    }
}
