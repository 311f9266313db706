//! One running choice inside a worker: its cache, latent state, exit tracking, sampler and text.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Tensor;
use rand::SeedableRng;
use rand::rngs::StdRng;

use metrics::{counter, histogram};

use super::job::{DraftCounts, EngineFailure, Event, ExitReason, Job, JobSpec, WaveCounts, token_logprobs};
use super::shared::JobShared;
use super::wavefront::Wavefront;
use crate::generate::sampling::sampler_seed;
use crate::generate::{FinishReason, Sampler};
use crate::metrics as m;
use crate::model::{Chunk, ExitTracker, HuginnModel, KvCache};
use crate::text::{TextStream, TextTokenizer};

/// Where a chunk (a prompt, or one new token) is: the prelude, then `cap` core steps, then the
/// coda. Each stage covers the chunk's positions in order, in pieces that fit a tick's rows (a
/// decoding token's one row is one piece); a core step is complete when every piece ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prelude,
    Core,
    Coda,
}

/// One choice of a job while it runs. Its fields change only through the methods below, one per
/// transition the scheduler drives: a piece of the prelude, of a core step or of the coda runs
/// (`*_piece`, then `*_done`), the exit is checked, the token is emitted (`emit_token`, which
/// starts the next chunk) and the sequence is released.
pub struct Running {
    shared: Arc<JobShared>,
    choice: usize,
    /// This choice's share of the job's K/V reservation.
    reserved_kv: usize,
    /// The last event was sent; the sequence leaves at the end of the tick.
    finished: bool,
    cache: KvCache,
    rng: StdRng,
    sampler: Sampler,
    text: TextStream,
    /// Prompt and generated ids.
    context: Vec<u32>,
    generated: usize,
    /// Positions of the chunk being iterated (the prompt, then one token at a time).
    start: usize,
    len: usize,
    /// Steps done on the current chunk and the cap for it.
    step: usize,
    cap: usize,
    /// The cap is the remaining step budget rather than `num_steps`.
    cap_is_budget: bool,
    prefill: bool,
    /// The chunk's stage, and how many of its positions are through it (at the current step,
    /// for the core).
    stage: Stage,
    done: usize,
    /// The chunk's iteration ended by its exit criterion (not its cap or budget).
    converged: bool,
    state: Tensor,
    injection: Tensor,
    /// Outputs of the current stage's pieces so far, joined when the stage covers the chunk: the
    /// prelude's injection rows, or the next state's rows of the current step.
    pieces: Vec<Tensor>,
    /// Every coda row's logits so far, for a prompt that reports them or a verification (whose
    /// round settles from them).
    coda_rows: Vec<Vec<f32>>,
    tracker: ExitTracker,
    /// Logits of the current state, when already computed this tick.
    logits: Option<Vec<f32>>,
    /// Core steps spent so far (prompt prefill included).
    steps_spent: usize,
    last_token_at: Option<Instant>,
    /// What the chunk is for: a token, a draft or a verification (speculative decoding).
    phase: Phase,
    /// The speculative round under way.
    round: Option<Round>,
    drafts: DraftCounts,
    /// The parallel sampler's window.
    wave: Option<Wavefront>,
    waves: WaveCounts,
}

/// What became of a sequence after its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterToken {
    /// It goes on to its next token.
    Continues,
    /// It is done: its last event is still to be sent (after its release).
    Finishes(FinishReason),
    /// Its reader is gone or too far behind (the job is cancelled).
    Dropped,
}

impl Running {
    pub fn new(shared: Arc<JobShared>, choice: usize, model: &HuginnModel) -> crate::model::Result<Self> {
        let spec = shared.spec.clone();
        let seed = spec.params.seed.wrapping_add(choice as u64);
        // Replaced by the first chunk's prelude before any step reads them.
        let placeholder = Tensor::zeros((1, 1), model.activation_dtype(), model.device())?;
        // This choice's share of the reservation computed when the job was submitted.
        let reserved_kv = shared.job.kv_reservation / spec.n.max(1);
        Ok(Self {
            choice,
            reserved_kv,
            finished: false,
            cache: model.new_cache(spec.params.cache),
            rng: StdRng::seed_from_u64(seed),
            sampler: Sampler::new(spec.params.sampling.clone(), sampler_seed(seed)),
            text: TextStream::new(spec.stop.clone()),
            context: spec.prompt.clone(),
            generated: 0,
            start: 0,
            len: spec.prompt.len(),
            step: 0,
            cap: 0,
            cap_is_budget: false,
            prefill: true,
            stage: Stage::Prelude,
            done: 0,
            converged: false,
            state: placeholder.clone(),
            injection: placeholder,
            pieces: Vec::new(),
            coda_rows: Vec::new(),
            tracker: ExitTracker::new(spec.params.exit, Vec::new()),
            logits: None,
            steps_spent: 0,
            last_token_at: None,
            phase: Phase::Token,
            round: None,
            drafts: DraftCounts::default(),
            wave: None,
            waves: WaveCounts::default(),
            shared,
        })
    }

