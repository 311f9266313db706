//! How the scheduler runs elastic depth (docs/DESIGN.md, "Elastic depth"): the controller's
//! signals (the inter-token latencies of elastic sequences, the queue's waits), the factor it
//! sets on the running elastic sequences, and the admission slots they take at that depth.

use metrics::gauge;
use std::time::Instant;

use super::Scheduler;
use super::prefill;
use crate::engine::elastic::elastic_cap;
use crate::engine::job::{Job, JobSpec};
use crate::engine::running::Running;
use crate::metrics as m;

impl Scheduler {
    /// The job at the head of the queue has waited `seconds` so far (elastic depth's queue signal).
    pub fn observe_waiting(&mut self, seconds: f64) {
        self.depth.observe_waiting(seconds);
    }

    /// Elastic depth's factor now.
    pub fn depth_factor(&self) -> f64 {
        self.depth.factor()
    }

    /// Elastic depth: the latencies this tick's tokens saw go to the controller; at the end of a
    /// control period it sets the factor, and the running elastic sequences take their new caps.
    pub(super) fn control_depth(&mut self) {
        // Read (and so emptied) even with the controller off, so that samples never pile up.
        for r in &mut self.running {
            for seconds in r.take_itl() {
                self.depth.observe_itl(seconds);
            }
        }
        if !self.depth.is_on() {
            return;
        }
        let lowest = self.running.iter().filter_map(Running::floor_factor).fold(0.0, f64::max);
        if let Some(factor) = self.depth.update(Instant::now(), lowest) {
            self.set_depth_factor(factor);
        }
    }

    /// Every elastic sequence takes the caps of `factor` (published as the worker's gauge).
    pub(super) fn set_depth_factor(&mut self, factor: f64) {
        self.depth.set_factor(factor);
        gauge!(m::DEPTH_FACTOR, "worker" => self.worker.to_string()).set(factor);
        for r in &mut self.running {
            r.set_depth(factor);
        }
    }

    /// The steps `spec`'s prompt prefill runs if admitted now: `num_steps` (or the step budget),
    /// lowered for an elastic job to its tokens' cap at the current factor.
    pub(super) fn prefill_depth(&self, spec: &JobSpec) -> usize {
        let steps = prefill::prefill_steps(spec);
        elastic_cap(&spec.params, self.depth.factor()).map_or(steps, |cap| steps.min(cap))
    }

    /// The admission slots `job`'s choices take at the current factor: each its cap over its
    /// `num_steps` when elastic, one otherwise.
    pub(super) fn slot_share(&self, job: &Job) -> f64 {
        let params = &job.spec.params;
        let share = elastic_cap(params, self.depth.factor()).map_or(1.0, |cap| cap as f64 / params.num_steps as f64);
        share * job.spec.n as f64
    }
}
