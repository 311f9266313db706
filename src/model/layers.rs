//! The layers of a Huginn "sandwich" block, run over a ragged batch: the rows of several sequences
//! (each a chunk of consecutive positions, with its own cache) stacked into one `[tokens, d]` matrix.
//! This is the model's math only: every kernel is the backend's ([`Backend`]). Linear layers see
//! the whole matrix at once; attention writes each chunk's keys and values into its cache and
//! attends over the ragged batch in one backend call.

use candle_core::{DType, Device, Tensor};

use super::backend::{AttentionPlan, Backend, Linear};
use super::cache::{KvCache, LayerSlot};
use super::config::{HuginnConfig, RopeScaling};
use super::error::Result;
use super::weights::WeightFiles;

/// One sequence's rows in a batched call: positions `start..start + len`, at recurrence step `step`
/// (used by core layers to pick the cache slot).
pub struct Chunk<'a> {
    pub cache: &'a mut KvCache,
    pub start: usize,
    pub len: usize,
    pub step: usize,
}

/// Which stage a layer belongs to, to name its cache slot.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    Prelude,
    Core,
    Coda,
}

/// Per-call data shared by every layer: rotary tables gathered for each row, and the backend's
/// attention plan (for tensor ops: gather indices and masks, built once per call).
pub struct BatchLayout {
    /// `[tokens, 1, head_dim / 2]` cos and sin of each row's position.
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
    attention: AttentionPlan,
}

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i + 1): Huginn-0125.
    Interleaved,
    /// Dimension i with i + head_dim / 2: Llama (and retrofitted Llama checkpoints).
    RotateHalf,
}

/// How a family applies RoPE: its base, its frequency scaling and its layout.
#[derive(Debug, Clone, Copy)]
pub struct RopeSpec {
    pub base: f64,
    pub scaling: Option<RopeScaling>,
    pub style: RopeStyle,
}

impl RopeSpec {
    /// Huginn-0125's: `rope_base`, no scaling, interleaved pairs.
    pub fn huginn_0125(cfg: &HuginnConfig) -> Self {
        Self { base: cfg.rope_base, scaling: None, style: RopeStyle::Interleaved }
    }
}

/// Rotary embedding tables, float32, `[block_size, head_dim / 2]`.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

/// Llama-3 frequency scaling of one inverse frequency, in float32 as the reference computes it.
fn llama3_scaled(inv_freq: f32, s: &RopeScaling) -> f32 {
    let (factor, low, high, original) = (
        s.factor as f32,
        s.low_freq_factor as f32,
        s.high_freq_factor as f32,
        s.original_max_position_embeddings as f32,
    );
    let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
    if wavelen < original / high {
        inv_freq
    } else if wavelen > original / low {
        inv_freq / factor
    } else {
        let smooth = (original / wavelen - low) / (high - low);
        (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    }
}

impl Rope {
    pub fn new(cfg: &HuginnConfig, spec: RopeSpec, device: &Device) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let hd = cfg.head_dim() as f32;
        let base = spec.base as f32;
        // Same float32 recipe as the references: inv_freq = 1 / base^(2i/hd) (then scaled, for
        // Llama-3), angle = pos * inv_freq.
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / hd))
            .map(|f| spec.scaling.as_ref().map_or(f, |s| llama3_scaled(f, s)))
            .collect();
        let mut cos = Vec::with_capacity(cfg.block_size * half);
        let mut sin = Vec::with_capacity(cfg.block_size * half);
        for pos in 0..cfg.block_size {
            for f in &inv {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (cfg.block_size, half), device)?,
            sin: Tensor::from_vec(sin, (cfg.block_size, half), device)?,
            style: spec.style,
        })
    }

    /// The `[block_size, head_dim / 2]` cos and sin tables.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// The layout of a call over `chunks`: one gather of each table by the rows' positions.
    pub fn layout(&self, chunks: &[Chunk<'_>], backend: Backend) -> Result<BatchLayout> {
        let positions: Vec<u32> = chunks.iter().flat_map(|c| (c.start..c.start + c.len).map(|p| p as u32)).collect();
        let device = self.cos.device();
        let index = Tensor::new(positions.as_slice(), device)?;
        let gather = |table: &Tensor| -> Result<Tensor> {
            let rows = table.index_select(&index, 0)?;
            Ok(rows.reshape((positions.len(), 1, rows.dim(1)?))?)
        };
        let spans = chunks.iter().map(|c| (c.start, c.len)).collect();
        Ok(BatchLayout {
            cos: gather(&self.cos)?,
            sin: gather(&self.sin)?,
            style: self.style,
            attention: backend.attention_plan(spans, device)?,
        })
    }
}

