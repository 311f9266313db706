//! What every running choice has, whatever its decoder: its job, cache, context, sampler, text,
//! step budget and RNG, and the chunk it iterates (positions, stage, step, cap, state). Decoders
//! (`engine::decoder`) decide what a chunk is for and what its coda's logits become; the methods
//! here are the transitions every chunk goes through.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Tensor;
use metrics::{counter, histogram};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::depth::ElasticDepth;
use super::fault::SequenceFault;
use super::job::{EngineFailure, Event, ExitReason, Job, JobSpec, token_logprobs};
use super::shared::JobShared;
use crate::generate::constraint::Constraint;
use crate::generate::sampling::sampler_seed;
use crate::generate::{FinishReason, Sampler};
use crate::metrics as m;
use crate::model::{ExitTracker, GateExit, HuginnModel, KvCache, PrefixBlock, PrefixCapture, PrefixLayout};
use crate::text::{TextStream, TextTokenizer};

/// Where a chunk (a prompt, or one new token) is: the prelude, then `cap` core steps, then the
/// coda. Each stage covers the chunk's positions in order, in pieces that fit a tick's rows (a
/// decoding token's one row is one piece); a core step is complete when every piece ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A choice waiting for another choice of its job to prefill the prompt it then takes from
    /// the prefix cache.
    Waiting,
    Prelude,
    Core,
    Coda,
}

/// What became of a sequence after its chunk settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterToken {
    /// It goes on to its next chunk.
    Continues,
    /// It is done: its last event is still to be sent (after its release).
    Finishes(FinishReason),
    /// Its reader is gone or too far behind (the job is cancelled).
    Dropped,
}

/// The chunk being iterated: its positions, stage, step and cap, and its tensors.
pub(super) struct ChunkState {
    /// First position and count.
    pub start: usize,
    pub len: usize,
    /// Steps done on the chunk, and its cap.
    pub step: usize,
    pub cap: usize,
    /// The cap is the remaining step budget rather than the decoder's steps.
    pub cap_is_budget: bool,
    pub stage: Stage,
    /// Positions through the current stage (at the current step, for the core).
    pub done: usize,
    /// The iteration ended by the exit criterion (not the cap or budget).
    pub converged: bool,
    pub state: Tensor,
    pub injection: Tensor,
    /// Outputs of the current stage's pieces so far, joined when the stage covers the chunk.
    pub pieces: Vec<Tensor>,
    /// Every coda row's logits so far, for a chunk whose every row is read.
    pub coda_rows: Vec<Vec<f32>>,
    pub tracker: ExitTracker,
    /// The exit gate's cumulative probabilities per row (the `gate` criterion).
    pub gate: GateExit,
    /// Rows that exited while the chunk still runs its loops for their K/V (`exit_kv: fill`,
    /// and a prompt under the gate, which runs every loop).
    pub held: Option<Held>,
    /// Logits of the current state's last row, when already computed.
    pub logits: Option<Vec<f32>>,
}

/// What the rows that exited early had when they exited, kept until the chunk's last loop.
pub(super) struct Held {
    /// The state rows of the exited rows (the others' rows are not read).
    pub state: Tensor,
    pub exited: Vec<bool>,
    /// The last row's logits at its exit, when the criterion had computed them.
    pub logits: Option<Vec<f32>>,
}

/// Row `r` of `on` where `pick[r]`, else of `off` (exact: rows are copied).
fn pick_rows(pick: &[bool], on: &Tensor, off: &Tensor) -> crate::model::Result<Tensor> {
    let rows = pick.len();
    let index: Vec<u32> = pick.iter().enumerate().map(|(r, &p)| if p { r as u32 } else { (rows + r) as u32 }).collect();
    let index = Tensor::new(index.as_slice(), on.device())?;
    Ok(Tensor::cat(&[on, off], 0)?.index_select(&index, 0)?)
}

impl ChunkState {
    /// The core steps begin: step 0 of `cap` (`true`: the cap is the budget left).
    pub fn enter_core(&mut self, (cap, cap_is_budget): (usize, bool)) {
        (self.stage, self.done, self.step) = (Stage::Core, 0, 0);
        (self.cap, self.cap_is_budget) = (cap, cap_is_budget);
        self.logits = None;
        self.held = None;
    }

    /// Rows `exited` (newly) exit at the current state while the loops go on: their state (and,
    /// for the last row, its logits) is kept for the coda.
    pub fn hold(&mut self, exited: &[bool]) -> crate::model::Result<()> {
        let logits = if exited.last() == Some(&true) { self.logits.clone() } else { None };
        match &mut self.held {
            None => self.held = Some(Held { state: self.state.clone(), exited: exited.to_vec(), logits }),
            Some(held) => {
                held.state = pick_rows(exited, &self.state, &held.state)?;
                for (was, &now) in held.exited.iter_mut().zip(exited) {
                    *was |= now;
                }
                held.logits = held.logits.take().or(logits);
            }
        }
        Ok(())
    }

