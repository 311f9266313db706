//! `huginn bench --families`: the published shapes of the other checkpoint families
//! (`init-random --preset ouro-1.4b | ouro-2.6b | recurrent-llama-3.2-1b |
//! recurrent-tinyllama-1.1b`, random weights, bfloat16, written once), each loaded as `huginn
//! serve --model` would: load time against reading the files once, peak resident memory against
//! the weights' bytes, and batch-1 tokens/s against the read bound of a token's weights. The
//! section replaces the one between its markers in the report.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};

use super::bench_full_size::{read_once, reset_peak_rss, rss_kb, weight_files};
use super::report_section::Section;
use huginn::bench::{
    core_step_weight_bytes, decode_speed, per_token_weight_bytes, read_pattern_tokens_per_second, serving_weight_bytes,
};
use huginn::checkpoint::{preset, preset_family, write_random_family_checkpoint};
use huginn::model::{BackendChoice, HuginnModel, dtype_name};
use huginn::text::TextTokenizer;

const SECTION: Section = Section { begin: "<!-- families: begin -->", end: "<!-- families: end -->" };

const PRESETS: [&str; 4] = ["ouro-1.4b", "ouro-2.6b", "recurrent-llama-3.2-1b", "recurrent-tinyllama-1.1b"];

/// Loop count of the batch-1 figure: Ouro's `total_ut_steps`; the retrofitted models' training
/// recurrence is larger (32), 4 keeps their row comparable.
const STEPS: usize = 4;

/// Decode / bound pairs measured per preset.
const PAIRS: usize = 3;

/// One preset's figures.
#[derive(serde::Serialize, serde::Deserialize)]
struct Row {
    name: String,
    family: String,
    file_gb: f64,
    read_s: f64,
    load_s: f64,
    peak_gb: f64,
    weights_gb: f64,
    tokens_per_second: f64,
    bound: f64,
    /// Median of the pairs' ratios.
    of_bound: f64,
    kv_kb_per_token: f64,
}

/// Writes (once, under `dir`) and measures every preset, each in a process of its own (a fresh
/// allocator and resident set, so that one preset's freed pages do not hide the next one's peak);
/// writes the section into `out`.
pub fn run(dir: &Path, out: &Path, presets: &[String]) -> anyhow::Result<()> {
    let threads = huginn::cpu_threads::configured();
    let mut rows = Vec::new();
    for &name in PRESETS.iter().filter(|p| presets.is_empty() || presets.iter().any(|q| q == *p)) {
        let folder = dir.join(name);
        if !folder.join("config.json").is_file() {
            eprintln!("writing the random {name} checkpoint to {}", folder.display());
            write_random_family_checkpoint(&folder, &preset(name)?, preset_family(name), 30, DType::BF16, 2)?;
        }
        let output = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "--family-measure"])
            .arg(&folder)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("starting the measuring process")?;
        anyhow::ensure!(output.status.success(), "measuring {name} failed: {}", output.status);
        let line = String::from_utf8_lossy(&output.stdout);
        let mut row: Row = serde_json::from_str(line.trim().lines().last().unwrap_or_default())
            .with_context(|| format!("the measurement of {name}: {line}"))?;
        row.name = name.to_string();
        rows.push(row);
    }
    let mut md = String::new();
    writeln!(md, "{}", SECTION.begin)?;
    writeln!(md, "## The other checkpoint families at their published shapes\n")?;
    writeln!(md, "Produced by `cargo run --release -- bench --families` (only this section is rewritten).")?;
    writeln!(
        md,
        "Each preset written once by `huginn init-random --preset NAME --dtype bf16 --shards 2` (random weights, in \
         its family's tensor names), then measured in a process of its own: the files read once through a small \
         buffer (from the disk when they were not cached; the read leaves them in the page cache), then loaded as `huginn serve --model` does (`model.dtype = auto`: \
         bfloat16), peak resident memory counted from just before the load. Batch 1: \
         greedy, {STEPS} loops per token (Ouro's default; the retrofitted models' default is 32), `shared:1` cache. \
         The bound: a token's weights read once (embedding row, prelude, coda, head) and the recurrent block's once \
         per loop, summed on {threads} threads; decode and bound alternated {PAIRS} times, medians listed (\
         `of bound`: the median of the pairs' ratios). K/V per token: every (loop, layer) kept, as \
         the `full` layout at {STEPS} loops.\n"
    )?;
    writeln!(
        md,
        "| preset | family | files (GB) | read (s) | load (s) | load / read | weights (GB) | peak RSS (GB) | peak / weights | tokens/s | bound | of bound | K/V per token, full (KiB) |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.2}x | {:.2} | {:.2} | {:.2}x | {:.3} | {:.3} | {:.0}% | {:.0} |",
            r.name,
            r.family,
            r.file_gb,
            r.read_s,
            r.load_s,
            r.load_s / r.read_s,
            r.weights_gb,
            r.peak_gb,
            r.peak_gb / r.weights_gb,
            r.tokens_per_second,
            r.bound,
            100.0 * r.of_bound,
            r.kv_kb_per_token
        )?;
    }
    writeln!(md, "{}", SECTION.end)?;
    SECTION.write(out, &md)?;
    eprintln!("wrote the families section of {}", out.display());
    Ok(())
}

