//! Depth-level continuous batching.
//!
//! The unit of scheduling is one recurrence step. Every tick, every running sequence advances one
//! core step in a single batched pass, whatever its `num_steps`, exit rule, position or phase (a
//! prompt being prefilled is a chunk of many rows, a decoding token a chunk of one). Sequences whose
//! token stops iterating (exit criterion, cap or budget) go through the coda and sampling, emit the
//! token, and start their next token's prelude, joining the next tick. New jobs join at any tick.
//! Every per-sequence computation is independent of the batch it runs in, so a request's output is
//! the same alone or beside others.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use metrics::{counter, histogram};

use super::job::{EngineFailure, Event, Job};
use super::running::{JobShared, Running, latent_vec, token_logprobs};
use crate::generate::FinishReason;
use crate::metrics as m;
use crate::model::{Chunk, ExitTracker, HuginnModel, LogitRows, Result};
use crate::text::TextTokenizer;

/// Limits of one worker.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    pub max_active_sequences: usize,
    pub max_kv_bytes: usize,
}

/// What a worker holds: running sequences, their K/V bytes and their K/V reservation (sequences
/// that sent their last event no longer count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub sequences: usize,
    pub kv_bytes: usize,
    pub reserved_kv: usize,
}

/// Called with the new totals whenever a sequence is released, before its last event is sent.
pub type Reporter = Box<dyn Fn(Totals) + Send>;

pub struct Scheduler {
    model: Arc<HuginnModel>,
    tokenizer: Arc<TextTokenizer>,
    limits: SchedulerLimits,
    running: Vec<Running>,
    /// The worker's metric label.
    worker: Arc<str>,
    reporter: Option<Reporter>,
}

impl Scheduler {
    /// A scheduler for the worker labelled `worker` in the metrics.
    pub fn new(model: Arc<HuginnModel>, tokenizer: Arc<TextTokenizer>, limits: SchedulerLimits, worker: &str) -> Self {
        Self { model, tokenizer, limits, running: Vec::new(), worker: worker.into(), reporter: None }
    }

    /// Publishes the totals through `reporter` each time a sequence ends, before its client hears
    /// of it (so that `/metrics` read right after a response shows the sequence gone).
    pub fn with_reporter(mut self, reporter: Reporter) -> Self {
        self.reporter = Some(reporter);
        self
    }

    /// Sequences, K/V bytes and reservations of the sequences still running.
    pub fn totals(&self) -> Totals {
        let live = self.running.iter().filter(|r| !r.finished);
        live.fold(Totals::default(), |t, r| Totals {
            sequences: t.sequences + 1,
            kv_bytes: t.kv_bytes + r.cache.bytes(),
            reserved_kv: t.reserved_kv + r.reserved_kv,
        })
    }

    /// Sequence `i` is about to send its last event: its cache is freed, it leaves the totals and
    /// (with its job's last choice) the running gauge, all before the event goes out. Returns the
    /// bytes its cache held.
    fn release(&mut self, i: usize) -> usize {
        let r = &mut self.running[i];
        let bytes = r.cache.bytes();
        r.finished = true;
        r.cache = self.model.new_cache(r.spec().params.cache);
        r.shared.choice_done();
        if let Some(report) = &self.reporter {
            report(self.totals());
        }
        bytes
    }

    /// Sends sequence `i`'s last event, after releasing it.
    fn finish(&mut self, i: usize, reason: FinishReason) {
        let text = self.running[i].text.finish();
        let kv_bytes = self.release(i);
        let r = &self.running[i];
        r.send(Event::Finished { choice: r.choice, reason, text, kv_bytes });
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty()
    }