    /// The loops are over: the rows that exited early take back the state they exited with
    /// (their K/V stays the deeper loops'); true when the last row had exited early.
    pub fn restore_held(&mut self) -> crate::model::Result<bool> {
        let Some(held) = self.held.take() else {
            return Ok(false);
        };
        let last_exited = held.exited.last() == Some(&true);
        if held.exited.iter().all(|&e| e) {
            self.state = held.state;
        } else if held.exited.iter().any(|&e| e) {
            self.state = pick_rows(&held.exited, &held.state, &self.state)?;
        }
        if last_exited && held.logits.is_some() {
            self.logits = held.logits;
        }
        Ok(last_exited)
    }
}

/// How a prompt's prefill starts: from `len` positions of cached blocks (a prefill of `layout`),
/// and recording blocks for the prefix cache (`capture`, whose bytes the cache set aside).
#[derive(Default)]
pub struct PrefillStart {
    pub blocks: Vec<Arc<PrefixBlock>>,
    pub len: usize,
    pub layout: Option<PrefixLayout>,
    pub capture: Option<PrefixCapture>,
    pub capture_bytes: usize,
}

/// One choice of a job while it runs (its decoder aside).
pub struct Sequence {
    pub(super) shared: Arc<JobShared>,
    pub(super) choice: usize,
    /// This choice's share of the job's K/V reservation.
    reserved_kv: usize,
    /// The last event was sent; the sequence leaves at the end of the tick.
    finished: bool,
    pub(super) cache: KvCache,
    pub(super) rng: StdRng,
    pub(super) sampler: Sampler,
    text: TextStream,
    /// Prompt and emitted ids, then the tentative tokens proposed after them.
    pub(super) context: Vec<u32>,
    /// Tentative tokens at the end of `context` (see [`Self::propose`]).
    proposed: usize,
    pub(super) generated: usize,
    /// Still prefilling the prompt (the prompt is the chunk).
    pub(super) prefill: bool,
    /// Core steps spent so far (prompt prefill included).
    pub(super) steps_spent: usize,
    last_token_at: Option<Instant>,
    pub(super) chunk: ChunkState,
    /// Prompt positions the prefix cache supplied.
    pub(super) cached_tokens: usize,
    /// The final states of those positions, while the prompt's coda still has to report their
    /// rows (`echo` with log-probabilities).
    pub(super) prefix_states: Option<Tensor>,
    /// The prompt's blocks being recorded for the prefix cache, and the bytes set aside for them.
    pub(super) capture: Option<PrefixCapture>,
    pub(super) capture_bytes: usize,
    /// What the output must match, advanced by every emitted token.
    pub(super) constraint: Option<Constraint>,
    /// Its elastic depth (`engine::depth`), for a generation with a floor.
    pub(super) elastic: ElasticDepth,
}

/// One token to emit: the logits that produced it (`raw`), after `steps` steps, why they stopped,
/// and whether more tokens of the same settle follow.
pub(super) struct Emitted<'a> {
    pub token: u32,
    pub raw: &'a [f32],
    pub steps: usize,
    pub exit: ExitReason,
    pub more: bool,
}

impl Sequence {
    pub fn new(shared: Arc<JobShared>, choice: usize, model: &HuginnModel) -> crate::model::Result<Self> {
        let spec = shared.spec.clone();
        let seed = spec.params.seed.wrapping_add(choice as u64);
        // Replaced by the first chunk's prelude before any step reads them.
        let placeholder = Tensor::zeros((1, 1), model.activation_dtype(), model.device())?;
        let chunk = ChunkState {
            start: 0,
            len: spec.prompt.len(),
            step: 0,
            cap: 0,
            cap_is_budget: false,
            stage: Stage::Prelude,
            done: 0,
            converged: false,
            state: placeholder.clone(),
            injection: placeholder,
            pieces: Vec::new(),
            coda_rows: Vec::new(),
            tracker: ExitTracker::new(spec.params.exit, Vec::new()),
            gate: GateExit::default(),
            held: None,
            logits: None,
        };
        Ok(Self {
            choice,
            reserved_kv: shared.job.kv_reservation / spec.n.max(1),
            finished: false,
            cache: model.new_cache(spec.params.cache),
            rng: StdRng::seed_from_u64(seed),
            sampler: Sampler::new(spec.params.sampling.clone(), sampler_seed(seed)),
            text: TextStream::new(spec.stop.clone()),
            context: spec.prompt.clone(),
            proposed: 0,
            generated: 0,
            prefill: true,
            steps_spent: 0,
            last_token_at: None,
            chunk,
            shared,
            cached_tokens: 0,
            prefix_states: None,
            capture: None,
            capture_bytes: 0,
            constraint: spec.constraint.clone(),
            elastic: ElasticDepth::new(spec.params.min_num_steps),
        })
    }

