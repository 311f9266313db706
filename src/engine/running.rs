//! One running choice inside a worker: its [`Sequence`] (what every choice has) and its
//! [`Decoder`] (what its strategy adds). The scheduler drives it through these methods only, one
//! per transition: a piece of the prelude, of a core step or of the coda runs (`*_piece`, then
//! `*_done`), the exit is checked, the chunk settles (`settle`, which sets up the next chunk) and
//! the sequence is released.

use std::sync::Arc;

use candle_core::Tensor;
use metrics::counter;

use super::decoder::{self, Decoder};
use super::fault::SequenceFault;
use super::job::{EngineFailure, Event, Job, JobSpec};
pub(super) use super::sequence::cat;
use super::sequence::latent_vec;
pub use super::sequence::{AfterToken, PrefillStart, Sequence, Stage};
use super::shared::JobShared;
use crate::generate::FinishReason;
use crate::metrics as m;
use crate::model::{Chunk, ExitKv, HuginnModel, PrefixCapture};
use crate::text::TextTokenizer;

pub struct Running {
    seq: Sequence,
    decoder: Box<dyn Decoder>,
    /// Fails this sequence's next settle (tests of fault isolation).
    #[cfg(test)]
    pub(super) fault_at_settle: bool,
}

impl Running {
    pub fn new(shared: Arc<JobShared>, choice: usize, model: &HuginnModel) -> crate::model::Result<Self> {
        let decoder = decoder::for_job(&shared.spec);
        Ok(Self {
            seq: Sequence::new(shared, choice, model)?,
            decoder,
            #[cfg(test)]
            fault_at_settle: false,
        })
    }

    pub fn spec(&self) -> &JobSpec {
        self.seq.spec()
    }

    pub fn job(&self) -> &Job {
        self.seq.job()
    }

    /// Which choice of its job this is.
    pub fn choice(&self) -> usize {
        self.seq.choice
    }

    pub fn reserved_kv(&self) -> usize {
        self.seq.reserved_kv()
    }

    pub fn kv_bytes(&self) -> usize {
        self.seq.kv_bytes()
    }

    pub fn is_finished(&self) -> bool {
        self.seq.is_finished()
    }

    /// Still prefilling its prompt (the prompt is its chunk).
    pub fn is_prefill(&self) -> bool {
        self.seq.prefill
    }

    /// Whether `other` is a choice of the same job.
    pub fn same_job(&self, other: &JobShared) -> bool {
        std::ptr::eq(Arc::as_ptr(&self.seq.shared), other)
    }

    pub fn shared(&self) -> &Arc<JobShared> {
        &self.seq.shared
    }

    /// The prompt's prefill starts: from cached positions, recording blocks (see [`PrefillStart`]).
    pub fn begin_prefill(&mut self, start: PrefillStart) -> crate::model::Result<()> {
        self.seq.begin_prefill(start)
    }

    /// The choice waits for another choice of its job to prefill the prompt (see
    /// [`Stage::Waiting`]).
    pub fn wait(&mut self) {
        self.seq.wait();
    }

    /// The prompt's blocks recorded for the prefix cache (its prefill's coda is complete).
    pub fn take_capture(&mut self) -> Option<PrefixCapture> {
        self.seq.take_capture()
    }

    /// Bytes set aside in the prefix cache for the blocks this prefill records.
    pub fn capture_bytes(&self) -> usize {
        self.seq.capture_bytes
    }

    /// Prompt positions the prefix cache supplied.
    pub fn cached_tokens(&self) -> usize {
        self.seq.cached_tokens
    }

    /// Whether its job set an elastic floor (`min_num_steps`).
    pub fn is_elastic(&self) -> bool {
        self.seq.is_elastic()
    }

    /// Its worker's depth factor is `factor` (elastic depth): its tokens' cap from the next one.
    pub fn set_depth(&mut self, factor: f64) {
        self.seq.set_depth(factor);
    }