    /// Whether `job` fits now (sequence slots and reserved K/V memory). An empty scheduler takes any
    /// job, so one too large for the limits still runs alone rather than waiting forever.
    pub fn has_room_for(&self, job: &Job) -> bool {
        if self.running.is_empty() {
            return true;
        }
        let reserved: usize = self.running.iter().map(|r| r.reserved_kv).sum();
        self.running.len() + job.spec.n <= self.limits.max_active_sequences
            && reserved.saturating_add(job.kv_reservation) <= self.limits.max_kv_bytes
    }

    /// Starts a job: its choices' prompt preludes run now; they iterate from the next tick. A job
    /// that fails to start gets an error event, and the error is returned.
    pub fn admit(&mut self, job: Job) -> Result<()> {
        histogram!(m::QUEUE_WAIT).record(job.submitted.elapsed().as_secs_f64());
        counter!(m::PROMPT_TOKENS).increment((job.spec.prompt.len() * job.spec.n) as u64);
        let shared = Arc::new(JobShared::new(job, self.worker.clone()));
        let spec = shared.spec.clone();
        if spec.params.max_tokens == 0 && !spec.prompt_logprobs && !spec.report_logits {
            for choice in 0..spec.n {
                shared.choice_done();
                let event = Event::Finished { choice, reason: FinishReason::Length, text: String::new(), kv_bytes: 0 };
                let _ = shared.job.events.try_send(event);
            }
            return Ok(());
        }
        let started = (0..spec.n)
            .map(|c| Running::new(shared.clone(), c, &self.model))
            .collect::<Result<Vec<_>>>()
            .and_then(|mut fresh| {
                let mut refs: Vec<&mut Running> = fresh.iter_mut().collect();
                start_chunks(&self.model, &mut refs)?;
                Ok(fresh)
            });
        match started {
            Ok(fresh) => {
                self.running.extend(fresh);
                Ok(())
            }
            Err(e) => {
                let _ = shared.job.events.try_send(Event::Error { failure: EngineFailure::Start(e.to_string()) });
                Err(e)
            }
        }
    }

    /// One core step for every running sequence, then exits, sampling and the next preludes. On
    /// an error the running sequences are left as they were: the caller fails them.
    /// Returns whether any sequence advanced (none does while every reader is behind).
    pub fn tick(&mut self) -> Result<bool> {
        self.drop_cancelled();
        if self.running.is_empty() {
            return Ok(false);
        }
        let advanced = self.step_all()?;
        self.drop_finished();
        Ok(advanced)
    }

    /// Advances the sequences whose readers have room for this tick's events (the others wait,
    /// holding their state, so that no channel overflows).
    fn step_all(&mut self) -> Result<bool> {
        let active: Vec<usize> =
            (0..self.running.len()).filter(|&i| self.running[i].shared.job.can_take_a_tick()).collect();
        if active.is_empty() {
            return Ok(false);
        }
        let count = active.len();
        let state = cat(active.iter().map(|&i| &self.running[i].state))?;
        let injection = cat(active.iter().map(|&i| &self.running[i].injection))?;
        // Decided once above: a reader draining meanwhile must not change who is in this tick.
        let mut taking = vec![false; self.running.len()];
        active.iter().for_each(|&i| taking[i] = true);
        let mut chunks: Vec<Chunk<'_>> = self
            .running
            .iter_mut()
            .zip(&taking)
            .filter(|(_, taking)| **taking)
            .map(|(r, _)| Chunk { cache: &mut r.cache, start: r.start, len: r.len, step: r.step })
            .collect();
        let next = self.model.core_step(&state, &injection, &mut chunks)?;
        drop(chunks);
        let mut row = 0;
        for &i in &active {
            let r = &mut self.running[i];
            r.state = next.narrow(0, row, r.len)?;
            row += r.len;
            r.step += 1;
            r.steps_spent += 1;
            r.logits = None;
        }
        counter!(m::CORE_STEPS, "worker" => self.worker.to_string()).increment(count as u64);
        histogram!(m::BATCH_SEQUENCES).record(count as f64);

        // Criteria that read the distribution need the coda at every checked step.
        let checking: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| {
                let r = &self.running[i];
                !r.prefill && r.tracker.checks_at(r.step - 1)
            })
            .collect();
        let wants_logits: Vec<usize> =
            checking.iter().copied().filter(|&i| self.running[i].spec().params.exit.criterion.needs_logits()).collect();
        self.decode(&wants_logits)?;

