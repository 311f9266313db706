//! Sequential decoding: each chunk is one token (the first is the prompt), iterated up to
//! `num_steps` (or its exit criterion), its token sampled from the coda's last row.

use super::{AfterToken, Decoder, Sequence, SequenceFault, TextTokenizer};
use crate::engine::sequence::Emitted;
use crate::generate::FinishReason;

pub struct Sequential;

impl Decoder for Sequential {
    fn settle(
        &mut self,
        seq: &mut Sequence,
        tokenizer: &TextTokenizer,
        limit: usize,
    ) -> Result<AfterToken, SequenceFault> {
        emit_sampled(seq, tokenizer, limit, Sequence::start_next_token)
    }
}

/// Samples the chunk's token from its last row's logits and emits it; when the choice goes on,
/// `next` sets up its next chunk. Every strategy emits its plain tokens (a prompt's first token,
/// a token no speculative round fits) through this.
pub(super) fn emit_sampled(
    seq: &mut Sequence,
    tokenizer: &TextTokenizer,
    limit: usize,
    next: impl FnOnce(&mut Sequence),
) -> Result<AfterToken, SequenceFault> {
    let exit = seq.exit_reason();
    let steps = seq.chunk.step;
    seq.count_shed(exit, steps);
    if seq.prefill && seq.spec().params.continuous_compute() {
        seq.chunk.state = seq.chunk.state.narrow(0, seq.chunk.len - 1, 1)?;
    }
    if seq.spec().params.max_tokens == 0 {
        // Prompt log-probabilities (or logits) only.
        return Ok(AfterToken::Finishes(FinishReason::Length));
    }
    let raw = seq.take_logits()?;
    let raw = seq.constrained(raw)?;
    let mut logits = raw.clone();
    let token = seq.sampler.sample(&mut logits, &seq.context);
    seq.constrain_to(token)?;
    Ok(match seq.push_token(tokenizer, Emitted { token, raw: &raw, steps, exit, more: false }, limit)? {
        Some(after) => after,
        None => {
            next(seq);
            AfterToken::Continues
        }
    })
}
