//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use huginn::engine::{Completion, Driver, JobSpec};
use huginn::generate::GenerationParams;
use huginn::model::{BackendChoice, CacheStrategy, HuginnModel};
use huginn::text::TextTokenizer;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/huginn-tiny-ref")
}

/// Copies the fixture checkpoint into a fresh temporary folder.
pub fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// The kernels the tests run on: `HUGINN_MODEL_BACKEND` when set (CI runs the engine and server
/// suites again with `tensor`, the device path), else `auto`.
pub fn backend() -> BackendChoice {
    std::env::var("HUGINN_MODEL_BACKEND").map(|v| v.parse().expect("HUGINN_MODEL_BACKEND")).unwrap_or_default()
}

/// The device the model tests run on: `HUGINN_TEST_DEVICE` (`scripts/gpu-check.sh` sets `cuda:0`),
/// else the CPU.
pub fn device() -> Device {
    std::env::var("HUGINN_TEST_DEVICE")
        .map(|d| huginn::model::parse_device(&d).expect("HUGINN_TEST_DEVICE"))
        .unwrap_or(Device::Cpu)
}

pub fn load(dir: &Path, dtype: DType) -> Arc<HuginnModel> {
    Arc::new(HuginnModel::load_with(dir, &device(), Some(dtype), backend()).unwrap())
}

/// Runs `spec` alone through the scheduler on this thread (what `huginn generate` does), with
/// the tokenizer of the checkpoint in `dir`.
pub fn run_in(dir: &Path, model: &Arc<HuginnModel>, spec: JobSpec) -> huginn::model::Result<Completion> {
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config()).unwrap());
    Driver::new(model.clone(), tokenizer, 1).run_one(spec)
}

/// [`run_in`] for `prompt` and `params` on a model with the fixture's tokenizer.
pub fn generate(
    model: &Arc<HuginnModel>,
    prompt: &[u32],
    params: &GenerationParams,
) -> huginn::model::Result<Completion> {
    run_in(&fixture_dir(), model, JobSpec::new(prompt.to_vec(), params.clone()))
}

/// Like [`generate`], reporting raw logits.
pub fn generate_logits(model: &Arc<HuginnModel>, prompt: &[u32], params: &GenerationParams) -> Completion {
    let mut spec = JobSpec::new(prompt.to_vec(), params.clone());
    spec.report_logits = true;
    run_in(&fixture_dir(), model, spec).unwrap()
}

/// Logits at every prompt position after `steps` recurrences from a zero state.
pub fn prompt_logits(model: &Arc<HuginnModel>, ids: &[u32], steps: usize) -> Tensor {
    prompt_logits_in(&fixture_dir(), model, ids, steps)
}

/// [`prompt_logits`] with the tokenizer of `dir`.
pub fn prompt_logits_in(dir: &Path, model: &Arc<HuginnModel>, ids: &[u32], steps: usize) -> Tensor {
    let mut params = GenerationParams::new(steps);
    params.max_tokens = 0;
    params.init_scale = 0.0;
    params.cache = CacheStrategy::Full;
    let mut spec = JobSpec::new(ids.to_vec(), params);
    spec.report_logits = true;
    let rows = run_in(dir, model, spec).unwrap().prompt_logits;
    let width = rows.first().map_or(0, Vec::len);
    Tensor::from_vec(rows.concat(), (ids.len(), width), &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub const PROMPT: [u32; 7] = [322, 295, 326, 373, 310, 383, 86];
