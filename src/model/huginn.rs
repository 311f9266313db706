//! Huginn-0125 recurrent-depth transformer (Geiping et al. 2025, arXiv 2502.05171).
//!
//! A prelude embeds the tokens, a core block is applied r times to a latent state, a coda decodes
//! the state into logits. The three stages are separate entry points so that a scheduler can run
//! many sequences at different recurrence steps in one batched pass. Weights are immutable and
//! shared; all per-sequence state (K/V cache, latent state) lives with the caller.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, RngExt, SeedableRng};

use super::backend::{Backend, BackendChoice, Linear};
use super::cache::{CacheStrategy, KvCache};
use super::config::HuginnConfig;
use super::error::{ModelError, Result};
use super::family::{Family, FinalNorm};
use super::layers::{Block, Chunk, RmsNorm, Rope, Stage};
use super::weights::{WeightFiles, read_text};

pub struct HuginnModel {
    cfg: HuginnConfig,
    device: Device,
    /// The kernels, and the dtypes of weights, activations and K/V.
    backend: Backend,
    embed_scale: f64,
    /// The embedding table; `None` when it is tied to the output head, whose rows it then reads
    /// (the table is held once, in the head's packed form).
    wte: Option<Tensor>,
    lm_head: Linear,
    family: Family,
    prelude: Vec<Block>,
    /// Huginn's adapter (`None`: Ouro's loops take the state alone).
    adapter: Option<Adapter>,
    core: Vec<Block>,
    coda: Vec<Block>,
    ln_f: RmsNorm,
    /// Ouro's learned exit gate.
    gate: Option<ExitGate>,
    rope: Rope,
}

/// The adapter `W [s, e] + b` of Huginn's core step, split by the columns it multiplies.
struct Adapter {
    /// Columns that multiply the latent state.
    state: Linear,
    /// Columns that multiply the prelude output (applied once per token: the injection).
    input: Linear,
    bias: Option<Tensor>,
}

/// `λ = sigmoid(w · h + b)`, the probability of exiting after the loop whose output is h, in
/// float32.
struct ExitGate {
    /// `[d, 1]`, float32.
    weight: Tensor,
    bias: f32,
}

/// Which rows of the coda output become logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// The last position of each chunk: `[chunks, vocab]`.
    Last,
    /// Every position: `[tokens, vocab]`.
    All,
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "half" => Ok(DType::F16),
        other => Err(ModelError::UnsupportedDtype(other.to_string())),
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "other",
    }
}

