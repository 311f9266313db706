//! `huginn bench --attention`: the share of a 1,024-token prompt's prefill spent in the CPU
//! attention kernel, on the width-1024 model (float32 and bfloat16) and the full-size
//! Huginn-0125 shape (bfloat16), runs alternated, medians. The section replaces the one between
//! its markers in the report.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};

use super::bench_tally::median;
use super::report_section::Section;
use huginn::bench::attention::{PrefillTime, time_prefill};
use huginn::model::{HuginnModel, dtype_name};
use huginn::text::TextTokenizer;

const SECTION: Section = Section { begin: "<!-- attention: begin -->", end: "<!-- attention: end -->" };

/// One configuration: a model folder, its dtype and the prompt's depth.
struct Case<'a> {
    name: &'static str,
    dir: &'a Path,
    dtype: DType,
    num_steps: usize,
}

pub fn run(large_model: &Path, full_size_model: Option<&Path>, out: &Path, quick: bool) -> anyhow::Result<()> {
    let (tokens, repeats) = if quick { (256, 1) } else { (1024, 3) };
    let mut cases = vec![
        Case { name: "width-1024", dir: large_model, dtype: DType::F32, num_steps: 4 },
        Case { name: "width-1024", dir: large_model, dtype: DType::BF16, num_steps: 4 },
    ];
    if let Some(dir) = full_size_model {
        // One step: the prelude, one pass of the core block and the coda (the share is per layer).
        cases.push(Case { name: "Huginn-0125", dir, dtype: DType::BF16, num_steps: 1 });
    }
    let mut rows = Vec::new();
    for case in &cases {
        let model = Arc::new(
            HuginnModel::load(case.dir, case.dtype, &Device::Cpu)
                .with_context(|| format!("loading {}", case.dir.display()))?,
        );
        let tokenizer = Arc::new(TextTokenizer::load(case.dir, model.config())?);
        time_prefill(&model, &tokenizer, 16, case.num_steps)?; // warm-up
        let mut times: Vec<PrefillTime> = Vec::new();
        for _ in 0..repeats {
            let time = time_prefill(&model, &tokenizer, tokens, case.num_steps)?;
            eprintln!(
                "attention: {} {}: prefill {:.2} s, attention {:.2} s",
                case.name,
                dtype_name(case.dtype),
                time.seconds,
                time.attention_seconds
            );
            times.push(time);
        }
        rows.push((case, times));
    }
    let mut md = String::new();
    writeln!(md, "{}\n## Attention in a long prompt's prefill\n", SECTION.begin)?;
    writeln!(
        md,
        "`huginn bench --attention`: a {tokens}-token prompt (distinct ids) prefilled through the scheduler until its \
         first token, {} run(s) per model, {} threads; the time inside the CPU attention kernel (tiles of 4 query \
         rows per head, each key and value read once per tile) against the whole prefill.\n",
        repeats,
        huginn::cpu_threads::configured()
    )?;
    writeln!(md, "| model | dtype | num_steps | prefill (s) | attention (s) | attention share |")?;
    writeln!(md, "|---|---|---:|---:|---:|---:|")?;
    for (case, times) in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.2} | {:.1}% |",
            case.name,
            dtype_name(case.dtype),
            case.num_steps,
            median(times.iter().map(|t| t.seconds).collect()),
            median(times.iter().map(|t| t.attention_seconds).collect()),
            100.0 * median(times.iter().map(PrefillTime::attention_share).collect())
        )?;
    }
    writeln!(md, "{}", SECTION.end)?;
    SECTION.write(out, &md)?;
    println!("{md}");
    Ok(())
}

pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
