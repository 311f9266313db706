//! The window of the parallel sampler (docs/DESIGN.md, "The parallel sampler"): which positions
//! are in flight, how many core steps each has had, and what each had at the end of the last
//! sampler step (its state and its mixed input embedding), all by absolute position.
//!
//! Between two sampler steps the window's head moves on by the rows that froze, so row `j` now
//! is row `j + shift` then. Every comparison and carry goes through [`Wavefront::overlap`], which
//! works from the positions each tensor was recorded at: a position's convergence is measured
//! against its own previous state, never a neighbour's.

use candle_core::{DType, Tensor};
use rand::Rng;

use super::fault::SequenceFault;
use crate::generate::parallel::RowStatus;
use crate::model::HuginnModel;

type Result<T> = std::result::Result<T, SequenceFault>;

pub struct Wavefront {
    /// Position of row 0.
    start: usize,
    /// Core steps of each row so far.
    steps: Vec<usize>,
    /// The states at the end of the last sampler step, and the position of their row 0.
    previous: Option<(usize, Tensor)>,
    /// The mixed injections of the last sampler step, and the position of their row 0.
    injection: Option<(usize, Tensor)>,
}

impl Wavefront {
    /// A window of one new position.
    pub fn new(start: usize) -> Self {
        Self { start, steps: vec![0], previous: None, injection: None }
    }

    pub fn start(&self) -> usize {
        self.start
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn steps(&self) -> &[usize] {
        &self.steps
    }

    /// Of `len` rows from `start`, the leading ones whose positions a tensor recorded from
    /// `recorded_start` with `recorded_len` rows holds: (its row of our row 0, how many).
    pub fn overlap(recorded_start: usize, recorded_len: usize, start: usize, len: usize) -> Option<(usize, usize)> {
        let offset = start.checked_sub(recorded_start)?;
        let count = recorded_len.saturating_sub(offset).min(len);
        (count > 0).then_some((offset, count))
    }

    /// Rows of `recorded` (from its position) matching this window's leading rows.
    fn matching(&self, recorded: &Option<(usize, Tensor)>) -> Result<Option<(Tensor, usize)>> {
        let Some((at, tensor)) = recorded else { return Ok(None) };
        Ok(match Self::overlap(*at, tensor.dim(0)?, self.start, self.len()) {
            Some((offset, count)) => Some((tensor.narrow(0, offset, count)?, count)),
            None => None,
        })
    }

    /// This sampler step's injection from the prelude's `fresh` rows: a position the window
    /// had before gets `(1 - ema)·fresh + ema·its previous injection`, a new one `fresh`.
    pub fn mix_injection(&mut self, fresh: &Tensor, ema: f64) -> Result<Tensor> {
        let mixed = match self.matching(&self.injection)? {
            Some((old, count)) if ema > 0.0 => {
                let blended = ((fresh.narrow(0, 0, count)? * (1.0 - ema))? + (old * ema)?)?;
                if count == self.len() {
                    blended
                } else {
                    Tensor::cat(&[&blended, &fresh.narrow(0, count, self.len() - count)?], 0)?
                }
            }
            _ => fresh.clone(),
        };
        self.injection = Some((self.start, mixed.clone()));
        Ok(mixed)
    }

    /// This sampler step's starting state: each carried position's state from the last step,
    /// then fresh initial states for the new ones; with `noise` > 0, every row mixed with fresh
    /// noise at weight `noise / (1 + its steps so far)`.
    pub fn starting_state(
        &self,
        model: &HuginnModel,
        init_scale: f64,
        noise: f64,
        rng: &mut impl Rng,
    ) -> Result<Tensor> {
        let (carried, count) = match self.matching(&self.previous)? {
            Some((rows, count)) => (Some(rows), count),
            None => (None, 0),
        };
        let fresh = (count < self.len()).then(|| model.init_state(self.len() - count, init_scale, rng)).transpose()?;
        let state = match (carried, fresh) {
            (Some(c), Some(f)) => Tensor::cat(&[&c, &f], 0)?,
            (Some(c), None) => c,
            (None, Some(f)) => f,
            (None, None) => return Err(SequenceFault::Invariant("an empty parallel window")),
        };
        if noise <= 0.0 {
            return Ok(state);
        }
        let z = model.init_state(self.len(), init_scale, rng)?;
        let weights: Vec<f32> = self.steps.iter().map(|&s| (noise / (1.0 + s as f64)) as f32).collect();
        let w = Tensor::from_vec(weights, (self.len(), 1), state.device())?.to_dtype(state.dtype())?;
        let keep = (1.0 - &w)?;
        Ok((state.broadcast_mul(&keep)? + z.broadcast_mul(&w)?)?)
    }

    /// The sampler step ran `steps` core steps and left `states`: each row's steps and its
    /// relative latent change `|s - s_prev| / |s|` against its own position's state at the end
    /// of the last step (`None` for a position new to the window). The states are recorded.
    pub fn finish_step(&mut self, states: &Tensor, steps: usize) -> Result<Vec<RowStatus>> {
        for s in &mut self.steps {
            *s += steps;
        }
        let mut changes = vec![None; self.len()];
        if let Some((previous, count)) = self.matching(&self.previous)? {
            let now = states.narrow(0, 0, count)?.to_dtype(DType::F32)?;
            let diff = (&now - previous.to_dtype(DType::F32)?)?.sqr()?.sum(1)?.sqrt()?;
            let norm = now.sqr()?.sum(1)?.sqrt()?;
            let ratio = (diff / norm)?.to_vec1::<f32>()?;
            for (change, value) in changes.iter_mut().zip(ratio) {
                *change = Some(f64::from(value)).filter(|v| v.is_finite());
            }
        }
        self.previous = Some((self.start, states.clone()));
        Ok(self.steps.iter().zip(changes).map(|(&steps, change)| RowStatus { steps, change }).collect())
    }

    /// `frozen` rows leave the head; the window becomes `len` rows (the new ones without steps).
    pub fn advance(&mut self, frozen: usize, len: usize) {
        self.start += frozen;
        self.steps.drain(..frozen.min(self.steps.len()));
        self.steps.truncate(len);
        self.steps.resize(len, 0);
    }
}

#[cfg(test)]
#[path = "wavefront_tests.rs"]
mod tests;
