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

use metrics::{counter, gauge, histogram};

use super::elastic::{DepthController, ElasticTargets};
use super::fault::SequenceFault;
use super::job::{EngineFailure, Event, Job, StrategyCounts};
use super::prefix::{Digest32, PrefixCache};
use super::running::{AfterToken, Running, Stage, cat};
use super::shared::JobShared;
use crate::generate::FinishReason;
use crate::metrics as m;
use crate::model::{HuginnModel, LogitRows, Result};
use crate::text::TextTokenizer;

/// Limits of one worker.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    pub max_active_sequences: usize,
    pub max_kv_bytes: usize,
    /// Rows (token positions) one prelude, core-step or coda pass may hold; 0: unlimited. A
    /// prompt larger than what is left is prefilled in pieces, step-major (exact).
    pub max_tick_rows: usize,
    /// Bytes of prompt K/V the prefix cache may keep (0: no cache), within `max_kv_bytes`.
    pub prefix_cache_bytes: usize,
    /// Elastic depth's targets (none: off).
    pub elastic: ElasticTargets,
}

/// What a worker holds: running sequences, their K/V bytes and their K/V reservation (sequences
/// that sent their last event no longer count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub sequences: usize,
    pub kv_bytes: usize,
    pub reserved_kv: usize,
}

/// Rows of one pass: (sequence index, rows), in index order.
type Plan = Vec<(usize, usize)>;

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
    /// The prompt rows waiting last published to the gauge.
    published_waiting: Option<usize>,
    /// Prompt blocks kept for reuse (`None`: caching off).
    prefix: Option<PrefixCache>,
    /// What identifies the model in the prefix cache's keys.
    fingerprint: Digest32,
    /// Elastic depth's controller (off without targets).
    depth: DepthController,
}

impl Scheduler {
    /// A scheduler for the worker labelled `worker` in the metrics.
    pub fn new(model: Arc<HuginnModel>, tokenizer: Arc<TextTokenizer>, limits: SchedulerLimits, worker: &str) -> Self {
        let worker: Arc<str> = worker.into();
        Self {
            fingerprint: prefill::fingerprint(&model),
            prefix: PrefixCache::new(limits.prefix_cache_bytes.min(limits.max_kv_bytes), worker.clone()),
            model,
            tokenizer,
            limits,
            running: Vec::new(),
            worker,
            reporter: None,
            published_waiting: None,
            depth: DepthController::new(limits.elastic, Instant::now()),
        }
    }

    /// Publishes the totals through `reporter` each time a sequence ends, before its client hears
    /// of it (so that `/metrics` read right after a response shows the sequence gone).
    pub fn with_reporter(mut self, reporter: Reporter) -> Self {
        self.reporter = Some(reporter);
        self
    }

    /// Replaces the prefix cache by an empty one of `bytes` (0: none).
    pub fn set_prefix_cache(&mut self, bytes: usize) {
        self.limits.prefix_cache_bytes = bytes;
        self.prefix = PrefixCache::new(bytes.min(self.limits.max_kv_bytes), self.worker.clone());
    }

    /// Bytes the prefix cache holds.
    pub fn prefix_cache_bytes(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixCache::bytes)
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
    ///
    /// Slots are counted at each sequence's depth: an elastic sequence whose cap is a fraction of
    /// its `num_steps` takes that fraction of a slot, so more elastic jobs are admitted as the
    /// depth factor falls, while each has a row of each pass (an elastic job is admitted only while
    /// the sequences fit in `max_tick_rows`); memory is reserved for their full depth.
    pub fn has_room_for(&self, job: &Job) -> bool {
        if self.running.is_empty() {
            return true;
        }
        let reserved: usize = self.running.iter().map(Running::reserved_kv).sum();
        let slots = self.running.iter().map(Running::slot_share).sum::<f64>() + self.slot_share(job);
        // An elastic job also needs a row of each pass for every sequence (a plain one is planned
        // before the elastic ones, whatever their number).
        let rows = job.spec.params.min_num_steps.is_none()
            || self.limits.max_tick_rows == 0
            || self.running.len() + job.spec.n <= self.limits.max_tick_rows;
        slots <= self.limits.max_active_sequences as f64 + 1e-9
            && rows
            && reserved.saturating_add(job.kv_reservation).saturating_add(self.prefix_held())
                <= self.limits.max_kv_bytes
    }

