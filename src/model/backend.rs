//! The backend seam: the few operations the model's layers need from kernels (linear layers,
//! attention over a ragged batch, residual add + RMSNorm, SwiGLU, K/V writes), and which kernels
//! run them, chosen once at load from the device, the dtype and the `model.backend` setting.
//!
//! Two kernel sets exist: the CPU kernels (`cpu/`: packed weights, AMX tiles, fused passes, all
//! batch-invariant) and the tensor backend (`tensor/`: candle tensor ops only, what CUDA and Metal
//! run, and what `model.backend = "tensor"` forces on the CPU). A device path of its own (a CUDA
//! attention kernel, Metal) is one folder beside them and one arm in each match below.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};
use super::{cpu, tensor};

/// The `model.backend` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BackendChoice {
    /// The CPU kernels on the CPU (float32 or bfloat16 weights), tensor ops elsewhere.
    #[default]
    Auto,
    /// Tensor ops everywhere (the device path, also on the CPU).
    Tensor,
}

impl FromStr for BackendChoice {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "tensor" => Ok(Self::Tensor),
            _ => Err(ModelError::InvalidArgument(format!("backend `{s}`: use `auto` or `tensor`"))),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Tensor => "tensor",
        })
    }
}

/// The kernels a loaded model runs on, with the dtype of its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The CPU kernels: float32 activations; weights, embedding table and K/V in float32 or, with
    /// `bf16`, in bfloat16.
    Cpu { bf16: bool },
    /// Tensor ops, everything in `dtype`.
    Tensor { dtype: DType },
}

impl Backend {
    /// The kernels for weights in `dtype` on `device`.
    pub fn choose(choice: BackendChoice, device: &Device, dtype: DType) -> Self {
        match choice {
            BackendChoice::Auto if device.is_cpu() && matches!(dtype, DType::F32 | DType::BF16) => {
                Self::Cpu { bf16: dtype == DType::BF16 }
            }
            _ => Self::Tensor { dtype },
        }
    }

    /// `cpu` or `tensor`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu { .. } => "cpu",
            Self::Tensor { .. } => "tensor",
        }
    }

    /// The dtype the weights are stored in.
    pub fn weights_dtype(&self) -> DType {
        match self {
            Self::Cpu { bf16: true } => DType::BF16,
            Self::Cpu { bf16: false } => DType::F32,
            Self::Tensor { dtype } => *dtype,
        }
    }

    /// The dtype of the latent state, the activations, norms and biases.
    pub fn activation_dtype(&self) -> DType {
        match self {
            Self::Cpu { .. } => DType::F32,
            Self::Tensor { dtype } => *dtype,
        }
    }

    /// The dtype of the K/V cache: the weights' (bfloat16 K/V on the CPU too, half the bytes that
    /// attention reads each step).
    pub fn kv_dtype(&self) -> DType {
        self.weights_dtype()
    }

    /// The dimension of positions in a K/V buffer: `[heads, capacity, head_dim]` for the CPU
    /// kernels (each head's rows contiguous, as their attention reads them), `[capacity, heads,
    /// head_dim]` for tensor ops (a sequence's visible keys are one contiguous block to gather).
    pub fn kv_positions_dim(&self) -> usize {
        match self {
            Self::Cpu { .. } => 1,
            Self::Tensor { .. } => 0,
        }
    }

    /// Whether a row's results are the same bits whatever else shares its batch (the CPU kernels
    /// are written so; library GEMMs and softmaxes need not be).
    pub fn batch_invariant(&self) -> bool {
        matches!(self, Self::Cpu { .. })
    }

    /// A linear layer over a `[out, in]` weight (packed now for the CPU kernels).
    pub fn linear(&self, weight: Tensor) -> Result<Linear> {
        Ok(Linear(match self {
            Self::Cpu { bf16 } => LinearWeight::Cpu(cpu::Linear::new(&weight, *bf16)?),
            Self::Tensor { dtype } => LinearWeight::Tensor(weight.to_dtype(*dtype)?),
        }))
    }

    /// Whether [`Self::linear_from_bf16_rows`] is available: the kernels pack a bfloat16 weight
    /// as its rows are read, with no copy of the whole weight in memory.
    pub fn packs_bf16_rows(&self) -> bool {
        matches!(self, Self::Cpu { bf16: true })
    }

    /// A linear layer over a bfloat16 `[n, k]` weight that `read(first, rows)` supplies in blocks
    /// of whole rows (`rows.len() / k` rows from row `first`), as bfloat16 bits.
    pub fn linear_from_bf16_rows(
        &self,
        n: usize,
        k: usize,
        read: impl Fn(usize, &mut [u16]) -> Result<()> + Sync,
    ) -> Result<Linear> {
        match self {
            Self::Cpu { bf16: true } => Ok(Linear(LinearWeight::Cpu(cpu::Linear::from_bf16_rows(n, k, read)?))),
            _ => Err(ModelError::InvalidArgument(format!("the {self:?} backend does not pack bfloat16 rows"))),
        }
    }

    /// `rms_norm(a + b, weight, eps)` over the last dimension.
    pub fn add_rms_norm(&self, a: &Tensor, b: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        match self {
            Self::Cpu { .. } => cpu::add_rms_norm(a, b, weight, eps),
            Self::Tensor { .. } => tensor::add_rms_norm(a, b, weight, eps),
        }
    }

    /// `silu(gate) * up` over `[gate | up]` rows.
    pub fn swiglu(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Cpu { .. } => cpu::swiglu(xs),
            Self::Tensor { .. } => tensor::swiglu(xs),
        }
    }

    /// Writes `rows` (`[n, heads, head_dim]`) into a K/V `buffer` (laid out as
    /// [`Self::kv_positions_dim`] says) at positions `start..start + n`.
    pub fn write_kv(&self, buffer: &Tensor, rows: &Tensor, start: usize) -> Result<()> {
        match self {
            Self::Cpu { .. } => cpu::write_rows(buffer, rows, start),
            Self::Tensor { .. } => tensor::write_rows(buffer, rows, start),
        }
    }

    /// What attention needs to know about a call's chunks (`spans[c]` = first position and rows
    /// of chunk `c`), built once per entry-point call and shared by its layers.
    pub fn attention_plan(&self, spans: Vec<(usize, usize)>, device: &Device) -> Result<AttentionPlan> {
        Ok(match self {
            Self::Cpu { .. } => AttentionPlan::Rows(spans),
            Self::Tensor { .. } => AttentionPlan::Gathered(tensor::GatherPlan::new(&spans, device)?),
        })
    }

    /// Every row of `q` (`[tokens, heads, head_dim]`, already scaled) attends causally over its
    /// chunk's cached keys and values (`cached[c]`, up to the chunk's last position). Returns
    /// `[tokens, heads * head_dim]`.
    pub fn attend(&self, q: &Tensor, cached: &[(Tensor, Tensor)], plan: &AttentionPlan) -> Result<Tensor> {
        match plan {
            AttentionPlan::Rows(spans) => cpu::attend(q, spans, cached),
            AttentionPlan::Gathered(plan) => tensor::attend(q, cached, plan),
        }
    }
}

