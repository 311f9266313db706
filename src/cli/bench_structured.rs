//! `huginn bench --structured`: what a JSON-schema constraint costs. On the width-1024 model
//! (random weights, vocabulary 32,768) and on the same shape with a Huginn-0125-sized vocabulary
//! (65,536 entries of one to five letters, with and without a leading space, so that a mask walks
//! a realistic trie): the time of one token's mask, and tokens/s constrained against unconstrained
//! at concurrency 1 and 16, alternated in pairs in one run. The section replaces the one between
//! its markers in the report (a full run keeps it).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use super::bench_tally::median;
use super::report_section::Section;
use huginn::checkpoint::{preset, write_random_checkpoint};
use huginn::engine::{Completion, Driver, JobSpec};
use huginn::generate::GenerationParams;
use huginn::generate::constraint::{ConstraintLimits, ConstraintSpec, ConstraintVocab};
use huginn::model::HuginnModel;
use huginn::text::TextTokenizer;

const SECTION: Section = Section { begin: "<!-- structured: begin -->", end: "<!-- structured: end -->" };
const NUM_STEPS: usize = 4;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    })
}

/// Letters for id `n`: a bijective base-26 word (a, b, ..., z, aa, ab, ...).
fn word(mut n: usize) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
        n -= 1;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// The width-1024 shape with a 65,536-entry vocabulary of words, written once under `dir`.
fn ensure_wide_vocab_model(dir: &Path) -> anyhow::Result<()> {
    if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
        return Ok(());
    }
    let cfg = huginn::model::HuginnConfig { vocab_size: 65536, ..preset("width-1024")? };
    eprintln!("writing the width-1024 checkpoint with a 65,536-entry vocabulary to {}", dir.display());
    write_random_checkpoint(dir, &cfg, 7, DType::F32, 1)?;
    let path = dir.join("tokenizer.json");
    let mut tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let vocab = tokenizer["model"]["vocab"].as_object_mut().context("tokenizer.json without a vocabulary")?;
    let renamed: serde_json::Map<String, Value> = std::mem::take(vocab)
        .into_iter()
        .map(|(name, id)| {
            let n = id.as_u64().unwrap_or(0) as usize;
            // The placeholders become words, every other one with the byte-level space (Ġ).
            let name = if name.starts_with("<r") {
                format!("{}{}", if n % 2 == 1 { "Ġ" } else { "" }, word(n))
            } else {
                name
            };
            (name, id)
        })
        .collect();
    *vocab = renamed;
    std::fs::write(&path, serde_json::to_string(&tokenizer)?)?;
    Ok(())
}

struct Loaded {
    name: String,
    model: Arc<HuginnModel>,
    tokenizer: Arc<TextTokenizer>,
    vocab: ConstraintVocab,
}

fn load(name: &str, dir: &Path) -> anyhow::Result<Loaded> {
    let model =
        Arc::new(HuginnModel::load(dir, DType::F32, &Device::Cpu).with_context(|| format!("{}", dir.display()))?);
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config())?);
    let width = model.config().vocab_size;
    let vocab = ConstraintVocab::load(dir, tokenizer.clone(), width, ConstraintLimits::default())?;
    Ok(Loaded { name: name.into(), model, tokenizer, vocab })
}

/// Mean microseconds of one mask along random walks through the schema.
fn mask_micros(loaded: &Loaded, tokens: usize) -> anyhow::Result<f64> {
    let mut rng = StdRng::seed_from_u64(3);
    let (mut total, mut count) = (0.0, 0);
    let width = loaded.model.config().vocab_size as u32;
    while count < tokens {
        let mut c = loaded.vocab.compile(&ConstraintSpec::JsonSchema(schema()))?;
        for _ in 0..64 {
            let started = Instant::now();
            let mask = c.allowed()?;
            total += started.elapsed().as_secs_f64();
            count += 1;
            let allowed: Vec<u32> = (0..width).filter(|&id| mask.allows(id)).collect();
            let eos = loaded.tokenizer.special().eos.first().copied();
            let choices: Vec<u32> = allowed.into_iter().filter(|&id| Some(id) != eos).collect();
            if choices.is_empty() || c.must_end() {
                break;
            }
            c.accept(choices[rng.random_range(0..choices.len())])?;
        }
    }
    Ok(1e6 * total / count as f64)
}