        let mut done: Vec<(usize, bool)> = Vec::new();
        for &i in &active {
            let r = &mut self.running[i];
            let mut converged = false;
            if checking.contains(&i) {
                let latent =
                    if r.spec().params.exit.criterion.needs_latent() { latent_vec(&r.state)? } else { Vec::new() };
                converged = r.tracker.check(&latent, r.logits.as_deref())?.exit;
            }
            if converged || r.step >= r.cap {
                done.push((i, converged));
            }
        }
        let need: Vec<usize> = done.iter().map(|(i, _)| *i).filter(|&i| self.running[i].logits.is_none()).collect();
        self.decode(&need)?;

        let mut continuing = Vec::new();
        for (i, converged) in done {
            if self.finish_token(i, converged)? {
                continuing.push(i);
            }
        }
        let mut refs: Vec<&mut Running> =
            self.running.iter_mut().enumerate().filter(|(i, _)| continuing.contains(i)).map(|(_, r)| r).collect();
        start_chunks(&self.model, &mut refs)?;
        Ok(true)
    }

    /// Coda + head for the sequences at `indices` (their current state), stored in `logits`.
    /// Prompt chunks that report prompt log-probabilities get every row.
    fn decode(&mut self, indices: &[usize]) -> Result<()> {
        if indices.is_empty() {
            return Ok(());
        }
        let (all_rows, last_rows): (Vec<usize>, Vec<usize>) = indices.iter().partition(|&&i| {
            let r = &self.running[i];
            r.prefill && (r.spec().prompt_logprobs || r.spec().report_logits)
        });
        for i in all_rows {
            let r = &mut self.running[i];
            let chunk = Chunk { cache: &mut r.cache, start: r.start, len: r.len, step: 0 };
            let logits = self.model.coda(&r.state, &mut [chunk], LogitRows::All)?;
            let rows = logits.to_vec2::<f32>()?;
            if r.spec().prompt_logprobs {
                let logprobs = rows
                    .iter()
                    .zip(r.context.iter().skip(1))
                    .map(|(row, &next)| token_logprobs(row, next, r.spec().logprobs.unwrap_or(0)))
                    .collect();
                r.send(Event::PromptLogprobs { choice: r.choice, logprobs });
            }
            r.logits = rows.last().cloned();
            if r.spec().report_logits {
                r.send(Event::Logits { choice: r.choice, rows });
            }
        }
        if last_rows.is_empty() {
            return Ok(());
        }
        let state = cat(last_rows.iter().map(|&i| &self.running[i].state))?;
        let mut chunks = Vec::with_capacity(last_rows.len());
        for (i, r) in self.running.iter_mut().enumerate() {
            if last_rows.contains(&i) {
                chunks.push(Chunk { cache: &mut r.cache, start: r.start, len: r.len, step: 0 });
            }
        }
        let logits = self.model.coda(&state, &mut chunks, LogitRows::Last)?.to_vec2::<f32>()?;
        drop(chunks);
        for (&i, row) in last_rows.iter().zip(logits) {
            self.running[i].logits = Some(row);
        }
        Ok(())
    }

    /// Samples and emits the token of sequence `i`; true when the sequence goes on.
    fn finish_token(&mut self, i: usize, converged: bool) -> Result<bool> {
        let limit = self.model.config().block_size;
        let r = &mut self.running[i];
        let exit = r.exit_reason(converged);
        let steps = r.step;
        histogram!(m::STEPS_PER_TOKEN, "exit_reason" => exit.label()).record(steps as f64);
        if converged {
            counter!(m::EARLY_EXITS, "criterion" => r.spec().params.exit.criterion.name()).increment(1);
        }
        if r.prefill && r.spec().params.continuous_compute {
            r.state = r.state.narrow(0, r.len - 1, 1)?;
        }
        if r.spec().params.max_tokens == 0 {
            // Prompt log-probabilities (or logits) only.
            self.finish(i, FinishReason::Length);
            return Ok(false);
        }
        let raw = r.logits.take().unwrap_or_default();
        if r.spec().report_logits && !r.prefill {
            r.send(Event::Logits { choice: r.choice, rows: vec![raw.clone()] });
        }
        let mut logits = raw.clone();
        let token = r.sampler.sample(&mut logits, &r.context);
        r.sampler.record(token);
        r.context.push(token);
        r.generated += 1;
        r.prefill = false;
        counter!(m::GENERATION_TOKENS).increment(1);
        let now = Instant::now();
        match r.last_token_at {
            None => histogram!(m::TIME_TO_FIRST_TOKEN).record(r.shared.job.submitted.elapsed().as_secs_f64()),
            Some(last) => histogram!(m::INTER_TOKEN_LATENCY).record((now - last).as_secs_f64()),
        }
        r.last_token_at = Some(now);
        let piece = r.text.push(&self.tokenizer, token)?;
        let logprobs = r.spec().logprobs.map(|top| token_logprobs(&raw, token, top));
        let reason = r.finish_reason_after(token, piece.stopped, limit);
        let sent = r.send(Event::Token { choice: r.choice, id: token, text: piece.text, steps, exit, logprobs });
        if let Some(reason) = reason {
            self.finish(i, reason);
            return Ok(false);
        }
        Ok(sent)
    }

    fn drop_cancelled(&mut self) {
        self.running.retain(|r| !r.shared.job.is_cancelled());
    }

    /// Removes sequences that sent their last event (or whose client went away).
    fn drop_finished(&mut self) {
        self.running.retain(|r| !r.finished && !r.shared.job.is_cancelled());
    }

    /// Ends every running job with an error event (the caller logs the failure).
    pub fn fail_all(&mut self, message: &str) {
        for r in &self.running {
            r.send(Event::Error { failure: EngineFailure::Worker(message.to_string()) });
        }
        self.running.clear();
    }
}

