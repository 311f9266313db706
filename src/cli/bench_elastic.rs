//! `huginn bench --elastic`: what a server does with more load than it can serve at full depth.
//! On `models/huginn-addition-6` through the engine: a closed loop of `MAX_ACTIVE` clients at
//! full depth measures the rate the server sustains (requests/s) and its inter-token latency,
//! which becomes elastic depth's target. Then open-loop arrivals (Poisson, seeded) ramp through
//! `PHASES` times that rate and back, against three servers side by side: fixed depth with a
//! deep queue (it queues), fixed depth with a small queue (it refuses: 429), and elastic depth
//! (every request with `min_num_steps` 3, the latency target above and a queue-wait target). Per
//! phase: time to first token and inter-token latency (p50, p99), tokens/s, 429s, accuracy on the
//! problems answered, and mean steps per generated token; the runs alternate when repeated and
//! each figure is the median over the repeats. The section (and `docs/elastic-depth.svg`)
//! replace their previous versions.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device};
use rand::{RngExt, SeedableRng, rngs::StdRng};

use super::bench_tally::median;
use super::elastic_plot::{Series, timeline_svg};
use super::report_section::Section;
use huginn::bench::elastic::{Arrival, Record, open_loop};
use huginn::bench::load::{percentile, run_one};
use huginn::engine::{ElasticTargets, Engine, EngineConfig, JobSpec, SchedulerLimits};
use huginn::generate::GenerationParams;
use huginn::model::{CacheStrategy, HuginnModel};
use huginn::text::TextTokenizer;
use huginn::train::addition::{Formatter, Problem, TaskFile};
use huginn::train::eval::held_out_problems;

/// (seconds, value) points of a line.
type Points = Vec<(f64, f64)>;

const SECTION: Section = Section { begin: "<!-- elastic: begin -->", end: "<!-- elastic: end -->" };
/// The arrival rate of each phase, as a multiple of the rate sustained at full depth.
const PHASES: [f64; 7] = [0.5, 1.0, 2.0, 3.0, 2.0, 1.0, 0.5];
const MAX_ACTIVE: usize = 16;
const FLOOR: usize = 3;

/// Rows of a pass (`engine.max_tick_rows`) of every server but the last.
const TICK_ROWS: usize = 2 * MAX_ACTIVE;

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Server {
    Queues,
    Refuses,
    Elastic,
    /// Elastic depth without a row budget: as many elastic sequences as the slots allow.
    ElasticUnbounded,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Queues => "fixed depth, deep queue",
            Server::Refuses => "fixed depth, small queue",
            Server::Elastic => "elastic depth",
            Server::ElasticUnbounded => "elastic, no row budget",
        }
    }

    fn is_elastic(self) -> bool {
        matches!(self, Server::Elastic | Server::ElasticUnbounded)
    }
}

struct Setup {
    model: Arc<HuginnModel>,
    tokenizer: Arc<TextTokenizer>,
    problems: Vec<Problem>,
    prompts: Vec<Vec<u32>>,
    num_steps: usize,
}

impl Setup {
    fn spec(&self, i: usize, elastic: bool) -> JobSpec {
        let problem = &self.problems[i % self.problems.len()];
        let mut params = GenerationParams::new(self.num_steps);
        params.max_tokens = problem.answer().len() + 2;
        params.stop_token_ids = self.tokenizer.special().stop.clone();
        params.init_scale = 0.0;
        params.cache = CacheStrategy::Shared(1);
        params.min_num_steps = elastic.then_some(FLOOR);
        JobSpec::new(self.prompts[i % self.prompts.len()].clone(), params)
    }

    fn engine(&self, queue_capacity: usize, elastic: ElasticTargets, max_tick_rows: usize) -> Arc<Engine> {
        let limits = SchedulerLimits {
            max_active_sequences: MAX_ACTIVE,
            max_kv_bytes: usize::MAX,
            max_tick_rows,
            prefix_cache_bytes: 0,
            elastic,
        };
        let config = EngineConfig { queue_capacity, limits, restart_backoff: Duration::from_secs(1) };
        Arc::new(Engine::start(vec![self.model.clone()], self.tokenizer.clone(), config))
    }
}

