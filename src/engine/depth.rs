//! A sequence's elastic depth (docs/DESIGN.md, "Elastic depth"): its tokens' cap under its
//! worker's depth factor (never below its floor, `min_num_steps`; the prompt's prefill depth is
//! the cap when its job was admitted), the steps it shed, and the inter-token latencies its
//! worker's controller reads.

use metrics::counter;

use super::elastic::elastic_cap;
use super::job::ExitReason;
use super::sequence::Sequence;
use crate::metrics as m;

#[derive(Debug, Default)]
pub struct ElasticDepth {
    /// The floor; `None`: not elastic.
    floor: Option<usize>,
    /// Its tokens' cap at the worker's factor.
    cap: Option<usize>,
    /// Steps its tokens would have spent at `num_steps` and did not, having hit a lowered cap.
    pub shed: usize,
    /// Inter-token latencies (seconds) since the controller last read them.
    itl: Vec<f64>,
}

impl ElasticDepth {
    pub fn new(floor: Option<usize>) -> Self {
        Self { floor, ..Self::default() }
    }

    /// A token came `seconds` after the previous one (kept only for an elastic sequence).
    pub fn observe_itl(&mut self, seconds: f64) {
        if self.floor.is_some() {
            self.itl.push(seconds);
        }
    }
}

impl Sequence {
    pub(super) fn is_elastic(&self) -> bool {
        self.elastic.floor.is_some()
    }

    /// The cap of the chunk about to iterate: a prompt's prefill depth (set when its job was
    /// admitted), else the elastic cap of an elastic sequence, else `num_steps`.
    pub(super) fn token_cap(&self) -> usize {
        let num_steps = self.spec().params.num_steps;
        match self.elastic.cap {
            _ if self.prefill => self.shared.prefill_steps.min(num_steps),
            Some(cap) => cap.min(num_steps),
            None => num_steps,
        }
    }

    /// Its worker's depth factor is `factor`: the cap of its tokens from the next one on.
    pub(super) fn set_depth(&mut self, factor: f64) {
        self.elastic.cap = elastic_cap(&self.spec().params, factor);
    }

    /// A token stopped after `steps` for `exit`: one that hit a lowered cap shed the steps up to
    /// `num_steps` (counted for `usage.elastic_steps_shed` and the metric).
    pub(super) fn count_shed(&mut self, exit: ExitReason, steps: usize) {
        let num_steps = self.spec().params.num_steps;
        if self.is_elastic() && exit == ExitReason::Cap && steps < num_steps {
            let shed = num_steps - steps;
            self.elastic.shed += shed;
            counter!(m::ELASTIC_STEPS_SHED).increment(shed as u64);
        }
    }

    /// The latencies seen since the last call, for the controller.
    pub(super) fn take_itl(&mut self) -> std::vec::Drain<'_, f64> {
        self.elastic.itl.drain(..)
    }

    /// The share of an admission slot it takes: its cap over `num_steps` (1 when not elastic).
    pub(super) fn slot_share(&self) -> f64 {
        let num_steps = self.spec().params.num_steps;
        match self.elastic.cap {
            Some(cap) => cap.min(num_steps) as f64 / num_steps as f64,
            None => 1.0,
        }
    }

    /// The factor at or below which its cap is its floor (`None` when not elastic).
    pub(super) fn floor_factor(&self) -> Option<f64> {
        self.elastic.floor.map(|floor| floor as f64 / self.spec().params.num_steps as f64)
    }
}
