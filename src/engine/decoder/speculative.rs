//! Self-speculative decoding (docs/DESIGN.md, "Self-speculative decoding").
//!
//! A round starts from the last emitted token `t` at position `b`, whose K/V is not yet written.
//! It drafts up to `K` tokens one by one, each a chunk of one row at `draft_steps` steps (the
//! request's exit rule applies, capped there): `t` at `b` gives the first draft, the first draft at
//! `b + 1` the second, and so on. Then the cache is cut back to `b` (the drafts' K/V is discarded)
//! and one verification chunk of `K + 1` rows, `t` and the drafts at positions `b..=b + K`, runs
//! `num_steps` steps like a prompt: fresh initial state, no exit, logits for every row. Row `i`
//! is the verifier's distribution after `t` and the first `i` drafts; the longest prefix of drafts
//! it accepts is emitted, then its own token after that prefix (the correction, or a bonus when
//! every draft stood), so a round yields 1 to `K + 1` tokens. The cache is cut back to the
//! accepted positions: what remains is exactly the verified K/V of the accepted tokens.

use metrics::{counter, histogram};

use super::sequential::emit_sampled;
use super::{AfterToken, Decoder, DraftCounts, Sequence, SequenceFault, StrategyCounts, TextTokenizer};
use crate::engine::job::ExitReason;
use crate::engine::sequence::Emitted;
use crate::generate::Speculation;
use crate::generate::speculative::{Verdict, verify};
use crate::metrics as m;

pub struct Speculative {
    params: Speculation,
    round: Round,
    counts: DraftCounts,
}

/// Where the sequence is in its rounds.
enum Round {
    /// An ordinary token (the prompt, or a token no round fits).
    Plain,
    /// Drafting: the drafts so far are the sequence's proposals.
    Drafting(Drafts),
    /// Verifying the drafts (the chunk).
    Verifying(Drafts),
}

/// A round under way.
struct Drafts {
    /// Position of the round's first token (emitted, its K/V not yet written).
    base: usize,
    /// Drafts this round aims for.
    target: usize,
    /// The distribution each draft was drawn from.
    distributions: Vec<Vec<(u32, f64)>>,
    /// Drafts the output's constraint took (rolled back before the verification is weighed).
    constrained: usize,
    steps_at_start: usize,
}

impl Speculative {
    pub fn new(params: Speculation) -> Self {
        Self { params, round: Round::Plain, counts: DraftCounts::default() }
    }

    /// Sets up the chunk of the token just emitted: a draft when a round fits, else a plain token.
    fn next_chunk(&mut self, seq: &mut Sequence, limit: usize) {
        seq.start_next_token();
        let base = seq.chunk.start;
        self.round = match self.round_size(seq, base, limit) {
            Some(target) => Round::Drafting(Drafts {
                base,
                target,
                distributions: Vec::with_capacity(target),
                constrained: 0,
                steps_at_start: seq.steps_spent,
            }),
            None => Round::Plain,
        };
    }

    /// Drafts the next round may make from `position`: `draft_tokens`, fewer when the tokens left
    /// (`max_tokens`), the context or the step budget allow fewer; `None` when not even one
    /// draft fits (then a plain token follows).
    fn round_size(&self, seq: &Sequence, position: usize, limit: usize) -> Option<usize> {
        let params = &seq.spec().params;
        // A round emits at most `drafts + 1` tokens and covers positions up to `position + drafts`.
        let mut drafts = self
            .params
            .draft_tokens
            .min(params.max_tokens.saturating_sub(seq.generated + 1))
            .min(limit.saturating_sub(position + 1));
        if let Some(left) = seq.budget_left() {
            drafts = drafts.min(left.saturating_sub(params.num_steps) / self.params.draft_steps);
        }
        (drafts > 0).then_some(drafts)
    }

    /// A draft's coda is done: draws the draft and goes on to the next one, or, with the round's
    /// drafts made (or a stop token drafted), to the verification.
    fn take_draft(&mut self, seq: &mut Sequence, mut round: Drafts) -> Result<AfterToken, SequenceFault> {
        // A constrained draft is drawn from the masked draft distribution, and the constraint
        // takes it (to be rolled back before the verification).
        let logits = seq.take_logits()?;
        let mut logits = seq.constrained(logits)?;
        let distribution = seq.sampler.distribution(&mut logits, &seq.context);
        let draft = seq.sampler.draw(&distribution);
        if seq.constrain_to(draft)? {
            round.constrained += 1;
        }
        seq.propose(draft);
        round.distributions.push(distribution);
        let stop = seq.spec().params.stop_token_ids.contains(&draft) || seq.constraint_complete();
        if round.distributions.len() < round.target && !stop {
            seq.start_chunk(seq.context.len() - 1, 1);
            self.round = Round::Drafting(round);
        } else {
            seq.cache.truncate(round.base);
            seq.start_chunk(round.base, round.distributions.len() + 1);
            self.round = Round::Verifying(round);
        }
        Ok(AfterToken::Continues)
    }

