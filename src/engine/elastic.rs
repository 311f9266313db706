//! Elastic depth (docs/DESIGN.md, "Elastic depth"): one controller per worker holds a latency
//! signal to its target by scaling the recurrence caps of the requests that opted in with a
//! floor (`min_num_steps`).
//!
//! The signal, each control period, is the 90th percentile of the inter-token latencies of
//! elastic sequences seen in the period over `target_itl`, or of the queue waits (jobs admitted
//! in the period, and the head of the queue still waiting) over `target_queue`, whichever is
//! further over its target. The law:
//! - over target (ratio `s` > 1): the factor is multiplied by `1 / s`, at most halved: a token's
//!   latency is nearly proportional to its steps, so one period corrects most of the excess, and
//!   the halving limit bounds the step when the signal is noisy;
//! - well under target (`s` < [`RAISE_BELOW`]) or no signal at all (idle): the factor rises by
//!   [`RAISE_STEP`] a period, slowly, so that a raise overshoots the target by at most one small
//!   step before the next decrease;
//! - between the two (the dead band): unchanged, so that a signal near its target does not hunt.
//!
//! The period is several target latencies long, so that tokens begun at the old caps have ended
//! before the next decision reads their effect (a controller deciding faster than its plant
//! responds oscillates). The factor never goes below the point where every elastic sequence is
//! at its floor (lowering it further would change nothing and only delay the recovery).

use std::time::{Duration, Instant};

use crate::generate::GenerationParams;

/// Below this ratio of signal to target the factor rises.
pub const RAISE_BELOW: f64 = 0.8;
/// How much the factor rises in one period.
pub const RAISE_STEP: f64 = 0.05;
/// The most one period may divide the factor by.
pub const MAX_DECREASE: f64 = 2.0;
/// The smallest factor, whatever the floors.
pub const MIN_FACTOR: f64 = 0.01;
/// Samples of each signal kept per period (the rest of a period's samples are dropped).
const MAX_SAMPLES: usize = 4096;

/// The operator's targets (`engine.target_itl_ms`, `engine.target_queue_ms`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ElasticTargets {
    pub itl: Option<Duration>,
    pub queue: Option<Duration>,
}

impl ElasticTargets {
    pub fn is_on(&self) -> bool {
        self.itl.is_some() || self.queue.is_some()
    }

    /// Four times the smallest target, within 50 ms and 2 s.
    pub fn period(&self) -> Duration {
        let smallest = [self.itl, self.queue].into_iter().flatten().min().unwrap_or(Duration::from_millis(250));
        (smallest * 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
    }
}

/// One worker's depth factor and what it measures.
#[derive(Debug)]
pub struct DepthController {
    targets: ElasticTargets,
    period: Duration,
    factor: f64,
    period_start: Instant,
    itl: Vec<f64>,
    queue: Vec<f64>,
    /// The longest wait of a job still queued, seen in this period.
    waiting: f64,
}

/// The value at the 90th percentile of `samples` (sorted in place).
fn p90(samples: &mut [f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable_by(f64::total_cmp);
    let index = ((samples.len() as f64 * 0.9).ceil() as usize).clamp(1, samples.len()) - 1;
    Some(samples[index])
}

impl DepthController {
    pub fn new(targets: ElasticTargets, now: Instant) -> Self {
        Self {
            targets,
            period: targets.period(),
            factor: 1.0,
            period_start: now,
            itl: Vec::new(),
            queue: Vec::new(),
            waiting: 0.0,
        }
    }

    pub fn is_on(&self) -> bool {
        self.targets.is_on()
    }

    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Sets the factor (within its bounds), as if a period had ended with it.
    pub fn set_factor(&mut self, factor: f64) {
        self.factor = factor.clamp(MIN_FACTOR, 1.0);
    }

    /// An elastic sequence's token came `seconds` after its previous one.
    pub fn observe_itl(&mut self, seconds: f64) {
        if self.targets.itl.is_some() && self.itl.len() < MAX_SAMPLES {
            self.itl.push(seconds);
        }
    }

    /// A job waited `seconds` in the queue before it was admitted.
    pub fn observe_queue_wait(&mut self, seconds: f64) {
        if self.targets.queue.is_some() && self.queue.len() < MAX_SAMPLES {
            self.queue.push(seconds);
        }
    }

    /// The job at the head of the queue has waited `seconds` so far.
    pub fn observe_waiting(&mut self, seconds: f64) {
        self.waiting = self.waiting.max(seconds);
    }

    /// The signal over its target for the period just ended (the larger of the two), `None`
    /// without any sample.
    fn ratio(&mut self) -> Option<f64> {
        let itl = self.targets.itl.zip(p90(&mut self.itl)).map(|(t, v)| v / t.as_secs_f64());
        let queued = p90(&mut self.queue).into_iter().chain((self.waiting > 0.0).then_some(self.waiting));
        let queue = self.targets.queue.zip(queued.reduce(f64::max)).map(|(t, v)| v / t.as_secs_f64());
        [itl, queue].into_iter().flatten().reduce(f64::max)
    }

    /// At the end of a period, the new factor (never below `lowest`, the factor at which every
    /// elastic sequence is at its floor); `None` while the period runs or when it is unchanged.
    pub fn update(&mut self, now: Instant, lowest: f64) -> Option<f64> {
        if !self.is_on() || now.duration_since(self.period_start) < self.period {
            return None;
        }
        self.period_start = now;
        let ratio = self.ratio();
        self.itl.clear();
        self.queue.clear();
        self.waiting = 0.0;
        let floor = lowest.clamp(MIN_FACTOR, 1.0);
        let next = match ratio {
            Some(s) if s > 1.0 => self.factor / s.min(MAX_DECREASE),
            Some(s) if s >= RAISE_BELOW => self.factor,
            _ => self.factor + RAISE_STEP,
        }
        .clamp(floor, 1.0);
        let changed = (next - self.factor).abs() > 1e-12;
        self.factor = next;
        changed.then_some(next)
    }
}

/// An elastic token's cap at `factor`: `num_steps` scaled, never below the floor.
pub fn scaled_cap(num_steps: usize, floor: usize, factor: f64) -> usize {
    ((num_steps as f64 * factor).round() as usize).clamp(floor.min(num_steps), num_steps)
}

/// The cap of a generation's tokens at `factor`: its [`scaled_cap`] when it set a floor
/// (`min_num_steps`), `None` when it is not elastic.
pub fn elastic_cap(params: &GenerationParams, factor: f64) -> Option<usize> {
    params.min_num_steps.map(|floor| scaled_cap(params.num_steps, floor, factor))
}

#[cfg(test)]
#[path = "elastic_tests.rs"]
mod tests;
