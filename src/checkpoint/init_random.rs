//! Random-weight checkpoints in the published format, so any shape can be tested and benchmarked.
//!
//! Weights follow the reference initialisation (truncated normals with σ = sqrt(2/5d), output
//! projections scaled down by the expected depth, norms at one, q/k biases at zero). Each tensor is
//! drawn from its own RNG stream seeded by (seed, name): the same seed gives the same weights
//! whatever the sharding, and tensors are generated one at a time while writing.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::DType;
use rand::SeedableRng;
use rand::rngs::StdRng;
use safetensors::tensor::View;
use serde_json::json;

use super::byte_tokenizer::{SPECIAL_TOKENS, byte_level_tokenizer_json, special_base};
use crate::model::huginn::truncated_normal;
use crate::model::layers::Stage;
use crate::model::ouro_config::OuroConfig;
use crate::model::{Architecture, Family, HuginnConfig, ModelError, Result, dtype_name};
use crate::text::HUGINN_CHAT_TEMPLATE;

/// How one tensor is initialised.
#[derive(Debug, Clone, Copy)]
enum Init {
    Normal(f64),
    Ones,
    Zeros,
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// The tensors of a checkpoint of this shape, in the published names of `family`.
fn tensor_specs(cfg: &HuginnConfig, family: Family) -> Vec<TensorSpec> {
    let (d, i, h, hd) = (cfg.n_embd, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim());
    let kv = cfg.kv_heads();
    let std = (2.0 / (5.0 * d as f64)).sqrt();
    let depth = cfg.n_layers_in_prelude + cfg.n_layers_in_coda + cfg.n_layers_in_recurrent_block * cfg.mean_recurrence;
    let out_std = std / (2.0 * depth.max(1) as f64).sqrt();
    let names = family.names();
    let mut specs =
        vec![TensorSpec { name: names.embedding.into(), shape: vec![cfg.vocab_size, d], init: Init::Normal(std) }];
    let mut block = |prefix: String| {
        let t = |suffix: &str, shape: Vec<usize>, init| TensorSpec { name: format!("{prefix}.{suffix}"), shape, init };
        if family == Family::Ouro {
            for norm in
                ["input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"]
            {
                specs.push(t(&format!("{norm}.weight"), vec![d], Init::Ones));
            }
            for (name, rows) in [("q", h * hd), ("k", kv * hd), ("v", kv * hd)] {
                specs.push(t(&format!("self_attn.{name}_proj.weight"), vec![rows, d], Init::Normal(std)));
            }
            specs.push(t("self_attn.o_proj.weight", vec![d, h * hd], Init::Normal(out_std)));
            specs.push(t("mlp.gate_proj.weight", vec![i, d], Init::Normal(std)));
            specs.push(t("mlp.up_proj.weight", vec![i, d], Init::Normal(std)));
            specs.push(t("mlp.down_proj.weight", vec![d, i], Init::Normal(out_std)));
            return;
        }
        specs.push(t("norm_1.weight", vec![d], Init::Ones));
        specs.push(t("attn.Wqkv.weight", vec![(h + 2 * kv) * hd, d], Init::Normal(std)));
        if cfg.qk_bias {
            specs.push(t("attn.qk_bias", vec![2, 1, h, hd], Init::Zeros));
        }
        if family == Family::RetrofitOlmo {
            specs.push(t("attn.q_norm.weight", vec![h * hd], Init::Ones));
            specs.push(t("attn.k_norm.weight", vec![kv * hd], Init::Ones));
        }
        specs.push(t("attn.proj.weight", vec![d, h * hd], Init::Normal(out_std)));
        specs.push(t("norm_2.weight", vec![d], Init::Ones));
        specs.push(t("mlp.fc.weight", vec![2 * i, d], Init::Normal(std)));
        specs.push(t("mlp.proj.weight", vec![d, i], Init::Normal(out_std)));
        if family == Family::Huginn0125 {
            specs.push(t("norm_3.weight", vec![d], Init::Ones));
            specs.push(t("norm_4.weight", vec![d], Init::Ones));
        }
    };
    for (stage, count) in [
        (Stage::Prelude, cfg.n_layers_in_prelude),
        (Stage::Core, cfg.n_layers_in_recurrent_block),
        (Stage::Coda, cfg.n_layers_in_coda),
    ] {
        for n in 0..count {
            block(family.block_prefix(stage, n));
        }
    }
    let spec = |name: &str, shape: Vec<usize>, init| TensorSpec { name: name.into(), shape, init };
    if family.has_adapter() {
        specs.push(spec("transformer.adapter.weight", vec![d, 2 * d], Init::Normal(std)));
        if cfg.bias {
            specs.push(spec("transformer.adapter.bias", vec![d], Init::Zeros));
        }
    }
    specs.push(spec(names.final_norm, vec![d], Init::Ones));
    if let Some((weight, bias)) = names.gate {
        specs.push(spec(weight, vec![1, d], Init::Normal(std)));
        specs.push(spec(bias, vec![1], Init::Zeros));
    }
    if !cfg.tie_embeddings {
        specs.push(spec("lm_head.weight", vec![cfg.vocab_size, d], Init::Normal(std)));
    }
    specs
}

/// A tensor whose bytes are generated when the writer asks for them.
struct LazyTensor<'a> {
    spec: &'a TensorSpec,
    seed: u64,
    dtype: DType,
}