    /// The inter-token latencies it saw since the last call (elastic sequences only).
    pub fn take_itl(&mut self) -> impl Iterator<Item = f64> + '_ {
        self.seq.take_itl()
    }

    /// The share of an admission slot it takes (its cap over `num_steps`).
    pub fn slot_share(&self) -> f64 {
        self.seq.slot_share()
    }

    /// The depth factor at or below which it runs at its floor (`None`: not elastic).
    pub fn floor_factor(&self) -> Option<f64> {
        self.seq.floor_factor()
    }

    /// Positions of the chunk being iterated: first and count.
    pub fn positions(&self) -> (usize, usize) {
        (self.seq.chunk.start, self.seq.chunk.len)
    }

    /// Steps done on the current chunk, and its cap.
    pub fn steps(&self) -> (usize, usize) {
        (self.seq.chunk.step, self.seq.chunk.cap)
    }

    pub fn generated(&self) -> usize {
        self.seq.generated
    }

    pub fn stage(&self) -> Stage {
        self.seq.chunk.stage
    }

    /// Positions of the chunk not yet through the current stage (at the current step).
    pub fn remaining(&self) -> usize {
        self.seq.chunk.len - self.seq.chunk.done
    }

    /// The ids of the next `rows` positions of the prelude, and their chunk.
    pub fn prelude_piece(&mut self, rows: usize) -> (&[u32], Chunk<'_>) {
        let seq = &mut self.seq;
        let first = seq.chunk.start + seq.chunk.done;
        (&seq.context[first..first + rows], Chunk { cache: &mut seq.cache, start: first, len: rows, step: 0 })
    }

    /// The prelude ran over the next `injection.dim(0)` positions. When it covers the chunk, the
    /// decoder starts its core steps.
    pub fn prelude_done(&mut self, injection: Tensor, model: &HuginnModel) -> Result<(), SequenceFault> {
        let c = &mut self.seq.chunk;
        c.done += injection.dim(0)?;
        c.pieces.push(injection);
        if c.done < c.len {
            return Ok(());
        }
        c.injection = cat(std::mem::take(&mut c.pieces).iter())?;
        self.decoder.begin_core(&mut self.seq, model)
    }

    /// The state and injection rows of the next `rows` positions at the current step, and their
    /// chunk.
    pub fn core_piece(&mut self, rows: usize) -> crate::model::Result<(Tensor, Tensor, Chunk<'_>)> {
        let offset = self.decoder.slot_offset(&self.seq);
        let seq = &mut self.seq;
        let c = &seq.chunk;
        let (state, injection) = if rows == c.len {
            (c.state.clone(), c.injection.clone())
        } else {
            (c.state.narrow(0, c.done, rows)?, c.injection.narrow(0, c.done, rows)?)
        };
        let chunk = Chunk { cache: &mut seq.cache, start: c.start + c.done, len: rows, step: c.step + offset };
        Ok((state, injection, chunk))
    }

    /// The current step ran over the next `state.dim(0)` positions (`state`: their new rows).
    /// True when the step covers the chunk: the state is the new one and the step counts.
    pub fn core_done(&mut self, state: Tensor) -> Result<bool, SequenceFault> {
        let cost = self.decoder.step_cost(&self.seq);
        let c = &mut self.seq.chunk;
        c.done += state.dim(0)?;
        c.pieces.push(state);
        if c.done < c.len {
            return Ok(false);
        }
        c.state = cat(std::mem::take(&mut c.pieces).iter())?;
        c.done = 0;
        c.step += 1;
        c.logits = None;
        self.seq.steps_spent += cost;
        if let (true, Some(capture)) = (self.seq.prefill, &mut self.seq.capture) {
            self.seq.cache.record_step(capture, self.seq.chunk.step - 1)?;
        }
        Ok(true)
    }

    /// The chunk stopped iterating (`converged`: by its exit criterion): the coda follows, from
    /// the state each row exited with (rows held while their loops filled the K/V take theirs
    /// back).
    pub fn start_coda(&mut self, converged: bool) -> Result<(), SequenceFault> {
        let c = &mut self.seq.chunk;
        let held_exit = c.restore_held()?;
        (c.stage, c.done, c.converged) = (Stage::Coda, 0, converged || held_exit);
        if self.seq.prefill {
            if let Some(capture) = &mut self.seq.capture {
                capture.record_states(c.start, &c.state)?;
            }
            // Positions the cache supplied have their rows reported too: their coda runs again
            // from their cached final states (rewriting the same coda entries).
            if let Some(states) = self.seq.prefix_states.take() {
                c.state = Tensor::cat(&[&states, &c.state], 0)?;
                (c.start, c.len) = (0, c.start + c.len);
            }
        }
        Ok(())
    }

    /// The coda is already done when an exit check computed the chunk's logits this step (a
    /// decoding token's one row, its coda entries written): true then.
    pub fn coda_from_exit_check(&mut self) -> bool {
        let every_row = self.reports_every_row();
        let c = &mut self.seq.chunk;
        let ready = c.stage == Stage::Coda && c.done == 0 && c.logits.is_some() && !every_row;
        if ready {
            c.done = c.len;
        }
        ready
    }

    /// The state rows of the next `rows` positions for the coda, and their chunk.
    pub fn coda_piece(&mut self, rows: usize) -> crate::model::Result<(Tensor, Chunk<'_>)> {
        let seq = &mut self.seq;
        let c = &seq.chunk;
        let state = if rows == c.len { c.state.clone() } else { c.state.narrow(0, c.done, rows)? };
        Ok((state, Chunk { cache: &mut seq.cache, start: c.start + c.done, len: rows, step: 0 }))
    }

    /// Whether a coda piece needs every row's logits (a prompt reporting them, or a chunk whose
    /// decoder reads them all), or only its last.
    pub fn reports_every_row(&self) -> bool {
        let spec = self.seq.spec();
        self.seq.prefill && (spec.prompt_logprobs || spec.report_logits) || self.decoder.reads_every_row()
    }

    /// The coda ran over the next `rows` positions; `logits` holds every row's (when reporting
    /// every row) or the last row's. True when the coda covers the chunk: its logits are set
    /// (and a prompt's rows reported).
    pub fn coda_done(&mut self, rows: usize, logits: Vec<Vec<f32>>) -> bool {
        let every_row = self.reports_every_row();
        let c = &mut self.seq.chunk;
        c.done += rows;
        let complete = c.done >= c.len;
        if complete && self.seq.prefill {
            self.seq.cache.detach_prefix();
            if let Some(capture) = &mut self.seq.capture
                && let Err(e) = self.seq.cache.record_ends(capture)
            {
                tracing::warn!(%e, "a prompt's blocks could not be recorded for the prefix cache");
                self.seq.take_capture();
            }
        }
        let c = &mut self.seq.chunk;
        if every_row {
            c.coda_rows.extend(logits);
            if complete && self.seq.prefill {
                let rows = std::mem::take(&mut self.seq.chunk.coda_rows);
                self.seq.take_prompt_rows(rows);
            }
        } else if complete {
            c.logits = logits.into_iter().last();
        }
        complete
    }

    /// The exit rule is checked after the step just done: never on a chunk its decoder runs to
    /// the cap, nor after its exit while its loops fill the K/V. The gate is tracked on every
    /// step, prompts too (a prompt runs every loop; each row's output is its exit loop's); other
    /// criteria never check a prompt.
    pub fn checks_exit(&self) -> bool {
        let c = &self.seq.chunk;
        if self.spec().params.exit.criterion.needs_gate() {
            return self.seq.prefill || self.decoder.may_exit();
        }
        !self.seq.prefill && self.decoder.may_exit() && c.held.is_none() && c.tracker.checks_at(c.step - 1)
    }

    /// Whether the exit check needs this step's logits.
    pub fn exit_needs_logits(&self) -> bool {
        self.spec().params.exit.criterion.needs_logits()
    }

    /// Checks the exit rule on the current state (and logits, or the model's exit gate, where the
    /// criterion reads them): true when the chunk stops iterating now. With `exit_kv: fill` (and
    /// on a prompt) the rows that exit are held instead and the loops go on to the cap.
    pub fn check_exit(&mut self, model: &HuginnModel) -> Result<bool, SequenceFault> {
        let params = &self.seq.shared.spec.params;
        let (rule, fill) = (params.exit, params.exit_kv == ExitKv::Fill || self.seq.prefill);
        let c = &mut self.seq.chunk;
        let exited = if rule.criterion.needs_gate() {
            let lambdas =
                model.exit_gate(&c.state)?.ok_or(SequenceFault::Invariant("the gate criterion on a gateless model"))?;
            // The last loop is every remaining row's anyway.
            let decide = c.step < c.cap && c.tracker.checks_at(c.step - 1);
            c.gate.push(&lambdas, rule.threshold, decide)
        } else {
            let latent = if rule.criterion.needs_latent() { latent_vec(&c.state)? } else { Vec::new() };
            vec![c.tracker.check(&latent, c.logits.as_deref())?.exit]
        };
        if !exited.contains(&true) {
            return Ok(false);
        }
        if !fill && c.held.is_none() && !exited.contains(&false) {
            return Ok(true);
        }
        c.hold(&exited)?;
        Ok(false)
    }

    /// The chunk stops iterating: it converged, or reached its cap.
    pub fn chunk_done(&self, converged: bool) -> bool {
        converged || self.seq.chunk.step >= self.seq.chunk.cap
    }

    /// The logits of the chunk's last row.
    pub fn set_logits(&mut self, row: Vec<f32>) {
        self.seq.chunk.logits = Some(row);
    }

    /// The chunk's coda is done: its decoder settles it (emits, drafts, accepts, freezes) and
    /// sets up the next chunk; `limit` is the context length.
    pub fn settle(&mut self, tokenizer: &TextTokenizer, limit: usize) -> Result<AfterToken, SequenceFault> {
        #[cfg(test)]
        if std::mem::take(&mut self.fault_at_settle) {
            return Err(SequenceFault::Invariant("a fault injected by a test"));
        }
        if self.seq.chunk.converged {
            counter!(m::EARLY_EXITS, "criterion" => self.spec().params.exit.criterion.name()).increment(1);
        }
        self.decoder.settle(&mut self.seq, tokenizer, limit)
    }

    /// Frees the cache and leaves the running gauge (with the job's last choice) before the last
    /// event; returns the bytes the cache held.
    pub fn release(&mut self, model: &HuginnModel) -> usize {
        self.seq.release(model)
    }

    /// The last event, after [`Self::release`]: the rest of the text and how the choice ended.
    pub fn send_finished(&mut self, reason: FinishReason, kv_bytes: usize) {
        let text = self.seq.finish_text();
        let counts = self.decoder.counts();
        let (cached_tokens, elastic_steps_shed) = (self.seq.cached_tokens, self.seq.elastic.shed);
        let choice = self.seq.choice;
        self.seq.send(Event::Finished { choice, reason, text, kv_bytes, counts, cached_tokens, elastic_steps_shed });
    }

    /// Ends the choice's job with an error event.
    pub fn fail(&self, failure: EngineFailure) {
        self.seq.fail(failure);
    }
}
