//! Huginn-0125 recurrent-depth transformer (Geiping et al. 2025, arXiv 2502.05171).
//!
//! A prelude embeds the tokens, a core block is applied r times to a latent state, a coda decodes
//! the state into logits. The three stages are separate entry points so that a scheduler can run
//! many sequences at different recurrence steps in one batched pass. Weights are immutable and
//! shared; all per-sequence state (K/V cache, latent state) lives with the caller.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, RngExt};

use super::backend::{Backend, BackendChoice, Linear};
use super::cache::{CacheStrategy, KvCache};
use super::config::HuginnConfig;
use super::error::{ModelError, Result};
use super::layers::{Block, BlockShape, Chunk, RmsNorm, Rope, RopeSpec, RopeStyle, Stage};
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
    /// Adapter columns that multiply the latent state.
    adapter_state: Linear,
    /// Adapter columns that multiply the prelude output (applied once per token: the injection).
    adapter_input: Linear,
    adapter_bias: Option<Tensor>,
    core: Vec<Block>,
    coda: Vec<Block>,
    ln_f: RmsNorm,
    rope: Rope,
}

/// The checkpoint families in Huginn-0125's format (`RavenForCausalLM`), told apart by their
/// tensors: where their math differs, the model's parts differ (docs/DESIGN.md, "Checkpoint
/// families").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Huginn-0125: sandwich blocks (`norm_1`..`norm_4`), `qk_bias`, interleaved RoPE, embeddings
    /// times sqrt(n_embd), `ln_f` before and after the coda, tied head.
    Huginn0125,
    /// Retrofitted Llama / TinyLlama (McLeish et al. 2025): pre-norm blocks (`norm_1`, `norm_2`),
    /// grouped-query attention, rotate-half RoPE with `rope_theta` (and Llama-3 scaling),
    /// `init_values.embed_scale`, `ln_f` after the coda only, untied head.
    RetrofitLlama,
    /// Retrofitted OLMo-2: as retrofitted Llama, but post-norm blocks whose attention norms its
    /// queries and keys (`attn.q_norm`, `attn.k_norm`) before RoPE.
    RetrofitOlmo,
}

impl Family {
    /// The family of the checkpoint `w` holds (its first core block's tensors tell).
    pub fn detect(w: &WeightFiles) -> Result<Self> {
        let block = "transformer.core_block.0";
        Ok(if w.contains(&format!("{block}.norm_3.weight")) {
            Family::Huginn0125
        } else if w.contains(&format!("{block}.attn.q_norm.weight")) {
            Family::RetrofitOlmo
        } else {
            Family::RetrofitLlama
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Family::Huginn0125 => "huginn-0125",
            Family::RetrofitLlama => "retrofit-llama",
            Family::RetrofitOlmo => "retrofit-olmo",
        }
    }

    fn block_shape(&self) -> BlockShape {
        match self {
            Family::Huginn0125 => BlockShape::Sandwich,
            Family::RetrofitLlama => BlockShape::PreNorm,
            Family::RetrofitOlmo => BlockShape::PostNorm,
        }
    }

    fn rope(&self, cfg: &HuginnConfig) -> RopeSpec {
        match self {
            Family::Huginn0125 => RopeSpec::huginn_0125(cfg),
            Family::RetrofitLlama | Family::RetrofitOlmo => RopeSpec {
                base: cfg.rope_theta.unwrap_or(cfg.rope_base),
                scaling: cfg.rope_scaling,
                style: RopeStyle::RotateHalf,
            },
        }
    }

    fn embed_scale(&self, cfg: &HuginnConfig) -> f64 {
        match self {
            Family::Huginn0125 => (cfg.n_embd as f64).sqrt(),
            Family::RetrofitLlama | Family::RetrofitOlmo => cfg.init_values.and_then(|v| v.embed_scale).unwrap_or(1.0),
        }
    }
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
        let (wte, lm_head) = if w.contains("lm_head.weight") || !cfg.tie_embeddings {
            (Some(w.load_embedding("transformer.wte.weight", &[v, d])?), w.load_linear("lm_head.weight", &[v, d])?)
        } else {
            (None, w.load_linear("transformer.wte.weight", &[v, d])?)
        };
        let family = Family::detect(w)?;
        let shape = family.block_shape();
        let blocks = |stage: Stage, name: &str, count: usize| -> Result<Vec<Block>> {
            (0..count).map(|i| Block::load(w, &format!("transformer.{name}.{i}"), &cfg, shape, stage, i)).collect()
        };
        let adapter_bias = if cfg.bias { Some(w.load("transformer.adapter.bias", &[d])?) } else { None };
        let device = w.device().clone();
        Ok(Self {
            embed_scale: family.embed_scale(&cfg),
            family,
            prelude: blocks(Stage::Prelude, "prelude", cfg.n_layers_in_prelude)?,
            core: blocks(Stage::Core, "core_block", cfg.n_layers_in_recurrent_block)?,
            coda: blocks(Stage::Coda, "coda", cfg.n_layers_in_coda)?,
            adapter_state: w.load_linear_part("transformer.adapter.weight", &[d, 2 * d], 0..d, 0, 1.0)?,
            adapter_input: w.load_linear_part("transformer.adapter.weight", &[d, 2 * d], d..2 * d, 0, 1.0)?,
            adapter_bias,
            ln_f: RmsNorm::load(w, "transformer.ln_f.weight", &cfg)?,
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
    /// which every core step of that token adds to the state's projection.
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
        let injection = self.adapter_input.forward(&xs)?;
        Ok(match &self.adapter_bias {
            Some(bias) => injection.broadcast_add(bias)?,
            None => injection,
        })
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

    /// One recurrence step for every row: `s = core(adapter([s, e]))`, each chunk at its own
    /// `step` (which picks its cache slot).
    pub fn core_step(&self, state: &Tensor, injection: &Tensor, chunks: &mut [Chunk<'_>]) -> Result<Tensor> {
        self.check_rows(state.dim(0)?, chunks)?;
        let layout = self.rope.layout(chunks, self.backend)?;
        let mut xs = (self.adapter_state.forward(state)? + injection)?;
        for block in &self.core {
            xs = block.forward(&xs, &layout, chunks)?;
        }
        Ok(xs)
    }

    /// `ln_f` (Huginn-0125 only), the coda, `ln_f` again and the head; logits in float32.
    pub fn coda(&self, state: &Tensor, chunks: &mut [Chunk<'_>], rows: LogitRows) -> Result<Tensor> {
        self.check_rows(state.dim(0)?, chunks)?;
        let layout = self.rope.layout(chunks, self.backend)?;
        let mut xs = match self.family {
            Family::Huginn0125 => self.ln_f.forward(state)?,
            Family::RetrofitLlama | Family::RetrofitOlmo => state.clone(),
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
        let xs = self.ln_f.forward(&xs)?;
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