    pub fn spec(&self) -> &JobSpec {
        &self.shared.spec
    }

    pub fn job(&self) -> &Job {
        &self.shared.job
    }

    pub fn reserved_kv(&self) -> usize {
        self.reserved_kv
    }

    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Still prefilling its prompt (the prompt is its chunk).
    pub fn is_prefill(&self) -> bool {
        self.prefill
    }

    /// Positions of the chunk being iterated: first and count.
    pub fn positions(&self) -> (usize, usize) {
        (self.start, self.len)
    }

    /// Steps done on the current chunk, and its cap.
    pub fn steps(&self) -> (usize, usize) {
        (self.step, self.cap)
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Positions of the chunk not yet through the current stage (at the current step).
    pub fn remaining(&self) -> usize {
        self.len - self.done
    }

    /// The ids of the next `rows` positions of the prelude, and their chunk.
    pub fn prelude_piece(&mut self, rows: usize) -> (&[u32], Chunk<'_>) {
        let first = self.start + self.done;
        (&self.context[first..first + rows], Chunk { cache: &mut self.cache, start: first, len: rows, step: 0 })
    }

    /// The prelude ran over the next `injection.dim(0)` positions. When it covers the chunk, the
    /// core steps begin: a fresh initial state (unless continuous compute carries the last one),
    /// a fresh exit tracker, step 0 and its cap.
    pub fn prelude_done(&mut self, injection: Tensor, model: &HuginnModel) -> crate::model::Result<()> {
        self.done += injection.dim(0)?;
        self.pieces.push(injection);
        if self.done < self.len {
            return Ok(());
        }
        self.injection = cat(std::mem::take(&mut self.pieces).iter())?;
        if self.phase == Phase::Parallel {
            return self.start_sampler_step(model);
        }
        let params = &self.shared.spec.params;
        if self.prefill || !params.continuous_compute {
            self.state = model.init_state(self.len, params.init_scale, &mut self.rng)?;
        }
        let rule = params.exit;
        let initial =
            if rule.criterion.needs_latent() && self.may_exit() { latent_vec(&self.state)? } else { Vec::new() };
        self.tracker = ExitTracker::new(rule, initial);
        (self.stage, self.done, self.step) = (Stage::Core, 0, 0);
        self.logits = None;
        self.set_cap();
        Ok(())
    }

    /// The state and injection rows of the next `rows` positions at the current step, and their
    /// chunk.
    pub fn core_piece(&mut self, rows: usize) -> crate::model::Result<(Tensor, Tensor, Chunk<'_>)> {
        let (state, injection) = if rows == self.len {
            (self.state.clone(), self.injection.clone())
        } else {
            (self.state.narrow(0, self.done, rows)?, self.injection.narrow(0, self.done, rows)?)
        };
        let step = self.step + self.slot_offset();
        let chunk = Chunk { cache: &mut self.cache, start: self.start + self.done, len: rows, step };
        Ok((state, injection, chunk))
    }

    /// The current step ran over the next `state.dim(0)` positions (`state`: their new rows).
    /// True when the step covers the chunk: the state is the new one and the step counts.
    pub fn core_done(&mut self, state: Tensor) -> crate::model::Result<bool> {
        self.done += state.dim(0)?;
        self.pieces.push(state);
        if self.done < self.len {
            return Ok(false);
        }
        self.state = cat(std::mem::take(&mut self.pieces).iter())?;
        self.done = 0;
        self.step += 1;
        // A parallel window's every row counts; a prompt or a verification is one step.
        self.steps_spent += if self.phase == Phase::Parallel { self.len } else { 1 };
        self.logits = None;
        Ok(true)
    }

    /// The chunk stopped iterating (`converged`: by its exit criterion): the coda follows.
    pub fn start_coda(&mut self, converged: bool) {
        (self.stage, self.done, self.converged) = (Stage::Coda, 0, converged);
    }

    /// The coda is already done when an exit check computed the chunk's logits this step (a
    /// decoding token's one row, its coda entries written): true then.
    pub fn coda_from_exit_check(&mut self) -> bool {
        let ready = self.stage == Stage::Coda && self.done == 0 && self.logits.is_some() && !self.reports_every_row();
        if ready {
            self.done = self.len;
        }
        ready
    }

    /// The state rows of the next `rows` positions for the coda, and their chunk.
    pub fn coda_piece(&mut self, rows: usize) -> crate::model::Result<(Tensor, Chunk<'_>)> {
        let state = if rows == self.len { self.state.clone() } else { self.state.narrow(0, self.done, rows)? };
        Ok((state, Chunk { cache: &mut self.cache, start: self.start + self.done, len: rows, step: 0 }))
    }

    /// Whether a coda piece needs every row's logits (a prompt reporting them, a verification, a
    /// parallel window), or only its last.
    pub fn reports_every_row(&self) -> bool {
        self.prefill && (self.spec().prompt_logprobs || self.spec().report_logits)
            || matches!(self.phase, Phase::Verify | Phase::Parallel)
    }

    /// The coda ran over the next `rows` positions; `logits` holds every row's (when reporting
    /// every row) or the last row's. True when the coda covers the chunk: its logits are set
    /// (and a prompt's rows reported).
    pub fn coda_done(&mut self, rows: usize, logits: Vec<Vec<f32>>) -> bool {
        self.done += rows;
        let complete = self.done >= self.len;
        if self.reports_every_row() {
            self.coda_rows.extend(logits);
            if complete && self.phase == Phase::Token {
                let rows = std::mem::take(&mut self.coda_rows);
                self.take_prompt_rows(rows);
            }
        } else if complete {
            self.logits = logits.into_iter().last();
        }
        complete
    }

    /// The exit rule is checked after the step just done (never while prefilling or verifying).
    pub fn checks_exit(&self) -> bool {
        self.may_exit() && self.tracker.checks_at(self.step - 1)
    }

    /// Chunks of one token (a token or a draft) may exit early; a prompt, a verification or a
    /// parallel window runs every row to its cap.
    fn may_exit(&self) -> bool {
        !self.prefill && matches!(self.phase, Phase::Token | Phase::Draft)
    }

    /// Whether the exit check needs this step's logits.
    pub fn exit_needs_logits(&self) -> bool {
        self.spec().params.exit.criterion.needs_logits()
    }

    /// Checks the exit rule on the current state (and logits, where the criterion reads them):
    /// true when the token has converged.
    pub fn check_exit(&mut self) -> crate::model::Result<bool> {
        let latent =
            if self.spec().params.exit.criterion.needs_latent() { latent_vec(&self.state)? } else { Vec::new() };
        Ok(self.tracker.check(&latent, self.logits.as_deref())?.exit)
    }

    /// The chunk stops iterating: it converged, or reached its cap.
    pub fn chunk_done(&self, converged: bool) -> bool {
        converged || self.step >= self.cap
    }

    pub fn has_logits(&self) -> bool {
        self.logits.is_some()
    }

    /// The logits of the chunk's last row.
    pub fn set_logits(&mut self, row: Vec<f32>) {
        self.logits = Some(row);
    }

    /// Every row's logits of the prompt chunk: reported, the last one kept for sampling.
    fn take_prompt_rows(&mut self, rows: Vec<Vec<f32>>) {
        let spec = self.shared.spec.clone();
        if spec.prompt_logprobs {
            let logprobs = rows
                .iter()
                .zip(self.context.iter().skip(1))
                .map(|(row, &next)| token_logprobs(row, next, spec.logprobs.unwrap_or(0)))
                .collect();
            self.send(Event::PromptLogprobs { choice: self.choice, logprobs });
        }
        self.logits = rows.last().cloned();
        if spec.report_logits {
            self.send(Event::Logits { choice: self.choice, rows });
        }
    }

    /// The chunk's coda is done: samples its token from its logits, records it and sends it
    /// (with its metrics), or, speculating, keeps a draft or settles a verified round; `limit` is
    /// the context length.
    pub fn emit_token(&mut self, tokenizer: &TextTokenizer, limit: usize) -> crate::model::Result<AfterToken> {
        let converged = self.converged;
        if converged {
            counter!(m::EARLY_EXITS, "criterion" => self.spec().params.exit.criterion.name()).increment(1);
        }
        match self.phase {
            Phase::Draft => return self.take_draft(),
            Phase::Verify => return self.settle_round(tokenizer, limit),
            Phase::Parallel => return self.settle_wave(tokenizer, limit),
            Phase::Token => {}
        }
        let exit = self.exit_reason(converged);
        let steps = self.step;
        if self.prefill && self.spec().params.continuous_compute {
            self.state = self.state.narrow(0, self.len - 1, 1)?;
        }
        if self.spec().params.max_tokens == 0 {
            // Prompt log-probabilities (or logits) only.
            return Ok(AfterToken::Finishes(FinishReason::Length));
        }
        let raw = self.logits.take().unwrap_or_default();
        let mut logits = raw.clone();
        let token = self.sampler.sample(&mut logits, &self.context);
        let emitted = Emitted { token, raw: &raw, steps, exit, more: false };
        Ok(match self.push_token(tokenizer, emitted, limit)? {
            Some(after) => after,
            None => {
                self.next_chunk(limit);
                AfterToken::Continues
            }
        })
    }

    /// Frees the cache and leaves the running gauge (with the job's last choice) before the last
    /// event; returns the bytes the cache held.
    pub fn release(&mut self, model: &HuginnModel) -> usize {
        let bytes = self.cache.bytes();
        self.finished = true;
        self.cache = model.new_cache(self.spec().params.cache);
        self.shared.choice_done();
        bytes
    }

    /// The last event, after [`Self::release`]: the rest of the text and how the choice ended.
    pub fn send_finished(&mut self, reason: FinishReason, kv_bytes: usize) {
        let text = self.text.finish();
        let (drafts, waves) = (self.drafts, self.waves);
        self.send(Event::Finished { choice: self.choice, reason, text, kv_bytes, drafts, waves });
    }

    /// Ends the choice with an error event.
    pub fn fail(&self, message: &str) {
        self.send(Event::Error { failure: EngineFailure::Worker(message.to_string()) });
    }

    /// Sets the cap of the chunk about to iterate from `num_steps` and the remaining budget.
    fn set_cap(&mut self) {
        let num_steps = match (self.phase, self.spec().params.speculation) {
            (Phase::Draft, Some(s)) => s.draft_steps,
            _ => self.spec().params.num_steps,
        };
        match self.spec().max_total_steps {
            Some(budget) if budget.saturating_sub(self.steps_spent) < num_steps => {
                self.cap = budget.saturating_sub(self.steps_spent).max(1);
                self.cap_is_budget = true;
            }
            _ => {
                self.cap = num_steps;
                self.cap_is_budget = false;
            }
        }
    }

    fn budget_exhausted(&self) -> bool {
        self.spec().max_total_steps.is_some_and(|budget| self.steps_spent >= budget)
    }

    /// Sends an event; false when the receiver is gone or too far behind (the job is then cancelled).
    fn send(&self, event: Event) -> bool {
        if self.shared.job.events.try_send(event).is_err() {
            self.shared.job.cancelled.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn exit_reason(&self, converged: bool) -> ExitReason {
        if converged {
            ExitReason::Converged
        } else if self.cap_is_budget {
            ExitReason::Budget
        } else {
            ExitReason::Cap
        }
    }

    fn finish_reason_after(&self, token: u32, stopped_by_text: bool, limit: usize) -> Option<FinishReason> {
        let spec = self.spec();
        if stopped_by_text || spec.params.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated >= spec.params.max_tokens || self.context.len() >= limit || self.budget_exhausted() {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

#[path = "speculation.rs"]
mod speculation;
use speculation::{Emitted, Phase, Round};

#[path = "parallel.rs"]
mod parallel;

/// Tensors joined along the rows (one is returned as it is).
pub(super) fn cat<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> crate::model::Result<Tensor> {
    let parts: Vec<&Tensor> = tensors.collect();
    Ok(if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(&parts, 0)? })
}

/// A one-row latent state as float32 values (what the exit criteria compare).
fn latent_vec(state: &Tensor) -> crate::model::Result<Vec<f32>> {
    Ok(state.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}
