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

/// The repository root: `CARGO_MANIFEST_DIR` at run time (cargo sets it; `scripts/gpu-check.sh` sets
/// it where the test binary travels to another machine), else where the tests were built.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

pub fn fixture_dir() -> PathBuf {
    repo_root().join("tests/fixtures/huginn-tiny-ref")
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

/// The largest absolute difference between two runs' rows of logits (same shape; a NaN counts as
/// infinitely far).
pub fn max_gap(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts");
    let gap = |p: f32, q: f32| if (p - q).is_nan() { f32::INFINITY } else { (p - q).abs() };
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row widths");
            x.iter().zip(y).map(|(&p, &q)| gap(p, q))
        })
        .fold(0.0, f32::max)
}

/// [`max_gap`] over the logits that produced each token.
pub fn max_logit_gap(a: &Completion, b: &Completion) -> f32 {
    max_gap(&a.token_logits, &b.token_logits)
}

/// How far two runs of the same sequence that batch or split its rows differently may drift: not a
/// bit on the batch-invariant CPU kernels; with tensor ops (a GPU's products choose their reduction
/// order by shape) the parity bounds, 1e-4 in float32 and 0.06 in bfloat16.
pub fn batching_bound(model: &HuginnModel) -> f32 {
    match (model.backend().batch_invariant(), model.dtype()) {
        (true, _) => 0.0,
        (false, DType::F32) => 1e-4,
        (false, _) => 0.06,
    }
}

pub fn load(dir: &Path, dtype: DType) -> Arc<HuginnModel> {
    Arc::new(HuginnModel::load_with(dir, &device(), Some(dtype), backend()).unwrap())
}

/// Runs `spec` alone through the scheduler on this thread (what `huginn generate` does), with
/// the tokenizer of the checkpoint in `dir`.
pub fn run_in(dir: &Path, model: &Arc<HuginnModel>, spec: JobSpec) -> Result<Completion, huginn::engine::RunError> {
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config()).unwrap());
    Driver::new(model.clone(), tokenizer, 1).run_one(spec)
}

/// [`run_in`] for `prompt` and `params` on a model with the fixture's tokenizer.
pub fn generate(
    model: &Arc<HuginnModel>,
    prompt: &[u32],
    params: &GenerationParams,
) -> Result<Completion, huginn::engine::RunError> {
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