    /// Starts a job: its choices' prompt preludes run now; they iterate from the next tick. A job
    /// that fails to start gets an error event, and the error is returned.
    pub fn admit(&mut self, job: Job) -> Result<()> {
        let waited = job.submitted.elapsed().as_secs_f64();
        histogram!(m::QUEUE_WAIT).record(waited);
        self.depth.observe_queue_wait(waited);
        counter!(m::PROMPT_TOKENS).increment((job.spec.prompt.len() * job.spec.n) as u64);
        let steps = self.prefill_depth(&job.spec);
        let shared = Arc::new(JobShared::new(job, self.worker.clone(), steps, self.block_keys(steps)));
        let spec = shared.spec.clone();
        if spec.params.max_tokens == 0 && !spec.prompt_logprobs && !spec.report_logits {
            for choice in 0..spec.n {
                shared.choice_done();
                let event = Event::Finished {
                    cached_tokens: 0,
                    elastic_steps_shed: 0,
                    choice,
                    reason: FinishReason::Length,
                    text: String::new(),
                    kv_bytes: 0,
                    counts: StrategyCounts::zero_for(&spec.params.decoding),
                };
                let _ = shared.job.events.try_send(event);
            }
            return Ok(());
        }
        let factor = self.depth.factor();
        let started = (0..spec.n)
            .map(|c| {
                let mut r = Running::new(shared.clone(), c, &self.model)?;
                r.set_depth(factor);
                Ok(r)
            })
            .collect::<Result<Vec<_>>>();
        match started.and_then(|fresh| self.start_prefills(&shared, fresh)) {
            Ok(fresh) => {
                self.running.extend(fresh);
                self.fit_prefix_cache();
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
            self.control_depth();
            return Ok(false);
        }
        let started = Instant::now();
        let advanced = self.step_all()?;
        self.control_depth();
        self.drop_finished();
        if advanced {
            histogram!(m::TICK_DURATION).record(started.elapsed().as_secs_f64());
        }
        let waiting: usize = self.running.iter().filter(|r| r.is_prefill()).map(Running::remaining).sum();
        if self.published_waiting != Some(waiting) {
            // Only on a change: a decoding tick pays no metric call for it.
            gauge!(m::PROMPT_ROWS_WAITING, "worker" => self.worker.to_string()).set(waiting as f64);
            self.published_waiting = Some(waiting);
        }
        Ok(advanced)
    }

    /// Advances the sequences whose readers have room for this tick's events (the others wait,
    /// holding their state, so that no channel overflows): one prelude pass, one core-step pass
    /// and the coda passes, each over at most `max_tick_rows` rows, decoding rows first, then
    /// prompts in arrival order.
    fn step_all(&mut self) -> Result<bool> {
        let mut order: Vec<usize> =
            (0..self.running.len()).filter(|&i| self.running[i].job().can_take_a_tick()).collect();
        if order.is_empty() {
            return Ok(false);
        }
        // Stable: arrival order within decoders and within prompts.
        order.sort_by_key(|&i| self.running[i].is_prefill());
        self.run_preludes(&order)?;
        let stepped = self.run_core_step(&order)?;

        // Criteria that read the distribution need the coda at every checked step.
        let checking: Vec<usize> = stepped.iter().copied().filter(|&i| self.running[i].checks_exit()).collect();
        let wants_logits: Vec<usize> =
            checking.iter().copied().filter(|&i| self.running[i].exit_needs_logits()).collect();
        self.exit_check_logits(&wants_logits)?;
        for &i in &stepped {
            let r = &mut self.running[i];
            let converged = match checking.contains(&i).then(|| r.check_exit(&self.model)) {
                None => false,
                Some(Ok(converged)) => converged,
                Some(Err(fault)) => {
                    self.fail_sequence(i, fault);
                    continue;
                }
            };
            if r.chunk_done(converged)
                && let Err(fault) = r.start_coda(converged)
            {
                self.fail_sequence(i, fault);
            }
        }

        for i in self.run_codas(&order)? {
            if self.running[i].is_prefill() {
                self.prefill_done(i);
            }
            self.settle(i);
        }
        Ok(true)
    }

    /// Rows of this pass for each sequence of `order` in `stage` (index, rows), as far as the
    /// budget goes: decoding tokens (first in `order`) take their row, then the chunks of many
    /// rows share what is left (see [`prompt_shares`]): verifications and parallel windows
    /// first, then the prompts. The sequences of requests without elastic depth are planned
    /// first, as if the elastic ones were not there; the elastic ones share what is left.
    fn plan(&self, order: &[usize], stage: Stage) -> Plan {
        let mut left = if self.limits.max_tick_rows == 0 { usize::MAX } else { self.limits.max_tick_rows };
        let mut plan = Vec::new();
        for elastic in [false, true] {
            let mut prompts = Vec::new();
            for &i in order {
                let r = &self.running[i];
                if r.is_elastic() != elastic || r.is_finished() || r.stage() != stage || r.remaining() == 0 {
                    continue;
                }
                if r.is_prefill() || r.positions().1 > 1 {
                    prompts.push((i, r.remaining()));
                } else if left > 0 {
                    let rows = r.remaining().min(left);
                    plan.push((i, rows));
                    left -= rows;
                }
            }
            let shares = prompt_shares(&prompts, left);
            left -= shares.iter().map(|&(_, rows)| rows).sum::<usize>();
            plan.extend(shares);
        }
        plan.sort_unstable();
        plan
    }

    /// The pieces of the prelude this tick, in one call.
    fn run_preludes(&mut self, order: &[usize]) -> Result<()> {
        let plan = self.plan(order, Stage::Prelude);
        if plan.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::new();
        let mut chunks = Vec::with_capacity(plan.len());
        for (r, rows) in planned(&mut self.running, &plan) {
            let (piece, chunk) = r.prelude_piece(rows);
            ids.extend_from_slice(piece);
            chunks.push(chunk);
        }
        let injection = self.model.prelude(&ids, &mut chunks)?;
        drop(chunks);
        let mut row = 0;
        for &(i, rows) in &plan {
            if let Err(fault) = self.running[i].prelude_done(injection.narrow(0, row, rows)?, &self.model) {
                self.fail_sequence(i, fault);
            }
            row += rows;
        }
        Ok(())
    }

    /// The pieces of core steps this tick, in one call; returns the sequences whose step now
    /// covers their chunk.
    fn run_core_step(&mut self, order: &[usize]) -> Result<Vec<usize>> {
        let plan = self.plan(order, Stage::Core);
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let (mut states, mut injections, mut chunks) = (Vec::new(), Vec::new(), Vec::with_capacity(plan.len()));
        for (r, rows) in planned(&mut self.running, &plan) {
            let (state, injection, chunk) = r.core_piece(rows)?;
            states.push(state);
            injections.push(injection);
            chunks.push(chunk);
        }
        let next = self.model.core_step(&cat(states.iter())?, &cat(injections.iter())?, &mut chunks)?;
        drop(chunks);
        let mut stepped = Vec::new();
        let mut row = 0;
        for &(i, rows) in &plan {
            match self.running[i].core_done(next.narrow(0, row, rows)?) {
                Ok(true) => stepped.push(i),
                Ok(false) => {}
                Err(fault) => self.fail_sequence(i, fault),
            }
            row += rows;
        }
        counter!(m::CORE_STEPS, "worker" => self.worker.to_string()).increment(stepped.len() as u64);
        histogram!(m::BATCH_SEQUENCES).record(plan.len() as f64);
        histogram!(m::TICK_ROWS).record(plan.iter().map(|&(_, rows)| rows).sum::<usize>() as f64);
        Ok(stepped)
    }

    /// Coda + head for the exit checks of `indices` (decoding tokens, one row each): their logits.
    fn exit_check_logits(&mut self, indices: &[usize]) -> Result<()> {
        if indices.is_empty() {
            return Ok(());
        }
        let plan: Vec<(usize, usize)> = indices.iter().map(|&i| (i, self.running[i].positions().1)).collect();
        let logits = self.coda_pass(&plan)?;
        for (&i, row) in indices.iter().zip(logits) {
            self.running[i].set_logits(row);
        }
        Ok(())
    }

    /// The coda pieces this tick; returns the sequences whose coda now covers their chunk (their
    /// logits set, ready to sample).
    fn run_codas(&mut self, order: &[usize]) -> Result<Vec<usize>> {
        let mut complete: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| !self.running[i].is_finished() && self.running[i].coda_from_exit_check())
            .collect();
        let plan = self.plan(order, Stage::Coda);
        let (all_rows, last_rows): (Plan, Plan) =
            plan.into_iter().partition(|&(i, _)| self.running[i].reports_every_row());
        for (i, rows) in all_rows {
            let r = &mut self.running[i];
            let (state, chunk) = r.coda_piece(rows)?;
            let logits = self.model.coda(&state, &mut [chunk], LogitRows::All)?.to_vec2::<f32>()?;
            if r.coda_done(rows, logits) {
                complete.push(i);
            }
        }
        let logits = self.coda_pass(&last_rows)?;
        for (&(i, rows), row) in last_rows.iter().zip(logits) {
            if self.running[i].coda_done(rows, vec![row]) {
                complete.push(i);
            }
        }
        complete.sort_unstable();
        Ok(complete)
    }

