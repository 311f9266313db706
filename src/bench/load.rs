//! Load generator: closed-loop clients submitting jobs to the engine, measuring aggregate
//! throughput, time to first token and inter-token latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineConfig, Event, JobHandle, JobSpec, SchedulerLimits};
use crate::generate::GenerationParams;
use crate::model::{CacheStrategy, HuginnModel};
use crate::text::TextTokenizer;

#[derive(Debug, Clone)]
pub struct LoadResult {
    pub concurrency: usize,
    pub num_steps: usize,
    pub requests: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
}

impl LoadResult {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / values.len() as f64 }
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn engine_for(model: Arc<HuginnModel>, tokenizer: Arc<TextTokenizer>, max_active: usize) -> Engine {
    engine_with_budget(model, tokenizer, max_active, 0)
}

/// [`engine_for`] with at most `max_tick_rows` rows per pass (0: unlimited).
pub fn engine_with_budget(
    model: Arc<HuginnModel>,
    tokenizer: Arc<TextTokenizer>,
    max_active: usize,
    max_tick_rows: usize,
) -> Engine {
    let limits = SchedulerLimits {
        max_active_sequences: max_active,
        max_kv_bytes: usize::MAX,
        max_tick_rows,
        prefix_cache_bytes: 0,
        elastic: crate::engine::ElasticTargets::default(),
    };
    Engine::start(
        vec![model],
        tokenizer,
        EngineConfig { queue_capacity: 1024, limits, restart_backoff: std::time::Duration::from_millis(1000) },
    )
}

/// `spec` validated and queued; `None` when refused (the benchmark then records nothing for it).
pub fn queue(engine: &Engine, spec: JobSpec) -> Option<JobHandle> {
    engine.submit(engine.validate(spec).ok()?).ok()
}

/// A greedy job from a zero initial state with the `shared:1` cache, as every benchmark sends.
pub fn spec(prompt: &[u32], num_steps: usize, tokens: usize) -> JobSpec {
    let mut params = GenerationParams::new(num_steps);
    params.max_tokens = tokens;
    params.init_scale = 0.0;
    params.cache = CacheStrategy::Shared(1);
    JobSpec::new(prompt.to_vec(), params)
}

/// Timings of one request: (time to first token, gaps between tokens, tokens); no tokens when
/// it was refused.
pub fn run_one(engine: &Engine, spec: JobSpec) -> (f64, Vec<f64>, usize) {
    let started = Instant::now();
    let Some(mut handle) = queue(engine, spec) else { return (0.0, Vec::new(), 0) };
    let (mut first, mut last, mut gaps, mut tokens) = (None, None::<Instant>, Vec::new(), 0);
    while let Some(event) = handle.events.blocking_recv() {
        match event {
            Event::Token { .. } => {
                let now = Instant::now();
                first.get_or_insert(now - started);
                if let Some(previous) = last {
                    gaps.push((now - previous).as_secs_f64());
                }
                last = Some(now);
                tokens += 1;
            }
            Event::Finished { .. } | Event::Error { .. } => break,
            Event::PromptLogprobs { .. } | Event::Logits { .. } => {}
        }
    }
    (first.unwrap_or(Duration::ZERO).as_secs_f64(), gaps, tokens)
}

/// `concurrency` clients, each sending `per_client` requests of `tokens` tokens back to back.
pub fn closed_loop(
    engine: &Engine,
    prompt: &[u32],
    num_steps: usize,
    concurrency: usize,
    per_client: usize,
    tokens: usize,
) -> LoadResult {
    let started = Instant::now();
    let results: Vec<(f64, Vec<f64>, usize)> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..concurrency)
            .map(|_| {
                scope.spawn(|| {
                    (0..per_client).map(|_| run_one(engine, spec(prompt, num_steps, tokens))).collect::<Vec<_>>()
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().unwrap_or_default()).collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    LoadResult {
        concurrency,
        num_steps,
        requests: results.len(),
        tokens: results.iter().map(|r| r.2).sum(),
        seconds,
        ttft: results.iter().map(|r| r.0).collect(),
        itl: results.iter().flat_map(|r| r.1.clone()).collect(),
    }
}

/// Seconds until the short request finished and until all long ones did, submitted together.
pub fn short_versus_long(
    engine: &Engine,
    prompt: &[u32],
    long_steps: usize,
    long_count: usize,
    short_steps: usize,
    tokens: usize,
) -> (f64, f64) {
    let started = Instant::now();
    std::thread::scope(|scope| {
        let longs: Vec<_> =
            (0..long_count).map(|_| scope.spawn(|| run_one(engine, spec(prompt, long_steps, tokens)))).collect();
        let short = scope.spawn(|| {
            run_one(engine, spec(prompt, short_steps, tokens));
            started.elapsed().as_secs_f64()
        });
        let short = short.join().unwrap_or(0.0);
        for long in longs {
            let _ = long.join();
        }
        (short, started.elapsed().as_secs_f64())
    })
}
