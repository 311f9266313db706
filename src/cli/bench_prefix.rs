//! `huginn bench --prefix-cache`: the prefix cache on against off, side by side in one run, on the
//! workloads that repeat prompt beginnings: (a) multiple-choice scoring as lm-evaluation-harness
//! sends it (one `echo`, `max_tokens` 0 request per choice, all sharing a few-shot context), (b)
//! chat clients sharing a long system prompt (time to first token once the prompt is cached), (c)
//! the `n` choices of one request. Outputs must be identical on and off. The section replaces the
//! one between its markers in the report (a full run keeps it).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, ensure};
use candle_core::{DType, Device};

use super::bench_tally::median;
use super::report_section::Section;
use huginn::engine::{Completion, Driver, JobSpec};
use huginn::generate::GenerationParams;
use huginn::model::{CacheStrategy, HuginnModel, PREFIX_BLOCK_TOKENS, PrefixLayout};
use huginn::settings::DEFAULT_MAX_TICK_ROWS;
use huginn::text::TextTokenizer;

const SECTION: Section = Section { begin: "<!-- prefix-cache: begin -->", end: "<!-- prefix-cache: end -->" };

const NUM_STEPS: usize = 8;
const CHOICES: [&str; 4] = [" 11", " 12", " 13", " 14"];
const CACHE_BYTES: usize = 1 << 30;

struct Loaded {
    name: String,
    model: Arc<HuginnModel>,
    tokenizer: Arc<TextTokenizer>,
}

impl Loaded {
    fn new(name: &str, dir: &Path) -> anyhow::Result<Self> {
        let model = Arc::new(
            HuginnModel::load(dir, DType::F32, &Device::Cpu).with_context(|| format!("loading {}", dir.display()))?,
        );
        let tokenizer = Arc::new(TextTokenizer::load(dir, model.config())?);
        Ok(Self { name: name.into(), model, tokenizer })
    }

    /// A driver as a server worker runs (its default row budget), with or without the cache.
    fn driver(&self, cached: bool) -> Driver {
        Driver::with_tick_rows(self.model.clone(), self.tokenizer.clone(), 16, DEFAULT_MAX_TICK_ROWS)
            .with_prefix_cache(if cached { CACHE_BYTES } else { 0 })
    }

    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text)?)
    }
}

fn params(max_tokens: usize) -> GenerationParams {
    let mut params = GenerationParams::new(NUM_STEPS);
    params.max_tokens = max_tokens;
    params.cache = CacheStrategy::Full;
    params
}

/// A few-shot context of about `tokens` tokens: worked additions, one per line.
fn few_shot(tokens: usize) -> String {
    let mut text = String::new();
    let mut i = 0;
    while text.len() < tokens {
        let (a, b) = (17 + 13 * i % 70, 5 + 7 * i % 20);
        let _ = write!(text, "Question: what is {a} plus {b}?\nAnswer: {}\n\n", a + b);
        i += 1;
    }
    text
}

pub fn run(default_model: &Path, large_model: &Path, out: &Path, quick: bool) -> anyhow::Result<()> {
    let small = Loaded::new("default model", default_model)?;
    let large = Loaded::new("width-1024", large_model)?;
    let (questions, pairs) = if quick { (2, 1) } else { (8, 2) };
    let mut md = String::new();
    writeln!(md, "{}", SECTION.begin)?;
    writeln!(md, "## Prefix caching\n")?;
    writeln!(md, "Produced by `cargo run --release -- bench --prefix-cache` (only this section is rewritten).")?;
    writeln!(
        md,
        "Float32, `num_steps` {NUM_STEPS}, `full` cache, the server's row budget ({DEFAULT_MAX_TICK_ROWS} rows a pass), the"
    )?;
    writeln!(
        md,
        "cache on ({} MiB) against off in alternating runs on a fresh worker each; medians.",
        CACHE_BYTES >> 20
    )?;
    writeln!(md, "Every run's outputs are checked identical on and off (log-likelihoods, ids).\n")?;
    block_sizes(&mut md, &large)?;
    writeln!(md, "### (a) Multiple-choice scoring, as lm-evaluation-harness sends it\n")?;
    writeln!(
        md,
        "{questions} questions of 4 choices after a few-shot context; one `echo`, `max_tokens` 0 request per"
    )?;
    writeln!(
        md,
        "choice, one at a time (the harness's default; lm-eval 0.4.13 asks for 1 token and drops it); the cache"
    )?;
    writeln!(md, "starts empty.\n")?;
    writeln!(
        md,
        "| model | context tokens | requests | time off (s) | time on (s) | off / on | hit rate | log-likelihoods |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|")?;
    for (loaded, context) in [(&small, if quick { 120 } else { 200 }), (&large, if quick { 120 } else { 400 })] {
        scoring(&mut md, loaded, context, questions, pairs)?;
    }
    writeln!(md)?;
    chat(&mut md, &large, if quick { (4, 160) } else { (16, 1000) }, pairs)?;
    choices(&mut md, &large, if quick { 120 } else { 400 }, pairs)?;
    writeln!(md, "{}", SECTION.end)?;
    SECTION.write(out, &md)?;
    eprintln!("wrote the prefix-cache section of {}", out.display());
    Ok(())
}