    /// One coda call over the next pieces of `plan` (index, rows; in index order): the logits of
    /// each piece's last row.
    fn coda_pass(&mut self, plan: &[(usize, usize)]) -> Result<Vec<Vec<f32>>> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let (mut states, mut chunks) = (Vec::new(), Vec::with_capacity(plan.len()));
        for (r, rows) in planned(&mut self.running, plan) {
            let (state, chunk) = r.coda_piece(rows)?;
            states.push(state);
            chunks.push(chunk);
        }
        Ok(self.model.coda(&cat(states.iter())?, &mut chunks, LogitRows::Last)?.to_vec2::<f32>()?)
    }

    /// Settles sequence `i`'s chunk (its coda done): its decoder emits, drafts or freezes, and
    /// the sequence goes on to its next chunk or finishes.
    fn settle(&mut self, i: usize) {
        let limit = self.model.config().block_size;
        match self.running[i].settle(&self.tokenizer, limit) {
            Ok(AfterToken::Finishes(reason)) => self.finish(i, reason),
            Ok(AfterToken::Continues | AfterToken::Dropped) => {}
            Err(fault) => self.fail_sequence(i, fault),
        }
    }

    /// Sequence `i` failed on its own: its job ends with an error (its other choices leave at
    /// the end of the tick) and every other job goes on.
    fn fail_sequence(&mut self, i: usize, fault: SequenceFault) {
        tracing::error!(worker = %self.worker, choice = self.running[i].choice(), %fault, "a sequence failed; its job ends");
        counter!(m::SEQUENCE_FAULTS, "worker" => self.worker.to_string()).increment(1);
        self.release(i);
        self.running[i].fail(EngineFailure::Sequence(fault.to_string()));
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
            r.fail(EngineFailure::Worker(message.to_string()));
        }
        self.running.clear();
    }
}