/// RMSNorm: `x * rsqrt(mean(x²) + eps) * weight`.
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
    backend: Backend,
}

impl RmsNorm {
    pub fn load(w: &WeightFiles, name: &str, cfg: &HuginnConfig) -> Result<Self> {
        Self::load_scaled(w, name, cfg.n_embd, 1.0, cfg)
    }

    /// A norm over `width` values whose weight is multiplied by `scale` (a constant factor after
    /// the norm, such as the attention scale on queries).
    fn load_scaled(w: &WeightFiles, name: &str, width: usize, scale: f64, cfg: &HuginnConfig) -> Result<Self> {
        let mut weight = w.load(name, &[width])?;
        if scale != 1.0 {
            weight = (weight * scale)?;
        }
        Ok(Self { weight, eps: cfg.norm_eps as f32, backend: w.backend() })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(xs, &self.weight, self.eps)?)
    }

    /// `forward(a + b)` (in one pass on the CPU).
    pub fn forward_sum(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.backend.add_rms_norm(a, b, &self.weight, self.eps)
    }
}

/// What a family does to the projected queries and keys before RoPE.
enum QkStep {
    Nothing,
    /// Huginn-0125's bias, `[2d]`: query bias (scaled) then key bias, flattened.
    Bias(Tensor),
    /// OLMo-2's norms over all query and all key values (the query one carries the attention scale).
    Norm(RmsNorm, RmsNorm),
}

struct Attention {
    wqkv: Linear,
    /// What the queries and keys get before RoPE.
    qk: QkStep,
    proj: Linear,
    heads: usize,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    kv_heads: usize,
    head_dim: usize,
    backend: Backend,
}