/// Requests/s and the median inter-token latency of `MAX_ACTIVE` clients at full depth.
fn calibrate(setup: &Setup, seconds: f64) -> (f64, f64) {
    let engine = setup.engine(1024, ElasticTargets::default(), TICK_ROWS);
    let started = Instant::now();
    let results: Vec<(usize, Vec<f64>)> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..MAX_ACTIVE)
            .map(|c| {
                let (engine, setup) = (&engine, &setup);
                scope.spawn(move || {
                    let (mut done, mut gaps, mut i) = (0, Vec::new(), c);
                    while started.elapsed().as_secs_f64() < seconds {
                        let (_, more, tokens) = run_one(engine, setup.spec(i, false));
                        if tokens == 0 {
                            break;
                        }
                        gaps.extend(more);
                        done += 1;
                        i += MAX_ACTIVE;
                    }
                    (done, gaps)
                })
            })
            .collect();
        clients.into_iter().filter_map(|c| c.join().ok()).collect()
    });
    let requests: usize = results.iter().map(|r| r.0).sum();
    let gaps: Vec<f64> = results.into_iter().flat_map(|r| r.1).collect();
    (requests as f64 / started.elapsed().as_secs_f64(), percentile(&gaps, 0.9))
}

/// Poisson arrivals through the phases (`rate` requests/s at 1x, `phase` seconds each).
fn arrivals(setup: &Setup, rate: f64, phase: f64, elastic: bool, seed: u64) -> Vec<Arrival> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut t = 0.0;
    for (p, multiple) in PHASES.iter().enumerate() {
        let end = (p + 1) as f64 * phase;
        loop {
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            t += -u.ln() / (rate * multiple);
            if t >= end {
                t = end;
                break;
            }
            let i = out.len();
            let answer = setup.problems[i % setup.problems.len()].answer();
            out.push(Arrival { at: t, spec: setup.spec(i, elastic), answer });
        }
    }
    out
}

/// One phase's figures for one run.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseFigures {
    ttft_p50: f64,
    ttft_p99: f64,
    itl_p50: f64,
    itl_p99: f64,
    tokens_per_second: f64,
    refused: f64,
    accuracy: f64,
    steps: f64,
}

fn phase_figures(records: &[Record], from: f64, to: f64) -> PhaseFigures {
    let arrived: Vec<&Record> = records.iter().filter(|r| r.at >= from && r.at < to).collect();
    let answered: Vec<&Record> = arrived.iter().copied().filter(|r| !r.refused && r.stopped).collect();
    let ttft: Vec<f64> = answered.iter().filter_map(|r| r.ttft()).collect();
    let gaps: Vec<f64> = answered.iter().flat_map(|r| r.gaps()).collect();
    let tokens = records.iter().flat_map(|r| r.token_times.iter()).filter(|&&t| t >= from && t < to).count();
    let steps: Vec<f64> = answered.iter().flat_map(|r| r.steps.iter().skip(1).map(|&s| s as f64)).collect();
    let correct = answered.iter().filter(|r| r.correct()).count();
    PhaseFigures {
        ttft_p50: percentile(&ttft, 0.5),
        ttft_p99: percentile(&ttft, 0.99),
        itl_p50: percentile(&gaps, 0.5),
        itl_p99: percentile(&gaps, 0.99),
        tokens_per_second: tokens as f64 / (to - from),
        refused: arrived.iter().filter(|r| r.refused).count() as f64,
        accuracy: if answered.is_empty() { 0.0 } else { 100.0 * correct as f64 / answered.len() as f64 },
        steps: steps.iter().sum::<f64>() / steps.len().max(1) as f64,
    }
}

/// Per window of `width` seconds: the p99 time to first token (by arrival) and the p99
/// inter-token latency (by the later token's time), in milliseconds.
fn windows(records: &[Record], end: f64, width: f64) -> (Points, Points) {
    let count = (end / width).ceil() as usize;
    let (mut ttft, mut itl) = (Vec::new(), Vec::new());
    for w in 0..count {
        let (from, to) = (w as f64 * width, (w + 1) as f64 * width);
        let first: Vec<f64> = records.iter().filter(|r| r.at >= from && r.at < to).filter_map(Record::ttft).collect();
        let gaps: Vec<f64> = records
            .iter()
            .flat_map(|r| r.token_times.windows(2).filter(|p| p[1] >= from && p[1] < to).map(|p| p[1] - p[0]))
            .collect();
        let middle = from + width / 2.0;
        if !first.is_empty() {
            ttft.push((middle, 1e3 * percentile(&first, 0.99)));
        }
        if !gaps.is_empty() {
            itl.push((middle, 1e3 * percentile(&gaps, 0.99)));
        }
    }
    (ttft, itl)
}

