//! The model suites, in one test binary: fixture parity (Huginn-0125 and the other checkpoint
//! families), the engine (alone vs batched), chunked prefill, prefix caching, speculation and the
//! parallel sampler. `cargo test` runs them here (one binary builds in half the time of five: 13.6 s
//! against 28.1 s, measured on this 2-core machine), and the GPU
//! check carries it as its single program besides `huginn` (`scripts/gpu-bundle.sh`,
//! `scripts/gpu-check.sh`). Each suite runs on `HUGINN_TEST_DEVICE` (default the CPU); each file
//! still runs alone with `cargo test --test <name>` (`test = false` in Cargo.toml keeps it out of
//! the default run).

// Each suite declares `mod common;` so that it also builds alone: here the helpers load once per suite.
#![allow(clippy::duplicate_mod)]

#[path = "chunked_prefill.rs"]
mod chunked_prefill;
#[path = "engine.rs"]
mod engine;
#[path = "families.rs"]
mod families;
#[path = "ouro.rs"]
mod ouro;
#[path = "parallel.rs"]
mod parallel;
#[path = "parity.rs"]
mod parity;
#[path = "prefix_cache.rs"]
mod prefix_cache;
#[path = "speculation.rs"]
mod speculation;