    /// The prompt's prefill starts as `start` says: after the cached positions, recording what
    /// it captures.
    pub(super) fn begin_prefill(&mut self, start: PrefillStart) -> crate::model::Result<()> {
        let PrefillStart { blocks, len, layout, capture, capture_bytes } = start;
        if let (true, Some(layout)) = (len > 0, layout) {
            let spec = self.spec();
            if spec.prompt_logprobs || spec.report_logits {
                self.prefix_states = Some(cat(blocks.iter().map(|b| b.states()))?.narrow(0, 0, len)?);
            }
            self.cache.attach_prefix(blocks, len, layout)?;
            self.cached_tokens = len;
        }
        (self.capture, self.capture_bytes) = (capture, capture_bytes);
        let prompt = self.spec().prompt.len();
        self.start_chunk(len, prompt - len);
        Ok(())
    }

    /// The choice waits for another choice of its job to prefill the prompt.
    pub(super) fn wait(&mut self) {
        self.chunk.stage = Stage::Waiting;
    }

    /// The prompt's blocks recorded (its prefill is over), with the bytes set aside for them.
    pub(super) fn take_capture(&mut self) -> Option<PrefixCapture> {
        self.capture_bytes = 0;
        self.capture.take()
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

    /// The chunk's prelude covers it: its core steps begin from a fresh initial state (unless
    /// continuous compute carries the last one) with a fresh exit tracker, at step 0, capped at
    /// `num_steps` or the budget left.
    pub(super) fn begin_core(
        &mut self,
        num_steps: usize,
        may_exit: bool,
        model: &HuginnModel,
    ) -> crate::model::Result<()> {
        let params = &self.shared.spec.params;
        let c = &mut self.chunk;
        if self.prefill {
            // Content-addressed: a prompt's encoding does not depend on the request.
            let seeds = self.shared.chain.noise_seeds(c.start..c.start + c.len);
            c.state = model.initial_state_seeded(&c.injection, params.init_scale, &seeds)?;
        } else if !params.continuous_compute() {
            c.state = model.initial_state(&c.injection, params.init_scale, &mut self.rng)?;
        }
        let rule = params.exit;
        let initial = if rule.criterion.needs_latent() && may_exit { latent_vec(&c.state)? } else { Vec::new() };
        c.tracker = ExitTracker::new(rule, initial);
        c.gate = if rule.criterion.needs_gate() { GateExit::new(c.len) } else { GateExit::default() };
        // Capped at `num_steps`, or at the budget left when less.
        let cap = match self.budget_left() {
            Some(left) if left < num_steps => (left.max(1), true),
            _ => (num_steps, false),
        };
        self.chunk.enter_core(cap);
        Ok(())
    }

    /// Core steps left in the request's budget (`None`: no budget).
    pub(super) fn budget_left(&self) -> Option<usize> {
        self.spec().max_total_steps.map(|budget| budget.saturating_sub(self.steps_spent))
    }

    /// The next chunk is `len` positions from `start`, from its prelude.
    pub(super) fn start_chunk(&mut self, start: usize, len: usize) {
        let c = &mut self.chunk;
        (c.start, c.len, c.stage, c.done) = (start, len, Stage::Prelude, 0);
    }

    /// The next chunk is the token just emitted (the last of the context), one row: the cache is
    /// cut back to its position, dropping any unaccepted positions of the last chunk.
    pub(super) fn start_next_token(&mut self) {
        let position = self.context.len() - 1;
        self.cache.truncate(position);
        self.start_chunk(position, 1);
    }

    /// The logits of the chunk's last row, taken to sample from.
    pub(super) fn take_logits(&mut self) -> Result<Vec<f32>, SequenceFault> {
        self.chunk.logits.take().ok_or(SequenceFault::Invariant("a chunk's coda left no logits"))
    }

    /// A tentative token (a draft, a window's guess): it joins the context, where the next
    /// chunk's prelude reads it, and the sampler's penalties count it, until
    /// [`Self::withdraw_proposals`] takes every proposal back. Emitting goes through
    /// [`Self::push_token`] only.
    pub(super) fn propose(&mut self, token: u32) {
        self.sampler.record(token);
        self.context.push(token);
        self.proposed += 1;
    }

    /// Takes back every tentative token (from the context and the penalties), in order.
    pub(super) fn withdraw_proposals(&mut self) -> Vec<u32> {
        let withdrawn = self.context.split_off(self.context.len() - self.proposed);
        for &token in &withdrawn {
            self.sampler.forget(token);
        }
        self.proposed = 0;
        withdrawn
    }

    /// Records and sends one emitted token: `None` when the choice goes on, else how it ended.
    pub(super) fn push_token(
        &mut self,
        tokenizer: &TextTokenizer,
        emitted: Emitted<'_>,
        limit: usize,
    ) -> Result<Option<AfterToken>, SequenceFault> {
        let Emitted { token, raw, steps, exit, more } = emitted;
        if self.proposed > 0 {
            return Err(SequenceFault::Invariant("a token emitted over tentative tokens"));
        }
        histogram!(m::STEPS_PER_TOKEN, "exit_reason" => exit.label()).record(steps as f64);
        if self.spec().report_logits && !self.prefill {
            self.send(Event::Logits { choice: self.choice, rows: vec![raw.to_vec()] });
        }
        self.sampler.record(token);
        self.context.push(token);
        self.generated += 1;
        self.prefill = false;
        counter!(m::GENERATION_TOKENS).increment(1);
        let now = Instant::now();
        match self.last_token_at {
            None => histogram!(m::TIME_TO_FIRST_TOKEN).record(self.shared.job.submitted.elapsed().as_secs_f64()),
            Some(last) => {
                let gap = (now - last).as_secs_f64();
                histogram!(m::INTER_TOKEN_LATENCY).record(gap);
                self.elastic.observe_itl(gap);
            }
        }
        self.last_token_at = Some(now);
        let piece = self.text.push(tokenizer, token)?;
        let logprobs = self.spec().logprobs.map(|top| token_logprobs(raw, token, top));
        let reason = self.finish_reason_after(token, piece.stopped, more, limit);
        let event = Event::Token { choice: self.choice, id: token, text: piece.text, steps, exit, logprobs, more };
        Ok(match (self.send(event), reason) {
            (_, Some(reason)) => Some(AfterToken::Finishes(reason)),
            (true, None) => None,
            (false, None) => Some(AfterToken::Dropped),
        })
    }

    /// Every row's logits of the prompt chunk: reported, the last one kept for sampling.
    pub(super) fn take_prompt_rows(&mut self, rows: Vec<Vec<f32>>) {
        let spec = self.shared.spec.clone();
        if spec.prompt_logprobs {
            let logprobs = rows
                .iter()
                .zip(self.context.iter().skip(1))
                .map(|(row, &next)| token_logprobs(row, next, spec.logprobs.unwrap_or(0)))
                .collect();
            self.send(Event::PromptLogprobs { choice: self.choice, logprobs });
        }
        self.chunk.logits = rows.last().cloned();
        if spec.report_logits {
            self.send(Event::Logits { choice: self.choice, rows });
        }
    }

    /// Why the chunk's iteration stopped.
    pub(super) fn exit_reason(&self) -> ExitReason {
        if self.chunk.converged {
            ExitReason::Converged
        } else if self.chunk.cap_is_budget {
            ExitReason::Budget
        } else {
            ExitReason::Cap
        }
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

    /// The rest of the text, at the end.
    pub(super) fn finish_text(&mut self) -> String {
        self.text.finish()
    }

    /// Ends the whole job with an error event.
    pub fn fail(&self, failure: EngineFailure) {
        self.send(Event::Error { failure });
        self.shared.job.cancelled.store(true, Ordering::Relaxed);
    }

    /// Sends an event; false when the receiver is gone or too far behind (the job is then cancelled).
    pub(super) fn send(&self, event: Event) -> bool {
        if self.shared.job.events.try_send(event).is_err() {
            self.shared.job.cancelled.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn budget_exhausted(&self) -> bool {
        self.budget_left() == Some(0)
    }

    /// Why the choice ends after `token`, if it does. The constraint has taken every token of the
    /// settle already, so its completion counts at the settle's last token (`more` false).
    fn finish_reason_after(&self, token: u32, stopped_by_text: bool, more: bool, limit: usize) -> Option<FinishReason> {
        let spec = self.spec();
        let complete = !more && self.constraint_complete();
        if stopped_by_text || complete || spec.params.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated >= spec.params.max_tokens || self.context.len() >= limit || self.budget_exhausted() {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

/// Tensors joined along the rows (one is returned as it is).
pub(super) fn cat<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> crate::model::Result<Tensor> {
    let parts: Vec<&Tensor> = tensors.collect();
    Ok(if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(&parts, 0)? })
}

/// A one-row latent state as float32 values (what the exit criteria compare).
pub(super) fn latent_vec(state: &Tensor) -> crate::model::Result<Vec<f32>> {
    Ok(state.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}