impl Attention {
    /// The attention of block `prefix`, in the tensor names of its shape's family: Huginn's
    /// fused `attn.Wqkv` and `attn.proj`, or Ouro's `self_attn.{q,k,v,o}_proj` (stacked into one
    /// layer as they load).
    fn load(w: &WeightFiles, prefix: &str, cfg: &HuginnConfig, shape: BlockShape) -> Result<Self> {
        let d = cfg.n_embd;
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let with_qk_norm = shape == BlockShape::PostNorm;
        // The attention scale 1/sqrt(hd) is folded into the query rows of Wqkv and the query bias
        // (RoPE is linear, so scaling before it equals scaling the rotated queries), or, where a
        // norm follows the projection (which would undo it), into the query norm's weight.
        let scale = 1.0 / (hd as f64).sqrt();
        let (scaled_rows, wqkv_scale) = if with_qk_norm { (0, 1.0) } else { (h * hd, scale as f32) };
        let (wqkv, proj) = if shape == BlockShape::FourNorm {
            let name = |p: &str| format!("{prefix}.self_attn.{p}_proj.weight");
            let (q, k, v) = (name("q"), name("k"), name("v"));
            let parts = [(q.as_str(), h * hd), (k.as_str(), kv * hd), (v.as_str(), kv * hd)];
            (w.load_linear_stacked(&parts, d, scaled_rows, wqkv_scale)?, name("o"))
        } else {
            let rows = (h + 2 * kv) * hd;
            let name = format!("{prefix}.attn.Wqkv.weight");
            (
                w.load_linear_part(&name, &[rows, d], 0..d, scaled_rows, wqkv_scale)?,
                format!("{prefix}.attn.proj.weight"),
            )
        };
        let prefix = format!("{prefix}.attn");
        let prefix = prefix.as_str();
        let qk = if cfg.qk_bias {
            let bias = w.load(&format!("{prefix}.qk_bias"), &[2, 1, h, hd])?.reshape(2 * d)?;
            let factors: Vec<f32> = (0..2 * d).map(|i| if i < d { scale as f32 } else { 1.0 }).collect();
            let factors = Tensor::from_vec(factors, 2 * d, bias.device())?.to_dtype(bias.dtype())?;
            QkStep::Bias((bias * factors)?)
        } else if with_qk_norm {
            let q = RmsNorm::load_scaled(w, &format!("{prefix}.q_norm.weight"), h * hd, scale, cfg)?;
            let k = RmsNorm::load_scaled(w, &format!("{prefix}.k_norm.weight"), kv * hd, 1.0, cfg)?;
            QkStep::Norm(q, k)
        } else {
            QkStep::Nothing
        };
        Ok(Self {
            wqkv,
            qk,
            proj: w.load_linear(&proj, &[d, h * hd])?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
            backend: w.backend(),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        layout: &BatchLayout,
        chunks: &mut [Chunk<'_>],
        stage: Stage,
        layer: usize,
    ) -> Result<Tensor> {
        let tokens = xs.dim(0)?;
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = self.wqkv.forward(xs)?;
        let qk = match &self.qk {
            QkStep::Nothing => qkv.narrow(1, 0, (h + kv) * hd)?.contiguous()?,
            QkStep::Bias(bias) => qkv.narrow(1, 0, (h + kv) * hd)?.broadcast_add(bias)?,
            QkStep::Norm(q_norm, k_norm) => {
                let q = q_norm.forward(&qkv.narrow(1, 0, h * hd)?.contiguous()?)?;
                let k = k_norm.forward(&qkv.narrow(1, h * hd, kv * hd)?.contiguous()?)?;
                Tensor::cat(&[&q, &k], 1)?
            }
        };
        // RoPE in float32 on q and k together: each row is a "batch" of H + KV heads at one position.
        let dtype = qk.dtype();
        let qk = qk.to_dtype(DType::F32)?.reshape((tokens, h + kv, 1, hd))?;
        let qk = match layout.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&qk, &layout.cos, &layout.sin)?,
            RopeStyle::RotateHalf => candle_nn::rotary_emb::rope(&qk, &layout.cos, &layout.sin)?,
        };
        let qk = qk.to_dtype(dtype)?.reshape((tokens, h + kv, hd))?;
        let q = qk.narrow(1, 0, h)?;
        let k = qk.narrow(1, h, kv)?;
        let v = qkv.narrow(1, (h + kv) * hd, kv * hd)?.reshape((tokens, kv, hd))?;

        let slot = |chunk: &Chunk<'_>| match stage {
            Stage::Prelude => LayerSlot::Prelude(layer),
            Stage::Core => LayerSlot::Core { layer, step: chunk.step },
            Stage::Coda => LayerSlot::Coda(layer),
        };
        // The new positions' keys and values go into each sequence's cache; `cached[c]` holds
        // chunk c's keys and values up to its last new position.
        let mut cached = Vec::with_capacity(chunks.len());
        let mut row = 0;
        for chunk in chunks.iter_mut() {
            let n = chunk.len;
            let slot = slot(chunk);
            cached.push(chunk.cache.append(slot, chunk.start, &k.narrow(0, row, n)?, &v.narrow(0, row, n)?)?);
            row += n;
        }
        let attended = self.backend.attend(&q, &cached, &layout.attention)?;
        self.proj.forward(&attended)
    }
}

struct GatedMlp {
    fc: Linear,
    proj: Linear,
    backend: Backend,
}

impl GatedMlp {
    /// The MLP of block `prefix`: Huginn's fused `mlp.fc` (gate rows, then up rows) and
    /// `mlp.proj`, or Ouro's `mlp.{gate,up,down}_proj`.
    fn load(w: &WeightFiles, prefix: &str, cfg: &HuginnConfig, shape: BlockShape) -> Result<Self> {
        let (d, i) = (cfg.n_embd, cfg.intermediate_size);
        let (fc, proj) = if shape == BlockShape::FourNorm {
            let name = |p: &str| format!("{prefix}.mlp.{p}_proj.weight");
            let (gate, up) = (name("gate"), name("up"));
            (w.load_linear_stacked(&[(gate.as_str(), i), (up.as_str(), i)], d, 0, 1.0)?, name("down"))
        } else {
            (w.load_linear(&format!("{prefix}.mlp.fc.weight"), &[2 * i, d])?, format!("{prefix}.mlp.proj.weight"))
        };
        Ok(Self { fc, proj: w.load_linear(&proj, &[d, i])?, backend: w.backend() })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // fc rows: first half gate, second half up.
        let gated = self.backend.swiglu(&self.fc.forward(xs)?)?;
        self.proj.forward(&gated)
    }
}

