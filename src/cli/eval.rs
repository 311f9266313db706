//! `huginn eval`: exact-match accuracy on held-out addition problems at several compute budgets.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;

use huginn::generate::{Decoding, FreezeRule, ParallelSampling, Speculation};
use huginn::model::{ExitCriterion, ExitRule, HuginnModel};
use huginn::text::TextTokenizer;
use huginn::train::addition::TaskFile;
use huginn::train::eval::{Budget, EvalResult, evaluate, held_out_problems};

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint folder (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Problems per setting.
    #[arg(long, default_value_t = 1000)]
    problems: usize,
    /// Seed of the problem draw (problems come from the held-out split whatever the seed).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Operands below 10^digits (default: the model's `task.json`, else 3).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=huginn::train::addition::MAX_DIGITS as i64))]
    digits: Option<u32>,
    /// Fixed recurrence counts to evaluate.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    num_steps: Vec<usize>,
    /// Adaptive exit settings to evaluate, as `criterion:threshold:cap` (for example `kl:0.0005:32`).
    #[arg(long = "exit", value_delimiter = ',')]
    exits: Vec<String>,
    /// Self-speculative settings to evaluate, as `draft_steps:draft_tokens:num_steps` (for example
    /// `2:4:12`).
    #[arg(long = "draft", value_delimiter = ',')]
    drafts: Vec<String>,
    /// Parallel-sampler settings to evaluate, as `inner_steps:freeze:threshold:num_steps` (for
    /// example `4:latent-diff:0.03:12`; the threshold `-` for `fixed`).
    #[arg(long = "parallel", value_delimiter = ',')]
    parallels: Vec<String>,
    /// Ask in the chat format instead of as a completion.
    #[arg(long)]
    chat: bool,
    /// Also write the table as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Also write a plot of accuracy against num_steps (SVG) to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Also write a plot of the mean steps per answer position under each `--exit` setting (SVG)
    /// to this file.
    #[arg(long)]
    steps_plot: Option<PathBuf>,
}

fn parse_exit(spec: &str) -> anyhow::Result<(ExitRule, usize)> {
    let parts: Vec<&str> = spec.split(':').collect();
    anyhow::ensure!(parts.len() == 3, "--exit `{spec}`: use criterion:threshold:cap, e.g. kl:0.0005:32");
    let criterion: ExitCriterion = parts[0].parse()?;
    let threshold: f64 = parts[1].parse().with_context(|| format!("--exit `{spec}`: threshold"))?;
    let cap: usize = parts[2].parse().with_context(|| format!("--exit `{spec}`: cap"))?;
    Ok((ExitRule::new(criterion, Some(threshold), 0)?, cap))
}