impl HuginnModel {
    /// Loads `config.json` and the safetensors weights of `dir` onto `device` in `dtype`, with the
    /// default kernels for them.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, Some(dtype), BackendChoice::Auto)
    }

    /// Loads a checkpoint in `dtype` (`None`: the checkpoint's own `torch_dtype`, float32 when it
    /// names none) onto `device`, with the kernels `backend` picks for them.
    pub fn load_with(dir: &Path, device: &Device, dtype: Option<DType>, backend: BackendChoice) -> Result<Self> {
        let cfg = HuginnConfig::from_json_str(&read_text(&dir.join("config.json"))?, "config.json")?;
        let dtype = match dtype {
            Some(dtype) => dtype,
            None => cfg.torch_dtype.as_deref().map(parse_dtype).transpose()?.unwrap_or(DType::F32),
        };
        let weights = WeightFiles::open(dir, Backend::choose(backend, device, dtype), device)?;
        Self::from_weights(cfg, &weights)
    }

    pub fn from_weights(cfg: HuginnConfig, w: &WeightFiles) -> Result<Self> {
        let (d, v) = (cfg.n_embd, cfg.vocab_size);
        let family = Family::detect(&cfg, w)?;
        let names = family.names();
        let (wte, lm_head) = if w.contains("lm_head.weight") || !cfg.tie_embeddings {
            (Some(w.load_embedding(names.embedding, &[v, d])?), w.load_linear("lm_head.weight", &[v, d])?)
        } else {
            (None, w.load_linear(names.embedding, &[v, d])?)
        };
        let shape = family.block_shape();
        let blocks = |stage: Stage, count: usize| -> Result<Vec<Block>> {
            (0..count).map(|i| Block::load(w, &family.block_prefix(stage, i), &cfg, shape, stage, i)).collect()
        };
        let adapter = if family.has_adapter() {
            let name = "transformer.adapter.weight";
            Some(Adapter {
                state: w.load_linear_part(name, &[d, 2 * d], 0..d, 0, 1.0)?,
                input: w.load_linear_part(name, &[d, 2 * d], d..2 * d, 0, 1.0)?,
                bias: if cfg.bias { Some(w.load("transformer.adapter.bias", &[d])?) } else { None },
            })
        } else {
            None
        };
        let gate = match names.gate {
            Some((weight, bias)) => Some(ExitGate {
                weight: w.load_as(weight, &[1, d], DType::F32)?.reshape((d, 1))?,
                bias: w.load_as(bias, &[1], DType::F32)?.to_vec1::<f32>()?[0],
            }),
            None => None,
        };
        let device = w.device().clone();
        Ok(Self {
            embed_scale: family.embed_scale(&cfg),
            family,
            prelude: blocks(Stage::Prelude, cfg.n_layers_in_prelude)?,
            core: blocks(Stage::Core, cfg.n_layers_in_recurrent_block)?,
            coda: blocks(Stage::Coda, cfg.n_layers_in_coda)?,
            adapter,
            ln_f: RmsNorm::load(w, names.final_norm, &cfg)?,
            gate,
            rope: Rope::new(&cfg, family.rope(&cfg), &device)?,
            backend: w.backend(),
            device,
            wte,
            lm_head,
            cfg,
        })
    }

    pub fn config(&self) -> &HuginnConfig {
        &self.cfg
    }

    /// The checkpoint family the model was loaded as.
    pub fn family(&self) -> Family {
        self.family
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The kernels the model runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.backend.weights_dtype()
    }

    /// The dtype of the latent state and the activations: the weights' dtype, except float32 for
    /// bfloat16 weights on the CPU kernels.
    pub fn activation_dtype(&self) -> DType {
        self.backend.activation_dtype()
    }

    /// The dtype of the K/V cache: the weights' dtype (bfloat16 K/V on the CPU too, half the bytes
    /// that attention reads each step).
    pub fn kv_dtype(&self) -> DType {
        self.backend.kv_dtype()
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self, strategy: CacheStrategy) -> KvCache {
        KvCache::new(&self.cfg, strategy, self.backend, &self.device)
    }

    /// Embeds `ids` (the tokens of all chunks, in chunk order), runs the prelude and returns each
    /// token's injection `[tokens, d]`: the prelude output through the adapter's input columns,
    /// which every core step of that token adds to the state's projection. Without an adapter
    /// (Ouro), the embeddings: the first loop's input ([`Self::initial_state`]).
    pub fn prelude(&self, ids: &[u32], chunks: &mut [Chunk<'_>]) -> Result<Tensor> {
        self.check_rows(ids.len(), chunks)?;
        for &id in ids {
            if id as usize >= self.cfg.vocab_size {
                return Err(ModelError::TokenOutOfRange { id, vocab: self.cfg.vocab_size });
            }
        }
        if let Some(c) = chunks.iter().find(|c| c.start != c.cache.len()) {
            return Err(ModelError::InvalidArgument(format!(
                "new tokens must start at position {}, got {}",
                c.cache.len(),
                c.start
            )));
        }
        for chunk in chunks.iter_mut() {
            chunk.cache.begin_tokens(chunk.start, chunk.len)?;
        }
        let layout = self.rope.layout(chunks, self.backend)?;
        let embedded = match &self.wte {
            Some(wte) => wte.embedding(&Tensor::new(ids, &self.device)?)?,
            None => self.lm_head.rows(ids)?,
        };
        let mut xs = (embedded.to_dtype(self.activation_dtype())? * self.embed_scale)?;
        for block in &self.prelude {
            xs = block.forward(&xs, &layout, chunks)?;
        }
        let Some(adapter) = &self.adapter else {
            return Ok(xs);
        };
        let injection = adapter.input.forward(&xs)?;
        Ok(match &adapter.bias {
            Some(bias) => injection.broadcast_add(bias)?,
            None => injection,
        })
    }

    /// The state the core steps of a chunk start from, given its injection: a draw of
    /// [`Self::init_state`] (Huginn's random or zero state), or, without an adapter (Ouro), the
    /// embeddings themselves (`init_scale` does not apply).
    pub fn initial_state(&self, injection: &Tensor, init_scale: f64, rng: &mut impl Rng) -> Result<Tensor> {
        match self.adapter {
            Some(_) => self.init_state(injection.dim(0)?, init_scale, rng),
            None => Ok(injection.clone()),
        }
    }

    /// The initial latent state of prompt positions whose noise is content-addressed: row `i` is
    /// drawn from a generator seeded with `seeds[i]` (a hash of the prompt up to and including
    /// the position), so a prompt's encoding does not depend on the request (Ouro: the embeddings).
    pub fn initial_state_seeded(&self, injection: &Tensor, init_scale: f64, seeds: &[u64]) -> Result<Tensor> {
        if self.adapter.is_none() {
            return Ok(injection.clone());
        }
        if init_scale <= 0.0 {
            return self.init_state(seeds.len(), init_scale, &mut rand::rngs::StdRng::seed_from_u64(0));
        }
        let rows = seeds
            .iter()
            .map(|&seed| self.init_state(1, init_scale, &mut rand::rngs::StdRng::seed_from_u64(seed)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Initial latent state for `rows` tokens: truncated normal (±3σ) with
    /// `σ = init_values.std · init_scale` (`init_values.std` defaults to sqrt(2 / 5d)), times the
    /// embedding scale; zeros when `init_scale` is 0.
    pub fn init_state(&self, rows: usize, init_scale: f64, rng: &mut impl Rng) -> Result<Tensor> {
        let d = self.cfg.n_embd;
        let std = self.cfg.state_std() * init_scale;
        if std <= 0.0 {
            return Ok(Tensor::zeros((rows, d), self.activation_dtype(), &self.device)?);
        }
        let values: Vec<f32> = (0..rows * d).map(|_| (truncated_normal(rng) * std * self.embed_scale) as f32).collect();
        Ok(Tensor::from_vec(values, (rows, d), &self.device)?.to_dtype(self.activation_dtype())?)
    }

    /// One recurrence step for every row: `s = core(adapter([s, e]))` (Ouro: `s = norm(core(s))`),
    /// each chunk at its own `step` (which picks its cache slot).
    pub fn core_step(&self, state: &Tensor, injection: &Tensor, chunks: &mut [Chunk<'_>]) -> Result<Tensor> {
        self.check_rows(state.dim(0)?, chunks)?;
        let layout = self.rope.layout(chunks, self.backend)?;
        let mut xs = match &self.adapter {
            Some(adapter) => (adapter.state.forward(state)? + injection)?,
            None => state.clone(),
        };
        for block in &self.core {
            xs = block.forward(&xs, &layout, chunks)?;
        }
        match self.family.final_norm() {
            FinalNorm::AfterEachStep => self.ln_f.forward(&xs),
            FinalNorm::AroundCoda | FinalNorm::AfterCoda => Ok(xs),
        }
    }

    /// Whether the model has a learned exit gate ([`Self::exit_gate`]).
    pub fn has_exit_gate(&self) -> bool {
        self.gate.is_some()
    }

    /// The exit gate's probability `λ` for each row of a core step's output, in float32; `None`
    /// on a model without a gate.
    pub fn exit_gate(&self, state: &Tensor) -> Result<Option<Vec<f32>>> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        let logits = state.to_dtype(DType::F32)?.matmul(&gate.weight)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(logits.into_iter().map(|g| 1.0 / (1.0 + (-(g + gate.bias)).exp())).collect()))
    }

    /// `ln_f` (Huginn-0125 only), the coda, `ln_f` again (not for Ouro, whose state is normed
    /// already) and the head; logits in float32.
    pub fn coda(&self, state: &Tensor, chunks: &mut [Chunk<'_>], rows: LogitRows) -> Result<Tensor> {
        self.check_rows(state.dim(0)?, chunks)?;
        let layout = self.rope.layout(chunks, self.backend)?;
        let final_norm = self.family.final_norm();
        let mut xs = match final_norm {
            FinalNorm::AroundCoda => self.ln_f.forward(state)?,
            FinalNorm::AfterCoda | FinalNorm::AfterEachStep => state.clone(),
        };
        for block in &self.coda {
            xs = block.forward(&xs, &layout, chunks)?;
        }
        let xs = match rows {
            LogitRows::All => xs,
            LogitRows::Last => {
                let mut end = 0;
                let picks: Vec<u32> = chunks
                    .iter()
                    .map(|c| {
                        end += c.len;
                        (end - 1) as u32
                    })
                    .collect();
                if picks.len() == 1 && picks[0] as usize + 1 == xs.dim(0)? {
                    xs.narrow(0, picks[0] as usize, 1)?
                } else {
                    xs.index_select(&Tensor::new(picks.as_slice(), &self.device)?, 0)?
                }
            }
        };
        let xs = match final_norm {
            FinalNorm::AroundCoda | FinalNorm::AfterCoda => self.ln_f.forward(&xs)?,
            FinalNorm::AfterEachStep => xs,
        };
        Ok(self.lm_head.forward(&xs)?.to_dtype(DType::F32)?)
    }

    fn check_rows(&self, rows: usize, chunks: &[Chunk<'_>]) -> Result<()> {
        let total: usize = chunks.iter().map(|c| c.len).sum();
        if total != rows || chunks.iter().any(|c| c.len == 0) {
            return Err(ModelError::InvalidArgument(format!(
                "{rows} rows given for chunks covering {total} positions"
            )));
        }
        if let Some(c) = chunks.iter().find(|c| c.start + c.len > self.cfg.block_size) {
            return Err(ModelError::ContextOverflow { needed: c.start + c.len, limit: self.cfg.block_size });
        }
        Ok(())
    }
}

/// Standard normal truncated to ±3 (rejection sampling, Box-Muller).
pub(crate) fn truncated_normal(rng: &mut impl Rng) -> f64 {
    loop {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        if z.abs() <= 3.0 {
            return z;
        }
    }
}