/// Measures the checkpoint in `folder` (this process's only load of a model) and prints its row as
/// one JSON line.
pub fn measure(folder: &Path) -> anyhow::Result<()> {
    let threads = huginn::cpu_threads::configured();
    let files = weight_files(folder)?;
    let file_bytes: u64 = files.iter().map(|f| f.metadata().map(|m| m.len()).unwrap_or(0)).sum();
    let read_s = read_once(&files)?;
    reset_peak_rss();
    let before = rss_kb("VmRSS:");
    let started = Instant::now();
    let model = HuginnModel::load_with(folder, &Device::Cpu, None, BackendChoice::Auto)
        .with_context(|| format!("loading {}", folder.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    let peak = rss_kb("VmHWM:").saturating_sub(before) * 1024;
    let model = Arc::new(model);
    let tokenizer = Arc::new(TextTokenizer::load(folder, model.config())?);
    let (token_bytes, step_bytes) = (per_token_weight_bytes(&model), core_step_weight_bytes(&model));
    // Decode and the bound alternated, PAIRS times (the host is shared and noisy): the medians of
    // each and of their ratios are reported.
    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        let stats = decode_speed(&model, &tokenizer, &[84, 104, 101, 32], STEPS, 3, 1)?;
        let bound = read_pattern_tokens_per_second(token_bytes, step_bytes, STEPS, threads, 1);
        pairs.push((stats.tokens_per_second(), bound));
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let tokens_per_second = median(pairs.iter().map(|p| p.0).collect());
    let bound = median(pairs.iter().map(|p| p.1).collect());
    let of_bound = median(pairs.iter().map(|p| p.0 / p.1).collect());
    let cfg = model.config();
    let layers = cfg.n_layers_in_prelude + cfg.n_layers_in_coda + cfg.n_layers_in_recurrent_block * STEPS;
    let kv_bytes = layers * 2 * cfg.kv_heads() * cfg.head_dim() * model.kv_dtype().size_in_bytes();
    let row = Row {
        name: folder.display().to_string(),
        family: model.family().name().to_string(),
        file_gb: file_bytes as f64 / 1e9,
        read_s,
        load_s,
        peak_gb: peak as f64 / 1e9,
        weights_gb: serving_weight_bytes(&model) as f64 / 1e9,
        tokens_per_second,
        bound,
        of_bound,
        kv_kb_per_token: kv_bytes as f64 / 1024.0,
    };
    eprintln!(
        "{}: load {:.1} s (read {:.1} s), peak {:.2} GB for {:.2} GB of weights, {:.3} tokens/s (bound {:.3}), {}",
        row.name,
        row.load_s,
        row.read_s,
        row.peak_gb,
        row.weights_gb,
        row.tokens_per_second,
        row.bound,
        dtype_name(model.dtype())
    );
    println!("{}", serde_json::to_string(&row)?);
    Ok(())
}

/// The families section of the report at `out`, if it has one (a full run keeps it).
pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
