//! `huginn init-random`: a random-weight checkpoint of a preset, a config file, or explicit shape flags.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use huginn::checkpoint::{preset, preset_family, write_random_family_checkpoint};
use huginn::model::weights::read_text;
use huginn::model::{Architecture, Family};
use huginn::model::{HuginnConfig, parse_dtype};

#[derive(Args)]
pub struct InitRandomArgs {
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// huginn-0125, tiny (the fixture's shape), width-1024 (the benchmark model), addition,
    /// ouro-1.4b, ouro-2.6b, recurrent-llama-3.2-1b or recurrent-tinyllama-1.1b (the published
    /// shapes, written in their family's tensor names).
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// A config.json to take the shape from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Split the weights into this many files with a model.safetensors.index.json.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    #[arg(long)]
    n_embd: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    intermediate_size: Option<usize>,
    #[arg(long)]
    prelude_layers: Option<usize>,
    #[arg(long)]
    core_layers: Option<usize>,
    #[arg(long)]
    coda_layers: Option<usize>,
    #[arg(long)]
    vocab_size: Option<usize>,
    #[arg(long)]
    block_size: Option<usize>,
    #[arg(long)]
    mean_recurrence: Option<usize>,
}

pub fn run(args: InitRandomArgs) -> anyhow::Result<()> {
    let mut cfg = match (&args.preset, &args.config) {
        (_, Some(path)) => HuginnConfig::from_json_str(&read_text(path)?, &path.display().to_string())?,
        (Some(name), None) => preset(name)?,
        (None, None) => preset("tiny")?,
    };
    let set = |field: &mut usize, value: Option<usize>| {
        if let Some(v) = value {
            *field = v;
        }
    };
    set(&mut cfg.n_embd, args.n_embd);
    set(&mut cfg.num_attention_heads, args.heads);
    if args.heads.is_some() {
        cfg.num_key_value_heads = args.heads;
    }
    set(&mut cfg.intermediate_size, args.intermediate_size);
    set(&mut cfg.n_layers_in_prelude, args.prelude_layers);
    set(&mut cfg.n_layers_in_recurrent_block, args.core_layers);
    set(&mut cfg.n_layers_in_coda, args.coda_layers);
    set(&mut cfg.vocab_size, args.vocab_size);
    set(&mut cfg.block_size, args.block_size);
    set(&mut cfg.mean_recurrence, args.mean_recurrence);
    let dtype = parse_dtype(&args.dtype)?;
    let family = match (&args.preset, cfg.architecture) {
        (_, Architecture::Ouro) => Family::Ouro,
        (Some(name), _) if args.config.is_none() => preset_family(name),
        _ => Family::Huginn0125,
    };
    write_random_family_checkpoint(&args.out, &cfg, family, args.seed, dtype, args.shards)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({}, d={}, heads={}, layers {}/{}/{}, mlp {}, vocab {}, {})",
        args.out.display(),
        family.name(),
        cfg.n_embd,
        cfg.num_attention_heads,
        cfg.n_layers_in_prelude,
        cfg.n_layers_in_recurrent_block,
        cfg.n_layers_in_coda,
        cfg.intermediate_size,
        cfg.vocab_size,
        args.dtype
    );
    Ok(())
}
