//! Decoding strategies: what each chunk of a sequence is for and what its coda's logits become.
//!
//! The scheduler drives every sequence through the same stages (prelude, core steps, coda) and
//! never asks which strategy it runs. A strategy answers, through [`Decoder`], what the scheduler
//! and the sequence need: the cap of the chunk about to iterate, how its core steps start, which
//! cache slots they use, whether it may exit early, whether every coda row is read, and what
//! happens when its coda is done (`settle`: emit, draft, accept, freeze, cut the cache back and set
//! up the next chunk). Tentative tokens (drafts, guesses) go through [`Sequence::propose`] and
//! [`Sequence::withdraw_proposals`], so that penalties see them the same way in every strategy.
//! Adding a strategy is one file here implementing [`Decoder`], one arm in [`for_job`] and its
//! parameters in `generate::Decoding` (docs/DESIGN.md, "Adding a decoding strategy").

mod parallel;
mod sequential;
mod speculative;

use super::fault::SequenceFault;
use super::job::{DraftCounts, JobSpec, StrategyCounts, WaveCounts};
use super::sequence::{AfterToken, Sequence};
use crate::generate::Decoding;
use crate::model::HuginnModel;
use crate::text::TextTokenizer;

pub use parallel::Parallel;
pub use sequential::Sequential;
pub use speculative::Speculative;

/// One decoding strategy's state and rules for one sequence.
pub trait Decoder: Send {
    /// The recurrence cap of the chunk about to iterate (before the step budget): `num_steps`,
    /// lowered for a generated token of an elastic sequence under load.
    fn num_steps(&self, seq: &Sequence) -> usize {
        seq.token_cap()
    }

    /// Whether the chunk (not a prompt: a prompt never exits early) may stop at its exit criterion.
    fn may_exit(&self) -> bool {
        true
    }

    /// The chunk's prelude covers it: its core steps begin (initial state, exit tracker, cap).
    fn begin_core(&mut self, seq: &mut Sequence, model: &HuginnModel) -> Result<(), SequenceFault> {
        let may_exit = !seq.prefill && self.may_exit();
        seq.begin_core(self.num_steps(seq), may_exit, model)?;
        Ok(())
    }

    /// Added to a core step's index to pick its cache slot.
    fn slot_offset(&self, _seq: &Sequence) -> usize {
        0
    }

    /// Core steps a completed step of the chunk costs the budget (one per row for a window whose
    /// rows are tokens each, one for a prompt or a verification).
    fn step_cost(&self, _seq: &Sequence) -> usize {
        1
    }

    /// Whether the settle reads every row of the chunk's coda (besides a prompt reporting them).
    fn reads_every_row(&self) -> bool {
        false
    }

    /// The chunk's coda is done (its logits in the sequence): what the strategy does with them.
    /// `limit` is the context length.
    fn settle(
        &mut self,
        seq: &mut Sequence,
        tokenizer: &TextTokenizer,
        limit: usize,
    ) -> Result<AfterToken, SequenceFault>;

    /// What the strategy did, reported when the choice ends.
    fn counts(&self) -> StrategyCounts {
        StrategyCounts::Sequential
    }
}

/// The strategy `spec` asks for.
pub fn for_job(spec: &JobSpec) -> Box<dyn Decoder> {
    match spec.params.decoding {
        Decoding::Sequential { .. } => Box::new(Sequential),
        Decoding::Speculative(s) => Box::new(Speculative::new(s)),
        Decoding::Parallel(p) => Box::new(Parallel::new(p)),
    }
}
