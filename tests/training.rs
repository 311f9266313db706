//! The trainer: it learns, it matches the inference runtime, it resumes exactly; and the shipped
//! default model shows that more recurrence gives more right answers.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use huginn::checkpoint::{preset, write_metadata};
use huginn::model::{HuginnConfig, HuginnModel};
use huginn::text::TextTokenizer;
use huginn::train::eval::{Budget, evaluate, held_out_problems};
use huginn::train::model::TrainModel;
use huginn::train::{TrainOptions, Trainer};

fn tiny_config() -> HuginnConfig {
    HuginnConfig {
        n_embd: 32,
        num_attention_heads: 2,
        num_key_value_heads: Some(2),
        intermediate_size: 64,
        n_layers_in_prelude: 1,
        n_layers_in_recurrent_block: 1,
        n_layers_in_coda: 1,
        block_size: 64,
        mean_recurrence: 3,
        mean_backprop_depth: 2,
        ..preset("addition").unwrap()
    }
}

fn options(steps: usize) -> TrainOptions {
    TrainOptions {
        model: tiny_config(),
        steps,
        batch_size: 16,
        lr: 3e-3,
        min_lr: 1e-3,
        warmup_steps: 2,
        weight_decay: 0.0,
        digits: 2,
        curriculum_steps: 0,
        start_digits: 0,
        chat_fraction: 0.25,
        max_recurrence: 8,
        seed: 5,
        init_from: None,
    }
}

fn weights(trainer: &Trainer) -> Vec<(String, Vec<f32>)> {
    let data = trainer.model().vars().data().lock().unwrap();
    let mut all: Vec<_> = data
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn a_short_run_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(options(40), dir.path(), false).unwrap();
    let losses: Vec<f64> = (0..40).map(|_| trainer.train_step().unwrap().loss).collect();
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[35..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.8 * first, "loss went from {first:.3} to {last:.3}");
}

#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    let straight = tempfile::tempdir().unwrap();
    let mut a = Trainer::new(options(4), straight.path(), false).unwrap();
    for _ in 0..4 {
        a.train_step().unwrap();
    }
    let split = tempfile::tempdir().unwrap();
    let mut b = Trainer::new(options(4), split.path(), false).unwrap();
    for _ in 0..2 {
        b.train_step().unwrap();
    }
    b.save().unwrap();
    drop(b);
    let mut c = Trainer::new(options(4), split.path(), true).unwrap();
    assert_eq!(c.step(), 2);
    for _ in 0..2 {
        c.train_step().unwrap();
    }
    assert_eq!(weights(&a), weights(&c));
    // Other options than the saved run's are refused.
    let mut changed = options(4);
    changed.lr = 1e-2;
    let err = Trainer::new(changed, split.path(), true).err().expect("different options must be refused");
    assert!(err.to_string().contains("options differ"), "{err}");
}

#[test]
fn the_training_forward_matches_the_inference_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_metadata(dir.path(), &tiny_config(), DType::F32).unwrap();
    let trained = TrainModel::new(cfg.clone(), 11, &Device::Cpu).unwrap();
    trained.save_weights(&dir.path().join("model.safetensors")).unwrap();
    let served = Arc::new(HuginnModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap());
    let ids: Vec<u32> = "472+389=861".bytes().map(u32::from).collect();
    for steps in [1, 3, 6] {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let state = Tensor::zeros((1, ids.len(), cfg.n_embd), DType::F32, &Device::Cpu).unwrap();
        let train_logits = trained.forward(&input, &state, steps, 2).unwrap().squeeze(0).unwrap();
        let served_logits = common::prompt_logits_in(dir.path(), &served, &ids, steps);
        let diff = (train_logits - served_logits)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "num_steps {steps}: max abs diff {diff}");
    }
}

#[test]
fn the_six_digit_model_answers_more_problems_with_more_recurrence() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/huginn-addition-6");
    let model = Arc::new(HuginnModel::load(&dir, DType::F32, &Device::Cpu).unwrap());
    let tokenizer = Arc::new(TextTokenizer::load(&dir, model.config()).unwrap());
    let digits = huginn::train::addition::TaskFile::read(&dir).unwrap().expect("task.json").digits;
    assert_eq!(digits, 6);
    let problems = held_out_problems(100, digits, 2024);
    let default_steps = model.config().mean_recurrence;
    let at =
        |num_steps: usize| evaluate(&model, &tokenizer, &problems, false, Budget::fixed(num_steps)).unwrap().accuracy();
    let (full, one) = (at(default_steps), at(1));
    assert!(full >= 0.85, "accuracy at num_steps {default_steps}: {full}");
    assert!(one <= full / 2.0, "accuracy at num_steps 1 ({one}) is not clearly below {full}");
}

#[test]
fn the_default_model_answers_more_problems_with_more_recurrence() {
    let dir = huginn::settings::default_model_dir().expect("the default model ships in models/");
    let model = Arc::new(HuginnModel::load(&dir, DType::F32, &Device::Cpu).unwrap());
    let tokenizer = Arc::new(TextTokenizer::load(&dir, model.config()).unwrap());
    let problems = held_out_problems(100, 3, 2024);
    let default_steps = model.config().mean_recurrence;
    let at = |num_steps: usize| {
        let budget = Budget::fixed(num_steps);
        evaluate(&model, &tokenizer, &problems, false, budget).unwrap().accuracy()
    };
    let (full, one) = (at(default_steps), at(1));
    assert!(full >= 0.90, "accuracy at num_steps {default_steps}: {full}");
    assert!(one <= full / 2.0, "accuracy at num_steps 1 ({one}) is not clearly below {full}");
    let chat = evaluate(&model, &tokenizer, &problems[..20], true, Budget::fixed(default_steps)).unwrap().accuracy();
    assert!(chat >= 0.85, "chat-format accuracy {chat}");
}
