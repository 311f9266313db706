//! `huginn bench --parallel`: the parallel (diffusion-forcing) sampler against sequential decoding,
//! side by side in one run. On the addition models, one problem at a time (batch 1, as a lone
//! client): accuracy and tokens/s of sequential decoding at the model's default `num_steps` and
//! with its best adaptive exit, and of the parallel sampler at several `inner_steps` and freeze
//! thresholds. On the width-1024 model (random weights: speed only, the `fixed` rule) at
//! `num_steps` 32, at concurrency 1 and 16. Settings alternate in small groups of problems (or
//! runs), so that a slow spell of the machine falls on all of them. The section replaces the one
//! between its markers in the report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};

use super::bench_tally::Tally;
use super::report_section::Section;
use huginn::engine::{Driver, JobSpec};
use huginn::generate::{Decoding, FreezeRule, GenerationParams, ParallelSampling};
use huginn::model::{CacheStrategy, ExitCriterion, ExitRule, HuginnModel};
use huginn::text::TextTokenizer;
use huginn::train::addition::TaskFile;
use huginn::train::eval::{Budget, evaluate_in_batches, held_out_problems};

const SECTION: Section = Section { begin: "<!-- parallel: begin -->", end: "<!-- parallel: end -->" };

/// (inner_steps, freeze rule, threshold) tried on the addition models.
const ADDITION_SAMPLERS: [(usize, FreezeRule, f64); 8] = [
    (2, FreezeRule::LatentDiff, 0.03),
    (3, FreezeRule::LatentDiff, 0.03),
    (4, FreezeRule::LatentDiff, 0.03),
    (2, FreezeRule::LatentDiff, 0.1),
    (4, FreezeRule::LatentDiff, 0.1),
    (4, FreezeRule::LatentDiff, 0.01),
    (4, FreezeRule::LatentDiffStrict, 0.03),
    (4, FreezeRule::Fixed, 0.0),
];
/// The best adaptive exit of the addition models (their cards): argmax unchanged for 2 steps.
const BEST_EXIT: (ExitCriterion, f64) = (ExitCriterion::ArgmaxStability, 2.0);
/// On the width-1024 model: `inner_steps` with the `fixed` rule at `num_steps` 32.
const LARGE_INNER: [usize; 3] = [4, 8, 16];
const LARGE_STEPS: usize = 32;
const PROMPT: [u32; 8] = [84, 104, 101, 32, 99, 111, 114, 101];

fn sampling(inner_steps: usize, freeze: FreezeRule, threshold: f64) -> ParallelSampling {
    let defaults = huginn::settings::GenerationSettings::default();
    let max_wavefront = defaults.max_wavefront;
    ParallelSampling { inner_steps, freeze, threshold, max_wavefront, state_noise: 0.0, embed_ema: defaults.embed_ema }
}

fn name(budget: &Budget) -> String {
    match (budget.decoding, budget.exit.criterion) {
        (Decoding::Parallel(p), _) if p.freeze == FreezeRule::Fixed => format!("parallel r'={} fixed", p.inner_steps),
        (Decoding::Parallel(p), _) => format!("parallel r'={} {} {}", p.inner_steps, p.freeze, p.threshold),
        (_, ExitCriterion::None) => "sequential".into(),
        (_, criterion) => format!("sequential, exit {criterion} {}", BEST_EXIT.1),
    }
}

pub fn run(addition_models: &[PathBuf], large_model: &Path, out: &Path, quick: bool) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(md, "{}", SECTION.begin)?;
    writeln!(md, "## The parallel sampler\n")?;
    writeln!(md, "Produced by `cargo run --release -- bench --parallel` (only this section is rewritten).")?;
    writeln!(md, "`r'`: `inner_steps`; the rule and threshold: `freeze` and `exit_threshold`. Greedy, one request")?;
    writeln!(md, "at a time (batch 1), settings alternating every 10 problems. Tokens/s counts every generated token")?;
    writeln!(md, "over the whole request (its prompt's pass included); decode tokens/s the tokens after the first")?;
    writeln!(md, "over the time after it (what the sampler changes). Tokens per sampler step and the mean")?;
    writeln!(md, "wavefront are over the sampler steps; mean steps per token counts every window row's steps.\n")?;
    for dir in addition_models.iter().filter(|d| d.join("config.json").is_file()) {
        addition_table(&mut md, dir, quick)?;
    }
    large_table(&mut md, large_model, quick)?;
    writeln!(md, "{}", SECTION.end)?;
    SECTION.write(out, &md)?;
    eprintln!("wrote the parallel-sampler section of {}", out.display());
    Ok(())
}

