//! One sequence driven through the model's entry points: prefill a prompt at a fixed depth, then
//! feed tokens one at a time, each iterating until its exit rule fires or the cap is reached.

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::model::{CacheStrategy, Chunk, ExitRule, ExitTracker, HuginnModel, KvCache, LogitRows, Result};

/// What feeding one token produced.
#[derive(Debug, Clone)]
pub struct TokenStep {
    /// Next-token logits (float32, vocabulary size).
    pub logits: Vec<f32>,
    /// Core steps spent.
    pub steps: usize,
    /// True when the exit criterion fired before the cap.
    pub converged: bool,
    /// Criterion value at the last checked step, if any step was checked.
    pub exit_value: Option<f64>,
}

pub struct Sequence<'m> {
    model: &'m HuginnModel,
    cache: KvCache,
    rng: StdRng,
    init_scale: f64,
    continuous_compute: bool,
    /// Final latent state of the last position processed (`[1, d]`), for continuous compute.
    last_state: Option<Tensor>,
}

impl<'m> Sequence<'m> {
    /// `seed` drives the random initial states (irrelevant when `init_scale` is 0).
    pub fn new(
        model: &'m HuginnModel,
        strategy: CacheStrategy,
        init_scale: f64,
        continuous_compute: bool,
        seed: u64,
    ) -> Self {
        Self {
            model,
            cache: model.new_cache(strategy),
            rng: StdRng::seed_from_u64(seed),
            init_scale,
            continuous_compute,
            last_state: None,
        }
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    fn initial_state(&mut self, rows: usize) -> Result<Tensor> {
        match (&self.last_state, self.continuous_compute && rows == 1) {
            (Some(state), true) => Ok(state.clone()),
            _ => self.model.init_state(rows, self.init_scale, &mut self.rng),
        }
    }

    /// Runs `ids` at positions after the cached ones through all `num_steps` core steps (no exit:
    /// every position sees its neighbours' K/V of the same step) and returns logits for `rows`.
    pub fn prefill(&mut self, ids: &[u32], num_steps: usize, rows: LogitRows) -> Result<Tensor> {
        let start = self.cache.len();
        let len = ids.len();
        let injection = self.model.prelude(ids, &mut [Chunk { cache: &mut self.cache, start, len, step: 0 }])?;
        let mut state = self.initial_state(len)?;
        for step in 0..num_steps {
            state =
                self.model.core_step(&state, &injection, &mut [Chunk { cache: &mut self.cache, start, len, step }])?;
        }
        let logits = self.model.coda(&state, &mut [Chunk { cache: &mut self.cache, start, len, step: 0 }], rows)?;
        self.last_state = Some(state.narrow(0, ids.len() - 1, 1)?);
        Ok(logits)
    }

    /// Feeds one token: iterates until `rule` fires (checked from step `min_steps` on) or
    /// `num_steps` steps, then decodes the state into next-token logits.
    pub fn step(&mut self, id: u32, num_steps: usize, rule: &ExitRule) -> Result<TokenStep> {
        let start = self.cache.len();
        let injection = self.model.prelude(&[id], &mut [Chunk { cache: &mut self.cache, start, len: 1, step: 0 }])?;
        let mut state = self.initial_state(1)?;
        let mut tracker =
            ExitTracker::new(*rule, if rule.criterion.needs_latent() { latent_vec(&state)? } else { Vec::new() });
        let mut logits: Option<Vec<f32>> = None;
        let (mut steps, mut converged, mut exit_value) = (0, false, None);
        for step in 0..num_steps {
            state = self.model.core_step(
                &state,
                &injection,
                &mut [Chunk { cache: &mut self.cache, start, len: 1, step }],
            )?;
            steps = step + 1;
            logits = None;
            if !tracker.checks_at(step) {
                continue;
            }
            let latent = if rule.criterion.needs_latent() { latent_vec(&state)? } else { Vec::new() };
            if rule.criterion.needs_logits() {
                logits = Some(self.decode(&state, start)?);
            }
            let check = tracker.check(&latent, logits.as_deref())?;
            exit_value = Some(check.value);
            if check.exit {
                converged = true;
                break;
            }
        }
        let logits = match logits {
            Some(l) => l,
            None => self.decode(&state, start)?,
        };
        self.last_state = Some(state);
        Ok(TokenStep { logits, steps, converged, exit_value })
    }

    fn decode(&mut self, state: &Tensor, start: usize) -> Result<Vec<f32>> {
        let logits =
            self.model.coda(state, &mut [Chunk { cache: &mut self.cache, start, len: 1, step: 0 }], LogitRows::Last)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// A one-row latent state as float32 values (what the exit criteria compare).
pub(crate) fn latent_vec(state: &Tensor) -> Result<Vec<f32>> {
    Ok(state.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}