fn load_setup(dir: &Path, count: usize) -> anyhow::Result<Setup> {
    let model =
        Arc::new(HuginnModel::load(dir, DType::F32, &Device::Cpu).with_context(|| format!("{}", dir.display()))?);
    let tokenizer = Arc::new(TextTokenizer::load(dir, model.config())?);
    let digits = TaskFile::read(dir)?.map_or(6, |t| t.digits);
    let problems = held_out_problems(count, digits, 11);
    let formatter = Formatter::new(&tokenizer)?;
    let prompts = problems.iter().map(|p| formatter.prompt_ids(p, false)).collect::<Result<Vec<_>, _>>()?;
    let num_steps = model.config().mean_recurrence;
    Ok(Setup { model, tokenizer, problems, prompts, num_steps })
}

pub fn run(dir: &Path, out: &Path, svg_out: &Path, quick: bool) -> anyhow::Result<()> {
    let setup = load_setup(dir, 4096)?;
    let (phase, repeats) = if quick { (1.0, 1) } else { (8.0, 2) };
    let (rate, itl) = calibrate(&setup, if quick { 1.0 } else { 4.0 });
    let target_itl = Duration::from_secs_f64(itl.max(1e-4));
    let targets = ElasticTargets { itl: Some(target_itl), queue: Some(target_itl * 5) };
    eprintln!("elastic: {rate:.1} requests/s at full depth, inter-token latency {:.2} ms", 1e3 * itl);
    let servers = [Server::Queues, Server::Refuses, Server::Elastic, Server::ElasticUnbounded];
    let mut figures: Vec<Vec<Vec<PhaseFigures>>> = vec![Vec::new(); servers.len()];
    let mut first_runs: Vec<(Vec<Record>, Points)> = Vec::new();
    for repeat in 0..repeats {
        for (s, &server) in servers.iter().enumerate() {
            let engine = match server {
                Server::Queues => setup.engine(1 << 20, ElasticTargets::default(), TICK_ROWS),
                Server::Refuses => setup.engine(MAX_ACTIVE / 2, ElasticTargets::default(), TICK_ROWS),
                Server::Elastic => setup.engine(1 << 20, targets, TICK_ROWS),
                Server::ElasticUnbounded => setup.engine(1 << 20, targets, 0),
            };
            let load = arrivals(&setup, rate, phase, server.is_elastic(), 5 + repeat as u64);
            eprintln!("elastic: {} (run {}), {} requests", server.name(), repeat + 1, load.len());
            let (records, factors) = open_loop(engine, load, phase / 8.0);
            let per_phase =
                (0..PHASES.len()).map(|p| phase_figures(&records, p as f64 * phase, (p + 1) as f64 * phase)).collect();
            figures[s].push(per_phase);
            if repeat == 0 {
                first_runs.push((records, factors));
            }
        }
    }
    let end = PHASES.len() as f64 * phase;
    let mut ttft_series = Vec::new();
    let mut itl_series = Vec::new();
    for (s, (records, _)) in first_runs.iter().enumerate() {
        let (ttft, itl) = windows(records, end, phase / 4.0);
        ttft_series.push(Series { name: servers[s].name(), points: ttft });
        itl_series.push(Series { name: servers[s].name(), points: itl });
    }
    let factors: Vec<Series> = servers
        .iter()
        .zip(&first_runs)
        .filter(|(server, _)| server.is_elastic())
        .map(|(server, (_, f))| Series {
            name: server.name(),
            points: f.iter().copied().filter(|&(t, _)| t <= end).collect(),
        })
        .collect();
    let svg = timeline_svg(&ttft_series, &itl_series, &factors, 1e3 * target_itl.as_secs_f64(), phase, &PHASES);
    if let Some(parent) = svg_out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(svg_out, svg).with_context(|| format!("writing {}", svg_out.display()))?;

    let md = report(&setup, &servers, &figures, rate, target_itl, phase, repeats, svg_out);
    SECTION.write(out, &md)?;
    println!("{md}");
    Ok(())
}

