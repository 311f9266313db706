//! The parallel ("diffusion-forcing") sampler (docs/DESIGN.md, "The parallel sampler").
//!
//! After the prompt's first token, a sequence keeps a window of `W` positions `c..c + W`: the
//! last frozen token at `c` (its K/V not yet written) and guesses after it (the sequence's
//! proposals). One sampler step is one chunk of the `W` rows: the prelude over their current
//! tokens (each position's injection mixed with its previous one, `embed_ema`), `inner_steps`
//! core steps from the states the positions had at the end of the last step (new positions from
//! fresh states, every state mixed with damped `state_noise`), and the coda over every row. Then
//! the freeze rule picks `f` rows (`generate::parallel`); rows `0..f` are committed: their K/V,
//! written by this step, stays in the cache, and their tokens are emitted: the guesses at
//! `c + 1..c + f` that this step's K/V was computed from, and a token drawn from row `f - 1` for
//! `c + f`. The cache is cut back to `c + f`, every later guess is redrawn from its row, one
//! position is added (up to `max_wavefront`, the tokens left, the context and the step budget;
//! never past a guessed stop token or a guess that completes the output's grammar) and the next step
//! runs the new window. Under a constraint every guess and every frozen token is drawn masked in
//! the grammar's state after the tokens before it.

use metrics::histogram;

use super::sequential::emit_sampled;
use super::{AfterToken, Decoder, Sequence, SequenceFault, StrategyCounts, TextTokenizer, WaveCounts};
use crate::engine::job::ExitReason;
use crate::engine::sequence::Emitted;
use crate::engine::wavefront::Wavefront;
use crate::generate::parallel::{FrozenBy, ParallelSampling};
use crate::metrics as m;
use crate::model::HuginnModel;

pub struct Parallel {
    params: ParallelSampling,
    /// The window, once the prompt's first token is out (the prompt is an ordinary chunk).
    window: Option<Wavefront>,
    /// Guesses the output's constraint took (rolled back when the window settles).
    constrained: usize,
    counts: WaveCounts,
}

impl Parallel {
    pub fn new(params: ParallelSampling) -> Self {
        Self { params, window: None, constrained: 0, counts: WaveCounts::default() }
    }

    /// The window's coda is done: freezes rows, emits their tokens, redraws the guesses and sets
    /// up the next window.
    fn settle_window(
        &mut self,
        seq: &mut Sequence,
        tokenizer: &TextTokenizer,
        limit: usize,
    ) -> Result<AfterToken, SequenceFault> {
        let p = self.params;
        let (num_steps, min_steps) = (seq.spec().params.num_steps, seq.spec().params.exit.min_steps);
        let mut rows = std::mem::take(&mut seq.chunk.coda_rows);
        let Some(wave) = self.window.as_mut() else {
            return Err(SequenceFault::Invariant("a window settled before it opened"));
        };
        let status = wave.finish_step(&seq.chunk.state, seq.chunk.step)?;
        let out_of_budget = seq.budget_left() == Some(0);
        let mut frozen = p.frozen_rows(&status, num_steps, min_steps);
        if out_of_budget {
            // The last step the budget allows: the head at least is emitted (and ends the choice).
            frozen = frozen.max(1);
        }
        let (c, w) = (seq.chunk.start, seq.chunk.len);
        if rows.len() != w || status.len() != w {
            return Err(SequenceFault::Invariant("a window's rows do not match its coda"));
        }
        self.counts.steps += 1;
        self.counts.rows += w;
        self.counts.frozen += frozen;
        self.counts.row_steps += seq.chunk.step * w;
        histogram!(m::PARALLEL_TOKENS_PER_STEP).record(frozen as f64);
        histogram!(m::PARALLEL_WAVEFRONT).record(w as f64);

        // The guesses this step ran on (positions c + 1..c + w); the context is the frozen tokens.
        // Under a constraint, the guesses it took are rolled back and each frozen row is masked in
        // the state after the tokens frozen before it: a guess was drawn under that same state, so
        // it stands; a row after a guess that completes the grammar is not frozen.
        let guesses = seq.withdraw_proposals();
        seq.unconstrain(std::mem::take(&mut self.constrained))?;
        for (i, row) in status.iter().enumerate().take(frozen) {
            // Each row is read once: it moves into its mask.
            let raw = seq.constrained(std::mem::take(&mut rows[i]))?;
            let token = match guesses.get(i) {
                Some(&guess) if i + 1 < frozen => {
                    self.counts.guesses_frozen += 1;
                    guess
                }
                _ => seq.sampler.sample(&mut raw.clone(), &seq.context),
            };
            seq.constrain_to(token)?;
            let exit = match p.frozen_by(row, num_steps, min_steps) {
                FrozenBy::Converged => ExitReason::Converged,
                FrozenBy::Cap => ExitReason::Cap,
                FrozenBy::Carried if out_of_budget => ExitReason::Budget,
                FrozenBy::Carried => ExitReason::Carried,
            };
            let more = i + 1 < frozen && !seq.constraint_complete();
            let emitted = Emitted { token, raw: &raw, steps: row.steps, exit, more };
            if let Some(after) = seq.push_token(tokenizer, emitted, limit)? {
                return Ok(after);
            }
        }

        // The next window: the rows left, one more, within every bound.
        let head = c + frozen;
        let params = &seq.spec().params;
        let mut len = (w - frozen + 1)
            .min(p.max_wavefront)
            .min(params.max_tokens.saturating_sub(seq.generated))
            .min(limit.saturating_sub(head + 1));
        if let Some(left) = seq.budget_left() {
            len = len.min(left);
        }
        let stops = params.stop_token_ids.clone();
        // Row `j` (from `frozen`) guesses position `c + j + 1`, the next window's row `j - frozen + 1`,
        // drawn (under a constraint) in the state after the guesses before it.
        for row in rows.iter_mut().skip(frozen).take(len.saturating_sub(1)) {
            let mut logits = seq.constrained(std::mem::take(row))?;
            let guess = seq.sampler.sample(&mut logits, &seq.context);
            if stops.contains(&guess) {
                break;
            }
            if seq.constrain_to(guess)? {
                self.constrained += 1;
            }
            seq.propose(guess);
            if seq.constraint_complete() {
                break;
            }
        }
        let len = seq.context.len() - head;
        seq.cache.truncate(head);
        wave.advance(frozen, len);
        seq.start_chunk(head, len);
        Ok(AfterToken::Continues)
    }
}

