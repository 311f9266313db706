//! Emitting tokens, and self-speculative decoding inside the token loop (docs/DESIGN.md, "Self-speculative decoding").
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

use super::*;
use crate::generate::speculative::{Verdict, verify};

/// What the current chunk is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// An ordinary token (or the prompt).
    Token,
    /// A draft of a speculative round.
    Draft,
    /// The verification of a round's drafts.
    Verify,
    /// A sampler step of the parallel sampler's window.
    Parallel,
}

/// A speculative round under way.
pub(super) struct Round {
    /// Position of the round's first token (emitted, its K/V not yet written).
    base: usize,
    /// Drafts this round aims for.
    target: usize,
    drafts: Vec<u32>,
    /// The distribution each draft was drawn from.
    draft_distributions: Vec<Vec<(u32, f64)>>,
    steps_at_start: usize,
}

/// One token to emit: the logits that produced it (`raw`), after `steps` steps, why they stopped,
/// and whether more tokens of the same step follow.
pub(super) struct Emitted<'a> {
    pub token: u32,
    pub raw: &'a [f32],
    pub steps: usize,
    pub exit: ExitReason,
    pub more: bool,
}

impl Running {
    /// Records and sends one generated token: `None` when the choice goes on, else how it ended.
    pub(super) fn push_token(
        &mut self,
        tokenizer: &TextTokenizer,
        emitted: Emitted<'_>,
        limit: usize,
    ) -> crate::model::Result<Option<AfterToken>> {
        let Emitted { token, raw, steps, exit, more } = emitted;
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
            Some(last) => histogram!(m::INTER_TOKEN_LATENCY).record((now - last).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        let piece = self.text.push(tokenizer, token)?;
        let logprobs = self.spec().logprobs.map(|top| token_logprobs(raw, token, top));
        let reason = self.finish_reason_after(token, piece.stopped, limit);
        let event = Event::Token { choice: self.choice, id: token, text: piece.text, steps, exit, logprobs, more };
        Ok(match (self.send(event), reason) {
            (_, Some(reason)) => Some(AfterToken::Finishes(reason)),
            (true, None) => None,
            (false, None) => Some(AfterToken::Dropped),
        })
    }

    /// Sets up the chunk of the token just emitted (the last of the context): a draft when a
    /// speculative round fits, else an ordinary token. The cache is cut back to that token's
    /// position, dropping a finished round's unaccepted positions.
    pub(super) fn next_chunk(&mut self, limit: usize) {
        let position = self.context.len() - 1;
        self.cache.truncate(position);
        (self.start, self.len) = (position, 1);
        (self.stage, self.done) = (Stage::Prelude, 0);
        if self.spec().params.parallel.is_some() {
            self.wave = Some(Wavefront::new(position));
            self.phase = Phase::Parallel;
            return;
        }
        self.phase = match self.round_size(position, limit) {
            Some(target) => {
                let steps_at_start = self.steps_spent;
                let (drafts, draft_distributions) = (Vec::with_capacity(target), Vec::with_capacity(target));
                self.round = Some(Round { base: position, target, drafts, draft_distributions, steps_at_start });
                Phase::Draft
            }
            None => Phase::Token,
        };
    }

    /// Drafts the next round may make from `position`: `draft_tokens`, fewer when the tokens left
    /// (`max_tokens`), the context or the step budget allow fewer; `None` when not speculating
    /// or when not even one draft fits (then an ordinary token follows).
    fn round_size(&self, position: usize, limit: usize) -> Option<usize> {
        let spec = self.spec();
        let speculation = spec.params.speculation?;
        // A round emits at most `drafts + 1` tokens and covers positions up to `position + drafts`.
        let mut drafts = speculation
            .draft_tokens
            .min(spec.params.max_tokens.saturating_sub(self.generated + 1))
            .min(limit.saturating_sub(position + 1));
        if let Some(budget) = spec.max_total_steps {
            let left = budget.saturating_sub(self.steps_spent);
            drafts = drafts.min(left.saturating_sub(spec.params.num_steps) / speculation.draft_steps);
        }
        (drafts > 0).then_some(drafts)
    }

    /// A draft's coda is done: draws the draft from its distribution and goes on to the next
    /// draft, or, with the round's drafts made (or a stop token drafted), to the verification.
    pub(super) fn take_draft(&mut self) -> crate::model::Result<AfterToken> {
        let mut logits = self.logits.take().unwrap_or_default();
        let distribution = self.sampler.distribution(&mut logits, &self.context);
        let draft = self.sampler.draw(&distribution);
        let Some(round) = self.round.as_mut() else {
            return Err(crate::model::ModelError::InvalidArgument("a draft outside a speculative round".into()));
        };
        // Recorded so that the next draft's penalties see it; taken back before verification.
        self.sampler.record(draft);
        self.context.push(draft);
        round.drafts.push(draft);
        round.draft_distributions.push(distribution);
        let stop = self.shared.spec.params.stop_token_ids.contains(&draft);
        if round.drafts.len() < round.target && !stop {
            (self.start, self.len) = (self.context.len() - 1, 1);
        } else {
            self.cache.truncate(round.base);
            (self.start, self.len) = (round.base, round.drafts.len() + 1);
            self.phase = Phase::Verify;
        }
        (self.stage, self.done) = (Stage::Prelude, 0);
        Ok(AfterToken::Continues)
    }

    /// The verification's coda is done: accepts the longest prefix of drafts the verifier agrees
    /// with, adds the verifier's own next token, and emits them (each with its share of the
    /// round's core steps); then the next chunk.
    pub(super) fn settle_round(&mut self, tokenizer: &TextTokenizer, limit: usize) -> crate::model::Result<AfterToken> {
        let Some(round) = self.round.take() else {
            return Err(crate::model::ModelError::InvalidArgument("a verification outside a speculative round".into()));
        };
        let rows = std::mem::take(&mut self.coda_rows);
        // Row `i` is verified with the context and penalty counts after `t` and the drafts before
        // `i`: the context still holds the drafts, the counts are rebuilt as drafts are accepted.
        for &draft in &round.drafts {
            self.sampler.forget(draft);
        }
        let mut tokens = Vec::with_capacity(round.drafts.len() + 1);
        let mut accepted = 0;
        for (i, row) in rows.iter().enumerate() {
            let mut logits = row.clone();
            let verifier = self.sampler.distribution(&mut logits, &self.context[..round.base + 1 + i]);
            let Some(&draft) = round.drafts.get(i) else {
                // Every draft stood: the verifier's bonus token.
                tokens.push(self.sampler.draw(&verifier));
                break;
            };
            if let Verdict::Replace(token) = verify(&mut self.sampler, &verifier, &round.draft_distributions[i], draft)
            {
                tokens.push(token);
                break;
            }
            accepted += 1;
            tokens.push(draft);
            self.sampler.record(draft);
        }
        // Taken back: emitting the tokens records them.
        for &draft in &tokens[..accepted] {
            self.sampler.forget(draft);
        }
        self.context.truncate(round.base + 1);
        // A stop token ends the choice: nothing after it is emitted or charged.
        if let Some(stop) = tokens.iter().position(|t| self.shared.spec.params.stop_token_ids.contains(t)) {
            tokens.truncate(stop + 1);
        }
        let kept = tokens.len();
        if kept == 0 {
            return Err(crate::model::ModelError::InvalidArgument("a verification without logits".into()));
        }
        let accepted = accepted.min(kept);
        self.drafts.drafted += round.drafts.len();
        self.drafts.accepted += accepted;
        counter!(m::DRAFT_TOKENS).increment(round.drafts.len() as u64);
        counter!(m::DRAFT_TOKENS_ACCEPTED).increment(accepted as u64);
        histogram!(m::TOKENS_PER_ROUND).record(kept as f64);

        let spent = self.steps_spent - round.steps_at_start;
        for (i, (&token, row)) in tokens.iter().zip(&rows).enumerate() {
            let steps = spent / kept + usize::from(i < spent % kept);
            let emitted = Emitted { token, raw: row, steps, exit: ExitReason::Cap, more: i + 1 < kept };
            if let Some(after) = self.push_token(tokenizer, emitted, limit)? {
                return Ok(after);
            }
        }
        self.next_chunk(limit);
        Ok(AfterToken::Continues)
    }
}
