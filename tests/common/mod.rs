//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use huginn::generate::Sequence;
use huginn::model::{BackendChoice, CacheStrategy, HuginnModel, LogitRows};

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

pub fn load(dir: &Path, dtype: DType) -> HuginnModel {
    HuginnModel::load_with(dir, &device(), Some(dtype), backend()).unwrap()
}

/// Logits at every prompt position after `steps` recurrences from a zero state.
pub fn prompt_logits(model: &HuginnModel, ids: &[u32], steps: usize) -> Tensor {
    let mut seq = Sequence::new(model, CacheStrategy::Full, 0.0, false, 0);
    seq.prefill(ids, steps, LogitRows::All).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub const PROMPT: [u32; 7] = [322, 295, 326, 373, 310, 383, 86];
