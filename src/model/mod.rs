//! The model runtime: checkpoint loading, the three forward entry points, K/V caches and exits.

pub mod add_norm;
pub mod amx;
pub mod bf16_linear;
pub mod cache;
pub mod config;
mod cpu_support;
pub mod decode_attention;
pub mod error;
pub mod exit;
pub mod huginn;
pub mod layers;
pub mod linear;
pub mod panel_kernel;
pub mod swiglu;
pub mod weights;

pub use cache::{CacheStrategy, KvCache, LayerSlot};
pub use config::HuginnConfig;
pub use error::{ModelError, Result};
pub use exit::{ExitCheck, ExitCriterion, ExitRule, ExitTracker};
pub use huginn::{HuginnModel, LogitRows, dtype_name, parse_device, parse_dtype};
pub use layers::Chunk;