/// How a family arranges a block's norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockShape {
    /// Huginn-0125: `a = attn(norm_1(x)); x = norm_2(x + a); x = norm_4(x + mlp(norm_3(x)))`.
    Sandwich,
    /// Retrofitted Llama: `x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))`.
    PreNorm,
    /// Retrofitted OLMo-2: `x = x + norm_1(attn(x)); x = x + norm_2(mlp(x))`, with the queries and
    /// keys normed (`attn.q_norm`, `attn.k_norm`) before RoPE.
    PostNorm,
    /// Ouro: `x = x + input_layernorm_2(attn(input_layernorm(x)));
    /// x = x + post_attention_layernorm_2(mlp(post_attention_layernorm(x)))`.
    FourNorm,
}

/// One transformer block of the prelude, the core or the coda.
pub struct Block {
    norm_1: RmsNorm,
    attn: Attention,
    norm_2: RmsNorm,
    mlp: GatedMlp,
    /// The shape, with the norms only the sandwich has.
    shape: Norms,
    stage: Stage,
    layer: usize,
}

/// [`BlockShape`] with the third and fourth norms of the shapes that have four.
enum Norms {
    Sandwich {
        norm_3: RmsNorm,
        norm_4: RmsNorm,
    },
    PreNorm,
    PostNorm,
    /// `norm_1`, `norm_2` are `input_layernorm`, `post_attention_layernorm`; these the `_2` ones.
    FourNorm {
        attn_out: RmsNorm,
        mlp_out: RmsNorm,
    },
}

impl Block {
    pub fn load(
        w: &WeightFiles,
        prefix: &str,
        cfg: &HuginnConfig,
        shape: BlockShape,
        stage: Stage,
        layer: usize,
    ) -> Result<Self> {
        let norm = |name: &str| RmsNorm::load(w, &format!("{prefix}.{name}.weight"), cfg);
        let (norms, first, second) = match shape {
            BlockShape::Sandwich => {
                (Norms::Sandwich { norm_3: norm("norm_3")?, norm_4: norm("norm_4")? }, "norm_1", "norm_2")
            }
            BlockShape::PreNorm => (Norms::PreNorm, "norm_1", "norm_2"),
            BlockShape::PostNorm => (Norms::PostNorm, "norm_1", "norm_2"),
            BlockShape::FourNorm => (
                Norms::FourNorm { attn_out: norm("input_layernorm_2")?, mlp_out: norm("post_attention_layernorm_2")? },
                "input_layernorm",
                "post_attention_layernorm",
            ),
        };
        Ok(Self {
            norm_1: norm(first)?,
            attn: Attention::load(w, prefix, cfg, shape)?,
            norm_2: norm(second)?,
            mlp: GatedMlp::load(w, prefix, cfg, shape)?,
            shape: norms,
            stage,
            layer,
        })
    }

    pub fn forward(&self, xs: &Tensor, layout: &BatchLayout, chunks: &mut [Chunk<'_>]) -> Result<Tensor> {
        let (stage, layer) = (self.stage, self.layer);
        match &self.shape {
            Norms::Sandwich { norm_3, norm_4 } => {
                let attn = self.attn.forward(&self.norm_1.forward(xs)?, layout, chunks, stage, layer)?;
                let xs = self.norm_2.forward_sum(xs, &attn)?;
                let mlp = self.mlp.forward(&norm_3.forward(&xs)?)?;
                norm_4.forward_sum(&xs, &mlp)
            }
            Norms::PostNorm => {
                let attn = self.attn.forward(xs, layout, chunks, stage, layer)?;
                let xs = (xs + self.norm_1.forward(&attn)?)?;
                let mlp = self.mlp.forward(&xs)?;
                Ok((&xs + self.norm_2.forward(&mlp)?)?)
            }
            Norms::FourNorm { attn_out, mlp_out } => {
                let attn = self.attn.forward(&self.norm_1.forward(xs)?, layout, chunks, stage, layer)?;
                let xs = (xs + attn_out.forward(&attn)?)?;
                let mlp = self.mlp.forward(&self.norm_2.forward(&xs)?)?;
                Ok((&xs + mlp_out.forward(&mlp)?)?)
            }
            Norms::PreNorm => {
                let attn = self.attn.forward(&self.norm_1.forward(xs)?, layout, chunks, stage, layer)?;
                let xs = (xs + attn)?;
                let mlp = self.mlp.forward(&self.norm_2.forward(&xs)?)?;
                Ok((xs + mlp)?)
            }
        }
    }
}
