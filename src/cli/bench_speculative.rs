//! `huginn bench --speculative`: self-speculative decoding against plain decoding, side by side in
//! one run. On the addition models, one problem at a time (batch 1, as a lone client): accuracy
//! and tokens/s at the model's default `num_steps` and at 4x it, for several (draft_steps,
//! draft_tokens). On the width-1024 model (random weights: speed only) at concurrency 1 and 16.
//! Settings alternate in small groups of problems (or runs), so that a slow spell of the machine
//! falls on all of them. The section replaces the one between its markers in the report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};

use super::bench_tally::Tally;
use super::report_section::Section;
use huginn::engine::{Driver, JobSpec};
use huginn::generate::{Decoding, GenerationParams, Speculation};
use huginn::model::{CacheStrategy, HuginnModel};
use huginn::text::TextTokenizer;
use huginn::train::addition::TaskFile;
use huginn::train::eval::{Budget, evaluate_in_batches, held_out_problems};

const SECTION: Section = Section { begin: "<!-- speculative: begin -->", end: "<!-- speculative: end -->" };

/// (draft_steps, draft_tokens) tried on the addition models; those with draft_steps not below
/// `num_steps` are skipped.
const ADDITION_DRAFTS: [(usize, usize); 5] = [(1, 4), (2, 4), (2, 8), (3, 4), (4, 8)];
/// On the width-1024 model, at `num_steps` 32.
const LARGE_DRAFTS: [(usize, usize); 2] = [(4, 4), (8, 4)];
const LARGE_STEPS: usize = 32;
const PROMPT: [u32; 8] = [84, 104, 101, 32, 99, 111, 114, 101];

fn name(speculation: Option<Speculation>) -> String {
    match speculation {
        None => "plain".into(),
        Some(s) => format!("d={} K={}", s.draft_steps, s.draft_tokens),
    }
}

pub fn run(addition_models: &[PathBuf], large_model: &Path, out: &Path, quick: bool) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(md, "{}", SECTION.begin)?;
    writeln!(md, "## Self-speculative decoding\n")?;
    writeln!(md, "Produced by `cargo run --release -- bench --speculative` (only this section is rewritten).")?;
    writeln!(md, "`d`: `draft_steps`, `K`: `draft_tokens`. Greedy, one request at a time (batch 1), settings")?;
    writeln!(md, "alternating every 10 problems. Tokens/s counts every generated token over the whole request")?;
    writeln!(md, "(its prompt's pass included); decode tokens/s the tokens after the first over the time after it")?;
    writeln!(md, "(what speculation changes). Mean steps per token counts draft and verification steps.")?;
    writeln!(md, "A round costs `K·d` ticks of one row and `num_steps` ticks of `K + 1` rows; on a CPU a pass costs")?;
    writeln!(md, "in proportion to its rows on models this small, so the time saved is less than the steps saved.\n")?;
    for dir in addition_models.iter().filter(|d| d.join("config.json").is_file()) {
        addition_table(&mut md, dir, quick)?;
    }
    large_table(&mut md, large_model, quick)?;
    writeln!(md, "{}", SECTION.end)?;
    SECTION.write(out, &md)?;
    eprintln!("wrote the speculative-decoding section of {}", out.display());
    Ok(())
}