/// What a cached token costs at Huginn-0125's shape and at the width-1024 model's.
fn block_sizes(md: &mut String, large: &Loaded) -> anyhow::Result<()> {
    writeln!(md, "A cached token holds the K/V of every prelude layer, every core layer at every step, every coda")?;
    writeln!(md, "layer, and its state (blocks of {PREFIX_BLOCK_TOKENS} tokens):\n")?;
    writeln!(md, "| shape | dtype | num_steps | bytes per cached token |")?;
    writeln!(md, "|---|---|---:|---:|")?;
    let huginn = huginn::checkpoint::preset("huginn-0125")?;
    for (name, cfg, kv, state, steps) in [
        ("Huginn-0125", &huginn, DType::BF16, DType::F32, 32),
        ("Huginn-0125", &huginn, DType::BF16, DType::F32, 8),
        ("width-1024", large.model.config(), DType::F32, DType::F32, NUM_STEPS),
    ] {
        let bytes = PrefixLayout::new(cfg, steps).block_bytes(cfg, kv, state) / PREFIX_BLOCK_TOKENS;
        writeln!(md, "| {name} | {kv:?} K/V | {steps} | {:.2} MB |", bytes as f64 / 1e6)?;
    }
    writeln!(md)?;
    Ok(())
}

/// Runs `jobs` one after another on `driver`; their completions and the seconds it took.
fn one_by_one(driver: &mut Driver, jobs: &[JobSpec]) -> anyhow::Result<(Vec<Completion>, f64)> {
    let started = Instant::now();
    let mut done = Vec::with_capacity(jobs.len());
    for job in jobs {
        done.push(driver.run_one(job.clone())?);
    }
    Ok((done, started.elapsed().as_secs_f64()))
}

/// The log-likelihood of each request's continuation (its last `tail` prompt tokens), as bits.
fn loglikelihoods(done: &[Completion], tails: &[usize]) -> Vec<u32> {
    let sum = |c: &Completion, tail: usize| -> f32 {
        let rows = &c.prompt_logprobs;
        rows[rows.len().saturating_sub(tail)..].iter().map(|t| t.logprob).sum()
    };
    done.iter().zip(tails).map(|(c, &tail)| sum(c, tail).to_bits()).collect()
}

fn scoring(md: &mut String, loaded: &Loaded, context: usize, questions: usize, pairs: usize) -> anyhow::Result<()> {
    let shots = few_shot(context);
    let mut jobs = Vec::new();
    let mut tails = Vec::new();
    for q in 0..questions {
        let question = format!("{shots}Question: what is {} plus {}?\nAnswer:", 3 + q, 8);
        for choice in CHOICES {
            let prompt = loaded.encode(&(question.clone() + choice))?;
            tails.push(loaded.encode(&(question.clone() + choice))?.len() - loaded.encode(&question)?.len());
            let mut job = JobSpec::new(prompt, params(0));
            job.prompt_logprobs = true;
            jobs.push(job);
        }
    }
    let context_tokens = loaded.encode(&shots)?.len();
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut hit_rate, mut same) = (0.0, true);
    for pair in 0..pairs {
        for cached in if pair % 2 == 0 { [false, true] } else { [true, false] } {
            let (done, seconds) = one_by_one(&mut loaded.driver(cached), &jobs)?;
            let scores = loglikelihoods(&done, &tails);
            if cached {
                let prompt: usize = jobs.iter().map(|j| j.prompt.len()).sum();
                hit_rate = done.iter().map(|c| c.cached_tokens).sum::<usize>() as f64 / prompt as f64;
                on.push((seconds, scores));
            } else {
                off.push((seconds, scores));
            }
        }
    }
    for ((_, a), (_, b)) in off.iter().zip(&on) {
        same &= a == b;
    }
    ensure!(same, "{}: the log-likelihoods differ with the cache on", loaded.name);
    let (t_off, t_on) = (median(off.iter().map(|r| r.0).collect()), median(on.iter().map(|r| r.0).collect()));
    let row = format!(
        "| {} | {context_tokens} | {} | {t_off:.2} | {t_on:.2} | {:.2}x | {:.0}% | identical |",
        loaded.name,
        jobs.len(),
        t_off / t_on,
        100.0 * hit_rate
    );
    eprintln!("prefix cache, scoring: {row}");
    writeln!(md, "{row}")?;
    Ok(())
}

/// Time to first token of `done`'s choices: mean and 90th percentile.
fn ttft(done: &[Completion]) -> (f64, f64) {
    let mut times: Vec<f64> = done.iter().map(|c| c.first_token_seconds).collect();
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let p90 = times[((times.len() as f64 * 0.9).ceil() as usize).clamp(1, times.len()) - 1];
    (mean, p90)
}