/// The sequences of `plan` (index, rows; in index order) with their rows, borrowed together.
/// The rows of the waiting prompts (`(index, rows left)`, in arrival order) out of `left`: an
/// equal share each, a prompt that needs less than its share leaving the rest to the others,
/// what does not divide evenly going to the earliest. Every prompt gets a row while the budget
/// holds one per prompt (`engine.max_tick_rows` is at least the number of sequences), so a late
/// short prompt is never held back for whole prefills of the prompts before it.
fn prompt_shares(prompts: &[(usize, usize)], mut left: usize) -> Vec<(usize, usize)> {
    let mut given = vec![0usize; prompts.len()];
    loop {
        let wanting = prompts.iter().zip(&given).filter(|&(&(_, need), &got)| got < need).count();
        if wanting == 0 || left == 0 {
            break;
        }
        let share = (left / wanting).max(1);
        for (&(_, need), got) in prompts.iter().zip(&mut given) {
            let more = (need - *got).min(share).min(left);
            *got += more;
            left -= more;
        }
    }
    prompts.iter().zip(given).filter(|&(_, got)| got > 0).map(|(&(i, _), got)| (i, got)).collect()
}

fn planned<'a>(
    running: &'a mut [Running],
    plan: &'a [(usize, usize)],
) -> impl Iterator<Item = (&'a mut Running, usize)> {
    let mut next = plan.iter().peekable();
    running.iter_mut().enumerate().filter_map(move |(i, r)| match next.peek() {
        Some(&&(j, rows)) if j == i => {
            next.next();
            Some((r, rows))
        }
        _ => None,
    })
}

#[path = "scheduler_depth.rs"]
mod depth;
#[path = "scheduler_prefill.rs"]
mod prefill;

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