    /// The verification's coda is done: accepts the longest prefix of drafts the verifier agrees
    /// with, adds the verifier's own next token, and emits them (each with its share of the
    /// round's core steps); then the next chunk.
    fn settle_round(
        &mut self,
        seq: &mut Sequence,
        round: Drafts,
        tokenizer: &TextTokenizer,
        limit: usize,
    ) -> Result<AfterToken, SequenceFault> {
        let raw_rows = std::mem::take(&mut seq.chunk.coda_rows);
        // Row `i` is verified with the context and penalty counts after `t` and the drafts before
        // `i`: the drafts are withdrawn, then proposed again as they are accepted. Under a
        // constraint, the drafts it took are rolled back and row `i` is masked in the state after
        // the accepted drafts before it.
        let drafts = seq.withdraw_proposals();
        seq.unconstrain(round.constrained)?;
        let mut tokens = Vec::with_capacity(drafts.len() + 1);
        // The verifier's own token (a correction or the bonus), when the round ends with one.
        let mut own = None;
        let mut rows = Vec::with_capacity(raw_rows.len());
        for (i, row) in raw_rows.into_iter().enumerate() {
            let row = seq.constrained(row)?;
            let mut logits = row.clone();
            let verifier = seq.sampler.distribution(&mut logits, &seq.context);
            rows.push(row);
            let Some(&draft) = drafts.get(i) else {
                // Every draft stood: the verifier's bonus token.
                own = Some(seq.sampler.draw(&verifier));
                break;
            };
            if let Verdict::Replace(token) = verify(&mut seq.sampler, &verifier, &round.distributions[i], draft) {
                own = Some(token);
                break;
            }
            tokens.push(draft);
            seq.propose(draft);
            seq.constrain_to(draft)?;
            if seq.constraint_complete() {
                break;
            }
        }
        // The verifier's own token follows the accepted drafts, and joins the constraint too.
        if let Some(token) = own {
            tokens.push(token);
            seq.constrain_to(token)?;
        }
        // Taken back: emitting the tokens records them.
        let accepted = seq.withdraw_proposals().len();
        // A stop token ends the choice: nothing after it is emitted or charged.
        if let Some(stop) = tokens.iter().position(|t| seq.spec().params.stop_token_ids.contains(t)) {
            tokens.truncate(stop + 1);
        }
        let kept = tokens.len();
        if kept == 0 {
            return Err(SequenceFault::Invariant("a verification without logits"));
        }
        let accepted = accepted.min(kept);
        self.counts.drafted += drafts.len();
        self.counts.accepted += accepted;
        counter!(m::DRAFT_TOKENS).increment(drafts.len() as u64);
        counter!(m::DRAFT_TOKENS_ACCEPTED).increment(accepted as u64);
        histogram!(m::TOKENS_PER_ROUND).record(kept as f64);

        let spent = seq.steps_spent - round.steps_at_start;
        for (i, (&token, row)) in tokens.iter().zip(&rows).enumerate() {
            let steps = spent / kept + usize::from(i < spent % kept);
            let emitted = Emitted { token, raw: row, steps, exit: ExitReason::Cap, more: i + 1 < kept };
            if let Some(after) = seq.push_token(tokenizer, emitted, limit)? {
                return Ok(after);
            }
        }
        self.next_chunk(seq, limit);
        Ok(AfterToken::Continues)
    }
}

impl Decoder for Speculative {
    fn num_steps(&self, seq: &Sequence) -> usize {
        match self.round {
            Round::Drafting(_) => self.params.draft_steps,
            _ => seq.spec().params.num_steps,
        }
    }

    /// A verification runs every row to its cap, like a prompt.
    fn may_exit(&self) -> bool {
        !matches!(self.round, Round::Verifying(_))
    }

    fn reads_every_row(&self) -> bool {
        matches!(self.round, Round::Verifying(_))
    }

    fn settle(
        &mut self,
        seq: &mut Sequence,
        tokenizer: &TextTokenizer,
        limit: usize,
    ) -> Result<AfterToken, SequenceFault> {
        match std::mem::replace(&mut self.round, Round::Plain) {
            Round::Plain => emit_sampled(seq, tokenizer, limit, |seq| self.next_chunk(seq, limit)),
            Round::Drafting(round) => self.take_draft(seq, round),
            Round::Verifying(round) => self.settle_round(seq, round, tokenizer, limit),
        }
    }

    fn counts(&self) -> StrategyCounts {
        StrategyCounts::Speculative(self.counts)
    }
}
