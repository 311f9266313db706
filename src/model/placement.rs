//! Where and in what a model is loaded: the `model.device(s)`, `model.dtype` and `model.backend`
//! settings as types, parsed when settings are read (a bad value stops start-up naming its key).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::backend::BackendChoice;
use super::error::{ModelError, Result};

/// One device entry: `cpu`, `cuda` (= `cuda:0`), `cuda:N`, or `cuda:all` (every visible GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    CudaAll,
}

impl FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "cuda:all" => Ok(Self::CudaAll),
            other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
                Some(ordinal) => Ok(Self::Cuda(ordinal)),
                None => {
                    Err(ModelError::InvalidArgument(format!("device `{other}`: use cpu, cuda, cuda:N or cuda:all")))
                }
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::CudaAll => f.write_str("cuda:all"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device (CUDA needs a build with `--features cuda`).
    pub fn open(&self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) if cfg!(feature = "cuda") => Ok(Device::new_cuda(*n)?),
            Self::Cuda(_) => Err(ModelError::InvalidArgument(format!(
                "`{self}`: this build has no CUDA support (build with --features cuda)"
            ))),
            Self::CudaAll => Err(ModelError::InvalidArgument("`cuda:all` names many devices: expand it first".into())),
        }
    }

    /// The entries with `cuda:all` replaced by every visible GPU, in order.
    pub fn expand(specs: &[DeviceSpec]) -> Result<Vec<DeviceSpec>> {
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            match spec {
                Self::CudaAll => {
                    let count = cuda_device_count()?;
                    if count == 0 {
                        return Err(ModelError::InvalidArgument("`cuda:all`: no CUDA device is visible".into()));
                    }
                    out.extend((0..count).map(Self::Cuda));
                }
                other => out.push(*other),
            }
        }
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let count = (|| {
        result::init()?;
        result::device::get_count()
    })()
    .map_err(|e| ModelError::InvalidArgument(format!("`cuda:all`: counting CUDA devices failed: {e}")))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> Result<usize> {
    Err(ModelError::InvalidArgument("`cuda:all`: this build has no CUDA support (build with --features cuda)".into()))
}

/// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
pub fn parse_device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>()?.open()
}

/// The `model.devices` list: a TOML array, or one string of comma-separated entries (as
/// `HUGINN_MODEL_DEVICES=cuda:0,cuda:1` gives).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "DeviceListInput", into = "Vec<DeviceSpec>")]
pub struct DeviceList(pub Vec<DeviceSpec>);

#[derive(Deserialize)]
#[serde(untagged)]
enum DeviceListInput {
    List(Vec<String>),
    Text(String),
}

impl TryFrom<DeviceListInput> for DeviceList {
    type Error = ModelError;
    fn try_from(input: DeviceListInput) -> Result<Self> {
        let entries: Vec<String> = match input {
            DeviceListInput::List(list) => list,
            DeviceListInput::Text(text) if text.trim().is_empty() => Vec::new(),
            DeviceListInput::Text(text) => text.split(',').map(str::to_string).collect(),
        };
        Ok(Self(entries.iter().map(|e| e.parse()).collect::<Result<_>>()?))
    }
}

impl From<DeviceList> for Vec<DeviceSpec> {
    fn from(list: DeviceList) -> Self {
        list.0
    }
}

/// `model.dtype`: `auto` (the checkpoint's `torch_dtype`) or a fixed dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DTypeChoice {
    #[default]
    Auto,
    Fixed(DType),
}

impl FromStr for DTypeChoice {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        match super::huginn::parse_dtype(s) {
            Ok(dtype) => Ok(Self::Fixed(dtype)),
            Err(_) => Err(ModelError::InvalidArgument(format!("dtype `{s}`: use auto, f32, bf16 or f16"))),
        }
    }
}

impl fmt::Display for DTypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(DType::BF16) => f.write_str("bf16"),
            Self::Fixed(DType::F16) => f.write_str("f16"),
            Self::Fixed(_) => f.write_str("f32"),
        }
    }
}

impl DTypeChoice {
    /// The fixed dtype, `None` for `auto`.
    pub fn fixed(&self) -> Option<DType> {
        match self {
            Self::Auto => None,
            Self::Fixed(dtype) => Some(*dtype),
        }
    }
}

string_setting!(DeviceSpec, DTypeChoice, BackendChoice);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_entries_parse_and_print_back() {
        for (text, spec) in
            [("cpu", DeviceSpec::Cpu), ("cuda:1", DeviceSpec::Cuda(1)), ("cuda:all", DeviceSpec::CudaAll)]
        {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        for bad in ["gpu", "cuda:x", "cuda:", ""] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
        assert_eq!(DeviceSpec::expand(&[DeviceSpec::Cpu, DeviceSpec::Cpu]).unwrap().len(), 2);
    }

    #[test]
    fn dtype_choices_parse() {
        assert_eq!("auto".parse::<DTypeChoice>().unwrap(), DTypeChoice::Auto);
        assert_eq!("bf16".parse::<DTypeChoice>().unwrap(), DTypeChoice::Fixed(DType::BF16));
        assert_eq!(DTypeChoice::Fixed(DType::F32).to_string(), "f32");
        assert!("int8".parse::<DTypeChoice>().is_err());
    }
}
