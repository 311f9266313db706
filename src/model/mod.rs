//! The model runtime: checkpoint loading, the three forward entry points, K/V caches and exits.
//! The layers hold the model's math; the kernels under them are the backend's (`backend.rs`: the
//! CPU kernels in `cpu/`, tensor ops in `tensor/`).

/// Settings written as strings: serde goes through `FromStr` and `Display` (the types name
/// `TryFrom<String>` and `Into<String>` in their serde attributes).
macro_rules! string_setting {
    ($($t:ty),*) => {$(
        impl TryFrom<String> for $t {
            type Error = crate::model::ModelError;
            fn try_from(s: String) -> crate::model::Result<Self> {
                s.parse()
            }
        }

        impl From<$t> for String {
            fn from(value: $t) -> String {
                value.to_string()
            }
        }
    )*};
}

pub mod backend;
mod bf16_bits;
pub mod cache;
pub mod config;
mod cpu;
pub mod error;
pub mod exit;
pub mod family;
pub mod huginn;
pub mod layers;
pub mod ouro_config;
pub mod placement;
mod tensor;
pub mod weights;

pub use backend::{Backend, BackendChoice};
pub use cache::{CacheStrategy, KvCache, LayerSlot, PREFIX_BLOCK_TOKENS, PrefixBlock, PrefixCapture, PrefixLayout};
pub use config::{Architecture, HuginnConfig};
pub use cpu::{Kernel as Bf16Kernel, Linear as CpuLinear, amx_peak_loop, attention_time, bf16_kernel_description};
pub use error::{ModelError, Result};
pub use exit::{ExitCheck, ExitCriterion, ExitKv, ExitRule, ExitTracker, GateExit};
pub use family::Family;
pub use huginn::{HuginnModel, LogitRows, dtype_name, parse_dtype};
pub use layers::Chunk;
pub use placement::{DTypeChoice, DeviceList, DeviceSpec, parse_device};
