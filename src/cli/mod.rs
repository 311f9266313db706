//! Command-line interface: `huginn serve` (default), `generate`, `init-random`, `bench`, `train`, `eval`.

mod bench;
mod bench_attention;
mod bench_elastic;
mod bench_families;
mod bench_full_size;
mod bench_interference;
mod bench_parallel;
mod bench_prefix;
mod bench_roofline;
mod bench_serving;
mod bench_speculative;
mod bench_structured;
mod bench_tally;
mod elastic_plot;
mod eval;
mod generate;
mod init_random;
mod plot;
mod report_section;
mod roofline_plot;
mod serve;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "huginn", version, about = "Inference for recurrent-depth language models (Huginn-0125 architecture)")]
pub struct Cli {
    /// Settings file (default: config/default.toml when present).
    #[arg(long, global = true)]
    settings: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (the default command).
    Serve(serve::ServeArgs),
    /// Generate a continuation of a prompt with a local checkpoint.
    Generate(generate::GenerateArgs),
    /// Write a random-weight checkpoint of any shape in the published format.
    InitRandom(init_random::InitRandomArgs),
    /// Measure batch-1 decode speed and write docs/BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Train a recurrent-depth model on integer addition (CPU) and write a checkpoint.
    Train(train::TrainArgs),
    /// Exact-match accuracy on held-out addition problems at several compute budgets.
    Eval(eval::EvalArgs),
}

/// Parses the command line and runs the chosen command.
pub fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "huginn=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let settings = huginn::settings::Settings::load(cli.settings.as_deref())?;
    match cli.command.unwrap_or(Command::Serve(serve::ServeArgs::default())) {
        Command::Serve(args) => serve::run(args, settings),
        Command::Generate(args) => generate::run(args, settings),
        Command::InitRandom(args) => init_random::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
    }
}