fn jobs(loaded: &Loaded, clients: usize, tokens: usize, constrained: bool) -> anyhow::Result<Vec<JobSpec>> {
    (0..clients)
        .map(|c| {
            let mut params = GenerationParams::new(NUM_STEPS);
            params.max_tokens = tokens;
            params.seed = c as u64;
            params.stop_token_ids.clear();
            let mut job = JobSpec::new(vec![84, 104, 101, 32, 99 + c as u32 % 20], params);
            if constrained {
                job.constraint = Some(loaded.vocab.compile(&ConstraintSpec::JsonSchema(schema()))?);
            }
            Ok(job)
        })
        .collect()
}

/// Generated tokens per second of `clients` concurrent requests.
fn tokens_per_second(loaded: &Loaded, clients: usize, tokens: usize, constrained: bool) -> anyhow::Result<f64> {
    let specs = jobs(loaded, clients, tokens, constrained)?;
    let mut driver = Driver::new(loaded.model.clone(), loaded.tokenizer.clone(), clients.max(1));
    let started = Instant::now();
    let done: Vec<Completion> = driver.run(specs, |_, _| {})?.into_iter().flatten().collect();
    let generated: usize = done.iter().map(|c| c.token_ids.len()).sum();
    Ok(generated as f64 / started.elapsed().as_secs_f64())
}

pub fn run(large_model: &Path, wide_vocab_dir: &Path, out: &Path, quick: bool) -> anyhow::Result<()> {
    ensure_wide_vocab_model(wide_vocab_dir)?;
    let models = [
        load("width-1024, vocabulary 32,768", large_model)?,
        load("width-1024, vocabulary 65,536 (words)", wide_vocab_dir)?,
    ];
    let (pairs, tokens) = if quick { (1, 6) } else { (3, 24) };
    let mut md = String::new();
    writeln!(md, "{}", SECTION.begin)?;
    writeln!(md, "## Structured outputs: the cost of a JSON schema\n")?;
    writeln!(md, "Produced by `cargo run --release -- bench --structured` (only this section is rewritten).")?;
    writeln!(
        md,
        "Float32, `num_steps` {NUM_STEPS}, {tokens} tokens per request, a three-field JSON schema (a string, an"
    )?;
    writeln!(md, "integer, an array of strings: random weights spend most tokens inside strings, where most of the")?;
    writeln!(md, "vocabulary is allowed), constrained and unconstrained runs alternated, medians of {pairs} pairs.")?;
    writeln!(md, "The mask is computed on the worker's thread after each token's coda, serial with the passes.\n")?;
    writeln!(
        md,
        "| model | mask per token (µs) | clients | unconstrained tokens/s | constrained tokens/s | constrained / unconstrained |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    for loaded in &models {
        let mask = mask_micros(loaded, if quick { 64 } else { 512 })?;
        for clients in [1, 16] {
            let (mut free, mut bound) = (Vec::new(), Vec::new());
            for pair in 0..pairs {
                for constrained in if pair % 2 == 0 { [false, true] } else { [true, false] } {
                    let rate = tokens_per_second(loaded, clients, tokens, constrained)?;
                    if constrained { bound.push(rate) } else { free.push(rate) }
                }
            }
            let (f, b) = (median(free), median(bound));
            let row = format!("| {} | {mask:.0} | {clients} | {f:.1} | {b:.1} | {:.2}x |", loaded.name, b / f);
            eprintln!("structured: {row}");
            writeln!(md, "{row}")?;
        }
    }
    writeln!(md, "\n{}", SECTION.end)?;
    SECTION.write(out, &md)?;
    eprintln!("wrote the structured-outputs section of {}", out.display());
    Ok(())
}

/// The structured-outputs section of the report at `out`, if it has one (a full run keeps it).
pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
