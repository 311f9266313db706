//! The recurrent-depth model with trainable weights: the same math as
//! [`HuginnModel`](crate::model::HuginnModel), written with differentiable tensor operations over
//! padded `[batch, time]` sequences (no caches), and truncated backpropagation through the
//! recurrence. Parameter names are the published checkpoint's, so the weights save as a checkpoint
//! the inference runtime loads.

use candle_core::{D, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::model::huginn::truncated_normal;
use crate::model::layers::{Rope, RopeSpec};
use crate::model::{HuginnConfig, ModelError, Result};

struct Block {
    norm: [Tensor; 4],
    wqkv: Tensor,
    attn_proj: Tensor,
    fc: Tensor,
    mlp_proj: Tensor,
}

pub struct TrainModel {
    cfg: HuginnConfig,
    vars: VarMap,
    wte: Tensor,
    prelude: Vec<Block>,
    adapter: Tensor,
    core: Vec<Block>,
    coda: Vec<Block>,
    ln_f: Tensor,
    rope: Rope,
}

/// Weight initialisation: normal with `std = sqrt(2 / 5d)` (output projections also divided by
/// `sqrt(2 * effective depth)`), norms at one.
fn init_weights(cfg: &HuginnConfig, seed: u64, device: &Device) -> Result<VarMap> {
    let d = cfg.n_embd;
    let std = (2.0 / (5.0 * d as f64)).sqrt();
    let depth = cfg.n_layers_in_prelude + cfg.n_layers_in_coda + cfg.mean_recurrence * cfg.n_layers_in_recurrent_block;
    let out_std = std / (2.0 * depth.max(1) as f64).sqrt();
    let mut rng = StdRng::seed_from_u64(seed);
    let vars = VarMap::new();
    let mut add = |name: String, shape: &[usize], std: Option<f64>| -> Result<()> {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = match std {
            Some(std) => (0..count).map(|_| (truncated_normal(&mut rng) * std) as f32).collect(),
            None => vec![1.0; count],
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?;
        vars.data().lock().map_err(|_| ModelError::InvalidArgument("variable map poisoned".into()))?.insert(name, var);
        Ok(())
    };
    add("transformer.wte.weight".into(), &[cfg.vocab_size, d], Some(std))?;
    add("transformer.adapter.weight".into(), &[d, 2 * d], Some(std))?;
    add("transformer.ln_f.weight".into(), &[d], None)?;
    for (stage, count) in stages(cfg) {
        for i in 0..count {
            let p = format!("transformer.{stage}.{i}");
            for n in 1..=4 {
                add(format!("{p}.norm_{n}.weight"), &[d], None)?;
            }
            add(format!("{p}.attn.Wqkv.weight"), &[3 * d, d], Some(std))?;
            add(format!("{p}.attn.proj.weight"), &[d, d], Some(out_std))?;
            add(format!("{p}.mlp.fc.weight"), &[2 * cfg.intermediate_size, d], Some(std))?;
            add(format!("{p}.mlp.proj.weight"), &[d, cfg.intermediate_size], Some(out_std))?;
        }
    }
    Ok(vars)
}

fn stages(cfg: &HuginnConfig) -> [(&'static str, usize); 3] {
    [
        ("prelude", cfg.n_layers_in_prelude),
        ("core_block", cfg.n_layers_in_recurrent_block),
        ("coda", cfg.n_layers_in_coda),
    ]
}

/// Checks that the architecture is one this trainer implements.
pub fn check_trainable(cfg: &HuginnConfig) -> Result<()> {
    cfg.validate("config")?;
    let unsupported = if !cfg.tie_embeddings {
        Some("untied embeddings")
    } else if cfg.qk_bias {
        Some("qk_bias")
    } else if cfg.bias {
        Some("an adapter bias")
    } else {
        None
    };
    match unsupported {
        Some(what) => Err(ModelError::InvalidArgument(format!("the trainer does not support {what}"))),
        None => Ok(()),
    }
}

impl TrainModel {
    /// A freshly initialised model.
    pub fn new(cfg: HuginnConfig, seed: u64, device: &Device) -> Result<Self> {
        check_trainable(&cfg)?;
        let vars = init_weights(&cfg, seed, device)?;
        Self::from_vars(cfg, vars, device)
    }

    /// The model with weights from a `model.safetensors` written by [`TrainModel::save_weights`].
    pub fn load(cfg: HuginnConfig, weights: &std::path::Path, device: &Device) -> Result<Self> {
        check_trainable(&cfg)?;
        let mut vars = init_weights(&cfg, 0, device)?;
        vars.load(weights).map_err(|e| ModelError::InvalidArgument(format!("{}: {e}", weights.display())))?;
        Self::from_vars(cfg, vars, device)
    }

    fn from_vars(cfg: HuginnConfig, vars: VarMap, device: &Device) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            let data = vars.data().lock().map_err(|_| ModelError::InvalidArgument("variable map poisoned".into()))?;
            data.get(name)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| ModelError::InvalidArgument(format!("missing variable {name}")))
        };
        let block = |p: String| -> Result<Block> {
            Ok(Block {
                norm: [
                    get(&format!("{p}.norm_1.weight"))?,
                    get(&format!("{p}.norm_2.weight"))?,
                    get(&format!("{p}.norm_3.weight"))?,
                    get(&format!("{p}.norm_4.weight"))?,
                ],
                wqkv: get(&format!("{p}.attn.Wqkv.weight"))?,
                attn_proj: get(&format!("{p}.attn.proj.weight"))?,
                fc: get(&format!("{p}.mlp.fc.weight"))?,
                mlp_proj: get(&format!("{p}.mlp.proj.weight"))?,
            })
        };
        let blocks = |stage: &str, count: usize| -> Result<Vec<Block>> {
            (0..count).map(|i| block(format!("transformer.{stage}.{i}"))).collect()
        };
        let rope = Rope::new(&cfg, RopeSpec::huginn_0125(&cfg), device)?;
        Ok(Self {
            wte: get("transformer.wte.weight")?,
            adapter: get("transformer.adapter.weight")?,
            ln_f: get("transformer.ln_f.weight")?,
            prelude: blocks("prelude", cfg.n_layers_in_prelude)?,
            core: blocks("core_block", cfg.n_layers_in_recurrent_block)?,
            coda: blocks("coda", cfg.n_layers_in_coda)?,
            rope,
            vars,
            cfg,
        })
    }

    pub fn config(&self) -> &HuginnConfig {
        &self.cfg
    }

    /// The trainable variables, by checkpoint name.
    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    pub fn save_weights(&self, path: &std::path::Path) -> Result<()> {
        self.vars.save(path).map_err(|e| ModelError::InvalidArgument(format!("{}: {e}", path.display())))
    }

    /// A random initial latent state `[batch, time, d]`, as at inference with `init_scale` 1.
    pub fn random_state(&self, batch: usize, time: usize, rng: &mut impl Rng) -> Result<Tensor> {
        let d = self.cfg.n_embd;
        let std = (2.0 / (5.0 * d as f64)).sqrt() * (d as f64).sqrt();
        let values: Vec<f32> = (0..batch * time * d).map(|_| (truncated_normal(rng) * std) as f32).collect();
        Ok(Tensor::from_vec(values, (batch, time, d), self.wte.device())?)
    }

    /// Logits `[batch, time, vocab]` for `ids` `[batch, time]` after `steps` recurrences from
    /// `state`; gradients flow through the last `backprop` recurrences only (the prelude gets its
    /// gradient through the injections of those recurrences).
    pub fn forward(&self, ids: &Tensor, state: &Tensor, steps: usize, backprop: usize) -> Result<Tensor> {
        let (_, time) = ids.dims2()?;
        let mask = causal_mask(time, ids.device())?;
        let (cos, sin) = self.rope.tables();
        let rope = (cos.narrow(0, 0, time)?, sin.narrow(0, 0, time)?);
        let embed_scale = (self.cfg.n_embd as f64).sqrt();
        let mut xs = (self.wte.embedding(&ids.flatten_all()?)?.reshape((ids.dim(0)?, time, ()))? * embed_scale)?;
        for block in &self.prelude {
            xs = self.block(block, &xs, &mask, &rope, false)?;
        }
        let frozen = steps.saturating_sub(backprop);
        let injection = xs;
        let detached_injection = injection.detach();
        let mut state = state.clone();
        for step in 0..steps {
            let injection = if step < frozen { &detached_injection } else { &injection };
            let joined = Tensor::cat(&[&state, injection], D::Minus1)?;
            let mut xs = linear(&joined, &self.adapter)?;
            // Steps before the backpropagated ones need no graph: fused kernels without gradients.
            let fused = step < frozen;
            for block in &self.core {
                xs = self.block(block, &xs, &mask, &rope, fused)?;
            }
            state = if step + 1 == frozen { xs.detach() } else { xs };
        }
        let mut xs = self.norm(&state, &self.ln_f, false)?;
        for block in &self.coda {
            xs = self.block(block, &xs, &mask, &rope, false)?;
        }
        let xs = self.norm(&xs, &self.ln_f, false)?;
        Ok(xs.broadcast_matmul(&self.wte.t()?)?)
    }

    fn norm(&self, xs: &Tensor, weight: &Tensor, fused: bool) -> Result<Tensor> {
        let eps = self.cfg.norm_eps;
        if fused {
            return Ok(candle_nn::ops::rms_norm(&xs.contiguous()?, weight, eps as f32)?);
        }
        let scale = (xs.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        Ok(xs.broadcast_mul(&scale)?.broadcast_mul(weight)?)
    }

    /// `a = attn(norm_1(x)); x = norm_2(x + a); x = norm_4(x + mlp(norm_3(x)))`.
    /// With `fused`, the same math through kernels that have no backward pass (for tensors
    /// outside the graph).
    fn block(&self, b: &Block, xs: &Tensor, mask: &Tensor, rope: &(Tensor, Tensor), fused: bool) -> Result<Tensor> {
        let attn = self.attention(b, &self.norm(xs, &b.norm[0], fused)?, mask, rope, fused)?;
        let xs = self.norm(&(xs + attn)?, &b.norm[1], fused)?;
        let gated = linear(&self.norm(&xs, &b.norm[2], fused)?, &b.fc)?;
        let half = self.cfg.intermediate_size;
        let mlp = (gated.narrow(D::Minus1, 0, half)?.silu()? * gated.narrow(D::Minus1, half, half)?)?;
        self.norm(&(xs + linear(&mlp, &b.mlp_proj)?)?, &b.norm[3], fused)
    }

    fn attention(&self, b: &Block, xs: &Tensor, mask: &Tensor, rope: &(Tensor, Tensor), fused: bool) -> Result<Tensor> {
        let (batch, time, d) = xs.dims3()?;
        let (h, hd) = (self.cfg.num_attention_heads, self.cfg.head_dim());
        let qkv = linear(xs, &b.wqkv)?.reshape((batch, time, 3, h, hd))?;
        let heads =
            |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?); // [b, h, t, hd]
        let rotate = if fused { candle_nn::rotary_emb::rope_i } else { candle_nn::rotary_emb::rope_i_slow };
        let q = rotate(&q, &rope.0, &rope.1)?;
        let k = rotate(&k, &rope.0, &rope.1)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        let probs = if fused {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        };
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, time, d))?;
        linear(&out, &b.attn_proj)
    }
}

/// `xs @ w^T` over the last dimension.
fn linear(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(xs.broadcast_matmul(&w.t()?)?)
}

fn causal_mask(time: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> =
        (0..time * time).map(|i| if i % time > i / time { f32::NEG_INFINITY } else { 0.0 }).collect();
    Ok(Tensor::from_vec(values, (time, time), device)?)
}