fn chat(md: &mut String, loaded: &Loaded, (clients, system): (usize, usize), pairs: usize) -> anyhow::Result<()> {
    let system_prompt = few_shot(system);
    let job = |c: usize| -> anyhow::Result<JobSpec> {
        let text = format!("{system_prompt}User {c}: what is {c} plus {}?\nAssistant:", 2 * c + 1);
        Ok(JobSpec::new(loaded.encode(&text)?, params(4)))
    };
    let jobs = (0..clients).map(job).collect::<anyhow::Result<Vec<_>>>()?;
    let system_tokens = loaded.encode(&system_prompt)?.len();
    // Per run: (mean TTFT, p90 TTFT), and the generated ids.
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut ids: [Vec<Vec<u32>>; 2] = Default::default();
    for pair in 0..pairs {
        for cached in if pair % 2 == 0 { [false, true] } else { [true, false] } {
            let mut driver = loaded.driver(cached);
            // One earlier conversation: with the cache, the system prompt is in it.
            driver.run_one(job(clients)?)?;
            let done: Vec<Completion> = driver.run(jobs.clone(), |_, _| {})?.into_iter().flatten().collect();
            let got: Vec<Vec<u32>> = done.iter().map(|c| c.token_ids.clone()).collect();
            ensure!(ids[usize::from(cached)].is_empty() || ids[usize::from(cached)] == got, "chat: runs differ");
            ids[usize::from(cached)] = got;
            if cached { on.push(ttft(&done)) } else { off.push(ttft(&done)) }
        }
    }
    ensure!(ids[0] == ids[1], "chat: the ids differ with the cache on");
    let mean = |runs: &[(f64, f64)]| median(runs.iter().map(|r| r.0).collect());
    let p90 = |runs: &[(f64, f64)]| median(runs.iter().map(|r| r.1).collect());
    writeln!(md, "### (b) Chat clients sharing a system prompt ({})\n", loaded.name)?;
    writeln!(
        md,
        "{clients} clients arrive together, each with the same {system_tokens}-token system prompt and its own"
    )?;
    writeln!(md, "question, after one earlier conversation (which, with the cache, left the system prompt in it);")?;
    writeln!(md, "4 tokens each. Time to first token, from their arrival:\n")?;
    writeln!(md, "| cache | mean TTFT (s) | p90 TTFT (s) | generated ids |")?;
    writeln!(md, "|---|---:|---:|---|")?;
    writeln!(md, "| off | {:.2} | {:.2} | |", mean(&off), p90(&off))?;
    writeln!(md, "| on | {:.2} | {:.2} | identical |", mean(&on), p90(&on))?;
    writeln!(md, "| off / on | {:.1}x | {:.1}x | |\n", mean(&off) / mean(&on), p90(&off) / p90(&on))?;
    eprintln!("prefix cache, chat: mean TTFT off {:.2} s, on {:.2} s", mean(&off), mean(&on));
    Ok(())
}

fn choices(md: &mut String, loaded: &Loaded, prompt: usize, pairs: usize) -> anyhow::Result<()> {
    let text = few_shot(prompt);
    let tokens = loaded.encode(&text)?;
    let job = |n: usize| {
        let mut job = JobSpec::new(tokens.clone(), params(8));
        job.n = n;
        job.params.seed = 5;
        job
    };
    writeln!(
        md,
        "### (c) The `n` choices of one request ({}, a {}-token prompt, 8 tokens each)\n",
        loaded.name,
        tokens.len()
    )?;
    writeln!(md, "| request | cache | time (s) | cached tokens |")?;
    writeln!(md, "|---|---|---:|---:|")?;
    let settings = [(1, false), (4, false), (4, true)];
    let mut times = vec![Vec::new(); settings.len()];
    let mut hits = vec![0; settings.len()];
    let mut ids = vec![Vec::new(); settings.len()];
    for _ in 0..pairs {
        for (i, &(n, cached)) in settings.iter().enumerate() {
            let started = Instant::now();
            let done: Vec<Completion> = loaded.driver(cached).run(vec![job(n)], |_, _| {})?.remove(0);
            times[i].push(started.elapsed().as_secs_f64());
            hits[i] = done.iter().map(|c| c.cached_tokens).sum::<usize>();
            ids[i] = done.iter().map(|c| c.token_ids.clone()).collect::<Vec<_>>();
        }
    }
    ensure!(ids[1] == ids[2], "n: 4: the choices differ with the cache on");
    let base = median(times[0].clone());
    for (i, &(n, cached)) in settings.iter().enumerate() {
        let (t, hits) = (median(times[i].clone()), hits[i]);
        let cache = if cached { "on" } else { "off" };
        writeln!(md, "| `n: {n}` | {cache} | {t:.2} ({:.2}x `n: 1`) | {hits} |", t / base)?;
        eprintln!("prefix cache, n {n}, cache {cache}: {t:.2} s");
    }
    writeln!(md)?;
    Ok(())
}

/// The prefix-cache section of the report at `out`, if it has one (a full run keeps it).
pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
