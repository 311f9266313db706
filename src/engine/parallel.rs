//! The parallel ("diffusion-forcing") sampler inside the token loop (docs/DESIGN.md, "The parallel
//! sampler").
//!
//! After the prompt's first token, a sequence keeps a window of `W` positions `c..c + W`: the
//! last frozen token at `c` (its K/V not yet written) and guesses after it. One sampler step is
//! one chunk of the `W` rows: the prelude over their current tokens (each position's injection
//! mixed with its previous one, `embed_ema`), `inner_steps` core steps from the states the
//! positions had at the end of the last step (new positions from fresh states, every state mixed
//! with damped `state_noise`), and the coda over every row. Then the freeze rule picks `f` rows
//! (`generate::parallel`); rows `0..f` are committed: their K/V, written by this step, stays in
//! the cache, and their tokens are emitted: the guesses at `c + 1..c + f` that this step's K/V was
//! computed from, and a token drawn from row `f - 1` for `c + f`. The cache is cut back to
//! `c + f`, every later guess is redrawn from its row, one position is added (up to
//! `max_wavefront`, the tokens left, the context and the step budget; never past a guessed stop
//! token) and the next step runs the new window.

use super::*;
use crate::generate::parallel::{FrozenBy, ParallelSampling};

impl Running {
    fn parallel(&self) -> crate::model::Result<ParallelSampling> {
        self.spec()
            .params
            .parallel
            .ok_or_else(|| crate::model::ModelError::InvalidArgument("a parallel window without the sampler".into()))
    }

    /// Added to a core step's index to pick its cache slot: a sampler step's core steps (its
    /// cap: `inner_steps`, or fewer for the last steps before `num_steps` or the budget) take the
    /// last slots of `num_steps` (what the prompt's deepest steps wrote, and with
    /// `inner_steps = num_steps` exactly a sequential token's).
    pub(super) fn slot_offset(&self) -> usize {
        match self.phase {
            Phase::Parallel => self.spec().params.num_steps.saturating_sub(self.cap),
            _ => 0,
        }
    }

    /// The window's prelude is done (`self.injection`: its fresh rows): the sampler step's core
    /// steps begin from the mixed injection and the carried states.
    pub(super) fn start_sampler_step(&mut self, model: &HuginnModel) -> crate::model::Result<()> {
        let p = self.parallel()?;
        let (init_scale, num_steps) = (self.spec().params.init_scale, self.spec().params.num_steps);
        let Some(wave) = self.wave.as_mut() else {
            return Err(crate::model::ModelError::InvalidArgument("a sampler step without a window".into()));
        };
        self.injection = wave.mix_injection(&self.injection, p.embed_ema)?;
        self.state = wave.starting_state(model, init_scale, p.state_noise, &mut self.rng)?;
        (self.stage, self.done, self.step) = (Stage::Core, 0, 0);
        self.logits = None;
        // No position passes `num_steps`: the head (the row with the most steps, below the cap
        // since every freeze rule freezes the rows at it) gets at most the steps it lacks.
        let head_steps = wave.steps().first().copied().unwrap_or(0);
        let inner = p.inner_steps.min(num_steps.saturating_sub(head_steps)).max(1);
        // Every row's step counts against the budget: fewer steps when it does not cover them.
        (self.cap, self.cap_is_budget) = (inner, false);
        if let Some(left) = self.budget_left()
            && left < inner * self.len
        {
            (self.cap, self.cap_is_budget) = ((left / self.len).max(1), true);
        }
        Ok(())
    }

    fn budget_left(&self) -> Option<usize> {
        self.spec().max_total_steps.map(|budget| budget.saturating_sub(self.steps_spent))
    }

    /// The window's coda is done: freezes rows, emits their tokens, redraws the guesses and sets
    /// up the next window.
    pub(super) fn settle_wave(&mut self, tokenizer: &TextTokenizer, limit: usize) -> crate::model::Result<AfterToken> {
        let p = self.parallel()?;
        let (num_steps, min_steps) = (self.spec().params.num_steps, self.spec().params.exit.min_steps);
        let rows = std::mem::take(&mut self.coda_rows);
        let Some(wave) = self.wave.as_mut() else {
            return Err(crate::model::ModelError::InvalidArgument("a sampler step without a window".into()));
        };
        let status = wave.finish_step(&self.state, self.step)?;
        let out_of_budget = self.budget_left() == Some(0);
        let mut frozen = p.frozen_rows(&status, num_steps, min_steps);
        if out_of_budget {
            // The last step the budget allows: the head at least is emitted (and ends the choice).
            frozen = frozen.max(1);
        }
        let (c, w) = (self.start, self.len);
        if rows.len() != w || status.len() != w {
            return Err(crate::model::ModelError::InvalidArgument("a window's rows do not match its coda".into()));
        }
        self.waves.steps += 1;
        self.waves.rows += w;
        self.waves.frozen += frozen;
        self.waves.row_steps += self.step * w;
        histogram!(m::PARALLEL_TOKENS_PER_STEP).record(frozen as f64);
        histogram!(m::PARALLEL_WAVEFRONT).record(w as f64);

        // The guesses this step ran on (positions c + 1..c + w); the context is the frozen tokens.
        let guesses = self.context.split_off(c + 1);
        for (i, row) in status.iter().enumerate().take(frozen) {
            let token = match guesses.get(i) {
                Some(&guess) if i + 1 < frozen => guess,
                _ => self.sampler.sample(&mut rows[i].clone(), &self.context),
            };
            let exit = match p.frozen_by(row, num_steps, min_steps) {
                FrozenBy::Converged => ExitReason::Converged,
                FrozenBy::Cap => ExitReason::Cap,
                FrozenBy::Carried if out_of_budget => ExitReason::Budget,
                FrozenBy::Carried => ExitReason::Carried,
            };
            let emitted = Emitted { token, raw: &rows[i], steps: row.steps, exit, more: i + 1 < frozen };
            if let Some(after) = self.push_token(tokenizer, emitted, limit)? {
                return Ok(after);
            }
        }

        // The next window: the rows left, one more, within every bound.
        let head = c + frozen;
        let spec = self.spec();
        let mut len = (w - frozen + 1)
            .min(p.max_wavefront)
            .min(spec.params.max_tokens.saturating_sub(self.generated))
            .min(limit.saturating_sub(head + 1));
        if let Some(left) = self.budget_left() {
            len = len.min(left);
        }
        let stops = spec.params.stop_token_ids.clone();
        // Row `j` (from `frozen`) guesses position `c + j + 1`, the next window's row `j - frozen + 1`.
        let mut drawn = Vec::with_capacity(len.saturating_sub(1));
        for row in rows.iter().skip(frozen).take(len.saturating_sub(1)) {
            let guess = self.sampler.sample(&mut row.clone(), &self.context);
            if stops.contains(&guess) {
                break;
            }
            // Recorded so that the next guess's penalties see it; taken back below.
            self.sampler.record(guess);
            self.context.push(guess);
            drawn.push(guess);
        }
        for &guess in &drawn {
            self.sampler.forget(guess);
        }
        let len = 1 + drawn.len();
        self.cache.truncate(head);
        if let Some(wave) = self.wave.as_mut() {
            wave.advance(frozen, len);
        }
        (self.start, self.len) = (head, len);
        (self.stage, self.done) = (Stage::Prelude, 0);
        Ok(AfterToken::Continues)
    }
}
