//! `huginn train`: trains a recurrent-depth model on the addition task and writes a checkpoint.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use huginn::checkpoint::preset;
use huginn::model::HuginnConfig;
use huginn::model::weights::read_text;
use huginn::train::{TrainOptions, Trainer};

#[derive(Args)]
pub struct TrainArgs {
    /// Output folder: the checkpoint (published format) and the trainer state.
    #[arg(long, default_value = "models/huginn-addition")]
    out: PathBuf,
    /// Model shape: a preset name (addition, tiny, ...) ...
    #[arg(long, default_value = "addition", conflicts_with = "config")]
    preset: String,
    /// ... or a config.json.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Mean recurrence of the training distribution (also the served default num_steps).
    #[arg(long)]
    mean_recurrence: Option<usize>,
    /// Recurrences backpropagated through (truncated backpropagation).
    #[arg(long)]
    backprop_depth: Option<usize>,
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    min_lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Operands below 10^digits.
    #[arg(long, default_value_t = 3)]
    digits: u32,
    /// Curriculum: grow the operands' digits from --start-digits to --digits over this many
    /// steps (0: --digits from the start).
    #[arg(long, default_value_t = 0)]
    curriculum_steps: usize,
    /// First digit count of the curriculum.
    #[arg(long, default_value_t = 1)]
    start_digits: u32,
    /// Share of batches in the chat format.
    #[arg(long, default_value_t = 0.25)]
    chat_fraction: f64,
    /// Cap on the recurrences of one step.
    #[arg(long, default_value_t = 32)]
    max_recurrence: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start from the weights of this checkpoint folder (same shape) instead of a fresh
    /// initialisation; the optimizer starts afresh.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Write a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Continue the run whose checkpoint is in --out (same options required).
    #[arg(long)]
    resume: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut model: HuginnConfig = match &args.config {
        Some(path) => HuginnConfig::from_json_str(&read_text(path)?, &path.display().to_string())?,
        None => preset(&args.preset)?,
    };
    if let Some(mean) = args.mean_recurrence {
        model.mean_recurrence = mean;
    }
    if let Some(depth) = args.backprop_depth {
        model.mean_backprop_depth = depth;
    }
    anyhow::ensure!(args.steps > 0 && args.batch_size > 0, "--steps and --batch-size must be at least 1");
    let most = huginn::train::addition::MAX_DIGITS;
    anyhow::ensure!((1..=most).contains(&args.digits), "--digits must be 1 to {most}");
    anyhow::ensure!(
        (1..=args.digits).contains(&args.start_digits),
        "--start-digits must be 1 to --digits ({})",
        args.digits
    );
    anyhow::ensure!(args.curriculum_steps <= args.steps, "--curriculum-steps must be at most --steps");
    if let Some(init) = &args.init_from {
        anyhow::ensure!(
            init.join("model.safetensors").is_file(),
            "--init-from {}: no model.safetensors there (give a checkpoint folder written by huginn train)",
            init.display()
        );
    }
    let options = TrainOptions {
        model,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        digits: args.digits,
        curriculum_steps: args.curriculum_steps,
        start_digits: if args.curriculum_steps == 0 { 0 } else { args.start_digits },
        chat_fraction: args.chat_fraction,
        max_recurrence: args.max_recurrence,
        seed: args.seed,
        init_from: args.init_from.clone(),
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut trainer = Trainer::new(options, &args.out, args.resume)?;
    let bar = ProgressBar::new(args.steps as u64).with_position(trainer.step() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} (eta {eta}) {msg}")
            .context("progress bar template")?,
    );
    let (mut smoothed, mut tokens, mut seconds) = (None::<f64>, 0usize, 0f64);
    while trainer.step() < args.steps {
        let report = trainer.train_step()?;
        anyhow::ensure!(report.loss.is_finite(), "the loss diverged at step {}", report.step);
        smoothed = Some(smoothed.map_or(report.loss, |s| 0.95 * s + 0.05 * report.loss));
        tokens += report.tokens;
        seconds += report.seconds;
        let status = format!(
            "loss {:.4} lr {:.1e} r {:2} | {:.0} tokens/s",
            smoothed.unwrap_or(report.loss),
            report.lr,
            report.recurrence,
            tokens as f64 / seconds.max(1e-9)
        );
        bar.set_position(report.step as u64);
        if bar.is_hidden() && report.step % 50 == 0 {
            // Not a terminal (a log file, CI): a plain line now and then instead of the bar.
            eprintln!("step {}/{}: {status}", report.step, args.steps);
        }
        bar.set_message(status);
        if report.step % args.checkpoint_every == 0 || report.step == args.steps {
            trainer.save()?;
            let line = format!("step {}: loss {:.4}, checkpoint written", report.step, smoothed.unwrap_or(0.0));
            if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) }
        }
    }
    bar.finish();
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