impl LazyTensor<'_> {
    fn values(&self) -> Vec<f32> {
        let count: usize = self.spec.shape.iter().product();
        match self.spec.init {
            Init::Ones => vec![1.0; count],
            Init::Zeros => vec![0.0; count],
            Init::Normal(std) => {
                let mut rng = StdRng::seed_from_u64(self.seed ^ fnv1a(self.spec.name.as_bytes()));
                (0..count).map(|_| (truncated_normal(&mut rng) * std) as f32).collect()
            }
        }
    }
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.dtype {
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            _ => safetensors::Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = self.values();
        let bytes: Vec<u8> = match self.dtype {
            DType::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            DType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.spec.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// FNV-1a: a hash that never changes across toolchains, so checkpoints stay reproducible.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Writes config.json, weights (one file or `shards` files plus an index), tokenizer.json,
/// tokenizer_config.json and generation_config.json into `dir`: a Huginn-0125 checkpoint (an
/// Ouro one for an Ouro description).
pub fn write_random_checkpoint(dir: &Path, cfg: &HuginnConfig, seed: u64, dtype: DType, shards: usize) -> Result<()> {
    let family = if cfg.architecture == Architecture::Ouro { Family::Ouro } else { Family::Huginn0125 };
    write_random_family_checkpoint(dir, cfg, family, seed, dtype, shards)
}

/// [`write_random_checkpoint`] in the tensor names and block shape of `family`.
pub fn write_random_family_checkpoint(
    dir: &Path,
    cfg: &HuginnConfig,
    family: Family,
    seed: u64,
    dtype: DType,
    shards: usize,
) -> Result<()> {
    cfg.validate("config")?;
    if (family == Family::Ouro) != (cfg.architecture == Architecture::Ouro) {
        return Err(ModelError::InvalidArgument(format!(
            "a {} checkpoint needs a config of its own format ({})",
            family.name(),
            cfg.architecture.name()
        )));
    }
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(ModelError::UnsupportedDtype(format!("{dtype:?}")));
    }
    let cfg = write_metadata(dir, cfg, dtype)?;

    let specs = tensor_specs(&cfg, family);
    let shards = shards.clamp(1, specs.len());
    let total: usize = specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
    let mut groups: Vec<Vec<&TensorSpec>> = vec![Vec::new(); shards];
    let mut running = 0usize;
    for spec in &specs {
        let index = (running * shards / total.max(1)).min(shards - 1);
        groups[index].push(spec);
        running += spec.shape.iter().product::<usize>();
    }
    groups.retain(|g| !g.is_empty());
    let count = groups.len();
    let mut weight_map = BTreeMap::new();
    for (index, group) in groups.iter().enumerate() {
        let file = if count == 1 && shards == 1 {
            crate::model::weights::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
        };
        let views: Vec<(String, LazyTensor)> =
            group.iter().map(|spec| (spec.name.clone(), LazyTensor { spec, seed, dtype })).collect();
        let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(views, Some(metadata), &dir.join(&file))
            .map_err(|e| ModelError::Io { path: dir.join(&file), message: e.to_string() })?;
        for spec in group {
            weight_map.insert(spec.name.clone(), file.clone());
        }
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": total * dtype.size_in_bytes()}, "weight_map": weight_map});
        write_json(&dir.join(crate::model::weights::SHARD_INDEX), &index)?;
    }
    Ok(())
}

/// Writes config.json (with the special-token ids and dtype filled in), the byte-level
/// tokenizer.json, tokenizer_config.json (Huginn chat template) and generation_config.json into
/// `dir`; returns the config as written.
pub fn write_metadata(dir: &Path, cfg: &HuginnConfig, dtype: DType) -> Result<HuginnConfig> {
    let tokenizer = byte_level_tokenizer_json(cfg.vocab_size)?;
    let io = |e: std::io::Error| ModelError::Io { path: dir.to_path_buf(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(io)?;
    let base = special_base(cfg.vocab_size) as u32;
    let (bos, eos, pad) = (base, base + 1, base + 5);
    let mut cfg = cfg.clone();
    cfg.bos_token_id = Some(bos);
    cfg.eos_token_id = Some(crate::model::config::TokenIds::One(eos));
    cfg.pad_token_id = Some(pad);
    cfg.torch_dtype = Some(dtype_name(dtype).into());
    let json = |value: std::result::Result<serde_json::Value, serde_json::Error>| {
        value.map_err(|e| ModelError::InvalidArgument(e.to_string()))
    };
    let mut config = match cfg.architecture {
        Architecture::Raven => {
            let mut config = json(serde_json::to_value(&cfg))?;
            config["model_type"] = json!("huginn_raven");
            config
        }
        Architecture::Ouro => {
            let mut config = json(serde_json::to_value(OuroConfig::from_huginn(&cfg)))?;
            config["model_type"] = json!("ouro");
            config
        }
    };
    config["architectures"] = json!([cfg.architecture.name()]);
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"chat_template": HUGINN_CHAT_TEMPLATE, "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[5]}),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": bos, "eos_token_id": [eos, base + 4], "pad_token_id": pad}),
    )?;

    Ok(cfg)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::InvalidArgument(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| ModelError::Io { path: path.to_path_buf(), message: e.to_string() })
}