impl Decoder for Parallel {
    /// A window runs every row to its cap (a row stops when it freezes).
    fn may_exit(&self) -> bool {
        false
    }

    /// The window's prelude is done (the chunk's injection: its fresh rows): the sampler step's
    /// core steps begin from the mixed injection and the carried states.
    fn begin_core(&mut self, seq: &mut Sequence, model: &HuginnModel) -> Result<(), SequenceFault> {
        let Some(wave) = self.window.as_mut() else {
            seq.begin_core(seq.spec().params.num_steps, false, model)?;
            return Ok(());
        };
        let p = self.params;
        let (init_scale, num_steps) = (seq.spec().params.init_scale, seq.spec().params.num_steps);
        let c = &mut seq.chunk;
        c.injection = wave.mix_injection(&c.injection, p.embed_ema)?;
        c.state = wave.starting_state(model, init_scale, p.state_noise, &mut seq.rng)?;
        // No position passes `num_steps`: the head (the row with the most steps, below the cap
        // since every freeze rule freezes the rows at it) gets at most the steps it lacks.
        let head_steps = wave.steps().first().copied().unwrap_or(0);
        let inner = p.inner_steps.min(num_steps.saturating_sub(head_steps)).max(1);
        // Every row's step counts against the budget: fewer steps when it does not cover them.
        let len = seq.chunk.len;
        let cap = match seq.budget_left() {
            Some(left) if left < inner * len => ((left / len).max(1), true),
            _ => (inner, false),
        };
        seq.chunk.enter_core(cap);
        Ok(())
    }

    /// A sampler step's core steps (its cap: `inner_steps`, or fewer for the last steps before
    /// `num_steps` or the budget) take the last slots of `num_steps` (what the prompt's deepest
    /// steps wrote, and with `inner_steps = num_steps` exactly a sequential token's).
    fn slot_offset(&self, seq: &Sequence) -> usize {
        match self.window {
            Some(_) => seq.spec().params.num_steps.saturating_sub(seq.chunk.cap),
            None => 0,
        }
    }

    /// Every row of a window is a token with its own steps.
    fn step_cost(&self, seq: &Sequence) -> usize {
        if self.window.is_some() { seq.chunk.len } else { 1 }
    }

    fn reads_every_row(&self) -> bool {
        self.window.is_some()
    }

    fn settle(
        &mut self,
        seq: &mut Sequence,
        tokenizer: &TextTokenizer,
        limit: usize,
    ) -> Result<AfterToken, SequenceFault> {
        if self.window.is_some() {
            return self.settle_window(seq, tokenizer, limit);
        }
        emit_sampled(seq, tokenizer, limit, |seq| {
            seq.start_next_token();
            self.window = Some(Wavefront::new(seq.chunk.start));
        })
    }

    fn counts(&self) -> StrategyCounts {
        StrategyCounts::Parallel(self.counts)
    }
}