fn addition_table(md: &mut String, dir: &Path, quick: bool) -> anyhow::Result<()> {
    let model =
        Arc::new(HuginnModel::load(dir, DType::F32, &Device::Cpu).with_context(|| format!("{}", dir.display()))?);
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config())?);
    let digits = TaskFile::read(dir)?.map_or(3, |t| t.digits);
    let problems = held_out_problems(if quick { 20 } else { 300 }, digits, 7);
    let num_steps = model.config().mean_recurrence;
    let folder = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    writeln!(
        md,
        "### `{folder}` ({digits}-digit operands, {} held-out problems, `num_steps` {num_steps})\n",
        problems.len()
    )?;
    writeln!(
        md,
        "| setting | accuracy | tokens/s | vs sequential | vs exit | decode tokens/s | vs sequential | vs exit | tokens per sampler step | mean wavefront | mean steps per token |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let exit = ExitRule::new(BEST_EXIT.0, Some(BEST_EXIT.1), 0)?;
    let mut settings = vec![Budget::fixed(num_steps), Budget { exit, ..Budget::fixed(num_steps) }];
    settings.extend(ADDITION_SAMPLERS.iter().filter(|s| s.0 <= num_steps).map(|&(inner, freeze, threshold)| Budget {
        decoding: Decoding::Parallel(sampling(inner, freeze, threshold)),
        ..Budget::fixed(num_steps)
    }));
    let mut tallies: Vec<Tally> = settings.iter().map(|_| Tally::default()).collect();
    for group in problems.chunks(10) {
        for (budget, tally) in settings.iter().zip(&mut tallies) {
            let started = Instant::now();
            let result = evaluate_in_batches(&model, &tokenizer, group, false, *budget, 1)?;
            tally.add(&result, started.elapsed().as_secs_f64());
        }
    }
    let [sequential, exit, ..] = &tallies[..] else { anyhow::bail!("no sequential settings") };
    let (seq, seq_decode) = (sequential.tokens_per_second(), sequential.decode_tokens_per_second());
    let (ex, ex_decode) = (exit.tokens_per_second(), exit.decode_tokens_per_second());
    for (budget, t) in settings.iter().zip(&tallies) {
        let (per_step, wavefront) = match budget.decoding {
            Decoding::Parallel(_) => {
                (format!("{:.2}", t.waves.tokens_per_step()), format!("{:.2}", t.waves.mean_wavefront()))
            }
            _ => ("-".into(), "-".into()),
        };
        let row = format!(
            "| {} | {:.1}% | {:.0} | {:.2}x | {:.2}x | {:.0} | {:.2}x | {:.2}x | {per_step} | {wavefront} | {:.2} |",
            name(budget),
            100.0 * t.accuracy(),
            t.tokens_per_second(),
            t.tokens_per_second() / seq,
            t.tokens_per_second() / ex,
            t.decode_tokens_per_second(),
            t.decode_tokens_per_second() / seq_decode,
            t.decode_tokens_per_second() / ex_decode,
            t.steps_per_token()
        );
        eprintln!("{folder} {row}");
        writeln!(md, "{row}")?;
    }
    writeln!(md)?;
    Ok(())
}

fn large_table(md: &mut String, dir: &Path, quick: bool) -> anyhow::Result<()> {
    let model = Arc::new(HuginnModel::load(dir, DType::F32, &Device::Cpu).context("loading the width-1024 model")?);
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config())?);
    let (tokens, rounds) = if quick { (4, 1) } else { (32, 2) };
    writeln!(md, "### width-1024 (random weights: speed only), `num_steps` {LARGE_STEPS}, the `fixed` rule\n")?;
    writeln!(
        md,
        "{tokens} tokens per request after an 8-token prompt, `init_scale` 0, no stop token; {rounds} alternating rounds."
    )?;
    writeln!(md, "With the `fixed` rule a position freezes after `num_steps / r'` sampler steps of `r'` core steps:")?;
    writeln!(md, "one token per sampler step once the window holds `num_steps / r'` positions.\n")?;
    writeln!(md, "| concurrency | setting | tokens/s | vs sequential | tokens per sampler step | mean wavefront |")?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|")?;
    for concurrency in [1, 16] {
        let mut settings = vec![Decoding::default()];
        settings.extend(LARGE_INNER.iter().map(|&inner| Decoding::Parallel(sampling(inner, FreezeRule::Fixed, 0.0))));
        let mut tallies: Vec<Tally> = settings.iter().map(|_| Tally::default()).collect();
        for _ in 0..rounds {
            for (decoding, tally) in settings.iter().zip(&mut tallies) {
                let mut params = GenerationParams::new(LARGE_STEPS);
                params.max_tokens = tokens;
                params.init_scale = 0.0;
                params.cache = CacheStrategy::Shared(1);
                params.stop_token_ids.clear();
                params.decoding = *decoding;
                let specs = vec![JobSpec::new(PROMPT.to_vec(), params); concurrency];
                let mut driver = Driver::new(model.clone(), tokenizer.clone(), concurrency);
                let started = Instant::now();
                let outcomes = driver.run(specs, |_, _| {})?;
                tally.seconds += started.elapsed().as_secs_f64();
                tally.add_outputs(outcomes.iter().flatten());
            }
        }
        let sequential = tallies[0].tokens_per_second();
        for (decoding, t) in settings.iter().zip(&tallies) {
            let (setting, per_step, wavefront) = match decoding {
                Decoding::Parallel(p) => (
                    format!("parallel r'={} fixed", p.inner_steps),
                    format!("{:.2}", t.waves.tokens_per_step()),
                    format!("{:.2}", t.waves.mean_wavefront()),
                ),
                _ => ("sequential".into(), "-".into(), "-".into()),
            };
            let row = format!(
                "| {concurrency} | {setting} | {:.2} | {:.2}x | {per_step} | {wavefront} |",
                t.tokens_per_second(),
                t.tokens_per_second() / sequential
            );
            eprintln!("width-1024 {row}");
            writeln!(md, "{row}")?;
        }
    }
    writeln!(md)?;
    Ok(())
}

/// The parallel-sampler section of the report at `out`, if it has one (a full run keeps it).
pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
