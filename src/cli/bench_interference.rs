//! `huginn bench --interference`: a 1,024-token prompt arriving while four requests stream on the
//! width-1024 model, for several row budgets (`engine.max_tick_rows`) and none: the streams'
//! worst gap during the prefill over their median, and the prompt's time to first token over the
//! same prompt alone with no budget. The section replaces the one between its markers in the
//! report (a full run keeps it).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};

use super::report_section::Section;
use huginn::bench::interference::{Interference, long_prompt};
use huginn::model::HuginnModel;
use huginn::settings::DEFAULT_MAX_TICK_ROWS;
use huginn::text::TextTokenizer;

const SECTION: Section = Section { begin: "<!-- interference: begin -->", end: "<!-- interference: end -->" };

const STREAMS: usize = 4;
const NUM_STEPS: usize = 8;
const WARMUP: usize = 6;

pub fn run(model_dir: &Path, out: &Path, quick: bool) -> anyhow::Result<()> {
    let model =
        Arc::new(HuginnModel::load(model_dir, DType::F32, &Device::Cpu).context("loading the width-1024 model")?);
    let tokenizer = Arc::new(TextTokenizer::load(model_dir, model.config())?);
    let (prompt_len, budgets): (usize, &[usize]) =
        if quick { (128, &[0, 64]) } else { (1024, &[0, 512, 256, 128, 64, 32, 16]) };
    let alone = long_prompt(&model, &tokenizer, 0, 0, NUM_STEPS, prompt_len, WARMUP);
    eprintln!("interference: the prompt alone, no budget: TTFT {:.2} s", alone.ttft);
    let runs: Vec<Interference> = budgets
        .iter()
        .map(|&budget| {
            let run = long_prompt(&model, &tokenizer, budget, STREAMS, NUM_STEPS, prompt_len, WARMUP);
            eprintln!(
                "interference: budget {budget}: median gap {:.3} s, worst {:.3} s ({:.1}x), TTFT {:.2} s",
                run.median_gap,
                run.worst_gap,
                run.stall(),
                run.ttft
            );
            run
        })
        .collect();

    let mut md = String::new();
    writeln!(md, "{}", SECTION.begin)?;
    writeln!(md, "## A long prompt beside streaming requests\n")?;
    writeln!(md, "Produced by `cargo run --release -- bench --interference` (only this section is rewritten).")?;
    writeln!(
        md,
        "{STREAMS} requests stream at `num_steps` {NUM_STEPS} on the width-1024 model (float32); once each has {WARMUP} tokens a"
    )?;
    writeln!(
        md,
        "{prompt_len}-token prompt arrives (`num_steps` {NUM_STEPS}). `engine.max_tick_rows` bounds the rows of every pass"
    )?;
    writeln!(
        md,
        "(0: unlimited, the whole prompt in each step's pass). The prompt alone, no budget: first token after {:.2} s.\n",
        alone.ttft
    )?;
    writeln!(
        md,
        "| max_tick_rows | streams' median gap (s) | worst gap during the prefill (s) | worst / median | prompt TTFT (s) | TTFT / alone |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
    for run in &runs {
        let name = if run.budget == 0 { "0 (unlimited)".to_string() } else { run.budget.to_string() };
        let default = if run.budget == DEFAULT_MAX_TICK_ROWS { " (default)" } else { "" };
        writeln!(
            md,
            "| {name}{default} | {:.3} | {:.3} | {:.1}x | {:.2} | {:.2}x |",
            run.median_gap,
            run.worst_gap,
            run.stall(),
            run.ttft,
            run.ttft / alone.ttft
        )?;
    }
    writeln!(md, "\nGoal at the default budget: worst gap at most 3x the median, prompt TTFT at most 1.5x alone.")?;
    writeln!(
        md,
        "Budgets below `engine.max_active_sequences` (64 by default) are refused at start-up (a prompt must always get a row);"
    )?;
    writeln!(
        md,
        "they are measured here (the engine's limits set directly) to show what a smaller pool of sequences would allow."
    )?;
    writeln!(md, "{}", SECTION.end)?;
    SECTION.write(out, &md)?;
    eprintln!("wrote the interference section of {}", out.display());
    Ok(())
}

/// The interference section of the report at `out`, if it has one (a full run keeps it).
pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