/// The median of each figure over the repeats.
fn median_figures(runs: &[Vec<PhaseFigures>], phase: usize) -> PhaseFigures {
    let pick = |f: fn(&PhaseFigures) -> f64| median(runs.iter().map(|r| f(&r[phase])).collect());
    PhaseFigures {
        ttft_p50: pick(|f| f.ttft_p50),
        ttft_p99: pick(|f| f.ttft_p99),
        itl_p50: pick(|f| f.itl_p50),
        itl_p99: pick(|f| f.itl_p99),
        tokens_per_second: pick(|f| f.tokens_per_second),
        refused: pick(|f| f.refused),
        accuracy: pick(|f| f.accuracy),
        steps: pick(|f| f.steps),
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    setup: &Setup,
    servers: &[Server],
    figures: &[Vec<Vec<PhaseFigures>>],
    rate: f64,
    target: Duration,
    phase: f64,
    repeats: usize,
    svg: &Path,
) -> String {
    let target_ms = 1e3 * target.as_secs_f64();
    let mut md = String::new();
    let _ = writeln!(md, "{}\n## Elastic depth under overload\n", SECTION.begin);
    let _ = writeln!(
        md,
        "`huginn bench --elastic` on `models/huginn-addition-6` (num_steps {}, float32) through the engine, \
         {MAX_ACTIVE} sequences and {TICK_ROWS} rows a pass (`engine.max_tick_rows`) a worker, on this 2-core \
         CPU. A closed loop of {MAX_ACTIVE} clients at full depth sustains {rate:.1} requests/s with a 90th \
         percentile inter-token latency of {target_ms:.2} ms: that latency is elastic depth's target \
         (`engine.target_itl_ms`), five times it the queue-wait target. Poisson arrivals then run {phase} s at \
         each of {} times that rate. Four servers: fixed depth with a deep queue, fixed depth with a queue of {} \
         jobs (429 beyond), elastic depth with every request at `min_num_steps` {FLOOR}, and the same without a \
         row budget (its elastic sequences limited by the slots alone). Latencies in ms; accuracy on the \
         problems answered; steps per generated token after the first; medians over {repeats} alternated \
         run(s).\n",
        setup.num_steps,
        PHASES.iter().map(|p| format!("{p}x")).collect::<Vec<_>>().join(", "),
        MAX_ACTIVE / 2,
    );
    let _ = writeln!(
        md,
        "| load | server | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | tokens/s | 429s | accuracy | steps/token |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (p, multiple) in PHASES.iter().enumerate() {
        for (s, server) in servers.iter().enumerate() {
            let f = median_figures(&figures[s], p);
            let _ = writeln!(
                md,
                "| {multiple}x | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1}% | {:.2} |",
                server.name(),
                1e3 * f.ttft_p50,
                1e3 * f.ttft_p99,
                1e3 * f.itl_p50,
                1e3 * f.itl_p99,
                f.tokens_per_second,
                f.refused,
                f.accuracy,
                f.steps
            );
        }
    }
    // The goal, at the first 2x phase.
    let two = PHASES.iter().position(|&m| m == 2.0).unwrap_or(0);
    let elastic = median_figures(&figures[2], two);
    let full: Vec<f64> = (0..PHASES.len()).map(|p| median_figures(&figures[0], p).accuracy).collect();
    let full_accuracy = full.iter().sum::<f64>() / full.len() as f64;
    let _ = writeln!(
        md,
        "\nAt 2x: elastic depth's p99 inter-token latency is {:.2}x the target (goal: at most 1.5x), with {:.0} \
         429s, accuracy {:.1}% against {full_accuracy:.1}% at full depth (fixed depth, all phases; goal: within \
         2 points) at {:.2} steps a token. ![latency and depth factor over time]({})\n{}",
        elastic.itl_p99 / target.as_secs_f64(),
        elastic.refused,
        elastic.accuracy,
        elastic.steps,
        svg.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        SECTION.end
    );
    md
}

pub fn kept_section(out: &Path) -> String {
    SECTION.kept(out)
}
