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

use candle_core::Tensor;
use metrics::{counter, histogram};

use super::job::{EngineFailure, Event, Job};
use super::running::{AfterToken, JobShared, Running};
use crate::generate::FinishReason;
use crate::metrics as m;
use crate::model::{Chunk, HuginnModel, LogitRows, Result};
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
        let live = self.running.iter().filter(|r| !r.is_finished());
        live.fold(Totals::default(), |t, r| Totals {
            sequences: t.sequences + 1,
            kv_bytes: t.kv_bytes + r.kv_bytes(),
            reserved_kv: t.reserved_kv + r.reserved_kv(),
        })
    }

    /// Sequence `i` is about to send its last event: its cache is freed, it leaves the totals and
    /// (with its job's last choice) the running gauge, all before the event goes out. Returns the
    /// bytes its cache held.
    fn release(&mut self, i: usize) -> usize {
        let bytes = self.running[i].release(&self.model);
        if let Some(report) = &self.reporter {
            report(self.totals());
        }
        bytes
    }

    /// Sends sequence `i`'s last event, after releasing it.
    fn finish(&mut self, i: usize, reason: FinishReason) {
        let kv_bytes = self.release(i);
        self.running[i].send_finished(reason, kv_bytes);
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
        let reserved: usize = self.running.iter().map(Running::reserved_kv).sum();
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
        let active: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].job().can_take_a_tick()).collect();
        if active.is_empty() {
            return Ok(false);
        }
        let count = active.len();
        let state = cat(active.iter().map(|&i| self.running[i].state()))?;
        let injection = cat(active.iter().map(|&i| self.running[i].injection()))?;
        // Decided once above: a reader draining meanwhile must not change who is in this tick.
        let mut taking = vec![false; self.running.len()];
        active.iter().for_each(|&i| taking[i] = true);
        let mut chunks: Vec<Chunk<'_>> =
            self.running.iter_mut().zip(&taking).filter(|(_, taking)| **taking).map(|(r, _)| r.core_chunk()).collect();
        let next = self.model.core_step(&state, &injection, &mut chunks)?;
        drop(chunks);
        let mut row = 0;
        for &i in &active {
            let r = &mut self.running[i];
            let len = r.positions().1;
            r.stepped(next.narrow(0, row, len)?);
            row += len;
        }
        counter!(m::CORE_STEPS, "worker" => self.worker.to_string()).increment(count as u64);
        histogram!(m::BATCH_SEQUENCES).record(count as f64);

        // Criteria that read the distribution need the coda at every checked step.
        let checking: Vec<usize> = active.iter().copied().filter(|&i| self.running[i].checks_exit()).collect();
        let wants_logits: Vec<usize> =
            checking.iter().copied().filter(|&i| self.running[i].exit_needs_logits()).collect();
        self.decode(&wants_logits)?;

        let mut done: Vec<(usize, bool)> = Vec::new();
        for &i in &active {
            let r = &mut self.running[i];
            let converged = checking.contains(&i) && r.check_exit()?;
            if r.chunk_done(converged) {
                done.push((i, converged));
            }
        }
        let need: Vec<usize> = done.iter().map(|(i, _)| *i).filter(|&i| !self.running[i].has_logits()).collect();
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
        let (all_rows, last_rows): (Vec<usize>, Vec<usize>) =
            indices.iter().partition(|&&i| self.running[i].reports_prompt_rows());
        for i in all_rows {
            let r = &mut self.running[i];
            let logits = self.model.coda(&r.state().clone(), &mut [r.outer_chunk()], LogitRows::All)?;
            r.take_prompt_rows(logits.to_vec2::<f32>()?);
        }
        if last_rows.is_empty() {
            return Ok(());
        }
        let state = cat(last_rows.iter().map(|&i| self.running[i].state()))?;
        let mut chunks = Vec::with_capacity(last_rows.len());
        for (i, r) in self.running.iter_mut().enumerate() {
            if last_rows.contains(&i) {
                chunks.push(r.outer_chunk());
            }
        }
        let logits = self.model.coda(&state, &mut chunks, LogitRows::Last)?.to_vec2::<f32>()?;
        drop(chunks);
        for (&i, row) in last_rows.iter().zip(logits) {
            self.running[i].set_logits(row);
        }
        Ok(())
    }

    /// Samples and emits the token of sequence `i`; true when the sequence goes on.
    fn finish_token(&mut self, i: usize, converged: bool) -> Result<bool> {
        let limit = self.model.config().block_size;
        match self.running[i].emit_token(converged, &self.tokenizer, limit)? {
            AfterToken::Continues => Ok(true),
            AfterToken::Dropped => Ok(false),
            AfterToken::Finishes(reason) => {
                self.finish(i, reason);
                Ok(false)
            }
        }
    }

    fn drop_cancelled(&mut self) {
        self.running.retain(|r| !r.job().is_cancelled());
    }

    /// Removes sequences that sent their last event (or whose client went away).
    fn drop_finished(&mut self) {
        self.running.retain(|r| !r.is_finished() && !r.job().is_cancelled());
    }

    /// Ends every running job with an error event (the caller logs the failure).
    pub fn fail_all(&mut self, message: &str) {
        for r in &self.running {
            r.fail(message);
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
        r.next_chunk_ids(&mut ids);
    }
    let mut chunks: Vec<Chunk<'_>> = seqs.iter_mut().map(|r| r.outer_chunk()).collect();
    let injection = model.prelude(&ids, &mut chunks)?;
    drop(chunks);
    let mut row = 0;
    for r in seqs.iter_mut() {
        let len = r.positions().1;
        r.begin_chunk(injection.narrow(0, row, len)?, model)?;
        row += len;
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
