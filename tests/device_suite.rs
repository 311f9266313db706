//! The model suites that matter on an accelerator, in one test binary, so that the GPU check carries a
//! single program besides `huginn` (`scripts/gpu-bundle.sh`, `scripts/gpu-check.sh`): fixture parity,
//! the engine (alone vs batched), chunked prefill, speculation and the parallel sampler. Each runs on
//! `HUGINN_TEST_DEVICE` (default the CPU). `cargo test` runs the same files as their own binaries, so
//! this one is not part of the default run (`test = false` in Cargo.toml); build it with
//! `cargo test --release --test device_suite --no-run`.

#[path = "chunked_prefill.rs"]
mod chunked_prefill;
#[path = "engine.rs"]
mod engine;
#[path = "parallel.rs"]
mod parallel;
#[path = "parity.rs"]
mod parity;
#[path = "speculation.rs"]
mod speculation;