fn parse_draft(spec: &str) -> anyhow::Result<Budget> {
    let parts: Vec<usize> = spec
        .split(':')
        .map(|p| p.parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--draft `{spec}`: use draft_steps:draft_tokens:num_steps, e.g. 2:4:12"))?;
    let [draft_steps, draft_tokens, num_steps] = parts[..] else {
        anyhow::bail!("--draft `{spec}`: use draft_steps:draft_tokens:num_steps, e.g. 2:4:12");
    };
    let decoding = Decoding::Speculative(Speculation { draft_steps, draft_tokens });
    let budget = Budget { decoding, ..Budget::fixed(num_steps) };
    let mut params = huginn::generate::GenerationParams::new(num_steps);
    params.decoding = budget.decoding;
    params.check().with_context(|| format!("--draft `{spec}`"))?;
    Ok(budget)
}

/// A `--parallel` setting, checked as a request's would be.
fn parse_parallel(spec: &str) -> anyhow::Result<Budget> {
    let usage =
        || format!("--parallel `{spec}`: use inner_steps:freeze:threshold:num_steps, e.g. 4:latent-diff:0.03:12");
    let [inner, freeze, threshold, num_steps] = spec.split(':').collect::<Vec<_>>()[..] else {
        anyhow::bail!(usage());
    };
    let freeze: FreezeRule = freeze.parse().with_context(usage)?;
    let threshold = match threshold {
        "-" => huginn::generate::parallel::DEFAULT_FREEZE_THRESHOLD,
        t => t.parse().with_context(usage)?,
    };
    let num_steps: usize = num_steps.parse().with_context(usage)?;
    let sampling = ParallelSampling {
        inner_steps: inner.parse().with_context(usage)?,
        freeze,
        threshold,
        max_wavefront: huginn::settings::GenerationSettings::default().max_wavefront,
        state_noise: 0.0,
        embed_ema: huginn::settings::GenerationSettings::default().embed_ema,
    };
    let budget = Budget { decoding: Decoding::Parallel(sampling), ..Budget::fixed(num_steps) };
    let mut params = huginn::generate::GenerationParams::new(num_steps);
    params.decoding = budget.decoding;
    params.check().with_context(|| format!("--parallel `{spec}`"))?;
    Ok(budget)
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let dir = match args.model {
        Some(dir) => dir,
        None => huginn::settings::default_model_dir().context("no --model given and the default model is missing")?,
    };
    let model =
        HuginnModel::load(&dir, DType::F32, &Device::Cpu).with_context(|| format!("loading {}", dir.display()))?;
    let tokenizer = std::sync::Arc::new(TextTokenizer::load(&dir, model.config())?);
    let model = std::sync::Arc::new(model);
    let task = TaskFile::read(&dir)?;
    let digits = args.digits.or(task.map(|t| t.digits)).unwrap_or(3);
    let problems = held_out_problems(args.problems, digits, args.seed);
    let mut settings: Vec<(String, Budget)> =
        args.num_steps.iter().map(|&n| (format!("fixed {n}"), Budget::fixed(n))).collect();
    for spec in &args.exits {
        let (exit, cap) = parse_exit(spec)?;
        settings.push((format!("exit {spec}"), Budget { exit, ..Budget::fixed(cap) }));
    }
    for spec in &args.drafts {
        settings.push((format!("draft {spec}"), parse_draft(spec)?));
    }
    for spec in &args.parallels {
        settings.push((format!("parallel {spec}"), parse_parallel(spec)?));
    }
    let format = if args.chat { "chat" } else { "completion" };
    let mut md = String::new();
    writeln!(md, "| setting | num_steps (cap) | accuracy | mean steps per token |")?;
    writeln!(md, "|---|---:|---:|---:|")?;
    eprintln!("{} held-out problems ({}-digit operands, {format} format, seed {})", problems.len(), digits, args.seed);
    let mut fixed: Vec<(usize, EvalResult)> = Vec::new();
    let mut adaptive: Vec<(String, EvalResult)> = Vec::new();
    for (name, budget) in &settings {
        let result = evaluate(&model, &tokenizer, &problems, args.chat, *budget)?;
        let row = format!(
            "| {name} | {} | {:.1}% | {:.2} |",
            budget.num_steps,
            100.0 * result.accuracy(),
            result.mean_steps_per_token()
        );
        println!("{row}");
        writeln!(md, "{row}")?;
        if matches!(budget.decoding, Decoding::Speculative(_)) {
            eprintln!("{name}: {:.1}% of the drafts accepted", 100.0 * result.acceptance());
        } else if matches!(budget.decoding, Decoding::Parallel(_)) {
            let w = result.waves;
            eprintln!(
                "{name}: {:.2} tokens per sampler step, mean wavefront {:.2}",
                w.tokens_per_step(),
                w.mean_wavefront()
            );
        } else if budget.exit.criterion == ExitCriterion::None {
            fixed.push((budget.num_steps, result));
        } else {
            adaptive.push((name.clone(), result));
        }
    }
    if !adaptive.is_empty() {
        // Mean steps per answer digit under each adaptive setting: which digits take longer.
        let digits = adaptive.iter().map(|(_, r)| r.steps_by_position.len()).max().unwrap_or(0);
        let header: String = (1..=digits).map(|d| format!(" digit {d} |")).collect();
        writeln!(md, "\n| mean steps per answer position | {header} end |")?;
        writeln!(md, "|---|{}---:|", "---:|".repeat(digits))?;
        for (name, r) in &adaptive {
            let means = r.mean_steps_by_position();
            let cells: String =
                (0..digits).map(|d| means.get(d).map_or(" - |".to_string(), |m| format!(" {m:.2} |"))).collect();
            let row = format!("| {name} |{cells} {:.2} |", r.mean_end_token_steps());
            println!("{row}");
            writeln!(md, "{row}")?;
        }
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, super::plot::accuracy_svg(&fixed))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.steps_plot {
        anyhow::ensure!(!adaptive.is_empty(), "--steps-plot needs at least one --exit setting");
        std::fs::write(path, super::plot::steps_by_position_svg(&adaptive))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