/// Runs the prelude of each sequence's next chunk (its prompt while prefilling, else its last
/// sampled token) in one batched call, and resets its iteration state.
fn start_chunks(model: &HuginnModel, seqs: &mut [&mut Running]) -> Result<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    for r in seqs.iter_mut() {
        if r.prefill {
            ids.extend_from_slice(&r.context);
            r.start = 0;
            r.len = r.context.len();
        } else {
            ids.push(*r.context.last().unwrap_or(&0));
            r.start = r.context.len() - 1;
            r.len = 1;
        }
    }
    let mut chunks: Vec<Chunk<'_>> =
        seqs.iter_mut().map(|r| Chunk { cache: &mut r.cache, start: r.start, len: r.len, step: 0 }).collect();
    let injection = model.prelude(&ids, &mut chunks)?;
    drop(chunks);
    let mut row = 0;
    for r in seqs.iter_mut() {
        r.injection = injection.narrow(0, row, r.len)?;
        row += r.len;
        if r.prefill || !r.spec().params.continuous_compute {
            let (len, scale) = (r.len, r.spec().params.init_scale);
            r.state = model.init_state(len, scale, r.rng())?;
        }
        let rule = r.spec().params.exit;
        let initial = if rule.criterion.needs_latent() && !r.prefill { latent_vec(&r.state)? } else { Vec::new() };
        r.tracker = ExitTracker::new(rule, initial);
        r.step = 0;
        r.logits = None;
        r.set_cap();
    }
    Ok(())
}

fn cat<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> Result<Tensor> {
    let parts: Vec<&Tensor> = tensors.collect();
    Ok(if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(&parts, 0)? })
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