/// See [`Backend::attention_plan`].
pub enum AttentionPlan {
    /// The CPU kernels: each chunk's first position and rows.
    Rows(Vec<(usize, usize)>),
    /// Tensor ops: gather indices and masks.
    Gathered(tensor::GatherPlan),
}

/// A linear layer without bias, its weight prepared for its backend.
#[derive(Clone)]
pub struct Linear(LinearWeight);

#[derive(Clone)]
enum LinearWeight {
    Cpu(cpu::Linear),
    Tensor(Tensor),
}

impl Linear {
    /// `xs @ W^T` over the last dimension of `xs`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.0 {
            LinearWeight::Cpu(linear) => linear.forward(xs),
            LinearWeight::Tensor(weight) => tensor::linear(xs, weight),
        }
    }

    /// Rows `ids` of the `[out, in]` weight, `[ids.len(), in]` in the weight's values (float32
    /// on the CPU kernels): an embedding lookup in a table tied to an output head, so the table
    /// is held once.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.0 {
            LinearWeight::Cpu(linear) => linear.rows(ids),
            LinearWeight::Tensor(weight) => {
                let n = weight.dim(0)?;
                if let Some(id) = ids.iter().find(|&&id| id as usize >= n) {
                    return Err(ModelError::InvalidArgument(format!("row {id} of a weight with {n} rows")));
                }
                Ok(weight.embedding(&Tensor::new(ids, weight.device())?)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_cpu_kernels_for_float32_and_bfloat16_on_the_cpu_only() {
        let cpu = Device::Cpu;
        assert_eq!(Backend::choose(BackendChoice::Auto, &cpu, DType::F32), Backend::Cpu { bf16: false });
        assert_eq!(Backend::choose(BackendChoice::Auto, &cpu, DType::BF16), Backend::Cpu { bf16: true });
        assert_eq!(Backend::choose(BackendChoice::Auto, &cpu, DType::F16), Backend::Tensor { dtype: DType::F16 });
        let forced = Backend::choose(BackendChoice::Tensor, &cpu, DType::F32);
        assert_eq!(forced, Backend::Tensor { dtype: DType::F32 });
        assert_eq!((forced.kv_positions_dim(), forced.batch_invariant()), (0, false));
        assert_eq!("TENSOR".parse::<BackendChoice>().unwrap(), BackendChoice::Tensor);
        assert!("cuda".parse::<BackendChoice>().is_err());
    }
}
