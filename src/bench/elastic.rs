//! Open-loop load for `huginn bench --elastic`: requests arrive at set times whatever the server
//! does (as real clients do), each is submitted to the engine, refused (429) when its queue is
//! full, and timed token by token; the workers' depth factor is sampled meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, Event, JobSpec};
use crate::generate::FinishReason;

/// One request of the load: when it arrives (seconds from the start), what it asks, and the text
/// a right answer is.
pub struct Arrival {
    pub at: f64,
    pub spec: JobSpec,
    pub answer: String,
}

/// What became of one request (times in seconds from the start of the load).
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub at: f64,
    /// Refused at submission: every queue was full (a 429).
    pub refused: bool,
    /// When each token arrived.
    pub token_times: Vec<f64>,
    pub steps: Vec<usize>,
    pub text: String,
    pub answer: String,
    /// It ended on its own (a stop token), not cut by `max_tokens` or an error.
    pub stopped: bool,
    pub elastic_steps_shed: usize,
}

impl Record {
    pub fn ttft(&self) -> Option<f64> {
        self.token_times.first().map(|t| t - self.at)
    }

    pub fn gaps(&self) -> impl Iterator<Item = f64> + '_ {
        self.token_times.windows(2).map(|w| w[1] - w[0])
    }

    pub fn correct(&self) -> bool {
        self.stopped && self.text.trim() == self.answer
    }
}

/// Runs `arrivals` (sorted by time) against `engine`; returns each request's record and the
/// first worker's depth factor sampled every `sample` seconds, as (time, factor).
pub fn open_loop(engine: Arc<Engine>, arrivals: Vec<Arrival>, sample: f64) -> (Vec<Record>, Vec<(f64, f64)>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
        Ok(runtime) => runtime,
        Err(_) => return (Vec::new(), Vec::new()),
    };
    runtime.block_on(async move {
        let start = tokio::time::Instant::now();
        let origin = Instant::now();
        let end = arrivals.last().map_or(0.0, |a| a.at);
        let sampler = {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut interval = tokio::time::interval(Duration::from_secs_f64(sample));
                loop {
                    interval.tick().await;
                    let t = origin.elapsed().as_secs_f64();
                    samples.push((t, engine.depth_factors().first().copied().unwrap_or(1.0)));
                    if t > end && engine.in_flight() == 0 {
                        return samples;
                    }
                }
            })
        };
        let mut tasks = Vec::with_capacity(arrivals.len());
        for arrival in arrivals {
            tokio::time::sleep_until(start + Duration::from_secs_f64(arrival.at)).await;
            let at = origin.elapsed().as_secs_f64();
            let mut record = Record { at, answer: arrival.answer, ..Record::default() };
            let submitted = engine.validate(arrival.spec).ok().map(|job| engine.submit(job));
            let Some(Ok(mut handle)) = submitted else {
                record.refused = true;
                tasks.push(tokio::spawn(async move { record }));
                continue;
            };
            tasks.push(tokio::spawn(async move {
                while let Some(event) = handle.events.recv().await {
                    match event {
                        Event::Token { text, steps, .. } => {
                            record.token_times.push(origin.elapsed().as_secs_f64());
                            record.steps.push(steps);
                            record.text.push_str(&text);
                        }
                        Event::Finished { text, reason, elastic_steps_shed, .. } => {
                            record.text.push_str(&text);
                            record.stopped = reason == FinishReason::Stop;
                            record.elastic_steps_shed = elastic_steps_shed;
                            break;
                        }
                        Event::Error { .. } => break,
                        Event::PromptLogprobs { .. } | Event::Logits { .. } => {}
                    }
                }
                record
            }));
        }
        let mut records = Vec::with_capacity(tasks.len());
        for task in tasks {
            if let Ok(record) = task.await {
                records.push(record);
            }
        }
        let samples = sampler.await.unwrap_or_default();
        (records, samples)
    })
}