fn addition_table(md: &mut String, dir: &Path, quick: bool) -> anyhow::Result<()> {
    let model =
        Arc::new(HuginnModel::load(dir, DType::F32, &Device::Cpu).with_context(|| format!("{}", dir.display()))?);
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config())?);
    let digits = TaskFile::read(dir)?.map_or(3, |t| t.digits);
    let problems = held_out_problems(if quick { 20 } else { 300 }, digits, 7);
    let default = model.config().mean_recurrence;
    let folder = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    writeln!(md, "### `{folder}` ({digits}-digit operands, {} held-out problems)\n", problems.len())?;
    writeln!(
        md,
        "| num_steps | setting | accuracy | tokens/s | vs plain | decode tokens/s | vs plain | drafts accepted | mean steps per token |"
    )?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for num_steps in [default, 4 * default] {
        let mut settings = vec![None];
        settings.extend(
            ADDITION_DRAFTS
                .iter()
                .filter(|&&(d, _)| d < num_steps)
                .map(|&(draft_steps, draft_tokens)| Some(Speculation { draft_steps, draft_tokens })),
        );
        let mut tallies: Vec<Tally> = settings.iter().map(|_| Tally::default()).collect();
        for group in problems.chunks(10) {
            for (speculation, tally) in settings.iter().zip(&mut tallies) {
                let decoding = speculation.map_or_else(Decoding::default, Decoding::Speculative);
                let budget = Budget { decoding, ..Budget::fixed(num_steps) };
                let started = Instant::now();
                let result = evaluate_in_batches(&model, &tokenizer, group, false, budget, 1)?;
                tally.add(&result, started.elapsed().as_secs_f64());
            }
        }
        let (plain, plain_decode) = (tallies[0].tokens_per_second(), tallies[0].decode_tokens_per_second());
        for (speculation, t) in settings.iter().zip(&tallies) {
            let row = format!(
                "| {num_steps} | {} | {:.1}% | {:.0} | {:.2}x | {:.0} | {:.2}x | {} | {:.2} |",
                name(*speculation),
                100.0 * t.accuracy(),
                t.tokens_per_second(),
                t.tokens_per_second() / plain,
                t.decode_tokens_per_second(),
                t.decode_tokens_per_second() / plain_decode,
                t.acceptance(),
                t.steps_per_token()
            );
            eprintln!("{folder} {row}");
            writeln!(md, "{row}")?;
        }
    }
    writeln!(md)?;
    Ok(())
}

fn large_table(md: &mut String, dir: &Path, quick: bool) -> anyhow::Result<()> {
    let model = Arc::new(HuginnModel::load(dir, DType::F32, &Device::Cpu).context("loading the width-1024 model")?);
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config())?);
    let (tokens, rounds) = if quick { (4, 1) } else { (16, 2) };
    writeln!(md, "### width-1024 (random weights: speed only), `num_steps` {LARGE_STEPS}\n")?;
    writeln!(
        md,
        "{tokens} tokens per request after an 8-token prompt, `init_scale` 0, no stop token; {rounds} alternating rounds.\n"
    )?;
    writeln!(md, "| concurrency | setting | tokens/s | vs plain | drafts accepted |")?;
    writeln!(md, "|---:|---|---:|---:|---:|")?;
    for concurrency in [1, 16] {
        let mut settings = vec![None];
        settings.extend(
            LARGE_DRAFTS.iter().map(|&(draft_steps, draft_tokens)| Some(Speculation { draft_steps, draft_tokens })),
        );
        let mut tallies: Vec<Tally> = settings.iter().map(|_| Tally::default()).collect();
        for _ in 0..rounds {
            for (speculation, tally) in settings.iter().zip(&mut tallies) {
                let mut params = GenerationParams::new(LARGE_STEPS);
                params.max_tokens = tokens;
                params.init_scale = 0.0;
                params.cache = CacheStrategy::Shared(1);
                params.decoding = speculation.map_or_else(Decoding::default, Decoding::Speculative);
                let specs = vec![JobSpec::new(PROMPT.to_vec(), params); concurrency];
                let mut driver = Driver::new(model.clone(), tokenizer.clone(), concurrency);
                let started = Instant::now();
                let outcomes = driver.run(specs, |_, _| {})?;
                tally.seconds += started.elapsed().as_secs_f64();
                tally.add_outputs(outcomes.iter().flatten());
            }
        }
        let plain = tallies[0].tokens_per_second();
        for (speculation, t) in settings.iter().zip(&tallies) {
            let row = format!(
                "| {concurrency} | {} | {:.2} | {:.2}x | {} |",
                name(*speculation),
                t.tokens_per_second(),
                t.tokens_per_second() / plain,
                t.acceptance()
            );
            eprintln!("width-1024 {row}");
            writeln!(md, "{row}")?;
        }
    }
    writeln!(md)?;
    Ok(())
}

/// The speculative-decoding section of the report at `out`, if it has one (a full run keeps it).
pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
